"""Near-duplicate questions: one similarity definition for `questions draft`, `curate` and
`validate`, found in near-linear time (MinHash + locality-sensitive hashing), verified exactly.

Similarity of two questions = Jaccard similarity of their shingle sets:
- the text is the question's content: case, width, accents and punctuation folded
  (patterns.question_key), filler words dropped (English stopwords, Chinese/Japanese question
  words such as 如何/怎样/怎么), plurals singularised; a question of nothing but filler keeps all
  its words;
- spaced scripts (Latin, Cyrillic, Hangul, ...) give character 3-grams of the words with a space
  around each (so word boundaries count and word order barely does);
- unspaced scripts (Han, kana, Thai, Lao, Khmer, Myanmar) give character 2-grams of each run,
  a lone character itself: one Chinese word is two characters, so 3-grams would miss
  paraphrases of short questions.

Finding pairs: each question's shingles are hashed in numpy, `NUM_PERM` min-hashes per question
are cut into bands, and questions sharing a band are candidates; every candidate pair is then
compared exactly, so precision is exact and recall is what the bands catch (`bands()` picks
them so that a pair at the threshold is found with probability >= 99%).
bench/bench_curate_scale.py measures recall and precision on planted near-duplicates.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from validation import patterns

NUM_PERM = 64  # min-hashes per question (bench/README.md: 64 measured faster than fewer bands)
MAX_BUCKET_PAIRS = 64  # per bucket, each question meets at most this many neighbours each side
ESTIMATE_MARGIN = 0.2  # candidates estimated this far below the threshold are not verified
CHUNK = 10_000  # questions hashed at a time: ~15 arrays of 8 bytes per character (~70 MB)

_UNSPACED_RANGES = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0x20000, 0x3FFFF),  # CJK extensions B..
)
_UNSPACED_CLASS = "".join(f"{chr(a)}-{chr(b)}" for a, b in _UNSPACED_RANGES)
_UNSPACED_RUN = re.compile(f"[{_UNSPACED_CLASS}]+")
_SPACE_IN_RUN = re.compile(f"(?<=[{_UNSPACED_CLASS}]) +(?=[{_UNSPACED_CLASS}])")
# Question words and particles that carry no topic in Chinese and Japanese (longest first, so
# 怎么样 goes before 怎么). Removed only inside unspaced runs: they are CJK characters.
_CJK_FILLER = sorted((
    "如何才能", "怎样才能", "怎么才能", "如何", "怎样", "怎么样", "怎么", "为什么", "为何", "什么", "哪里", "哪儿", "哪个", "哪些",
    "是否", "能否", "可否", "能不能", "可不可以", "可以", "请问", "一下", "应该", "应当", "需要", "我们", "你们", "您", "我",
    "你", "吗", "呢", "吧", "啊", "呀", "的", "了", "どうやって", "どうすれば", "どうしたら", "なぜ", "ですか", "ますか",
    "ください", "とは", "には", "の", "を", "は", "が", "に", "で", "か",
), key=len, reverse=True)
_CJK_FILLER_RE = re.compile("|".join(map(re.escape, _CJK_FILLER)))


def content_text(question: str) -> str:
    """The text whose shingles are compared; see the module docstring."""
    key = patterns.question_key(question)
    if not key.isascii():
        key = _SPACE_IN_RUN.sub("", key)  # 备份 数据库 = 备份数据库
        spaced = _UNSPACED_RUN.sub(lambda m: f" {_CJK_FILLER_RE.sub('', m.group(0))} ", key)
    else:
        spaced = key
    # patterns.content_words on the folded text, without folding it twice.
    words = [w for w in spaced.split() if w not in patterns.STOPWORDS]
    return " ".join(w[:-1] if len(w) > 3 and w.endswith("s") else w for w in words) or key


def shingles(question: str) -> frozenset[str]:
    return frozenset(_grams(f" {content_text(question)} "))


def _grams(text: str) -> Iterable[str]:
    if text.isascii():
        return (text[i:i + 3] for i in range(len(text) - 2))
    return _mixed_grams(text)


def _mixed_grams(text: str) -> Iterable[str]:
    unspaced = [False] * len(text)
    for m in _UNSPACED_RUN.finditer(text):
        unspaced[m.start():m.end()] = [True] * (m.end() - m.start())
    n = len(text)
    for i in range(n):
        if unspaced[i]:
            if i + 1 < n and unspaced[i + 1]:
                yield text[i:i + 2]
            elif not (i > 0 and unspaced[i - 1]):
                yield text[i]
        elif i + 2 < n and not (unspaced[i + 1] or unspaced[i + 2]):
            yield text[i:i + 3]


def jaccard(x: frozenset[str], y: frozenset[str]) -> float:
    union = len(x | y)
    return len(x & y) / union if union else 1.0


def similarity(a: str, b: str) -> float:
    """The one near-duplicate measure (0..1) that the threshold in params.yaml applies to."""
    return jaccard(shingles(a), shingles(b))


# --- MinHash over numpy ------------------------------------------------------------------------

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fixed, well-spread 64-bit hash (no per-process salt)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _codepoints(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """All texts as one code point array, each as ' text ' followed by a 0 separator, and the
    start offset of each."""
    joined = "".join(f" {t} \0" for t in texts)
    cps = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    lengths = np.fromiter((len(t) + 3 for t in texts), dtype=np.int64, count=len(texts))
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    return cps, starts


def _unspaced_mask(cps: np.ndarray) -> np.ndarray:
    mask = np.zeros(cps.shape, dtype=bool)
    for lo, hi in _UNSPACED_RANGES:
        mask |= (cps >= lo) & (cps <= hi)
    return mask


def gram_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of each content text's shingles (as `_grams` defines them), flattened,
    and the row each belongs to. `texts` are content texts (content_text's output)."""
    cps, starts = _codepoints(texts)
    row_of = np.repeat(np.arange(len(texts)), np.diff(np.append(starts, len(cps))))
    u = _unspaced_mask(cps)
    z = cps == 0

    nxt = np.append(u[1:], False)
    prv = np.concatenate(([False], u[:-1]))
    nxt2 = np.append(u[2:], [False, False])
    # Windows never cross a row: each row ends " \0", and " " and "\0" are not unspaced.
    ok3 = ~u & ~nxt & ~nxt2 & ~z
    ok3[-2:] = False
    ok3[:-2] &= ~z[1:-1] & ~z[2:]
    ok2 = u & nxt
    ok1 = u & ~nxt & ~prv
    c1 = np.append(cps[1:], np.uint64(0))
    c2 = np.append(cps[2:], [np.uint64(0), np.uint64(0)])
    k = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F), np.uint64(0x165667B19E3779F9))
    base = cps * k[0]
    h3 = _mix(base ^ (c1 * k[1]) ^ (c2 * k[2]))
    h2 = _mix(base ^ (c1 * k[1]) ^ np.uint64(2))
    h1 = _mix(base ^ np.uint64(1))
    hashes = np.concatenate((h3[ok3], h2[ok2], h1[ok1]))
    rows = np.concatenate((row_of[ok3], row_of[ok2], row_of[ok1]))
    order = np.argsort(rows, kind="stable")
    return hashes[order], rows[order]


def _perm_params(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0x7E11E)  # fixed: the same questions always give the same pairs
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a, b


def minhashes(texts: Sequence[str], num_perm: int = NUM_PERM) -> np.ndarray:
    """(len(texts), num_perm) uint64 min-hashes; a text without shingles gets all-max rows
    (callers leave those out of the bands)."""
    return np.concatenate([_minhash_chunk(texts[s:s + CHUNK], num_perm)
                           for s in range(0, len(texts), CHUNK)] or
                          [np.empty((0, num_perm), dtype=np.uint64)])


def _minhash_chunk(texts: Sequence[str], num_perm: int) -> np.ndarray:
    out = np.full((len(texts), num_perm), _M64, dtype=np.uint64)
    hashes, rows = gram_hashes(texts)
    if not len(hashes):
        return out
    a, b = _perm_params(num_perm)
    present, first = np.unique(rows, return_index=True)
    tmp = np.empty_like(hashes)
    for p in range(num_perm):
        # a*x+b mod 2^64 (a odd) permutes the already well-mixed shingle hashes; a
        # _mix per permutation measured 4x slower for the same recall.
        np.multiply(hashes, a[p], out=tmp)
        np.add(tmp, b[p], out=tmp)
        out[present, p] = np.minimum.reduceat(tmp, first)
    return out


def bands(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows per band): the most rows per band (fewest false candidates) that still
    find a pair at exactly `threshold` with probability >= 0.99."""
    best = (num_perm, 1)
    for r in range(1, num_perm + 1):
        b = num_perm // r
        if 1 - (1 - threshold ** r) ** b >= 0.99:
            best = (b, r)
    return best


def band_keys(texts: Sequence[str], threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(len(texts), bands) uint64: one hash per band of each text's min-hashes, and the top
    byte of every min-hash (a 1-byte-per-hash signature to estimate similarity with). Built
    chunk by chunk, so only CHUNK rows of full min-hashes exist at a time."""
    n_bands, r = bands(threshold)
    weights = _mix(np.arange(1, r + 1, dtype=np.uint64))
    keys = np.zeros((len(texts), n_bands), dtype=np.uint64)
    small = np.zeros((len(texts), n_bands * r), dtype=np.uint8)
    for start in range(0, len(texts), CHUNK):
        sig = _minhash_chunk(texts[start:start + CHUNK], n_bands * r)
        end = start + len(sig)
        for band in range(n_bands):
            cols = sig[:, band * r:(band + 1) * r]
            keys[start:end, band] = _mix(
                (cols * weights).sum(axis=1, dtype=np.uint64) + np.uint64(band))
        small[start:end] = (sig >> np.uint64(56)).astype(np.uint8)
        keys[start + np.flatnonzero(sig[:, 0] == _M64)] = 0  # no shingles: in no band
    return keys, small


def candidate_pairs(texts: Sequence[str], threshold: float) -> np.ndarray:
    """(k, 2) index pairs i < j whose min-hashes share at least one band and whose estimated
    similarity is not far below the threshold."""
    keys_all, small = band_keys(texts, threshold)
    live = np.flatnonzero(keys_all[:, 0] != 0) if len(texts) else np.empty(0, dtype=np.int64)
    n = np.int64(len(texts))
    found = []
    for band in range(keys_all.shape[1]):
        keys = keys_all[live, band]
        order = np.argsort(keys, kind="stable")
        sk, members = keys[order], live[order]
        # Each member meets its bucket's first (lowest index) member, and its MAX_BUCKET_PAIRS
        # neighbours on either side: a bucket of thousands stays linear yet every copy is
        # compared with the question that the others are compared with.
        starts = np.flatnonzero(np.concatenate(([True], sk[1:] != sk[:-1])))
        head = members[np.repeat(starts, np.diff(np.append(starts, len(sk))))]
        far = head != members
        found.append(head[far] * n + members[far])
        for d in range(1, MAX_BUCKET_PAIRS + 1):
            same = np.flatnonzero(sk[d:] == sk[:-d])
            if not len(same):
                break
            a, b = members[same], members[same + d]
            found.append(np.minimum(a, b) * n + np.maximum(a, b))  # one int per pair: fast unique
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    codes = np.unique(np.concatenate(found))
    del found
    pairs = np.stack((codes // n, codes % n), axis=1)
    return pairs[_likely(pairs, small, threshold)]


def _likely(pairs: np.ndarray, small: np.ndarray, threshold: float) -> np.ndarray:
    """Pairs whose 1-byte min-hashes agree often enough: questions that merely share common
    words collide in some band far more often than they are near duplicates, and their number
    grows with the square of the rows (10x at 3x the rows here) while this test is numpy-fast.
    Equal bytes mean equal min-hashes, or a 1/256 chance; `ESTIMATE_MARGIN` below the threshold
    is 4 standard deviations of the estimate at 60 hashes, so a real pair is not lost."""
    keep = np.zeros(len(pairs), dtype=bool)
    chance = 1 / 256
    for start in range(0, len(pairs), 1_000_000):
        i, j = pairs[start:start + 1_000_000, 0], pairs[start:start + 1_000_000, 1]
        agree = (small[i] == small[j]).mean(axis=1)
        keep[start:start + len(i)] = (agree - chance) / (1 - chance) >= threshold - ESTIMATE_MARGIN
    return keep


@dataclass(frozen=True)
class Pair:
    i: int
    j: int  # i < j
    similarity: float


@dataclass(frozen=True)
class Pairs:
    """Near-duplicate pairs of a list of content texts. Identical texts form a group, whose
    first member (`rep`) stands for it; `pairs` are verified pairs of group firsts."""

    rep: list[int]  # per index: the first index with the same text (itself if it is first)
    pairs: list[Pair]
    probe_hits: list[tuple[int, int, float]]  # (probe, index, similarity), every group member

    def groups(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = defaultdict(list)
        for i, r in enumerate(self.rep):
            out[r].append(i)
        return out

    def expanded(self, limit: int = 10_000) -> Iterable[Pair]:
        """Every pair of indices: within a group (similarity 1.0) and across near groups, at
        most `limit` per group pair (a degenerate input of thousands of copies stays linear)."""
        groups = {r: m for r, m in self.groups().items() if len(m) > 1}
        for members in groups.values():
            yield from (Pair(members[0], k, 1.0) for k in members[1:])
        for p in self.pairs:
            left, right = groups.get(p.i, [p.i]), groups.get(p.j, [p.j])
            pairs = ((a, b) for a in left for b in right)
            for n, (a, b) in enumerate(pairs):
                if n >= limit:
                    break
                yield Pair(min(a, b), max(a, b), p.similarity)


def near_pairs(texts: Sequence[str], threshold: float, probes: Sequence[str] = ()) -> Pairs:
    """Verified pairs (Jaccard >= threshold) among content texts; identical texts are grouped
    first, so they cost nothing in the bands. `probes` (content texts too, e.g. evaluation
    prompts) go through the same bands and are paired with texts only."""
    first_of: dict[str, int] = {}
    rep = [first_of.setdefault(text, i) for i, text in enumerate(texts)]
    unique = [i for i, r in enumerate(rep) if r == i]
    distinct = [texts[i] for i in unique] + list(probes)
    nd = len(unique)
    cache: dict[int, frozenset[str]] = {}

    def grams(k: int) -> frozenset[str]:
        if k not in cache:
            cache[k] = frozenset(_grams(f" {distinct[k]} "))
        return cache[k]

    pairs, hits = [], []
    for i, j in candidate_pairs(distinct, threshold).tolist():
        if i >= nd:
            continue  # two probes
        sim = jaccard(grams(i), grams(j))
        if sim < threshold:
            continue
        if j < nd:
            pairs.append(Pair(unique[i], unique[j], sim))
        else:
            hits.append((j - nd, unique[i], sim))
    result = Pairs(rep, pairs, [])
    if hits:
        groups = result.groups()
        result.probe_hits.extend((q, k, sim) for q, r, sim in hits for k in groups[r])
    return result


@dataclass(frozen=True)
class Dedup:
    kept: list[int]  # indices into the input, in input order
    duplicate_of: dict[int, tuple[int, float]]  # removed index -> (kept index, similarity)
    family: list[int]  # per input index: the smallest index of its near-duplicate family
    probe_hits: list[tuple[int, int, float]]  # (probe index, question index, similarity)


def dedupe(questions: Sequence[str], threshold: float, probes: Sequence[str] = ()) -> Dedup:
    """Questions in precedence order (best first): each is removed when it is a near duplicate
    of an earlier kept one (the most similar is named); a copy of an earlier text goes where
    that text's first copy went. Families are the connected components of all near-duplicate
    pairs, removed questions included, so chains (A~B~C with A, C kept) stay together."""
    found = near_pairs([content_text(q) for q in questions], threshold,
                       [content_text(p) for p in probes])
    earlier: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for p in found.pairs:
        earlier[p.j].append((p.i, p.similarity))
    removed: dict[int, tuple[int, float]] = {}
    for j in sorted(set(earlier) | {i for i, r in enumerate(found.rep) if r != i}):
        r = found.rep[j]
        if r != j:
            removed[j] = removed.get(r, (r, 1.0))
            continue
        kept_before = [(i, s) for i, s in earlier[j] if i not in removed]
        if kept_before:
            removed[j] = max(kept_before, key=lambda m: (m[1], -m[0]))
    kept = [i for i in range(len(questions)) if i not in removed]
    copies = [Pair(r, i, 1.0) for i, r in enumerate(found.rep) if r != i]
    return Dedup(kept, removed, families(len(questions), [*found.pairs, *copies]),
                 found.probe_hits)


def families(n: int, pairs: Iterable[Pair]) -> list[int]:
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p in pairs:
        a, b = root(p.i), root(p.j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return [root(i) for i in range(n)]


def matches(queries: Sequence[str], questions: Sequence[str],
            threshold: float) -> list[tuple[int, int, float]]:
    """(query index, question index, similarity) for every near-duplicate pair across the two
    lists (e.g. evaluate.prompts against training questions)."""
    found = near_pairs([content_text(q) for q in questions], threshold,
                       [content_text(q) for q in queries])
    return found.probe_hits
