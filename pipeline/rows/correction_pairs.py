"""Pairs from expert corrections (curate): a replaced generated answer is the rejected side.

A pair is made only where the correction's `replaces` hash (written by `tuneline review`) is the
digest of the generated text it replaced: then the rejected answer is exactly what the expert
read and turned down. Never from an expert's own conversations (`add_conversation`), never from
imported answers, never from a conversation curate removed; each pair lands in its
conversation's split (pipeline/rows/pairs.py has the layout).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pipeline.rows.corrections import Correction, turn_meta
from pipeline.rows.formats import Conversation
from pipeline.rows.pairs import Pair, PairError, defects, digest, norm


@dataclass(frozen=True)
class Candidate:
    """A replaced generated turn, before curate knows whether its conversation survives."""

    conversation: str
    turn: int  # 0: the first answer, 1: the follow-up answer
    chosen: str
    rejected: str
    provenance: dict[str, Any]





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
