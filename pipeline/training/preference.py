"""Preference tuning (`train.objective: dpo | orpo`) on data/dataset/preference pairs.

    rows = preference.encode_pairs(tokenizer, pairs.read(path))        # (chosen, rejected) tokens
    ref = preference.reference_logps(model, rows, 4, 512, cache=...)   # before the adapter exists
    loss = preference.make_loss("dpo", beta=0.1)                       # mlx-lm's loss signature
    batches = preference.batch_iterator(seed)                          # its iterate_batches one

- DPO (Rafailov et al. 2023): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), with pi and
  ref the summed log-probabilities of the answer tokens under the policy and the reference. The
  reference is the same weights with the adapter switched off: its log-probabilities are computed
  once, before the adapter is applied (no second copy of the model in memory), and cached per
  row (`reference_cache`, keyed by the model's files, dtype and the row's tokens), so an
  experiment that changes only beta or the learning rate does not recompute them.
- ORPO (Hong et al. 2024): the chosen answer's mean token NLL + beta * -log sigmoid(log odds_c -
  log odds_r), odds = p / (1 - p) with p the answer's mean per-token probability. No reference.

A batch holds both sides of `batch_size` pairs (chosen rows first), padded to the longest; each
rank of a data-parallel run takes its pairs of the step and divides by its share of the step's
pairs (and, for ORPO's NLL, of its chosen tokens), so the averaged gradient is the one-process
gradient (as pipeline/training/packing.rank_denominator does for SFT). The loss returns the
number of real pairs as its count: mlx-lm's validation then averages exactly over pairs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import UserError

OBJECTIVES = ("sft", "dpo", "orpo")
Side = tuple[list[int], list[int]]  # token ids, 0/1 mask of the answer's tokens


class PreferenceError(UserError):
    """Pairs or settings that cannot train a preference objective."""


@dataclass(frozen=True)
class PairRow:
    id: str
    chosen: Side
    rejected: Side
    ref: tuple[float, float] = (0.0, 0.0)  # reference log-probs of chosen, rejected


# --- encoding --------------------------------------------------------------------------------


def encode_answer(tokenizer: Any, prompt: Sequence[dict[str, str]], answer: str) -> Side:
    """The conversation `prompt` + answer, with only the answer's tokens (and its end of turn)
    marked: earlier assistant turns in the prompt are context, not what the pair compares."""
    start = len(tokenizer.apply_chat_template(list(prompt), tokenize=True,
                                              add_generation_prompt=True, return_dict=False))
    tokens = list(tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": answer}], tokenize=True, return_dict=False))
    return tokens, [0] * start + [1] * (len(tokens) - start)


def encode_pairs(tokenizer: Any, found: Sequence[Any]) -> list[PairRow]:
    """Pairs (`id`, `prompt` messages, `chosen` and `rejected` text, as pipeline/rows/pairs.py
    reads them) -> token rows."""
    return [PairRow(p.id, encode_answer(tokenizer, p.prompt, p.chosen),
                    encode_answer(tokenizer, p.prompt, p.rejected)) for p in found]


# --- log-probabilities and losses ------------------------------------------------------------


def sequence_logps(model: Any, tokens: Any, mask: Any) -> tuple[Any, Any]:
    """Per row: the summed log-probability of the masked target tokens, and their count."""
    import mlx.core as mx
    from mlx import nn

    logits = model(tokens[:, :-1])
    weights = mask[:, 1:]
    logp = -nn.losses.cross_entropy(logits, tokens[:, 1:]).astype(mx.float32)
    return (logp * weights).sum(axis=1), weights.sum(axis=1)


def dpo_losses(pc: Any, pr: Any, rc: Any, rr: Any, beta: float) -> Any:
    """Per pair: -log sigmoid(beta * ((pc - rc) - (pr - rr)))."""
    import mlx.core as mx

    margin = beta * ((pc - rc) - (pr - rr))
    return mx.logaddexp(mx.zeros_like(margin), -margin)


def orpo_losses(mean_c: Any, mean_r: Any, beta: float) -> Any:
    """Per pair: beta * -log sigmoid(log odds(chosen) - log odds(rejected)), from the answers'
    mean per-token log-probabilities (kept below 0 so that log(1 - p) stays finite)."""
    import mlx.core as mx

    mean_c, mean_r = mx.minimum(mean_c, -1.0e-6), mx.minimum(mean_r, -1.0e-6)
    log_odds = (mean_c - mean_r) - (mx.log1p(-mx.exp(mean_c)) - mx.log1p(-mx.exp(mean_r)))
    return beta * mx.logaddexp(mx.zeros_like(log_odds), -log_odds)


def make_loss(objective: str, beta: float) -> Callable[..., tuple[Any, Any]]:
    """loss(model, tokens, mask, ref, weight, scale) -> (loss, pairs), for mlx-lm's train().

    tokens/mask: (2b, width), chosen rows first; ref: (2b,) reference log-probs; weight: (b,) 1
    for a real pair, 0 for a rank's filler in a short validation batch; scale: (2,) what this
    rank divides by (its share of the step's pairs and of its chosen answer tokens)."""

    if objective not in ("dpo", "orpo"):
        raise PreferenceError(f"params.yaml:train.objective: {objective!r} is not a preference "
                              "objective (dpo, orpo)")

    def loss(model: Any, tokens: Any, mask: Any, ref: Any, weight: Any, scale: Any):
        logps, counts = sequence_logps(model, tokens, mask)
        b = tokens.shape[0] // 2
        return objective_loss(objective, beta, (logps[:b], logps[b:]),
                              (counts[:b], counts[b:]), ref, weight, scale)

    return loss


def objective_loss(objective: str, beta: float, logps: tuple[Any, Any], counts: tuple[Any, Any],
                   ref: Any, weight: Any, scale: Any) -> tuple[Any, Any]:
    """The step's loss from each pair's summed answer log-probs (chosen, rejected) and their
    token counts; `ref` is (2b,): the chosen sides' reference log-probs, then the rejected."""
    import mlx.core as mx

    (pc, pr), b = logps, logps[0].shape[0]
    if objective == "dpo":
        per = dpo_losses(pc, pr, ref[:b], ref[b:], beta)
        total = (per * weight).sum() / scale[0]
    else:
        mean_c = pc / mx.maximum(counts[0], 1)
        mean_r = pr / mx.maximum(counts[1], 1)
        per = orpo_losses(mean_c, mean_r, beta)
        total = -(pc * weight).sum() / scale[1] + (per * weight).sum() / scale[0]
    return total, weight.sum().astype(mx.int32)


# --- batches ---------------------------------------------------------------------------------


def layout(rows: Sequence[PairRow], width_cap: int) -> tuple[np.ndarray, ...]:
    """(tokens, mask) of shape (2b, width): the chosen sides, then the rejected ones; and ref."""
    sides = [r.chosen for r in rows] + [r.rejected for r in rows]
    width = min(max(len(t) for t, _ in sides), width_cap)
    tokens = np.zeros((len(sides), width), np.int32)
    mask = np.zeros((len(sides), width), np.float32)
    for i, (t, m) in enumerate(sides):
        n = min(len(t), width)
        tokens[i, :n], mask[i, :n] = t[:n], m[:n]
    ref = np.array([r.ref[0] for r in rows] + [r.ref[1] for r in rows], np.float32)
    return tokens, mask, ref


def _answer_tokens(row: PairRow, cap: int) -> float:
    return float(sum(row.chosen[1][1:cap]))


def batch_iterator(seed: int) -> Callable[..., Iterator[tuple[Any, ...]]]:
    """mlx-lm's `iterate_batches` signature over PairRows: `batch_size` pairs a step, both
    sides; every rank draws the same order and takes its own pairs of each step."""
    import mlx.core as mx

    def iterate(dataset, batch_size, max_seq_length, loop=False, comm_group=None, **_):
        rank, size = (comm_group.rank(), comm_group.size()) if comm_group is not None else (0, 1)
        if batch_size % size:
            raise PreferenceError(f"params.yaml:train.batch_size: {batch_size} pairs must be "
                                  f"divisible by the {size} distributed processes")
        order = sorted(range(len(dataset)), key=lambda i: max(len(dataset[i].chosen[0]),
                                                              len(dataset[i].rejected[0])))
        if loop:
            batches = [order[i : i + batch_size]
                       for i in range(0, len(order) - batch_size + 1, batch_size)]
        else:  # validation scores every pair once, the last batch may be short
            batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        rng = np.random.default_rng(seed)
        while True:
            for b in rng.permutation(len(batches)) if loop else range(len(batches)):
                step = [dataset[j] for j in batches[b]]
                mine = step[rank::size]
                weight = np.ones(len(mine), np.float32)
                if not mine:  # a short validation batch: a filler pair that counts for nothing
                    mine, weight = step[:1], np.zeros(1, np.float32)
                tokens, mask, ref = layout(mine, max_seq_length)
                if loop:
                    scale = [len(step) / size, sum(_answer_tokens(r, max_seq_length)
                                                   for r in step) / size]
                else:
                    scale = [max(weight.sum(), 1.0), max(sum(
                        _answer_tokens(r, max_seq_length) for r in mine), 1.0)]
                yield (mx.array(tokens), mx.array(mask), mx.array(ref), mx.array(weight),
                       mx.array(np.array(scale, np.float32)))
            if not loop:
                return

    return iterate


# --- the reference ---------------------------------------------------------------------------


def model_digest(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(model_dir)).encode())
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def row_key(model_key: str, row: PairRow, max_seq_length: int) -> str:
    blob = json.dumps([model_key, max_seq_length, row.chosen, row.rejected])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def score(model: Any, rows: Sequence[PairRow], batch_size: int, max_seq_length: int
          ) -> list[tuple[float, float]]:
    """(chosen, rejected) summed log-probabilities of each row under `model` as it is now."""
    import mlx.core as mx

    out: list[tuple[float, float]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        tokens, mask, _ = layout(chunk, max_seq_length)
        logps, _ = sequence_logps(model, mx.array(tokens), mx.array(mask))
        mx.eval(logps)
        values = np.array(logps).tolist()
        out += list(zip(values[: len(chunk)], values[len(chunk):]))
    return out


def with_reference(model: Any, rows: Sequence[PairRow], batch_size: int, max_seq_length: int,
                   model_key: str, cache: Path | None) -> list[PairRow]:
    """Rows with their reference log-probs: from `cache` (one JSONL per model) where the same
    row was scored before, computed now (and added to it) otherwise."""
    path = cache / f"{model_key[:24]}.jsonl" if cache is not None else None
    known = {r["key"]: (r["chosen"], r["rejected"]) for r in _read_lines(path)} if (
        path is not None and path.exists()) else {}
    keys = [row_key(model_key, r, max_seq_length) for r in rows]
    todo = [r for r, k in zip(rows, keys) if k not in known]
    fresh = dict(zip((row_key(model_key, r, max_seq_length) for r in todo),
                     score(model, todo, batch_size, max_seq_length)))
    if path is not None and fresh:
        _write_lines(path, [{"key": k, "chosen": c, "rejected": r}
                           for k, (c, r) in sorted({**known, **fresh}.items())])
    values = {**known, **fresh}
    return [PairRow(r.id, r.chosen, r.rejected, tuple(values[k])) for r, k in zip(rows, keys)]


def write_reference(path: Path, splits: dict[str, Sequence[PairRow]]) -> None:
    """The DVC output: each pair's reference log-probs, per split (empty for sft)."""
    _write_lines(path, [{"id": r.id, "split": name, "chosen": round(r.ref[0], 5),
                        "rejected": round(r.ref[1], 5)}
                       for name, rows in splits.items() for r in rows])


def prepare(objective: str, model: Any, tokenizer: Any, model_dir: Path, folder: Path,
            read: Callable[[Path], Sequence[Any]], batch_size: int, max_seq_length: int,
            cache: Path | None) -> tuple[list[PairRow], list[PairRow]]:
    """The train and valid pairs of data/dataset/preference (`read`: pipeline/rows/pairs.py's)
    as token rows; for dpo with the reference log-probs of `model` as it is now (call it before
    the adapter is applied)."""
    sets = []
    for split in ("train", "valid"):
        path = folder / f"{split}.jsonl"
        sets.append(encode_pairs(tokenizer, read(path)) if path.exists() else [])
    check_count(folder, len(sets[0]), objective, batch_size)
    if objective == "dpo":
        key = model_digest(model_dir)
        sets = [with_reference(model, rows, batch_size, max_seq_length, key, cache)
                for rows in sets]
    return sets[0], sets[1]


def check_count(folder: Path, n_train: int, objective: str, batch_size: int) -> None:
    if n_train < batch_size:
        raise PreferenceError(
            f"{folder / 'train.jsonl'}: {n_train} pairs, objective {objective} needs at "
            f"least train.batch_size={batch_size}: replace more generated answers with "
            "`tuneline review` (each replacement is a pair), import a preference file into "
            "data/imports/, or lower train.batch_size")


def accuracy(model: Any, rows: Sequence[PairRow], batch_size: int, max_seq_length: int
             ) -> dict[str, Any]:
    """Preference accuracy (share of pairs whose chosen answer has the higher summed
    log-probability) and the mean margin (chosen minus rejected, nats) under `model`."""
    if not rows:
        return {"pairs": 0, "accuracy": None, "mean_margin": None}
    margins = [c - r for c, r in score(model, rows, batch_size, max_seq_length)]
    return {"pairs": len(rows), "accuracy": round(sum(m > 0 for m in margins) / len(rows), 4),
            "mean_margin": round(float(np.mean(margins)), 4)}


def fit_view(cfg: Any, rows: Sequence[Any]) -> tuple[Any, list[int]]:
    """What the memory check (training/fit.py) should see: SFT rows as they are; for pairs,
    every side a row and twice batch_size rows a padded step."""
    if not rows or not isinstance(rows[0], PairRow):
        return cfg, [len(t) for t, _ in rows]
    wider = dataclasses.replace(cfg, batch_size=2 * cfg.batch_size)
    return wider, [len(side[0]) for r in rows for side in (r.chosen, r.rejected)]


def _read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _write_lines(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Whole or not at all: a temporary file beside it, renamed into place (a kill mid-write
    leaves the old file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
