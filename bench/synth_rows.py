"""Synthetic curate inputs with planted near-duplicates (bench/bench_curate_scale.py).

Questions: a starter phrase + 3-7 words from a 20,000-word pseudo vocabulary (+ a topic),
5% of them Chinese (2-character words from 600 common characters, with a 如何/怎样/怎么 starter).
A known share of rows are planted near-duplicates of an earlier row: another filler starter
(How do I / How can I / 如何 / 怎样), other case, a plural, two English words swapped or one
filler word more; each plant records the row it copies.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

STARTERS = ("How do I", "How can I", "What is the best way to", "Can I", "Is it possible to",
            "Where do I", "How to", "What happens if I", "Why does", "When should I")
# Starters made of filler words only: swapping one for another keeps the question's content.
FILLER_STARTERS = ("How do I", "How can I", "Can I", "Where do I", "How to", "When should I")
ZH_STARTERS = ("如何", "怎样", "怎么", "请问如何", "我应该怎样")
_SYL = ["ka", "ri", "to", "mo", "ne", "su", "ha", "pe", "li", "ro", "da", "vi", "zo", "ul", "en", "ar", "is", "ot", "am", "ex", "pre", "con", "sub", "tra", "ver", "log", "buf", "idx", "tab", "col", "row", "seg", "wal", "sta", "gre", "mid", "lon", "pin", "qua", "nor", "dex", "fil", "mar"]
_ZH = ("数据库表索引查询备份恢复用户权限密码连接事务锁日志复制主从分区视图函数触发器约束字段类型"
       "排序分组统计性能优化内存磁盘缓存配置参数版本升级迁移导入导出文件目录网络端口服务进程线程"
       "监控告警延迟吞吐容量扩展集群节点故障切换安全加密审计清理压缩归档快照时间区域字符编码")


@dataclass(frozen=True)
class Synth:
    questions: list[str]
    planted: dict[int, int]  # row index -> index of the row it near-duplicates


def vocabulary(rng: random.Random, n: int = 20_000) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(_SYL) for _ in range(rng.randint(2, 4))))
    return sorted(words)


def _english(rng: random.Random, vocab: list[str]) -> list[str]:
    return [rng.choice(STARTERS)] + [rng.choice(vocab) for _ in range(rng.randint(3, 7))]


def _chinese(rng: random.Random) -> list[str]:
    words = ["".join(rng.choice(_ZH) for _ in range(2)) for _ in range(rng.randint(3, 5))]
    return [rng.choice(ZH_STARTERS)] + words


def render(parts: list[str]) -> str:
    if parts[0] in ZH_STARTERS:
        return "".join(parts) + "？"
    return " ".join(parts) + "?"


def paraphrase(rng: random.Random, parts: list[str]) -> list[str]:
    """A near-duplicate: a different starter plus one small edit."""
    zh = parts[0] in ZH_STARTERS
    starters = ZH_STARTERS if zh else FILLER_STARTERS
    out = parts[:]
    if parts[0] in starters:
        out[0] = rng.choice([s for s in starters if s != parts[0]])
    edit = rng.randrange(4)
    if edit == 0 and not zh:
        i = rng.randrange(1, len(out))
        out[i] = out[i] + "s"  # a plural
    elif edit == 1 and len(out) >= 6 and not zh:  # a swap in Chinese makes new bigrams
        i = rng.randrange(1, len(out) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
    elif edit == 2:
        out.insert(rng.randrange(1, len(out) + 1), "的" if zh else "the")
    elif not zh:
        out = [w.upper() if rng.random() < 0.3 else w for w in out]
    return out


def synth(n: int, dup_share: float = 0.1, seed: int = 0) -> Synth:
    rng = random.Random(seed)
    vocab = vocabulary(rng)
    parts: list[list[str]] = []
    planted: dict[int, int] = {}
    for i in range(n):
        if i > 10 and rng.random() < dup_share:
            src = rng.randrange(i)
            while src in planted:  # copy an original: families stay pairs, easy to score
                src = rng.randrange(i)
            planted[i] = src
            parts.append(paraphrase(rng, parts[src]))
        else:
            parts.append(_chinese(rng) if rng.random() < 0.05 else _english(rng, vocab))
    return Synth([render(p) for p in parts], planted)
