"""An LLM judge: which of two models answered each question better, and why.

    verdict = judge(client, cfg, prompts, base_answers, tuned_answers, seed=0)
    verdict = judge(client, cfg, prompts, sft_answers, tuned_answers, seed=0, names=("sft", "tuned"))

Each question's two answers go to the judge as A and B in a seeded random order (against
position bias); the reply, JSON or plain text, is mapped back to the sides' names. `cfg` is the
evaluate stage's judge settings: a generation backend (llm.LLMSettings) plus max_tokens and the
prompt template with {question}, {answer_a} and {answer_b}.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from typing import Any, Protocol

from pipeline.llm import clients as llm


class Question(Protocol):
    id: str

    @property
    def question(self) -> str: ...


def judge(client: llm.Client, cfg: Any, prompts: Sequence[Question],
          other: Sequence[dict[str, Any]], tuned: Sequence[dict[str, Any]],
          seed: int | None, names: tuple[str, str] = ("base", "tuned")) -> dict[str, Any]:
    """`{tuned}_wins`, `{other}_wins`, ties, unparsed, `{tuned}_win_rate` (over decided
    verdicts) and each verdict, for the sides `names` = (other's name, tuned's name)."""
    rng = random.Random(seed)
    sampling = llm.Sampling(temperature=0.0, seed=seed, max_tokens=cfg.max_tokens)
    other_name, tuned_name = names
    verdicts = []
    for p, o, t in zip(prompts, other, tuned):
        tuned_first = rng.random() < 0.5
        a, b = (t, o) if tuned_first else (o, t)
        text = fill(cfg.prompt, question=p.question, answer_a=a["answer"], answer_b=b["answer"])
        reply = llm.ask(client, [{"role": "user", "content": text}], sampling, cfg)  # retries
        pick, reason = parse_verdict(reply.text)
        winner = {"A": tuned_name if tuned_first else other_name,
                  "B": other_name if tuned_first else tuned_name}.get(pick, pick)
        verdicts.append({"id": p.id, "winner": winner, "reason": reason})
    wins = {k: sum(v["winner"] == k for v in verdicts) for k in (tuned_name, other_name, "tie")}
    decided = sum(wins.values())
    return {"enabled": True, "model": client.model, f"{tuned_name}_wins": wins[tuned_name],
            f"{other_name}_wins": wins[other_name], "ties": wins["tie"],
            "unparsed": len(verdicts) - decided,
            f"{tuned_name}_win_rate": round(wins[tuned_name] / decided, 4) if decided else None,
            "verdicts": verdicts}


def fill(template: str, **values: str) -> str:
    """Replace only `{name}` placeholders: the template may show JSON braces to the judge."""
    pattern = re.compile(r"\{(" + "|".join(map(re.escape, values)) + r")\}")
    return pattern.sub(lambda m: values[m.group(1)], template)  # one pass: no re-expansion


# "Winner: A", "The better answer is B", "better: tie" when the judge ignores the JSON format.
VERDICT_WORDS = re.compile(
    r"\b(?:winner|better)(?:\s+answer)?\W{0,3}(?:is\s+)?(?:answer\s+)?[\"']?(A|B|tie)\b",
    re.IGNORECASE)


def parse_verdict(reply: str) -> tuple[str, str]:
    """("A" | "B" | "tie" | "unparsed", reason) from a JSON object or a plain-text reply."""
    match = re.search(r"\{.*\}", reply, re.DOTALL)
    if match:
        try:
            obj = json.loads(match.group(0))
            pick = str(obj.get("winner", "")).strip().strip('"').upper()
            reason = str(obj.get("reason", "")).strip()
            if pick in ("A", "B"):
                return pick, reason
            if pick == "TIE":
                return "tie", reason
        except (json.JSONDecodeError, AttributeError):
            pass
    word = VERDICT_WORDS.search(reply)
    if word:
        pick = word.group(1)
        return ("tie" if pick.lower() == "tie" else pick.upper()), reply.strip()
    return "unparsed", reply.strip()
