"""Preference pairs: what an expert's correction teaches besides the new answer.

When an expert replaces a generated answer (`replace_answer`, `replace_followup` in
data/corrections.jsonl), the replaced answer is the "rejected" half of a pair, in the expert's own
domain. Curate writes the pairs to data/dataset/preference/{train,valid,test}.jsonl, each in the
split of its conversation, in TRL's conversational preference layout plus provenance:

  {"id": "q-0005/1", "conversation": "q-0005", "source": "correction",
   "prompt": [{"role": "user", "content": "..."}],          # the conversation up to the answer
   "chosen": [{"role": "assistant", "content": "expert"}],
   "rejected": [{"role": "assistant", "content": "generated"}],
   "provenance": {"correction": "data/corrections.jsonl:3",
                  "generated": "data/generated/answers.jsonl:5", "turn": 1, "replaces": "9f2c..."}}

A pair is made only where the correction's `replaces` hash (written by `tuneline review`) is the
digest of the generated text it replaced: then the rejected answer is exactly what the expert
read and turned down. Never from an expert's own conversations (`add_conversation`), never from
imported answers. Pair files people already have (data/imports/*.jsonl with `chosen` and
`rejected`) are imported in TRL's layouts: prompt/chosen/rejected as strings, as chat messages,
or chosen/rejected as whole conversations sharing their prompt (TRL's implicit prompt).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.errors import UserError
from pipeline.rows.corrections import Correction, turn_meta
from pipeline.rows.formats import Conversation
from pipeline.rows.jsonl import iter_jsonl_numbered

Messages = tuple[dict[str, str], ...]


class PairError(UserError):
    """A preference file that cannot be read as pairs: names the file, line and field."""


@dataclass(frozen=True)
class Candidate:
    """A replaced generated turn, before curate knows whether its conversation survives."""

    conversation: str
    turn: int  # 0: the first answer, 1: the follow-up answer
    chosen: str
    rejected: str
    provenance: dict[str, Any]


@dataclass(frozen=True)
class Pair:
    id: str
    prompt: Messages
    chosen: str
    rejected: str
    source: str  # correction | imported
    conversation: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {"id": self.id, "conversation": self.conversation, "source": self.source,
                "prompt": [dict(m) for m in self.prompt],
                "chosen": [{"role": "assistant", "content": self.chosen}],
                "rejected": [{"role": "assistant", "content": self.rejected}],
                "provenance": self.provenance}


def norm(text: str | None) -> str:
    """Text as review digests it: line endings unified, outer whitespace dropped."""
    return (text or "").replace("\r\n", "\n").replace("\r", "\n").strip()


def digest(text: str | None) -> str:
    """The `replaces` hash `tuneline review` writes (pipeline/commands/review.py `digest`)."""
    return hashlib.sha256(norm(text).encode()).hexdigest()[:16]


def defects(prompt: Sequence[dict[str, Any]], chosen: str, rejected: str) -> list[str]:
    """What makes a pair teach nothing or the wrong thing (validate reports the same)."""
    found = []
    c, r = norm(chosen), norm(rejected)
    if not c or not r:
        found.append("empty " + " and ".join(s for s, t in (("chosen", c), ("rejected", r))
                                               if not t))
    elif c == r:
        found.append("chosen equals rejected")
    elif c.startswith(r):
        found.append("rejected is a truncated copy of chosen")
    if not prompt or prompt[-1].get("role") != "user":
        found.append("prompt does not end with a user turn")
    return found


# --- pairs from corrections ------------------------------------------------------------------


def candidates(rows: dict[str, Conversation], corrections: list[Correction], path: str
               ) -> tuple[list[Candidate], list[dict[str, Any]]]:
    """Replaced generated turns in `rows` (the conversations before any correction), and the
    corrections that made no pair with the reason."""
    last = {(c.id, c.action): c for c in corrections}
    out, skipped = [], []
    for (rid, action), corr in sorted(last.items(), key=lambda kv: kv[1].line):
        if action not in ("replace_answer", "replace_followup"):
            continue
        why = _why_not(rows.get(rid), corr, last)
        if isinstance(why, str):
            skipped.append({"line": corr.line, "id": rid, "action": action, "why": why})
            continue
        turn, rejected, chosen = why
        conv = rows[rid]
        out.append(Candidate(rid, turn, chosen, rejected, {
            "correction": f"{path}:{corr.line}", "generated": conv.origin[0] if conv.origin
            else None, "turn": turn + 1, "replaces": corr.row["replaces"]}))
    return out, skipped


def _why_not(conv: Conversation | None, corr: Correction,
             last: dict[tuple[str, str], Correction]) -> str | tuple[int, str, str]:
    """(turn, rejected, chosen), or why this correction makes no pair."""
    if (corr.id, "add_conversation") in last:
        return "the expert's own conversation (add_conversation): nothing generated was replaced"
    if (corr.id, "drop") in last:
        return "dropped"
    if conv is None:
        return "no generated answer with this id (an expert answer to a bare question)"
    if not isinstance(corr.row.get("replaces"), str):
        return ('no "replaces" hash, so the replaced text is unknown; `tuneline review` '
                "writes it")
    sources, _ = turn_meta(conv)
    turn = 0 if corr.action == "replace_answer" else 1
    answers = [m["content"] for m in conv.messages if m["role"] == "assistant"]
    questions = [m["content"] for m in conv.messages if m["role"] == "user"]
    if len(answers) <= turn or sources[turn] != "generated":
        return f"answer {turn + 1} was not generated (source {sources[turn:turn + 1] or 'none'})"
    if corr.action == "replace_answer":
        chosen, expected = corr.row["answer"], digest(answers[0])
    else:
        if corr.row.get("followup", "") is None or not corr.row.get("followup_answer"):
            return "the follow-up was removed, not answered anew"
        if "followup" in corr.row and norm(corr.row["followup"]) != norm(questions[1]):
            return "the follow-up question changed: the old answer answered another question"
        chosen, expected = corr.row["followup_answer"], f"{digest(questions[1])}:{digest(answers[1])}"
    if corr.row["replaces"] != expected:
        return ("the generated text changed since the expert replaced it (answers "
                "regenerated): the replaced text is gone")
    problems = defects([{"role": "user"}], chosen, answers[turn])
    if problems:
        return problems[0]
    return turn, answers[turn], chosen


def pairs_for(conv: Conversation, found: Iterable[Candidate]) -> list[Pair]:
    """The pairs of a curated conversation: its prompt as the dataset row has it (system prompt
    included) up to the expert's answer, which must still be there."""
    out = []
    assistant_at = [i for i, m in enumerate(conv.messages) if m["role"] == "assistant"]
    for cand in found:
        if len(assistant_at) <= cand.turn:
            continue  # the turn was cut (drop_bad_generated kept the turns before it)
        at = assistant_at[cand.turn]
        if norm(conv.messages[at]["content"]) != norm(cand.chosen):
            continue
        prompt = tuple({"role": m["role"], "content": m["content"]} for m in conv.messages[:at])
        out.append(Pair(f"{conv.id}/{cand.turn + 1}", prompt, cand.chosen, cand.rejected,
                        "correction", conv.id, cand.provenance))
    return out


# --- files -----------------------------------------------------------------------------------


def is_pair_row(row: Any) -> bool:
    return isinstance(row, dict) and "chosen" in row and "rejected" in row


def is_pair_file(path: Path) -> bool:
    """A JSONL whose first row has `chosen` and `rejected`."""
    for _, row in iter_jsonl_numbered(path):
        return is_pair_row(row)
    return False


def read(path: Path, *, source: str = "imported") -> list[Pair]:
    """Every row of a preference file as a Pair (any of TRL's layouts, or curate's own)."""
    return [to_pair(row, f"{path}:{line}", f"{path.stem}-{line}", source)
            for line, row in iter_jsonl_numbered(path)]


def to_pair(row: dict[str, Any], where: str, default_id: str, source: str) -> Pair:
    if not is_pair_row(row):
        raise PairError(f"{where}: a preference row needs \"chosen\" and \"rejected\"")
    if "prompt" in row:
        prompt = _messages(row["prompt"], "user", f"{where}: prompt")
        chosen = _answer(row["chosen"], f"{where}: chosen")
        rejected = _answer(row["rejected"], f"{where}: rejected")
    else:  # TRL's implicit prompt: two whole conversations that differ in the last answer
        c = _messages(row["chosen"], "user", f"{where}: chosen")
        r = _messages(row["rejected"], "user", f"{where}: rejected")
        if len(c) < 2 or c[:-1] != r[:-1] or c[-1]["role"] != "assistant" \
                or r[-1]["role"] != "assistant":
            raise PairError(f"{where}: without \"prompt\", chosen and rejected must be "
                            "conversations that share every turn but a last assistant answer")
        prompt, chosen, rejected = c[:-1], c[-1]["content"], r[-1]["content"]
    rid = row.get("id") if isinstance(row.get("id"), str) and row.get("id") else default_id
    prov = row.get("provenance") if isinstance(row.get("provenance"), dict) else {"origin": where}
    conv = row.get("conversation") if isinstance(row.get("conversation"), str) else None
    return Pair(rid, prompt, chosen, rejected, str(row.get("source") or source), conv, prov)


def _messages(value: Any, role: str, where: str) -> Messages:
    if isinstance(value, str):
        return ({"role": role, "content": value},)
    if not isinstance(value, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in value):
        raise PairError(f"{where}: expected a string or a list of {{role, content}} messages")
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def _answer(value: Any, where: str) -> str:
    msgs = _messages(value, "assistant", where)
    if not msgs or msgs[-1]["role"] != "assistant" or len(msgs) > 1:
        raise PairError(f"{where}: expected one assistant message (or a string)")
    return msgs[-1]["content"]


def by_split(splits: dict[str, list[Conversation]], found: list[Candidate],
             imported: list[Pair], place: Any) -> tuple[dict[str, list[Pair]], dict[str, Any]]:
    """Pairs per split: a correction's pair goes where its conversation went (no leakage); an
    imported pair where `place(pair)` says (curate: the split of a row with its question)."""
    per_conv: dict[str, list[Candidate]] = {}
    for cand in found:
        per_conv.setdefault(cand.conversation, []).append(cand)
    out: dict[str, list[Pair]] = {name: [] for name in splits}
    for name, convs in splits.items():
        for conv in convs:
            out[name] += pairs_for(conv, per_conv.get(conv.id, ()))
    made = {p.conversation for ps in out.values() for p in ps}
    lost = sorted({c.conversation for c in found} - made)
    seen = {p.id: "corrections" for ps in out.values() for p in ps}
    for pair in imported:
        if pair.id in seen:
            raise PairError(f"{pair.provenance.get('origin')}: pair id {pair.id!r} is used twice "
                            "(also in " + seen[pair.id] + "); ids must be unique")
        seen[pair.id] = str(pair.provenance.get("origin"))
        out[place(pair)].append(pair)
    out = {name: sorted(ps, key=lambda p: p.id) for name, ps in out.items()}
    report = {"pairs": {name: len(ps) for name, ps in out.items()},
              "from_corrections": sum(p.source == "correction" for ps in out.values() for p in ps),
              "imported": len(imported),
              "conversations_removed": lost}
    return out, report
