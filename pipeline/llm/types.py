"""The shapes every LLM client shares: what is asked (messages, sampling, a JSON schema), what comes
back (`Reply`), the `Client` interface, and the errors callers see. Imports nothing of the project
but pipeline.core."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

from pipeline.core.errors import UserError

Message = dict[str, str]
Schema = dict[str, Any]  # a JSON schema the reply must match

@dataclass(frozen=True)
class Sampling:
    temperature: float
    seed: int | None
    max_tokens: int

    def as_dict(self) -> dict[str, Any]:
        # Shallow, not dataclasses.asdict: its recursive copy was the largest cost of 20,000
        # request keys (bench/README.md, "Generation at 10,000 questions"). Every field counts.
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str  # "stop" | "length" | what the server said
    prompt_tokens: int
    completion_tokens: int
    structured: bool = False  # the backend constrained the text to the requested JSON schema


class Client(Protocol):
    backend: str
    model: str
    server: str  # where requests go, for messages: a URL or "in-process llama.cpp"

    def identity(self) -> str:
        """What the cache key uses for 'which model': a content digest where one is known."""
        ...

    def chat(self, messages: Sequence[Message], sampling: Sampling,
             schema: Schema | None = None) -> Reply: ...

class LLMError(UserError):
    """The final word after retries: names the server, the model and what to check."""


class EmptyAnswer(LLMError):
    """The model kept answering with nothing: a problem of this question, not of the server."""


def normalise_finish(reason: Any) -> str:
    return str(reason) if reason else "unknown"

