"""Expert corrections: data/corrections.jsonl, applied by `tuneline curate`, written by hand or by
`tuneline review apply`.

Generated files are never edited by hand; an expert's work lives here, keyed by a stable question
id (data/questions.jsonl ids, or import ids), so regenerating answers never overwrites it.
One JSON object per line:

  {"id": "q-0007", "action": "drop", "note": "too vague"}
  {"id": "q-0003", "action": "replace_answer", "answer": "Run SELECT version(); ..."}
  {"id": "q-0003", "action": "replace_followup", "followup": "And the minor version?",
   "followup_answer": "..."}            # "followup" omitted: keep the question, replace the answer
  {"id": "q-0003", "action": "replace_followup", "followup": null}   # remove the follow-up turn
  {"id": "my-001", "action": "add_conversation", "messages": [{"role": "user", ...}, ...]}
  {"id": "q-0004", "action": "reviewed", "digest": "9f2c..."}   # an expert checked this row

Rules:
- `drop` removes the question whatever else says; delete the line to bring it back.
- `replace_answer` / `replace_followup` need the id in the generated answers, an import or
  data/questions.jsonl (then the expert answer stands in for a generated one).
- `add_conversation` adds a new id, or replaces the whole conversation of an existing one.
- `reviewed` changes no data: it records that an expert read the conversation and let it stand
  (written by `tuneline review serve`). "digest" is `review.conversation_digest` of the question,
  answer, follow-up and follow-up answer as reviewed; once the text changes (answers regenerated)
  the mark no longer matches and the row counts as not reviewed again.
- Several lines with the same id and action: the last one wins.
- Optional on every line: "question" (the question the expert answered: when it no longer matches,
  curate reports the correction as stale), "replaces" (sha256 of the text it replaced, written by
  review), "note", "author".
Every expert-written turn is marked "expert" in the row's `turn_sources`; the row's `source` becomes
"expert".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import UserError
from pipeline.rows import formats
from pipeline.rows.formats import Conversation
from pipeline.rows.jsonl import read_jsonl_numbered

ACTIONS = ("drop", "replace_answer", "replace_followup", "add_conversation", "reviewed")
OPTIONAL = ("question", "replaces", "note", "author", "reason")
FIELDS = {
    "drop": (),
    "replace_answer": ("answer",),
    "replace_followup": ("followup", "followup_answer"),
    "add_conversation": ("messages",),
    "reviewed": ("digest",),
}


class CorrectionError(UserError):
    """A line of data/corrections.jsonl that cannot be applied."""


@dataclass(frozen=True)
class Correction:
    id: str
    action: str
    line: int
    row: dict[str, Any]

    @property
    def where(self) -> str:
        return f"line {self.line} ({self.id}, {self.action})"


@dataclass
class Applied:
    """What applying the corrections did, for reports/curate.json."""

    applied: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    dropped: list[str] = dataclasses.field(default_factory=list)
    unmatched: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    stale: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def load(path: Path | str) -> list[Correction]:
    """Parse and check every line; an absent file means no corrections."""
    path = Path(path)
    if not path.exists():
        return []
    # The reader's own line numbers (lines end at "\n" only, as an editor counts them): a count
    # made here would disagree with it on lines holding only a Unicode space (NBSP, U+2028).
    return [_parse(path, line, row) for line, row in read_jsonl_numbered(path)]


def _parse(path: Path, line: int, row: dict[str, Any]) -> Correction:
    where = f"{path}:{line}"
    rid, action = row.get("id"), row.get("action")
    if not isinstance(rid, str) or not rid:
        raise CorrectionError(f'{where}: "id" must be a non-empty string (a question id)')
    if action not in ACTIONS:
        raise CorrectionError(f"{where}: action {action!r} is not one of {list(ACTIONS)}")
    allowed = {"id", "action", *FIELDS[action], *OPTIONAL}
    unknown = sorted(set(row) - allowed)
    if unknown:
        raise CorrectionError(f"{where}: unknown key(s) {unknown} for {action}; "
                              f"allowed: {sorted(allowed)}")
    _check_fields(where, action, row)
    return Correction(rid, action, line, row)


def _check_fields(where: str, action: str, row: dict[str, Any]) -> None:
    if action == "replace_answer" and not _text(row.get("answer")):
        raise CorrectionError(f'{where}: "answer" must be a non-empty string')
    if action == "replace_followup":
        if "followup" not in row and "followup_answer" not in row:
            raise CorrectionError(f'{where}: give "followup" and/or "followup_answer" '
                                  '("followup": null removes the follow-up)')
        if row.get("followup", "") is not None and not _text(row.get("followup_answer")):
            raise CorrectionError(f'{where}: "followup_answer" must be a non-empty string '
                                  "(a follow-up without an answer is not trained on)")
    if action == "reviewed" and not _text(row.get("digest")):
        raise CorrectionError(f'{where}: "digest" must be a non-empty string (written by '
                              "`tuneline review serve`; delete the line to clear the mark)")
    if action == "add_conversation":
        try:
            formats.to_messages(row, "chat")
        except UserError as exc:
            raise CorrectionError(f"{where}: messages: {exc}") from None


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def apply(rows: dict[str, Conversation], questions: dict[str, str],
          corrections: list[Correction], path: str) -> tuple[dict[str, Conversation], Applied]:
    """Corrections on top of `rows` (id -> conversation); returns new rows and what happened."""
    out, report = dict(rows), Applied()
    for corr in _last_per_action(corrections):
        if corr.action in ("drop", "reviewed"):  # reviewed: a note for people, not data
            continue
        current = out.get(corr.id) or _from_question(corr, questions)
        if current is None and corr.action != "add_conversation":
            report.unmatched.append({"line": corr.line, "id": corr.id, "action": corr.action,
                                     "why": "no generated answer, import or question has this id"})
            continue
        out[corr.id] = _APPLY[corr.action](current, corr, f"{path}:{corr.line}")
        report.applied.append({"line": corr.line, "id": corr.id, "action": corr.action})
        _note_stale(corr, questions.get(corr.id) or _first_question(rows.get(corr.id)), report)
    for corr in corrections:
        if corr.action != "drop" or corr.id in report.dropped:
            continue
        if out.pop(corr.id, None) is not None or corr.id in questions:
            report.dropped.append(corr.id)
        else:
            report.unmatched.append({"line": corr.line, "id": corr.id, "action": "drop",
                                     "why": "nothing has this id"})
    return out, report


def _last_per_action(corrections: list[Correction]) -> list[Correction]:
    last = {(c.id, c.action): c for c in corrections}
    # add_conversation first (a replace_* then edits the expert's conversation), and the answer
    # before the follow-up (an expert answer can stand in for a question never generated).
    rank = {"add_conversation": 0, "replace_answer": 1, "replace_followup": 2, "drop": 3,
            "reviewed": 4}
    return sorted(last.values(), key=lambda c: (rank[c.action], c.line))


def _from_question(corr: Correction, questions: dict[str, str]) -> Conversation | None:
    if corr.id not in questions or corr.action != "replace_answer":
        return None
    return Conversation(id=corr.id, messages=({"role": "user", "content": questions[corr.id]},),
                        source="expert", origin=(), meta={"turn_sources": [],
                                                          "finish_reasons": []})


def _first_question(conv: Conversation | None) -> str | None:
    if conv is None:
        return None
    return next((m["content"] for m in conv.messages if m["role"] == "user"), None)


def _note_stale(corr: Correction, question_now: str | None, report: Applied) -> None:
    then = corr.row.get("question")
    if isinstance(then, str) and question_now is not None and then.strip() != question_now.strip():
        report.stale.append({"line": corr.line, "id": corr.id, "question_then": then,
                             "question_now": question_now})


def turn_meta(conv: Conversation) -> tuple[list[str], list[str | None]]:
    """Per assistant turn: who wrote it, and the generator's finish reason (None: not generated)."""
    n = sum(1 for m in conv.messages if m["role"] == "assistant")
    sources = list(conv.meta.get("turn_sources") or [conv.source] * n)
    finishes = list(conv.meta.get("finish_reasons") or [None] * n)
    return sources, finishes


def _with_turns(conv: Conversation, messages: list[dict[str, str]], sources: list[str],
                finishes: list[str | None], origin: str) -> Conversation:
    meta = {**conv.meta, "turn_sources": sources, "finish_reasons": finishes}
    return dataclasses.replace(conv, messages=tuple(messages), source="expert",
                               origin=(*conv.origin, origin), meta=meta)


def _replace_answer(conv: Conversation, corr: Correction, origin: str) -> Conversation:
    messages, (sources, finishes) = list(conv.messages), turn_meta(conv)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    new = {"role": "assistant", "content": corr.row["answer"]}
    if answers:
        messages[answers[0]] = new
        sources[0], finishes[0] = "expert", None
    else:
        messages.append(new)
        sources, finishes = ["expert"], [None]
    return _with_turns(conv, messages, sources, finishes, origin)


def _replace_followup(conv: Conversation, corr: Correction, origin: str) -> Conversation:
    messages, (sources, finishes) = list(conv.messages), turn_meta(conv)
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    head = messages[: users[1]] if len(users) > 1 else messages
    if corr.row.get("followup", "") is None:
        return _with_turns(conv, head, sources[:1], finishes[:1], origin)
    question = corr.row.get("followup") or (messages[users[1]]["content"] if len(users) > 1
                                            else None)
    if question is None:
        raise CorrectionError(f"corrections {corr.where}: {corr.id} has no follow-up question "
                              'to answer; add "followup": "the question"')
    tail = [{"role": "user", "content": question},
            {"role": "assistant", "content": corr.row["followup_answer"]}]
    return _with_turns(conv, head + tail, sources[:1] + ["expert"], finishes[:1] + [None], origin)


def _add_conversation(conv: Conversation | None, corr: Correction, origin: str) -> Conversation:
    messages, _ = formats.to_messages(corr.row, "chat")
    n = sum(1 for m in messages if m["role"] == "assistant")
    meta = dict(conv.meta) if conv else {}
    meta.update(turn_sources=["expert"] * n, finish_reasons=[None] * n)
    return Conversation(id=corr.id, messages=tuple(messages), source="expert",
                        origin=(origin,), meta=meta)


_APPLY = {"replace_answer": _replace_answer, "replace_followup": _replace_followup,
          "add_conversation": _add_conversation}
