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

Pairs from corrections: pipeline/rows/correction_pairs.py. Pair files people already have (data/imports/*.jsonl with `chosen` and
`rejected`) are imported in TRL's layouts: prompt/chosen/rejected as strings, as chat messages,
or chosen/rejected as whole conversations sharing their prompt (TRL's implicit prompt).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.errors import UserError
from pipeline.rows.jsonl import iter_jsonl_numbered

Messages = tuple[dict[str, str], ...]


class PairError(UserError):
    """A preference file that cannot be read as pairs: names the file, line and field."""


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

