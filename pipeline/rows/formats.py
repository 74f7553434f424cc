"""Conversation layouts people already have -> chat messages (used by `tuneline curate`).

Every file in data/imports/*.jsonl is read with `read_import`; its layout is detected from the keys
of each row and must be the same on every line:

- chat         {"messages": [{"role": "user", "content": ...}, ...]}      (mlx-lm chat, OpenAI)
- sharegpt     {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}
- alpaca       {"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}
- completions  {"prompt", "completion"}                                     (mlx-lm completions)
- text         {"text": "<s>[INST] q[/INST] a</s>[INST]follow-up[/INST]"}  (Llama/Mistral markup,
               as in the seed guide) or ChatML markup (<|im_start|>user ...). Plain text without
               turn markers has no question/answer split and is refused with a hint.

A trailing unanswered turn (a follow-up question with no answer) is dropped. Rows keep their `id`
(else one is derived from the file name and the first question, so it survives reordering),
`source` (expert|imported|generated; default imported) and `category`.
`from_messages` renders the other way, for round trips and exports.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.errors import UserError
from pipeline.rows.jsonl import iter_jsonl_numbered

LAYOUTS = ("chat", "sharegpt", "alpaca", "completions", "text")
ROLES = ("system", "user", "assistant")
SOURCES = ("generated", "expert", "imported")
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "bot": "assistant", "chatgpt": "assistant", "model": "assistant", "system": "system",
}
EXPECTED = (
    "messages (chat), conversations (ShareGPT), instruction+output (alpaca), "
    "prompt+completion (completions) or text"
)
_SYS_RE = re.compile(r"^\s*<<SYS>>\n?(.*?)\n?<</SYS>>\s*", re.DOTALL)
_CHATML_RE = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>|$)", re.DOTALL)


class FormatError(UserError):
    """A row that cannot be turned into a conversation."""


@dataclass(frozen=True)
class Conversation:
    """One dataset-to-be row: messages plus where they came from."""

    id: str
    messages: tuple[dict[str, str], ...]
    source: str
    origin: tuple[str, ...]  # "file:line" of every input that shaped it
    meta: dict[str, Any] = field(default_factory=dict)
    dropped_turns: int = 0


def detect(row: dict[str, Any]) -> str | None:
    """The layout of one row, or None when its keys match none."""
    if "messages" in row:
        return "chat"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "completions"
    if "text" in row:
        return "text"
    return None


def to_messages(row: dict[str, Any], layout: str) -> tuple[list[dict[str, str]], int]:
    """Messages of a row in `layout`, and how many trailing unanswered turns were dropped."""
    messages = _CONVERTERS[layout](row)
    for i, msg in enumerate(messages):
        if msg["role"] not in ROLES:
            raise FormatError(f"message {i}: role {msg['role']!r} is not one of {list(ROLES)}")
        if not isinstance(msg["content"], str):
            raise FormatError(f"message {i}: content must be a string, got "
                              f"{type(msg['content']).__name__}")
    return _drop_unanswered(messages)


def _drop_unanswered(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], int]:
    kept = list(messages)
    if kept and kept[-1]["role"] == "assistant" and not kept[-1]["content"].strip():
        kept.pop()
    while kept and kept[-1]["role"] == "user":
        kept.pop()
    dropped = sum(1 for m in messages[len(kept):] if m["role"] == "user")
    if not any(m["role"] == "assistant" for m in kept) or not any(m["role"] == "user"
                                                                  for m in kept):
        raise FormatError("no answered turn: a conversation needs a user message and an answer")
    return kept, dropped


def _chat(row: dict[str, Any]) -> list[dict[str, str]]:
    msgs = row["messages"]
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        raise FormatError('"messages" must be a list of {"role": ..., "content": ...} objects')
    missing = [i for i, m in enumerate(msgs) if "role" not in m or "content" not in m]
    if missing:
        raise FormatError(f'message {missing[0]} lacks "role" or "content"')
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _sharegpt(row: dict[str, Any]) -> list[dict[str, str]]:
    turns = row["conversations"]
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise FormatError('"conversations" must be a list of {"from": ..., "value": ...} objects')
    out = []
    for i, turn in enumerate(turns):
        who, text = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
        if who not in SHAREGPT_ROLES:
            raise FormatError(f"turn {i}: speaker {who!r} is not one of {sorted(SHAREGPT_ROLES)}")
        out.append({"role": SHAREGPT_ROLES[who], "content": text})
    return out


def _alpaca(row: dict[str, Any]) -> list[dict[str, str]]:
    out = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    for pair in row.get("history") or []:
        if not (isinstance(pair, list) and len(pair) == 2):
            raise FormatError('"history" must be a list of [question, answer] pairs')
        out += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    question = row["instruction"]
    if row.get("input"):
        question = f"{question}\n\n{row['input']}"
    return out + [{"role": "user", "content": question},
                  {"role": "assistant", "content": row["output"]}]


def _completions(row: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["completion"]}]


def _text(row: dict[str, Any]) -> list[dict[str, str]]:
    text = row["text"]
    if not isinstance(text, str):
        raise FormatError(f'"text" must be a string, got {type(text).__name__}')
    if "[INST]" in text:
        return parse_inst(text)
    if "<|im_start|>" in text:
        return parse_chatml(text)
    raise FormatError(
        'plain "text" has no turn markers ([INST] ... [/INST] or <|im_start|>), so it cannot be '
        'split into question and answer; write it as {"messages": [...]} instead'
    )


def parse_inst(text: str) -> list[dict[str, str]]:
    """`<s>[INST] q[/INST] a</s>[INST] q2[/INST] a2</s>` -> messages (Llama 2 / Mistral)."""
    chunks = text.replace("<s>", "").split("[INST]")
    if chunks[0].strip():
        raise FormatError(f"text before the first [INST]: {chunks[0].strip()[:40]!r}")
    out: list[dict[str, str]] = []
    for n, chunk in enumerate(chunks[1:], start=1):
        question, sep, answer = chunk.partition("[/INST]")
        if not sep and n < len(chunks) - 1:
            raise FormatError(f"[INST] number {n} has no closing [/INST]")
        if n == 1 and (sys_match := _SYS_RE.match(question)):
            out.append({"role": "system", "content": sys_match.group(1).strip()})
            question = question[sys_match.end():]
        out.append({"role": "user", "content": question.strip()})
        if sep:
            out.append({"role": "assistant", "content": answer.replace("</s>", "").strip()})
    return out


def parse_chatml(text: str) -> list[dict[str, str]]:
    """`<|im_start|>user\\nq<|im_end|>\\n<|im_start|>assistant\\na<|im_end|>` -> messages."""
    return [{"role": role, "content": content.strip()} for role, content in
            _CHATML_RE.findall(text)]


def render_inst(messages: list[dict[str, str]]) -> str:
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    parts = []
    for i in range(0, len(turns), 2):
        question = turns[i]["content"]
        if i == 0 and system:
            question = f"<<SYS>>\n{system[0]}\n<</SYS>>\n\n{question}"
        answer = turns[i + 1]["content"] if i + 1 < len(turns) else None
        start = "<s>" if i == 0 else ""
        parts.append(f"{start}[INST] {question}[/INST]" + (f" {answer}</s>" if answer else ""))
    return "".join(parts)


def render_chatml(messages: list[dict[str, str]]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def from_messages(messages: list[dict[str, str]], layout: str) -> dict[str, Any]:
    """Render messages in `layout` (text uses [INST] markup): the inverse of to_messages."""
    if layout == "chat":
        return {"messages": [dict(m) for m in messages]}
    if layout == "sharegpt":
        back = {"user": "human", "assistant": "gpt", "system": "system"}
        return {"conversations": [{"from": back[m["role"]], "value": m["content"]}
                                  for m in messages]}
    if layout == "text":
        return {"text": render_inst(messages)}
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m["content"] for m in messages if m["role"] != "system"]
    if layout == "completions":
        if len(turns) != 2 or system:
            raise FormatError("completions hold one question and one answer, no system prompt")
        return {"prompt": turns[0], "completion": turns[1]}
    if layout == "alpaca":
        row: dict[str, Any] = {"instruction": turns[-2], "input": "", "output": turns[-1]}
        if len(turns) > 2:
            row["history"] = [[turns[i], turns[i + 1]] for i in range(0, len(turns) - 2, 2)]
        return {**row, **({"system": system[0]} if system else {})}
    raise FormatError(f"unknown layout {layout!r}; choose one of {list(LAYOUTS)}")


_CONVERTERS = {"chat": _chat, "sharegpt": _sharegpt, "alpaca": _alpaca,
               "completions": _completions, "text": _text}


def derived_id(stem: str, messages: list[dict[str, str]]) -> str:
    """An id that follows the content, not the line number: reordering a file keeps it."""
    first = next(m["content"] for m in messages if m["role"] == "user")
    return f"{stem}-{hashlib.sha256(first.encode()).hexdigest()[:10]}"


def read_import(path: Path | str) -> list[Conversation]:
    """Every row of one import file as a Conversation; errors name the file and line."""
    path = Path(path)
    layout_of_file: tuple[str, int] | None = None
    out = []
    for lineno, row in _numbered_rows(path):
        layout = detect(row)
        if layout is None:
            raise FormatError(f"{path}:{lineno}: unknown layout; keys seen: {sorted(row)}; "
                              f"expected {EXPECTED}")
        if layout_of_file is None:
            layout_of_file = (layout, lineno)
        elif layout != layout_of_file[0]:
            raise FormatError(
                f"{path}:{lineno}: layout {layout} but line {layout_of_file[1]} is "
                f"{layout_of_file[0]}; keep one layout per file (split it into two files)"
            )
        out.append(_conversation(path, lineno, row, layout))
    return out


def _numbered_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """read_jsonl drops blank lines; keep the real line numbers for messages."""
    return iter_jsonl_numbered(path)


def _conversation(path: Path, lineno: int, row: dict[str, Any], layout: str) -> Conversation:
    try:
        messages, dropped = to_messages(row, layout)
    except FormatError as exc:
        raise FormatError(f"{path}:{lineno}: {layout} row: {exc}") from None
    rid = row.get("id")
    source = row.get("source") if row.get("source") in SOURCES else "imported"
    meta = {"category": row["category"]} if isinstance(row.get("category"), str) else {}
    return Conversation(
        id=str(rid) if rid not in (None, "") else derived_id(path.stem, messages),
        messages=tuple(messages),
        source=source,
        origin=(f"{path}:{lineno}",),
        meta=meta,
        dropped_turns=dropped,
    )
