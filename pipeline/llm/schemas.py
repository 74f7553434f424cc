"""JSON schemas for structured replies, and reading those replies back.

The schemas go through `llm.ask(..., schema=...)` to each backend's structured-output mechanism
(llama.cpp grammar, Ollama `format`, OpenAI `response_format`), so even a 135M model replies in a
shape the code can read. The root is always an object (OpenAI's json_schema demands one).

- `draft_list(count, starters, chars)`: `{"questions": [...]}`, one question per item; with
  starters, item i must start with starter i (rotating): the 135M embedded model otherwise
  repeats one question; the template asked for those starters anyway.
- `draft_by_category(categories, count, chars)`: `{"<category>": [...], ...}`, every category.
- `FOLLOWUP`: `{"followup": "..."}`: one line, no label, ending like a question or a request.
- `loads(text)`: the JSON value of a reply, also of one cut short by max_tokens (the complete
  items before the cut survive).
"""

from __future__ import annotations

import json
import re
from typing import Any

Schema = dict[str, Any]

# One unit of a question: no quote or backslash (nothing to escape), no question mark (the first
# one ends it: no second question glued on), no line break or brackets (no list or JSON debris),
# no comma, a full stop only before a lowercase letter (pg_hba.conf), digits in runs of at most
# 4 (16.1, 2024).
# The 135M embedded model otherwise echoes the prompt's comma-separated starters, runs on in
# sentences, or loops on digits (bench/README.md). Plain groups: llama-cpp-python's converter
# has no (?:...).
CHAR = r'[^"\\?？\n,.。{}\[\]0-9]'
BODY = rf"({CHAR}|[.][a-z_]|[0-9]{{1,4}}({CHAR}|[.][0-9a-z_]))"
FIRST = r'[^"\\?？\n,.。{}\[\]()0-9 :：*#>-]'  # no numbering, bullet, label or space in front
END = "[?？]"


def question(chars: tuple[int, int], starter: str | None = None) -> Schema:
    """One question string of about `chars` (min, max) characters (a unit of BODY may be a few),
    opening with `starter`, or else with a character that cannot start numbering or a bullet."""
    lo, hi = chars
    head = f"{literal(starter.strip())} " if starter else FIRST
    fixed = len(starter.strip()) + 1 if starter else 1
    room_lo = max(1, lo - fixed - 1)
    room_hi = max(room_lo + 1, hi - fixed - 1)
    # A number may close the question ("... in PostgreSQL 16?"): BODY keeps digits off its end.
    return {"type": "string",
            "pattern": f"^{head}{BODY}{{{room_lo},{room_hi}}}[0-9]{{0,4}}{END}$"}


def literal(text: str) -> str:
    """`text` as a regex matching itself; spaces stay plain (grammar converters differ on '\\ ')."""
    return re.sub(r"([.^$*+?()\[\]{}|\\])", r"\\\1", text)


def questions_array(count: int, chars: tuple[int, int],
                    starters: tuple[str, ...] = ()) -> Schema:
    if starters:
        items = [question(chars, starters[i % len(starters)]) for i in range(count)]
        return {"type": "array", "prefixItems": items, "items": False,
                "minItems": count, "maxItems": count}
    return {"type": "array", "items": question(chars),
            "minItems": count, "maxItems": count}


def draft_list(count: int, chars: tuple[int, int], starters: tuple[str, ...] = ()) -> Schema:
    return strict_object({"questions": questions_array(count, chars, starters)})


def draft_by_category(categories: tuple[str, ...], count: int, chars: tuple[int, int],
                      starters: tuple[str, ...] = ()) -> Schema:
    return strict_object({c: questions_array(count, chars, starters) for c in categories})


def strict_object(properties: dict[str, Schema]) -> Schema:
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


# The follow-up is held to the same shape as a drafted question: one question, no label or
# preamble in front (FIRST), no run-on sentences; short enough to fit followup_max_tokens.
FOLLOWUP = strict_object({"followup": question((8, 160))})


def followup_text(text: str) -> str | None:
    """The follow-up inside a structured reply (also one cut short by max_tokens: the text so
    far); None when the reply is not that shape."""
    value = loads(text)
    if isinstance(value, dict) and isinstance(value.get("followup"), str):
        return value["followup"].strip()
    cut = re.match(r'\s*\{\s*"followup"\s*:\s*"((?:[^"\\]|\\.)*)', text)
    return cut.group(1).strip() if cut else None


# --- reading replies -----------------------------------------------------------------------


def loads(text: str) -> Any:
    """The reply's JSON value; for a reply cut short, the longest prefix that closes cleanly
    (up to the last complete string); None when there is none."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    for end, closers in reversed(closing_points(text)[-8:]):
        try:
            return json.loads(text[:end] + closers)
        except json.JSONDecodeError:
            continue
    return None


def closing_points(text: str) -> list[tuple[int, str]]:
    """(end, closers) after each complete string value: where the text could be cut and closed."""
    stack: list[str] = []
    points: list[tuple[int, str]] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in "[{":
            stack.append("]" if ch == "[" else "}")
        elif ch in "]}" and stack:
            stack.pop()
        elif ch == '"':
            i = string_end(text, i)
            if i >= n:
                break  # cut inside a string: that value is incomplete
            # A string followed by ':' is a key, not a value: no cut there.
            rest = text[i + 1:i + 40].lstrip()
            if stack and not rest.startswith(":"):
                points.append((i + 1, "".join(reversed(stack))))
        i += 1
    return points


def string_end(text: str, start: int) -> int:
    """Index of the quote closing the string opened at `start` (or the text's end)."""
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return i
        i += 1
    return len(text)
