"""Curate: `tuneline curate --generated data/generated/answers.jsonl
--questions data/questions.jsonl --corrections data/corrections.jsonl --imports data/imports
--out data/dataset --report reports/curate.json` (the `curate` stage of dvc.yaml).

generated answers + imports (any layout of pipeline/rows/formats.py) + expert corrections
-> data/dataset/{train,valid,test}.jsonl in mlx-lm chat format, each row with `id`, `source`
(generated|expert|imported), `turn_sources`, `finish_reasons` and `origin` (file:line of every
input).

- Generated turns that are empty, cut off (finish_reason "length"), refusals or template leaks are
  dropped when `curate.drop_bad_generated` (they can be regenerated; expert and imported rows are
  never dropped silently: validate reports them with the line to fix).
- Exact duplicate questions (case, punctuation, spacing) and near duplicates (pipeline/rows/neardup.py:
  shingle Jaccard of the question's content >= `curate.near_dup_threshold`, found with MinHash
  + LSH and verified exactly) are removed, keeping expert over imported over generated rows;
  reports/curate.json lists every removal.
- Split: a hash of `curate.seed` and the row's family id places each row, so adding questions
  never moves existing rows. A family is a chain of near duplicates (its first row's id; a row
  on its own is its own family), so near copies never straddle train/valid/test, and rows that
  near-duplicate an `evaluate.prompts` entry go to test with their family (the comparison must
  not be one the model trained on). valid and test get at least `curate.min_split_rows` rows,
  whole families taken from train in hash order (stable too once the splits have grown past
  the minimum by hash alone).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.core.errors import UserError
from pipeline.rows import correction_pairs, formats, neardup, pairs
from pipeline.rows import corrections as corr_mod
from pipeline.rows.formats import Conversation
from pipeline.rows.jsonl import atomic_dir, iter_jsonl_numbered, paused_gc, write_json, write_jsonl
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


def run(cfg: CurateConfig, paths: CuratePaths, *,
        held_out: tuple[str, ...] = ()) -> CurateResult:
    """`held_out`: evaluate.prompts; rows that near-duplicate one are kept out of train."""
    with paused_gc():
        return _run(cfg, paths, held_out)


def _run(cfg: CurateConfig, paths: CuratePaths, held_out: tuple[str, ...]) -> CurateResult:
    _check_config(cfg)
    questions = load_questions(paths.questions)
    generated = load_generated(paths.generated)
    files = sorted(paths.imports.glob("*.jsonl"))
    pair_files = [f for f in files if pairs.is_pair_file(f)]  # TRL preference layouts
    imported = [c for f in files if f not in pair_files for c in formats.read_import(f)]
    rows = _index(generated + imported)
    corrections = corr_mod.load(paths.corrections)
    found, no_pair = correction_pairs.candidates(rows, corrections, str(paths.corrections))
    rows, applied = corr_mod.apply(rows, questions, corrections, str(paths.corrections))
    bad: list[dict[str, Any]] = []
    if cfg.drop_bad_generated:
        rows = _drop_bad_generated(rows, bad)
    kept, duplicates, family, held = dedupe(list(rows.values()), cfg.near_dup_threshold,
                                            held_out)
    if cfg.system_prompt is not None:
        kept = [_with_system(c, cfg.system_prompt) for c in kept]
    splits, moved = split(kept, cfg, family, {h["id"] for h in held})
    prefs, pref_report = correction_pairs.by_split(splits, found, [p for f in pair_files
                                                        for p in pairs.read(f)],
                                        _pair_placer(splits, cfg))
    with atomic_dir(paths.out) as tmp:  # the three splits as one unit: a kill never mixes runs
        for name in SPLITS:
            write_jsonl(tmp / f"{name}.jsonl", [dataset_row(c) for c in splits[name]])
            write_jsonl(tmp / "preference" / f"{name}.jsonl", [p.row() for p in prefs[name]])
    report = _report(splits, generated, imported, applied, duplicates, bad, moved)
    report["preference"] = {**pref_report, "no_pair": len(no_pair)}
    report["details"]["no_pair"] = no_pair
    report["details"]["near_evaluate_prompts"] = held
    write_json(paths.report, report)
    counts = {name: len(splits[name]) for name in SPLITS}
    return CurateResult(counts, len(duplicates), len(bad) + len(applied.dropped), report)


def _pair_placer(splits: dict[str, list[Conversation]], cfg: CurateConfig) -> Any:
    """An imported pair goes to the split of the dataset row asking its first question (no
    leakage), else where its own id hashes to, as a row would."""
    where = {patterns.question_key(first_question(c)): name
             for name, convs in splits.items() for c in convs}
    train_end = 1 - cfg.valid_fraction - cfg.test_fraction

    def place(pair: pairs.Pair) -> str:
        question = next((m["content"] for m in pair.prompt if m["role"] == "user"), "")
        if patterns.question_key(question) in where:
            return where[patterns.question_key(question)]
        p = position(cfg.seed, pair.id)
        return "train" if p < train_end else "valid" if p < 1 - cfg.test_fraction else "test"

    return place


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
    return {str(r["id"]): r["question"] for _, r in iter_jsonl_numbered(path)
            if "id" in r and isinstance(r.get("question"), str)}


def load_generated(path: Path) -> list[Conversation]:
    """data/generated/answers.jsonl rows -> conversations; absent or empty means none yet."""
    if not path.exists():
        return []
    return [_generated(path, line, row) for line, row in iter_jsonl_numbered(path)]


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


def dedupe(convs: list[Conversation], threshold: float, held_out: tuple[str, ...] = ()
           ) -> tuple[list[Conversation], list[dict[str, Any]], dict[str, str],
                      list[dict[str, Any]]]:
    """Keep one row per question: expert over imported over generated, then by id. Also returns
    each kept row's family id (pipeline/rows/neardup.py: chains of near duplicates) and the kept rows
    whose question near-duplicates a `held_out` prompt (they must not be trained on)."""
    ordered = sorted(convs, key=lambda c: (SOURCE_RANK.get(c.source, 3), c.id))
    questions = [first_question(c) for c in ordered]
    found = neardup.dedupe(questions, threshold, held_out)
    removed = []
    for j, (i, sim) in sorted(found.duplicate_of.items()):
        exact = patterns.question_key(questions[j]) == patterns.question_key(questions[i])
        removed.append({"id": ordered[j].id, "duplicate_of": ordered[i].id,
                        "kind": "exact" if exact else "near",
                        "similarity": 1.0 if exact else round(sim, 3), "question": questions[j]})
    family = {ordered[i].id: ordered[found.family[i]].id for i in found.kept}
    held = [{"id": ordered[k].id, "prompt": held_out[q], "similarity": round(sim, 3)}
            for q, k, sim in sorted(found.probe_hits, key=lambda h: (ordered[h[1]].id, h[0]))
            if k not in found.duplicate_of]
    return [ordered[i] for i in found.kept], removed, family, held


def position(seed: int, row_id: str) -> float:
    """Where a row falls in [0, 1): depends on nothing but the seed and its own id."""
    digest = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split(convs: list[Conversation], cfg: CurateConfig, family: dict[str, str] | None = None,
          held: set[str] | frozenset[str] = frozenset(),
          ) -> tuple[dict[str, list[Conversation]], list[dict[str, str]]]:
    """Place each family by the hash of its id; families with a `held` row go to test."""
    need = 2 * cfg.min_split_rows + 1
    if len(convs) < need:
        raise CurateError(f"only {len(convs)} rows after curation; valid and test need "
                          f"{cfg.min_split_rows} each and train at least 1 ({need} in all): add "
                          "questions or imports, or lower curate.min_split_rows in params.yaml")
    fam = family or {}
    fam_of = {c.id: fam.get(c.id, c.id) for c in convs}
    held_families = {fam_of[rid] for rid in held}
    train_end = 1 - cfg.valid_fraction - cfg.test_fraction
    pos = {f: position(cfg.seed, f) for f in set(fam_of.values())}
    members: dict[str, list[Conversation]] = defaultdict(list)
    splits: dict[str, list[Conversation]] = {name: [] for name in SPLITS}
    for conv in convs:
        f = fam_of[conv.id]
        p = pos[f]
        name = ("test" if f in held_families else "train" if p < train_end
                else "valid" if p < 1 - cfg.test_fraction else "test")
        splits[name].append(conv)
        members[f].append(conv)
    moved = []
    for name in ("valid", "test"):
        # Top up with whole families from train's end nearest the valid/test range, so the
        # choice is stable and no family straddles two splits.
        in_train = sorted({fam_of[c.id] for c in splits["train"]}, key=pos.__getitem__,
                          reverse=True)
        for f in in_train:
            if len(splits[name]) >= cfg.min_split_rows:
                break
            for conv in members[f]:
                splits[name].append(conv)
                moved.append({"id": conv.id, "to": name})
        moved_ids = {m["id"] for m in moved}
        splits["train"] = [c for c in splits["train"] if c.id not in moved_ids]
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
