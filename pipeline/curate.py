"""Curate: `tuneline curate --generated data/generated/answers.jsonl
--questions data/questions.jsonl --corrections data/corrections.jsonl --imports data/imports
--out data/dataset --report reports/curate.json` (the `curate` stage of dvc.yaml).

generated answers + imports (any layout of pipeline/formats.py) + expert corrections
-> data/dataset/{train,valid,test}.jsonl in mlx-lm chat format, each row with `id`, `source`
(generated|expert|imported), `turn_sources`, `finish_reasons` and `origin` (file:line of every
input).

- Generated turns that are empty, cut off (finish_reason "length"), refusals or template leaks are
  dropped when `curate.drop_bad_generated` (they can be regenerated; expert and imported rows are
  never dropped silently: validate reports them with the line to fix).
- Exact duplicate questions (case, punctuation, spacing) and near duplicates (character 3-gram
  Jaccard of the question's content words >= `curate.near_dup_threshold`) are removed, keeping
  expert over imported over generated rows; reports/curate.json lists every removal.
- Split: a hash of `curate.seed` and the row id places each row, so adding questions never moves
  existing rows. valid and test get at least `curate.min_split_rows` rows, taken from train in
  hash order (stable too once the splits have grown past the minimum by hash alone).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline import corrections as corr_mod
from pipeline import formats
from pipeline.errors import UserError
from pipeline.formats import Conversation
from pipeline.jsonl import atomic_dir, read_jsonl, write_json, write_jsonl
from validation import patterns

SPLITS = ("train", "valid", "test")
SOURCE_RANK = {"expert": 0, "imported": 1, "generated": 2}


class CurateError(UserError):
    """Inputs that cannot make a dataset (too few rows, clashing ids, malformed answers)."""


@dataclass(frozen=True)
class CurateConfig:
    seed: int
    valid_fraction: float
    test_fraction: float
    min_split_rows: int
    near_dup_threshold: float
    system_prompt: str | None
    drop_bad_generated: bool


@dataclass(frozen=True)
class CuratePaths:
    generated: Path
    questions: Path
    corrections: Path
    imports: Path
    out: Path
    report: Path


@dataclass(frozen=True)
class CurateResult:
    counts: dict[str, int]
    duplicates: int
    dropped: int
    report: dict[str, Any]


def run(cfg: CurateConfig, paths: CuratePaths) -> CurateResult:
    _check_config(cfg)
    questions = load_questions(paths.questions)
    generated = load_generated(paths.generated)
    imported = [c for f in sorted(paths.imports.glob("*.jsonl")) for c in formats.read_import(f)]
    rows = _index(generated + imported)
    rows, applied = corr_mod.apply(rows, questions, corr_mod.load(paths.corrections),
                                   str(paths.corrections))
    bad: list[dict[str, Any]] = []
    if cfg.drop_bad_generated:
        rows = _drop_bad_generated(rows, bad)
    kept, duplicates = dedupe(list(rows.values()), cfg.near_dup_threshold)
    if cfg.system_prompt is not None:
        kept = [_with_system(c, cfg.system_prompt) for c in kept]
    splits, moved = split(kept, cfg)
    with atomic_dir(paths.out) as tmp:  # the three splits as one unit: a kill never mixes runs
        for name in SPLITS:
            write_jsonl(tmp / f"{name}.jsonl", [dataset_row(c) for c in splits[name]])
    report = _report(splits, generated, imported, applied, duplicates, bad, moved)
    write_json(paths.report, report)
    counts = {name: len(splits[name]) for name in SPLITS}
    return CurateResult(counts, len(duplicates), len(bad) + len(applied.dropped), report)


def _check_config(cfg: CurateConfig) -> None:
    if not (0 <= cfg.valid_fraction < 1 and 0 <= cfg.test_fraction < 1
            and cfg.valid_fraction + cfg.test_fraction < 1):
        raise CurateError(f"params.yaml curate: valid_fraction {cfg.valid_fraction} + "
                          f"test_fraction {cfg.test_fraction} must be below 1 "
                          "(train gets the rest)")
    if not 0 < cfg.near_dup_threshold <= 1:
        raise CurateError(f"params.yaml curate.near_dup_threshold: {cfg.near_dup_threshold} "
                          "must be in (0, 1]; 1.0 removes exact duplicates only")


def load_questions(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    return {str(r["id"]): r["question"] for r in read_jsonl(path)
            if "id" in r and isinstance(r.get("question"), str)}


def load_generated(path: Path) -> list[Conversation]:
    """data/generated/answers.jsonl rows -> conversations; absent or empty means none yet."""
    if not path.exists():
        return []
    numbered = [n for n, raw in enumerate(path.read_bytes().split(b"\n"), 1) if raw.strip()]
    return [_generated(path, line, row) for line, row in zip(numbered, read_jsonl(path))]


def _generated(path: Path, line: int, row: dict[str, Any]) -> Conversation:
    for key in ("id", "question", "answer"):
        if not isinstance(row.get(key), str):
            raise CurateError(f"{path}:{line}: {key!r} must be a string; rerun the generate "
                              "stage (dvc repro generate) to rewrite this file")
    messages = [{"role": "user", "content": row["question"]},
                {"role": "assistant", "content": row["answer"]}]
    finishes = [row.get("finish_reason")]
    dropped = 0
    if isinstance(row.get("followup"), str) and row["followup"].strip():
        if isinstance(row.get("followup_answer"), str):
            messages += [{"role": "user", "content": row["followup"]},
                         {"role": "assistant", "content": row["followup_answer"]}]
            finishes.append(row.get("followup_finish_reason"))
        else:
            dropped = 1  # an unanswered follow-up teaches nothing
    meta = {"turn_sources": ["generated"] * len(finishes), "finish_reasons": finishes,
            **{k: row[k] for k in ("model", "category") if isinstance(row.get(k), str)}}
    return Conversation(id=row["id"], messages=tuple(messages), source="generated",
                        origin=(f"{path}:{line}",), meta=meta, dropped_turns=dropped)


def _index(conversations: list[Conversation]) -> dict[str, Conversation]:
    rows: dict[str, Conversation] = {}
    for conv in conversations:
        if conv.id in rows:
            raise CurateError(f"id {conv.id!r} appears twice: {rows[conv.id].origin[0]} and "
                              f"{conv.origin[0]}; ids must be unique across generated answers "
                              "and imports (rename one)")
        rows[conv.id] = conv
    return rows


def _drop_bad_generated(rows: dict[str, Conversation],
                        bad: list[dict[str, Any]]) -> dict[str, Conversation]:
    """Remove generated answers that would fail validation; an expert never has to clean them."""
    out = {}
    for rid, conv in rows.items():
        sources, finishes = corr_mod.turn_meta(conv)
        answers = [m for m in conv.messages if m["role"] == "assistant"]
        reasons = [_badness(m["content"], f) if s == "generated" else None
                   for m, s, f in zip(answers, sources, finishes)]
        first_bad = next((i for i, r in enumerate(reasons) if r), None)
        if first_bad is None:
            out[rid] = conv
            continue
        bad.append({"id": rid, "turn": first_bad, "why": reasons[first_bad],
                    "origin": conv.origin[0] if conv.origin else None})
        if first_bad > 0:  # keep the good turns before it
            out[rid] = _truncate_turns(conv, first_bad)
    return out


def _badness(text: str, finish_reason: str | None) -> str | None:
    if not text.strip():
        return "empty answer"
    if finish_reason == "length":
        return "cut off at the token limit (finish_reason length)"
    if patterns.is_refusal(text):
        return "refusal boilerplate"
    marker = patterns.template_marker(text)
    return f"chat-template marker {marker!r} in the answer" if marker else None


def _truncate_turns(conv: Conversation, n_answers: int) -> Conversation:
    messages, seen = [], 0
    for m in conv.messages:
        if m["role"] == "user" and seen == n_answers:
            break
        messages.append(m)
        seen += m["role"] == "assistant"
    sources, finishes = corr_mod.turn_meta(conv)
    meta = {**conv.meta, "turn_sources": sources[:n_answers],
            "finish_reasons": finishes[:n_answers]}
    return replace(conv, messages=tuple(messages), meta=meta)


def _with_system(conv: Conversation, prompt: str) -> Conversation:
    if conv.messages and conv.messages[0]["role"] == "system":
        return conv
    return replace(conv, messages=({"role": "system", "content": prompt}, *conv.messages))


def first_question(conv: Conversation) -> str:
    return next(m["content"] for m in conv.messages if m["role"] == "user")


def dedupe(convs: list[Conversation],
           threshold: float) -> tuple[list[Conversation], list[dict[str, Any]]]:
    """Keep one row per question: expert over imported over generated, then by id."""
    ordered = sorted(convs, key=lambda c: (SOURCE_RANK.get(c.source, 3), c.id))
    kept: list[Conversation] = []
    exact: dict[str, str] = {}
    grams: list[frozenset[str]] = []
    postings: dict[str, list[int]] = defaultdict(list)
    removed = []
    for conv in ordered:
        question = first_question(conv)
        key = patterns.question_key(question)
        if key in exact:
            removed.append({"id": conv.id, "duplicate_of": exact[key], "kind": "exact",
                            "similarity": 1.0, "question": question})
            continue
        mine = trigrams(question)
        match = _nearest(mine, grams, postings)
        if match is not None and match[1] >= threshold:
            removed.append({"id": conv.id, "duplicate_of": kept[match[0]].id, "kind": "near",
                            "similarity": round(match[1], 3), "question": question})
            continue
        exact[key] = conv.id
        for gram in mine:
            postings[gram].append(len(kept))
        grams.append(mine)
        kept.append(conv)
    return kept, removed


def trigrams(question: str) -> frozenset[str]:
    text = patterns.content_words(question) or patterns.question_key(question)
    text = f" {text} "
    return frozenset(text[i:i + 3] for i in range(len(text) - 2))


def _nearest(mine: frozenset[str], grams: list[frozenset[str]],
             postings: dict[str, list[int]]) -> tuple[int, float] | None:
    """Most similar kept question by Jaccard, touching only questions that share a 3-gram."""
    shared: dict[int, int] = defaultdict(int)
    for gram in mine:
        for idx in postings.get(gram, ()):
            shared[idx] += 1
    best = None
    for idx, n in shared.items():
        sim = n / (len(mine) + len(grams[idx]) - n)
        if best is None or sim > best[1]:
            best = (idx, sim)
    return best


def position(seed: int, row_id: str) -> float:
    """Where a row falls in [0, 1): depends on nothing but the seed and its own id."""
    digest = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split(convs: list[Conversation],
          cfg: CurateConfig) -> tuple[dict[str, list[Conversation]], list[dict[str, str]]]:
    need = 2 * cfg.min_split_rows + 1
    if len(convs) < need:
        raise CurateError(f"only {len(convs)} rows after curation; valid and test need "
                          f"{cfg.min_split_rows} each and train at least 1 ({need} in all): add "
                          "questions or imports, or lower curate.min_split_rows in params.yaml")
    train_end = 1 - cfg.valid_fraction - cfg.test_fraction
    pos = {c.id: position(cfg.seed, c.id) for c in convs}
    splits: dict[str, list[Conversation]] = {name: [] for name in SPLITS}
    for conv in convs:
        p = pos[conv.id]
        name = "train" if p < train_end else "valid" if p < 1 - cfg.test_fraction else "test"
        splits[name].append(conv)
    moved = []
    for name in ("valid", "test"):
        # Top up from train's rows nearest the valid/test range, so the choice is stable.
        donors = sorted(splits["train"], key=lambda c: pos[c.id], reverse=True)
        for conv in donors[: max(0, cfg.min_split_rows - len(splits[name]))]:
            splits["train"].remove(conv)
            splits[name].append(conv)
            moved.append({"id": conv.id, "to": name})
    return {name: sorted(rows, key=lambda c: c.id) for name, rows in splits.items()}, moved


def dataset_row(conv: Conversation) -> dict[str, Any]:
    sources, finishes = corr_mod.turn_meta(conv)
    return {
        "id": conv.id,
        "source": conv.source,
        "messages": [dict(m) for m in conv.messages],
        "turn_sources": sources,
        "finish_reasons": finishes,
        "origin": list(conv.origin),
        **{k: v for k, v in conv.meta.items() if k not in ("turn_sources", "finish_reasons")},
    }


def _report(splits: dict[str, list[Conversation]], generated: list[Conversation],
            imported: list[Conversation], applied: corr_mod.Applied,
            duplicates: list[dict[str, Any]], bad: list[dict[str, Any]],
            moved: list[dict[str, str]]) -> dict[str, Any]:
    rows = {name: len(splits[name]) for name in SPLITS}
    by_source: dict[str, int] = defaultdict(int)
    for conv in (c for rows_ in splits.values() for c in rows_):
        by_source[conv.source] += 1
    return {
        "rows": {**rows, "total": sum(rows.values())},
        "sources": dict(sorted(by_source.items())),
        "inputs": {"generated": len(generated), "imported": len(imported)},
        "removed": {"duplicates": len(duplicates), "bad_generated": len(bad),
                    "dropped_by_expert": len(applied.dropped),
                    "unanswered_turns": sum(c.dropped_turns for c in generated + imported)},
        "corrections": {"applied": len(applied.applied), "unmatched": len(applied.unmatched),
                        "stale": len(applied.stale)},
        "details": {"duplicates": duplicates, "bad_generated": bad,
                    "dropped_by_expert": applied.dropped, "unmatched": applied.unmatched,
                    "stale": applied.stale, "moved_for_minimum": moved},
    }
