"""Preference pair files -> the `pairs` frame the `preference_pairs` check validates with GX.

A pair file is data/dataset/preference/{split}.jsonl (curate writes it) or any JSONL given to
`tuneline validate` whose first row has `chosen` and `rejected` (TRL's layouts,
pipeline/rows/pairs.py). One row per line: file, line, id and one flag per defect, True when the
line is free of it (GX then expects every flag to be True):

- readable: a JSON object in one of the pair layouts (why not: `problem`);
- both_sides: chosen and rejected both have text;
- distinct: chosen is not rejected (after trimming whitespace);
- prompt_user: the prompt ends with a user turn (the model answers that turn);
- not_truncated: rejected is not a cut-off copy of chosen (a prefix of it): such a pair teaches
  "longer is better", not what the expert changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pandas as pd

from pipeline.rows import pairs

FLAGS = ("readable", "both_sides", "distinct", "prompt_user", "not_truncated")
COLUMNS = ("file", "line", "id", *FLAGS, "problem")
WHAT = {
    "both_sides": "an empty side: write both answers or delete the line",
    "distinct": "chosen equals rejected: the pair teaches nothing; delete the line",
    "prompt_user": "the prompt does not end with a user turn: the answers must reply to it",
    "not_truncated": "rejected is a truncated copy of chosen: it teaches length, not content; "
                     "delete the line or replace rejected with the answer that was turned down",
}
DEFECT_OF = {"both_sides": "empty", "distinct": "equals", "prompt_user": "user turn",
             "not_truncated": "truncated copy"}


def is_pair_file(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            for raw in fh:
                if raw.strip():
                    return pairs.is_pair_row(orjson.loads(raw))
    except (OSError, orjson.JSONDecodeError):
        return False
    return False


def frame(files: list[Path]) -> pd.DataFrame:
    rows = []
    for path in files:
        with path.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if raw.strip():
                    rows.append(_line(path, lineno, raw))
    data = {name: [r[i] for r in rows] for i, name in enumerate(COLUMNS)}
    out = pd.DataFrame({k: pd.Series(v, dtype=object) for k, v in data.items()})
    for flag in FLAGS:
        out[flag] = pd.array(data[flag], dtype="boolean")
    out["line"] = pd.array(data["line"], dtype="Int64")
    return out


def _line(path: Path, lineno: int, raw: bytes) -> tuple[Any, ...]:
    where = f"{path}:{lineno}"
    try:
        row = orjson.loads(raw)
        pair = pairs.to_pair(row, where, f"{path.stem}-{lineno}", "imported")
    except orjson.JSONDecodeError as exc:
        return (str(path), lineno, None, False, None, None, None, None,
                f"not valid JSON ({exc})")
    except pairs.PairError as exc:
        return (str(path), lineno, _id(row), False, None, None, None, None,
                str(exc).removeprefix(where + ": "))
    found = " ".join(pairs.defects(pair.prompt, pair.chosen, pair.rejected))
    flags = [DEFECT_OF[f] not in found for f in FLAGS[1:]]
    return (str(path), lineno, _id(row), True, *flags, None)


def _id(row: Any) -> str | None:
    rid = row.get("id") if isinstance(row, dict) else None
    return rid if isinstance(rid, str) else None


def describe(rec: dict[str, Any], settings: Any = None) -> str:
    if rec.get("readable") is False:
        return (f"not a preference pair: {rec['problem']}; expected TRL's prompt/chosen/rejected "
                "(strings or chat messages)")
    return "; ".join(WHAT[f] for f in FLAGS[1:] if rec.get(f) is False)
