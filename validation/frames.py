"""JSONL files -> the pandas frames the suites check (plain Python and pandas, no GX).

- files:    one row per file (or expected split): file, rows, present
- lines:    one row per physical line: file, line, id, utf8/blank/is_object flags, format (of
            the row) and file_format (of the file's first row), the line's text as `object_raw`
            where it is a JSON object, role sequence, question key. Other lines' text is read
            back from the file only when a finding needs it (pipeline/validate.py): GX fingerprints
            every frame it validates, so each string column costs a pass over its bytes.
- messages: one row per message with string content (chat), or prompt/completion: content for
            every role; has_text, last_char, text_len, finish_reason and turn for answers only

A column holds None where its check does not apply (a blank line has no `is_object`, a user
message no `finish_reason`): GX map expectations skip nulls, so no check needs a row condition
(each condition costs a DataFrame query per expectation). Line numbers are 1-based physical
lines, so a finding points at what an editor shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pandas as pd

from pipeline.rows.formats import detect
from validation.patterns import last_char, question_key

ROLE_CODES = {"system": "s", "user": "u", "assistant": "a"}
TOOL_ROLE_CODES = {**ROLE_CODES, "tool": "t"}  # files other than the curated dataset
TRAINING_FORMATS = ("chat", "completions", "text")
FILE_COLUMNS = ("file", "rows", "present")
LINE_COLUMNS = ("file", "line", "id", "utf8", "blank", "is_object", "format",
                "file_format", "object_raw", "role_seq", "turn_seq", "question_key")
MESSAGE_COLUMNS = ("file", "line", "id", "msg", "role", "content", "turn", "has_text",
                   "last_char", "text_len", "finish_reason")


@dataclass
class Frames:
    files: pd.DataFrame
    lines: pd.DataFrame
    messages: pd.DataFrame
    pairs: pd.DataFrame = field(default_factory=pd.DataFrame)  # validation/pairs.py


BOOLEAN = ("utf8", "blank", "is_object", "present", "has_text")
INTEGER = ("line", "rows", "msg", "turn", "text_len")


class _Table:
    """One tuple per row, turned into columns once: far cheaper than a dict per row at 1M rows."""

    def __init__(self, columns: tuple[str, ...]):
        self.columns = columns
        self.rows: list[tuple[Any, ...]] = []
        self.add = self.rows.append

    def frame(self) -> pd.DataFrame:
        columns = list(zip(*self.rows)) if self.rows else [()] * len(self.columns)
        return pd.DataFrame({name: _column(name, values)
                             for name, values in zip(self.columns, columns)})


def _column(name: str, values: tuple[Any, ...]) -> Any:
    if name in BOOLEAN:  # nullable booleans: isin() is vectorised, unlike objects with None
        return pd.array(values, dtype="boolean")
    if name in INTEGER:
        return pd.array(values, dtype="Int64")
    # Object, not pandas' "str" dtype: its isna() and isin(), which GX runs for every check,
    # cost several times more on Python-backed strings.
    return pd.Series(values, dtype=object)


def build(files: list[tuple[Path, bool]], tools: bool = False) -> Frames:
    """`files`: (path, present) pairs; a missing expected split counts as a file with no rows.
    `tools`: the tool role is a known role (chat with tool calls)."""
    codes = TOOL_ROLE_CODES if tools else ROLE_CODES
    tables = {name: _Table(cols) for name, cols in (
        ("files", FILE_COLUMNS), ("lines", LINE_COLUMNS), ("messages", MESSAGE_COLUMNS))}
    for path, present in files:
        rows = _read_file(path, tables, codes) if present else 0
        tables["files"].add((str(path), rows, present))
    return Frames(**{name: table.frame() for name, table in tables.items()})


def _read_file(path: Path, tables: dict[str, _Table], codes: dict[str, str]) -> int:
    name, file_format, rows = str(path), None, 0
    with path.open("rb") as fh:
        for lineno, raw_bytes in enumerate(fh, start=1):
            raw, utf8, blank, row = _parse(raw_bytes.rstrip(b"\r\n"))
            rows += blank is not True
            fmt = (detect(row) or "unknown") if isinstance(row, dict) else None
            file_format = file_format or fmt
            rid = _id(row) if fmt is not None else None
            tables["lines"].add((name, lineno, rid, utf8, blank,
                                 *_line(raw, blank, row, fmt, file_format, codes)))
            if fmt is not None:
                _add_messages(tables, name, lineno, rid, row, fmt)
    return rows


def _parse(raw_bytes: bytes) -> tuple[str, bool, bool | None, Any]:
    try:
        raw = raw_bytes.decode("utf-8")
    except UnicodeDecodeError:
        return raw_bytes.decode("utf-8", errors="replace"), False, None, None
    if not raw.strip():
        return raw, True, True, None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw, True, False, False
    return raw, True, False, value if isinstance(value, dict) else False


def _line(raw: str, blank: bool | None, row: Any, fmt: str | None,
          file_format: str | None, codes: dict[str, str]) -> tuple[Any, ...]:
    """The lines-frame values from is_object on, in LINE_COLUMNS order."""
    if fmt is None:
        is_object = None if blank is not False else False
        return (is_object, None, file_format, None, None, None, None)
    role_seq, question = _sequence(row, fmt, codes)
    turn_seq = role_seq if role_seq is not None and "x" not in role_seq else None
    return (True, fmt, file_format, raw, role_seq, turn_seq, question)


def _id(row: dict[str, Any]) -> str | None:
    rid = row.get("id")
    return str(rid) if isinstance(rid, (str, int)) and rid != "" else None


def _sequence(row: dict[str, Any], fmt: str | None,
              codes: dict[str, str]) -> tuple[str | None, str | None]:
    """Role sequence as letters (s, u, a; x for anything else) and the first question's key."""
    if fmt == "completions":
        prompt = row.get("prompt")
        return None, question_key(prompt) if isinstance(prompt, str) else None
    msgs = row.get("messages")
    if fmt != "chat" or not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        return None, None
    seq = "".join(codes.get(m.get("role"), "x") for m in msgs)
    first = next((m.get("content") for m in msgs if m.get("role") == "user"), None)
    return seq, question_key(first) if isinstance(first, str) else None


def _add_messages(tables: dict[str, _Table], name: str, lineno: int, rid: str | None,
                  row: dict[str, Any], fmt: str | None) -> None:
    if fmt == "completions":
        msgs: Any = [{"role": "user", "content": row.get("prompt")},
                     {"role": "assistant", "content": row.get("completion")}]
    elif fmt == "chat" and isinstance(row.get("messages"), list):
        msgs = row["messages"]
    else:
        return
    finishes = row.get("finish_reasons") if isinstance(row.get("finish_reasons"), list) else []
    roles = [m.get("role") if isinstance(m, dict) else None for m in msgs]
    last_turn = roles.count("assistant") - 1
    turn = -1
    for index, (msg, role) in enumerate(zip(msgs, roles)):
        turn += role == "assistant"
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, str):
            continue  # the schema check reports it
        if role != "assistant":
            tables["messages"].add((name, lineno, rid, index, str(role), content, -1, None,
                                    None, None, None))
            continue
        finish = finishes[turn] if turn < len(finishes) else None
        if finish is None and turn == last_turn:
            finish = row.get("finish_reason")  # a single reason belongs to the last answer
        char = last_char(content)
        tables["messages"].add((name, lineno, rid, index, "assistant", content, turn,
                                char is not None, char,
                                len(content) if char is not None else None,
                                finish if isinstance(finish, str) else None))

