"""Evaluate: `tuneline evaluate --model models/base --adapters models/adapters
--test data/dataset/test.jsonl --metrics reports/eval.json --html reports/compare.html
--cache .tuneline/cache/evaluate` (the `evaluate` stage of dvc.yaml).

Scores the base model and the tuned one (base + adapter) on the held-out split:
- test loss and perplexity over the tokens training learns from (assistant turns when
  `train.mask_prompt` is on, truncated at `train.max_seq_length`), so the numbers compare with
  the validation loss in reports/train.json;
- greedy answers of both to the first `evaluate.n_samples` test questions and to
  `evaluate.prompts`, side by side in reports/compare.html and in reports/eval.json;
- optionally (`evaluate.judge.enabled`) an LLM judge (pipeline/llm/judge.py), through the
  generation backends, says which answer is better and why;
- preference accuracy and margin on the held-out pairs (`--pairs`).
A dpo/orpo run's adapters hold its SFT-only baseline in `sft/`: that side is scored too, between
base and tuned, and eval.json compares all three (`sft`, `improvement_over_sft`, `judge_vs_sft`).
The model is loaded once: the base is scored first, then the adapter is applied in place (the SFT
one, then the tuned one's weights in its place when both add the same layers). The
base model's results depend neither on the adapter nor on `train` knobs, so with `--cache` they are
kept (outside DVC outputs) and an experiment that only retrains recomputes the tuned side alone
(a dpo/orpo run's SFT baseline is kept too, per adapter: a beta sweep scores it once).
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.core import config
from pipeline.core.errors import UserError
from pipeline.llm import clients as llm
from pipeline.llm.judge import judge
from pipeline.rows.jsonl import read_jsonl, write_json, write_text
from pipeline.training import model as mlx_model
from pipeline.training import preference


class EvalError(UserError):
    """Evaluation inputs that cannot be scored, with what to do about them."""


@dataclass(frozen=True)
class JudgeConfig(llm.LLMSettings):
    """A generation backend (backend, url, model, retries...) plus what to ask it."""

    enabled: bool  # ask an LLM which answer is better (off: no server needed)
    max_tokens: int  # budget for the verdict and its reasons
    prompt: str  # template with {question}, {answer_a}, {answer_b}


@dataclass(frozen=True)
class EvalConfig:
    n_samples: int  # first N held-out test questions answered by both models
    prompts: tuple[str, ...]  # extra prompts answered by both models
    max_tokens: int  # greedy answer budget per prompt
    batch_size: int  # sequences per forward pass when scoring the test loss
    judge: JudgeConfig


@dataclass(frozen=True)
class TrainKeys:
    """The `train` keys the test loss shares with training (read with `config.load_keys`)."""

    max_seq_length: int
    mask_prompt: bool
    pack: bool | Literal["auto"]
    pack_width: int


@dataclass(frozen=True)
class LossSpec:
    """How training scores tokens; read from the `train` section so both agree."""

    max_seq_length: int
    mask_prompt: bool
    pack_width: int | None = None  # train.pack: score rows packed (same loss, fewer shapes)


@dataclass(frozen=True)
class EvalPaths:
    model: Path
    adapters: Path
    test: Path
    metrics: Path
    html: Path
    cache: Path | None = None  # keeps the base model's results between runs (not a DVC output)
    pairs: Path | None = None  # held-out preference pairs (data/dataset/preference/test.jsonl)


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: tuple[dict[str, str], ...]  # what the model sees (system + user turns)
    reference: str | None  # the dataset's answer, for held-out questions

    @property
    def question(self) -> str:
        return self.messages[-1]["content"]


@dataclass(frozen=True)
class Result:
    base_loss: float
    tuned_loss: float
    improvement: float
    answers: int
    seconds: float


def loss_spec(params: Path | str) -> LossSpec:
    """The two `train` keys the test loss must share with training."""
    t = config.load_keys(TrainKeys, "train", params)
    where = f"{params}:train"
    if t.max_seq_length < 2:
        raise config.ConfigError(f"{where}.max_seq_length must be >= 2, got {t.max_seq_length}")
    pack = t.pack
    if pack == "auto":
        from pipeline.training import packing

        pack = packing.wanted(pack)
    if pack and t.pack_width < t.max_seq_length:
        raise config.ConfigError(f"{where}.pack_width must be an integer >= max_seq_length, "
                                 f"got {t.pack_width!r}")
    return LossSpec(t.max_seq_length, t.mask_prompt, t.pack_width if pack else None)


# ---------------------------------------------------------------- inputs


def read_test(path: Path) -> list[dict[str, Any]]:
    rows = read_jsonl(path)
    if not rows:
        raise EvalError(f"{path}: no rows; curate needs more data or a larger test fraction")
    for lineno, row in enumerate(rows, start=1):
        roles = [m.get("role") for m in row.get("messages") or [] if isinstance(m, dict)]
        if "user" not in roles or "assistant" not in roles:
            raise EvalError(f"{path}: row {lineno} (id {row.get('id')!r}) needs `messages` with "
                            "a user and an assistant turn; run `tuneline validate` on it")
    return rows


def prompts_for(rows: Sequence[dict[str, Any]], cfg: EvalConfig) -> list[Prompt]:
    """First `n_samples` held-out questions (up to their first answer), then `cfg.prompts`."""
    out = []
    for i, row in enumerate(rows[: max(cfg.n_samples, 0)]):
        msgs = row["messages"]
        first = next(k for k, m in enumerate(msgs) if m["role"] == "assistant")
        turns = tuple({"role": m["role"], "content": m["content"]} for m in msgs[:first])
        out.append(Prompt(str(row.get("id", f"test-{i + 1}")), turns, msgs[first]["content"]))
    for i, text in enumerate(cfg.prompts):
        out.append(Prompt(f"prompt-{i + 1}", ({"role": "user", "content": text},), None))
    return out


# ---------------------------------------------------------------- test loss


def encode_rows(tokenizer: Any, rows: Sequence[dict[str, Any]],
                mask_prompt: bool) -> list[tuple[list[int], list[int]]]:
    """(tokens, 0/1 mask of the tokens training learns) per row, encoded exactly as train does."""
    return [mlx_model.encode_chat(tokenizer, r["messages"], mask_prompt) for r in rows]


def test_loss(model: Any, encoded: Sequence[tuple[list[int], list[int]]], batch_size: int,
              max_seq_length: int, loss: Callable[..., tuple[Any, Any]] | None = None,
              pack_width: int | None = None) -> tuple[float, int]:
    """Mean loss per scored token over every row (none dropped, unlike training batches).

    With `pack_width`, rows are scored packed, `batch_size` sequences of that width at a time.
    """
    import mlx.core as mx

    if pack_width:
        from pipeline.training import packing

        packing.check_model(model)
        batches = packing.batch_iterator(0, pack_width, pack_width * batch_size)(
            list(encoded), batch_size, max_seq_length)
        loss = loss or packing.packed_loss
    else:
        batches = padded_batches(encoded, batch_size, max_seq_length)
        loss = loss or mlx_model.masked_loss
    total, count = 0.0, 0
    for batch in batches:
        mean, n_tok = loss(model, *batch)
        mx.eval(mean, n_tok)
        total, count = total + mean.item() * int(n_tok.item()), count + int(n_tok.item())
    if count == 0:
        raise EvalError(f"no answer tokens left to score: every test row's prompt is longer than "
                        f"train.max_seq_length={max_seq_length}; raise it in params.yaml")
    return total / count, count


def padded_batches(encoded: Sequence[tuple[list[int], list[int]]], batch_size: int,
                   max_seq_length: int) -> Iterator[tuple[Any, Any]]:
    import mlx.core as mx
    import numpy as np

    order = sorted(encoded, key=lambda e: len(e[0]))  # similar lengths share a batch: less padding
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = min(max(len(t) for t, _ in chunk), max_seq_length)
        tokens = np.zeros((len(chunk), width), np.int32)
        mask = np.zeros((len(chunk), width), np.float32)  # padding is never scored
        for j, (t, m) in enumerate(chunk):
            n = min(len(t), width)
            tokens[j, :n], mask[j, :n] = t[:n], m[:n]
        yield mx.array(tokens), mx.array(mask)


# ---------------------------------------------------------------- answers


def batch_answers(model: Any, tokenizer: Any, prompts: Sequence[Prompt],
                  max_tokens: int) -> list[dict[str, Any]]:
    """Greedy answers to all prompts in one batch (`mlx_model.batch_greedy`)."""
    answers = mlx_model.batch_greedy(model, tokenizer, [p.messages for p in prompts], max_tokens)
    return [{"id": p.id, **a} for p, a in zip(prompts, answers)]


def side(model: Any, tokenizer: Any, encoded: Sequence[tuple[list[int], list[int]]],
         prompts: Sequence[Prompt], cfg: EvalConfig, spec: LossSpec) -> dict[str, Any]:
    """Everything measured for one model: loss, perplexity, answers."""
    loss, tokens = test_loss(model, encoded, cfg.batch_size, spec.max_seq_length,
                             pack_width=spec.pack_width)
    return {"test_loss": round(loss, 6), "test_ppl": round(math.exp(min(loss, 700.0)), 4),
            "test_tokens": tokens,
            "answers": batch_answers(model, tokenizer, prompts, cfg.max_tokens)}


def base_key(model_dir: Path, rows: Sequence[dict[str, Any]], prompts: Sequence[Prompt],
             cfg: EvalConfig, spec: LossSpec, dtype: str) -> str:
    """Everything the base model's side depends on; the adapter and `train` knobs are not."""
    import mlx.core as mx
    import mlx_lm

    blob = json.dumps({
        "model": llm.dir_digest(model_dir), "rows": [r["messages"] for r in rows],
        "prompts": [list(p.messages) for p in prompts], "max_tokens": cfg.max_tokens,
        "spec": [spec.max_seq_length, spec.mask_prompt], "dtype": dtype,
        "versions": [mx.__version__, mlx_lm.__version__],
    }, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def cached_side(cache: Path | None, key: str, compute: Callable[[], dict[str, Any]],
                ) -> dict[str, Any]:
    """The base side from `cache` when this exact evaluation ran before (e.g. the previous
    `dvc exp run` with other train params): halves the cost of every experiment."""
    path = cache / f"base-{key}.json" if cache is not None else None
    if path is not None and path.exists():
        return json.loads(path.read_text(encoding="utf-8"))  # type: ignore[no-any-return]
    result = compute()
    if path is not None:
        write_json(path, result)
    return result


# ---------------------------------------------------------------- report


def run(cfg: EvalConfig, paths: EvalPaths, *, spec: LossSpec, seed: int | None = None,
        client: llm.Client | None = None) -> Result:
    """Score base then tuned; `paths.cache` (outside DVC outputs) keeps base results between
    runs."""
    cache = paths.cache
    from pipeline.training import accel

    start = time.perf_counter()
    rows = read_test(paths.test)
    prompts = prompts_for(rows, cfg)
    if not (paths.adapters / "adapter_config.json").exists():
        raise EvalError(f"{paths.adapters}: no adapter_config.json; run `dvc repro train` first")
    model, tokenizer = mlx_model.load(paths.model)  # in the dtype train ran it
    dtype = accel.compute_dtype()
    encoded = encode_rows(tokenizer, rows, spec.mask_prompt)
    key = base_key(paths.model, rows, prompts, cfg, spec, dtype) if cache is not None else ""
    base = cached_side(cache, key, lambda: side(model, tokenizer, encoded, prompts, cfg, spec))
    held = preference_rows(paths.pairs, tokenizer)
    prefs = {"base": cached_side(cache, f"{key}-pairs-{_file_key(paths.pairs)}", lambda: (
        preference.accuracy(model, held, cfg.batch_size, spec.max_seq_length)))}
    sides, attached = {"base": base}, None
    sft_dir = paths.adapters / "sft"  # a dpo/orpo run's SFT-only baseline (train.py)
    for name in (["sft"] if (sft_dir / "adapter_config.json").exists() else []) + ["tuned"]:
        folder = sft_dir if name == "sft" else paths.adapters

        def score(folder: Path = folder) -> dict[str, Any]:
            nonlocal model, attached
            if attached is not None and not mlx_model.swap_adapters(model, attached, folder):
                model, _ = mlx_model.load(paths.model)  # other layers: a clean model
                attached = None
            if attached is None:
                mlx_model.attach_adapters(model, folder)
            attached = folder
            return {"side": side(model, tokenizer, encoded, prompts, cfg, spec),
                    "pref": preference.accuracy(model, held, cfg.batch_size,
                                                spec.max_seq_length)}

        # The SFT baseline is the same adapter across a beta sweep (train's SFT cache): its
        # scores are kept like the base's, keyed by the adapter's files and the held-out pairs.
        got = cached_side(cache, f"{key}-sft-{_adapter_key(folder)}-pairs-"
                          f"{_file_key(paths.pairs)}", score) if name == "sft" else score()
        sides[name], prefs[name] = got["side"], got["pref"]
    for name, scores in sides.items():  # beside the loss: card and gate
        scores.update(preference_accuracy=prefs[name]["accuracy"],
                      preference_margin=prefs[name]["mean_margin"])
    tuned = sides["tuned"]
    report = build_report(rows, prompts, base, tuned, sides.get("sft"))
    report["preference"] = {"pairs": len(held), "objective": _objective(paths.adapters), **prefs}
    if cfg.judge.enabled:
        # The backend named in `evaluate.judge`: a server, or a .gguf / mlx dir in-process.
        client = client if client is not None else llm.connect(cfg.judge)
        report["judge"] = judge(client, cfg.judge, prompts, base["answers"], tuned["answers"],
                                seed)
        if "sft" in sides:
            report["judge_vs_sft"] = judge(client, cfg.judge, prompts, sides["sft"]["answers"],
                                           tuned["answers"], seed, names=("sft", "tuned"))
    write_json(paths.metrics, report)
    write_text(paths.html, render_html(report, prompts))
    return Result(base["test_loss"], tuned["test_loss"], report["improvement"], len(prompts),
                  time.perf_counter() - start)


def preference_rows(path: Path | None, tokenizer: Any) -> list[Any]:
    """Held-out pairs as token rows (pipeline/training/preference.py); none if absent."""
    from pipeline.rows import pairs

    if path is None or not path.exists():
        return []
    return preference.encode_pairs(tokenizer, pairs.read(path))


def _file_key(path: Path | None) -> str:
    data = path.read_bytes() if path is not None and path.exists() else b""
    return hashlib.sha256(data).hexdigest()[:16]


def _adapter_key(folder: Path) -> str:
    return "".join(_file_key(folder / f) for f in ("adapters.safetensors", "adapter_config.json"))


def _objective(adapters: Path) -> str:
    config = json.loads((adapters / "adapter_config.json").read_text(encoding="utf-8"))
    return str(config.get("tuneline", {}).get("objective", "sft"))


def build_report(rows: Sequence[dict[str, Any]], prompts: Sequence[Prompt],
                 base: dict[str, Any], tuned: dict[str, Any],
                 sft: dict[str, Any] | None = None) -> dict[str, Any]:
    """base, tuned and the improvement; with a dpo/orpo run's SFT-only side, that side between
    them and the tuned model's improvement over it."""
    sft_part = {} if sft is None else {"sft": sft}
    over_sft = {} if sft is None else {
        "improvement_over_sft": round(sft["test_loss"] - tuned["test_loss"], 6)}
    return {
        "base": base,
        **sft_part,
        "tuned": tuned,
        "improvement": round(base["test_loss"] - tuned["test_loss"], 6),
        **over_sft,
        "test_rows": len(rows),
        "prompts": [{"id": p.id, "question": p.question, "reference": p.reference}
                    for p in prompts],
        "judge": {"enabled": False},
        **({} if sft is None else {"judge_vs_sft": {"enabled": False}}),
    }


def _preference_html(pref: dict[str, Any] | None) -> list[str]:
    if not pref or not pref["pairs"]:
        return []
    cells = "".join(f"<tr><th>{k}</th><td>{pref[k]['accuracy']:.3f}</td>"
                    f"<td>{pref[k]['mean_margin']:+.3f}</td></tr>"
                    for k in ("base", "sft", "tuned") if k in pref)
    head = f"<tr><th>{pref['pairs']} held-out pairs</th><th>preference accuracy</th>"
    return [f"<table class='loss'>{head}<th>mean margin (nats)</th></tr>{cells}</table>"]


STYLE = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table.loss{border-collapse:collapse;margin-bottom:2em}
table.loss td,table.loss th{border:1px solid #ccc;padding:.3em .8em;text-align:right}
section{border-top:2px solid #ddd;padding:1em 0}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:1em}
.pair div{background:#f7f7f7;padding:.5em 1em;border-radius:4px}
pre{white-space:pre-wrap;word-wrap:break-word;font-family:inherit;margin:0}
.meta{color:#777;font-size:.85em}
"""


def render_html(report: dict[str, Any], prompts: Sequence[Prompt]) -> str:
    """A standalone page: the loss table, then each question with both answers side by side."""
    e = html.escape
    t = report["tuned"]
    names = [k for k in ("base", "sft", "tuned") if k in report]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>tuneline: base vs tuned</title>",
        f"<style>{STYLE}</style></head><body><h1>Base vs tuned</h1>",
        "<table class='loss'><tr><th></th><th>test loss</th><th>perplexity</th></tr>",
        *(f"<tr><th>{k}</th><td>{report[k]['test_loss']:.4f}</td>"
          f"<td>{report[k]['test_ppl']:.2f}</td></tr>" for k in names),
        f"<tr><th>improvement</th><td>{report['improvement']:+.4f}</td><td></td></tr>"
        + (f"<tr><th>over sft</th><td>{report['improvement_over_sft']:+.4f}</td><td></td></tr>"
           if "sft" in report else "") + "</table>",
        *_preference_html(report.get("preference")),
        f"<p class='meta'>{report['test_rows']} test rows, {t['test_tokens']} scored tokens.</p>",
    ]
    judged = [(label, {v["id"]: v for v in report.get(key, {}).get("verdicts", [])})
              for key, label in (("judge", "judge"), ("judge_vs_sft", "judge vs sft"))]
    grid = "" if len(names) == 2 else " style='grid-template-columns:repeat(3,1fr)'"
    for i, p in enumerate(prompts):
        parts.append(f"<section id='{e(p.id, quote=True)}'><h3>{e(p.question)}</h3>"
                     f"<p class='meta'>{e(p.id)}</p><div class='pair'{grid}>")
        for name in names:
            ans = report[name]["answers"][i]
            parts.append(f"<div><h4>{name}</h4><pre>{e(ans['answer'])}</pre><p class='meta'>"
                         f"{ans['tokens']} tokens, {e(str(ans['finish_reason']))}</p></div>")
        parts.append("</div>")
        if p.reference is not None:
            parts.append(f"<details><summary>reference answer</summary>"
                         f"<pre>{e(p.reference)}</pre></details>")
        for label, verdicts in judged:
            if p.id in verdicts:
                v = verdicts[p.id]
                parts.append(f"<p><b>{label}: {e(v['winner'])}</b> {e(v['reason'])}</p>")
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
