"""JSONL files -> the three pandas frames the suites check (plain Python and pandas, no GX).

- files:    one row per file (or expected split): file, rows, present
- lines:    one row per physical line: file, line, id, raw text, utf8/blank/is_object flags,
            format (of the row) and file_format (of the file's first row), role sequence,
            question key
- messages: one row per message with string content (chat), or prompt/completion: file, line,
            id, msg (index), role, turn (assistant ordinal), content, has_text, finish_reason

Line numbers are 1-based physical lines, so a finding points at what an editor shows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.formats import detect
from validation.patterns import question_key

ROLE_CODES = {"system": "s", "user": "u", "assistant": "a"}
TRAINING_FORMATS = ("chat", "completions", "text")


@dataclass
class Frames:
    files: pd.DataFrame
    lines: pd.DataFrame
    messages: pd.DataFrame


@dataclass
class _Columns:
    """Column lists filled row by row (much faster than a list of dicts for 1M rows)."""

    data: dict[str, list[Any]] = field(default_factory=dict)

    def add(self, **values: Any) -> None:
        for key, value in values.items():
            self.data.setdefault(key, []).append(value)

    def frame(self, columns: tuple[str, ...]) -> pd.DataFrame:
        return pd.DataFrame({c: self.data.get(c, []) for c in columns})


LINE_COLUMNS = ("file", "line", "id", "raw", "utf8", "blank", "is_object", "format",
                "file_format", "role_seq", "turn_seq", "question_key")
MESSAGE_COLUMNS = ("file", "line", "id", "msg", "role", "turn", "content", "has_text",
                   "finish_reason")


def build(files: list[tuple[Path, bool]]) -> Frames:
    """`files`: (path, present) pairs; a missing expected split counts as a file with no rows."""
    file_cols, lines, messages = _Columns(), _Columns(), _Columns()
    for path, present in files:
        rows = _read_file(path, lines, messages) if present else 0
        file_cols.add(file=str(path), rows=rows, present=present)
    return Frames(file_cols.frame(("file", "rows", "present")), lines.frame(LINE_COLUMNS),
                  messages.frame(MESSAGE_COLUMNS))


def _read_file(path: Path, lines: _Columns, messages: _Columns) -> int:
    name, file_format, rows = str(path), None, 0
    with path.open("rb") as fh:
        for lineno, raw_bytes in enumerate(fh, start=1):
            row, info = _parse(raw_bytes.rstrip(b"\r\n"))
            rows += not info["blank"]
            if row is not None:
                file_format = file_format or info["format"]
                _add_messages(messages, name, lineno, row, info["format"])
            lines.add(file=name, line=lineno, file_format=file_format, **info)
    return rows


def _parse(raw_bytes: bytes) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    try:
        raw, utf8 = raw_bytes.decode("utf-8"), True
    except UnicodeDecodeError:
        raw, utf8 = raw_bytes.decode("utf-8", errors="replace"), False
    info: dict[str, Any] = {"raw": raw, "utf8": utf8, "blank": not raw.strip(), "id": None,
                            "is_object": False, "format": None, "role_seq": None,
                            "turn_seq": None, "question_key": None}
    if not utf8 or info["blank"]:
        return None, info
    try:
        row = json.loads(raw)
    except ValueError:
        return None, info
    if not isinstance(row, dict):
        return None, info
    fmt = detect(row) or "unknown"
    info.update(is_object=True, format=fmt, id=_id(row), **_sequence(row, fmt))
    return row, info


def _id(row: dict[str, Any]) -> str | None:
    rid = row.get("id")
    return str(rid) if isinstance(rid, (str, int)) and rid != "" else None


def _sequence(row: dict[str, Any], fmt: str) -> dict[str, Any]:
    """Role sequence as letters (s, u, a; x for anything else) and the first question's key."""
    if fmt == "completions":
        prompt = row.get("prompt")
        return {"question_key": question_key(prompt) if isinstance(prompt, str) else None}
    msgs = row.get("messages")
    if fmt != "chat" or not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        return {}
    seq = "".join(ROLE_CODES.get(m.get("role"), "x") for m in msgs)
    first = next((m.get("content") for m in msgs if m.get("role") == "user"), None)
    return {"role_seq": seq, "turn_seq": seq if "x" not in seq else None,
            "question_key": question_key(first) if isinstance(first, str) else None}


def _add_messages(out: _Columns, name: str, lineno: int, row: dict[str, Any], fmt: str) -> None:
    if fmt == "completions":
        pairs = [{"role": "user", "content": row.get("prompt")},
                 {"role": "assistant", "content": row.get("completion")}]
    elif fmt == "chat" and isinstance(row.get("messages"), list):
        pairs = row["messages"]
    else:
        return
    finishes = row.get("finish_reasons") if isinstance(row.get("finish_reasons"), list) else []
    n_answers = sum(1 for m in pairs if isinstance(m, dict) and m.get("role") == "assistant")
    turn = -1
    for msg_index, msg in enumerate(pairs):
        role = msg.get("role") if isinstance(msg, dict) else None
        turn += role == "assistant"
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
            continue  # the schema check reports it
        finish = None
        if role == "assistant":
            finish = finishes[turn] if turn < len(finishes) else None
            if finish is None and turn == n_answers - 1:
                finish = row.get("finish_reason")  # a single reason belongs to the last answer
        out.add(file=name, line=lineno, id=_id(row), msg=msg_index, role=str(role),
                turn=turn if role == "assistant" else -1, content=msg["content"],
                has_text=bool(msg["content"].strip()),
                finish_reason=finish if isinstance(finish, str) else None)
