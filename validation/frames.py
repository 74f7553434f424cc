"""JSONL files -> the pandas frames the suites check (plain Python and pandas, no GX).

- files:    one row per file (or expected split): file, rows, present
- lines:    one row per physical line: file, line, id, utf8/blank/is_object flags, format (of
            the row) and file_format (of the file's first row), the line's text as `object_raw`
            where it is a JSON object, role sequence, question key, and `json_error`: why a
            line that is not blank is not a JSON object (GX fingerprints every frame it
            validates, so each string column costs a pass over its bytes: the text of those
            lines is not kept).
- messages: one row per message with string content (chat), or prompt/completion: content for
            every role; has_text, last_char, text_len, finish_reason, turn and restates (the
            answer only repeats its question) for answers only

A line is a JSON object only if every reader downstream takes it: Python's strict `json` on
a text-mode line (mlx-lm's loader: no raw control characters, no carriage return inside the
line, integers up to Python's 4300-digit limit, nesting within the recursion limit) and orjson
(tuneline's own readers: no NaN or Infinity, no lone surrogate escapes, no numbers out of
range). A line longer than MAX_LINE_BYTES is reported without being read whole.

A column holds None where its check does not apply (a blank line has no `is_object`, a user
message no `finish_reason`): GX map expectations skip nulls, so no check needs a row condition
(each condition costs a DataFrame query per expectation). Line numbers are 1-based physical
lines, so a finding points at what an editor shows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import pandas as pd

from pipeline.rows.formats import detect
from validation.patterns import last_char, question_key, restates

ROLE_CODES = {"system": "s", "user": "u", "assistant": "a"}
TOOL_ROLE_CODES = {**ROLE_CODES, "tool": "t"}  # files other than the curated dataset
TRAINING_FORMATS = ("chat", "completions", "text")
FILE_COLUMNS = ("file", "rows", "present")
LINE_COLUMNS = ("file", "line", "id", "utf8", "blank", "is_object", "format",
                "file_format", "object_raw", "role_seq", "turn_seq", "question_key",
                "json_error")
MESSAGE_COLUMNS = ("file", "line", "id", "msg", "role", "content", "turn", "has_text",
                   "last_char", "text_len", "finish_reason", "restates")
# A training row is kilobytes; 16 MiB is millions of tokens, past any context window. Longer
# lines are reported, and skipped in chunks rather than read whole.
MAX_LINE_BYTES = 16 << 20


@dataclass
class Frames:
    files: pd.DataFrame
    lines: pd.DataFrame
    messages: pd.DataFrame
    pairs: pd.DataFrame = field(default_factory=pd.DataFrame)  # validation/pairs.py


BOOLEAN = ("utf8", "blank", "is_object", "present", "has_text", "restates")
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
    name, file_format, rows, lineno = str(path), None, 0, 0
    with path.open("rb") as fh:
        while raw_bytes := fh.readline(MAX_LINE_BYTES + 1):
            lineno += 1
            if len(raw_bytes) > MAX_LINE_BYTES and not raw_bytes.endswith(b"\n"):
                raw, utf8, blank, row = "", True, False, _too_long(raw_bytes, fh)
            else:
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


def _too_long(head: bytes, fh: BinaryIO) -> str:
    """Skip the rest of an over-long line; say how long it was."""
    size = len(head)
    while (chunk := fh.readline(1 << 20)):
        size += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return (f"the line is {size / 2**20:.1f} MiB, longer than the {MAX_LINE_BYTES >> 20} MiB a "
            "row may have (a training row is kilobytes): split or shorten it")


def _parse(raw_bytes: bytes) -> tuple[str, bool, bool | None, Any]:
    """(text, utf8, blank, value): value is the JSON object, or why the line is not one."""
    try:
        raw = raw_bytes.decode("utf-8")
    except UnicodeDecodeError:
        return raw_bytes.decode("utf-8", errors="replace"), False, None, None
    if not raw.strip():
        return raw, True, True, None
    value, problem = parse_line(raw)
    if problem is not None:
        return raw, True, False, problem
    if not isinstance(value, dict):
        return raw, True, False, (f"a JSON {type(value).__name__}, not an object; each line "
                                  "must be one JSON object")
    return raw, True, False, value


def parse_line(raw: str) -> tuple[Any, str | None]:
    """One line's value as every reader downstream takes it, or why one of them refuses it."""
    if "\r" in raw:
        return None, ("a carriage return (\\r) inside the line: Python's text-mode reader "
                      "(mlx-lm's loader) ends the line there; remove it")
    try:
        value = json.loads(raw)  # strict: raw control characters in strings are refused
    except RecursionError:
        return None, ("nested deeper than Python's json reads (its recursion limit): mlx-lm's "
                      "loader fails on this line; flatten it")
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc}); each line must be one JSON object"
    except ValueError as exc:  # an integer past Python's int-string limit
        return None, (f"a number Python's json refuses ({str(exc).split(';')[0]}): mlx-lm's "
                      "loader fails on this line; write it as a string")
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return None, (f"not standard JSON ({exc}): NaN, Infinity, numbers out of range and "
                      "lone surrogate escapes break other readers; write them as strings or "
                      "null")
    return value, None


def _line(raw: str, blank: bool | None, row: Any, fmt: str | None,
          file_format: str | None, codes: dict[str, str]) -> tuple[Any, ...]:
    """The lines-frame values from is_object on, in LINE_COLUMNS order; `row` is the object,
    or why the line is not one (a string), or None (blank, not UTF-8)."""
    if fmt is None:
        is_object = None if blank is not False else False
        return (is_object, None, file_format, None, None, None, None,
                row if isinstance(row, str) else None)
    role_seq, question = _sequence(row, fmt, codes)
    turn_seq = role_seq if role_seq is not None and "x" not in role_seq else None
    return (True, fmt, file_format, raw, role_seq, turn_seq, question, None)


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
    turn, question = -1, None
    for index, (msg, role) in enumerate(zip(msgs, roles)):
        turn += role == "assistant"
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, str):
            continue  # the schema check reports it
        if role != "assistant":
            question = content if role == "user" else question
            tables["messages"].add((name, lineno, rid, index, str(role), content, -1, None,
                                    None, None, None, None))
            continue
        finish = finishes[turn] if turn < len(finishes) else None
        if finish is None and turn == last_turn:
            finish = row.get("finish_reason")  # a single reason belongs to the last answer
        char = last_char(content)
        tables["messages"].add((name, lineno, rid, index, "assistant", content, turn,
                                char is not None, char,
                                len(content) if char is not None else None,
                                finish if isinstance(finish, str) else None,
                                restates(question, content) if question is not None else None))

