"""Leakage: near-duplicate questions across files (train/valid/test) and between the training
file and `evaluate.prompts` (plain pandas + pipeline/rows/neardup.py, no GX).

Adds two columns to the lines frame for the `leakage` check of validation/suites.py:
`leak_free` (False for a row with a near copy in another file or, in a train file, near an
evaluation prompt; None where the line has no question) and `leak_with` (where the copies are,
for the message). Measure and threshold are curate's (`curate.near_dup_threshold`), so a dataset
curate wrote never fails this check.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.rows import neardup

MAX_NAMED = 3  # other copies named per row; the rest are counted


@dataclass(frozen=True)
class Leakage:
    threshold: float  # curate.near_dup_threshold
    prompts: tuple[str, ...]  # evaluate.prompts
    train_stem: str = "train"  # files named train*.jsonl are the training split


def add_columns(lines: pd.DataFrame, leak: Leakage | None) -> pd.DataFrame:
    has_q = lines["question_key"].notna().to_numpy() if len(lines) else []
    free: list[bool | None] = [True if h else None for h in has_q]
    notes: list[str | None] = [None] * len(lines)
    if leak is not None and len(lines):
        for i, others in _leaks(lines, leak).items():
            free[i] = False
            shown = "; ".join(others[:MAX_NAMED])
            more = f" and {len(others) - MAX_NAMED} more" if len(others) > MAX_NAMED else ""
            notes[i] = shown + more
    return lines.assign(leak_free=pd.array(free, dtype="boolean"),
                        leak_with=pd.Series(notes, dtype=object, index=lines.index))


def _leaks(lines: pd.DataFrame, leak: Leakage) -> dict[int, list[str]]:
    """Frame position -> descriptions of what it leaks with."""
    rows = [int(i) for i in (lines["question_key"].notna().to_numpy()).nonzero()[0]]
    keys = lines["question_key"].to_numpy()
    files = lines["file"].to_numpy()
    found: dict[int, list[str]] = defaultdict(list)
    near = neardup.near_pairs([neardup.content_text(keys[i]) for i in rows], leak.threshold,
                              [neardup.content_text(p) for p in leak.prompts])
    for p in near.expanded():
        a, b = rows[p.i], rows[p.j]
        if files[a] != files[b]:
            found[a].append(_place(lines, b, p.similarity))
            found[b].append(_place(lines, a, p.similarity))
    for q, k, sim in near.probe_hits:
        if Path(str(files[rows[k]])).stem.startswith(leak.train_stem):
            found[rows[k]].append(f"evaluate.prompts[{q}] {leak.prompts[q]!r} ({sim:.2f}): "
                                  "the evaluation would test training data")
    return found


def _place(lines: pd.DataFrame, i: int, sim: float) -> str:
    row = lines.iloc[i]
    rid = f" [{row['id']}]" if isinstance(row["id"], str) else ""
    return f"{Path(str(row['file'])).name}:{int(row['line'])}{rid} ({sim:.2f})"
