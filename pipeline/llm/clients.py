"""LLM clients for generation: one small interface (`Client.chat`), four implementations.

- `OllamaClient`: Ollama's native `/api/chat` (streaming NDJSON or one JSON reply).
- `OpenAIClient`: any OpenAI-compatible `/v1/chat/completions` (Ollama, vLLM, llama.cpp's server,
  LM Studio, `mlx_lm.server`). The API key comes only from the environment variable named by
  `api_key_env`.
- `LlamaCppClient` (local.py): llama.cpp in-process on a GGUF (the embedded default). Measured
  here ~7x faster than mlx on the embedded model (bench/README.md, "Generation").
- `MlxClient` (local.py): mlx-lm in-process on a model directory, for base models that are not GGUF.

Structured output: `chat(..., schema=...)` asks for a reply matching a JSON schema through each
backend's own mechanism (llama.cpp: a grammar built from the schema; Ollama: `format`; OpenAI-
compatible: `response_format` json_schema, then llama-cpp-python's json_object + schema). A server
that rejects it (a 4xx naming the field) is asked again without it, once per client, and the
client's `schema_fallback` says why; `Reply.structured` says whether the reply was constrained.

`ask` wraps any of them: exponential backoff on timeouts, connection errors, 429 (honouring
Retry-After), 5xx, replies that are not JSON or of the wrong shape, and empty answers; then one
`LLMError` that names the server, the model and what to check. `connect` builds a client from a
params section.

Server replies are untrusted input: redirects are refused (an API key must never travel to another
host, and a POST turned into a GET is not an answer), bodies and stream lines are read up to a
bound, a whole request has a deadline besides the silence timeout, and error bodies are redacted
before they reach a message.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

from pipeline.core.config import ConfigError

# Callers use one door (`from pipeline.llm import clients as llm`): the in-process clients and
# the shared types are re-exported here.
from pipeline.llm.local import (  # noqa: F401
    BaseModel,
    LlamaCppClient,
    MlxClient,
    dir_digest,
    embedded,
    file_digest,
)
from pipeline.llm.transport import (
    Fatal,
    Transient,
    clip,
    count,
    deadline,
    get_json,
    network_failure,
    parse_json,
    post,
    read_body,
    read_lines,
    redact_url,
    shape_error,
    split_credentials,
    typed,
)
from pipeline.llm.types import (
    Client,
    EmptyAnswer,
    LLMError,
    Message,
    Reply,
    Sampling,
    Schema,
    normalise_finish,
)

T = TypeVar("T")
MAX_RETRY_AFTER_S = 600.0  # a server asking for longer than this is treated as down


@dataclass(frozen=True)
class LLMSettings:
    """The connection knobs shared by the `generate` and `questions` sections of params.yaml."""

    backend: Literal["embedded", "ollama", "openai"]
    url: str  # server base URL (ignored by embedded)
    model: str  # server model name; for embedded: base, a .gguf or an mlx-lm directory
    api_key_env: str  # environment variable holding the API key (openai backend)
    stream: bool  # ollama: stream tokens, so `timeout` bounds silence rather than a whole answer
    timeout: float  # seconds of silence before a request counts as timed out
    deadline: float  # seconds a whole request may take, however steadily the bytes trickle in
    retries: int  # extra attempts after the first, with exponential backoff
    backoff: float  # first retry delay in seconds; doubles each attempt



class Empty(Transient):
    """An empty answer: retried (a sampled model may answer next time), then the question fails."""



@dataclass
class Tally:
    """Thread-safe counts of what was actually sent."""

    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def sent(self, retry: bool) -> None:
        with self.lock:
            self.requests += 1
            self.retries += int(retry)

    def used(self, reply: Reply) -> None:
        with self.lock:
            self.prompt_tokens += reply.prompt_tokens
            self.completion_tokens += reply.completion_tokens


# --- retries -------------------------------------------------------------------------------


def ask(
    client: Client,
    messages: Sequence[Message],
    sampling: Sampling,
    settings: LLMSettings,
    tally: Tally | None = None,
    sleep: Callable[[float], None] = time.sleep,
    schema: Schema | None = None,
) -> Reply:
    """One chat call with retries; raises LLMError (EmptyAnswer for a persistently empty reply).
    With `schema`, the reply is constrained where the backend can (see `Reply.structured`)."""

    def once() -> Reply:
        # Clients written before structured output take two arguments: keep them working.
        reply = (client.chat(messages, sampling) if schema is None
                 else client.chat(messages, sampling, schema=schema))
        if not reply.text.strip():
            raise Empty("the model returned an empty answer")
        return reply

    reply = retrying(client, settings, once, tally, sleep)
    if tally is not None:
        tally.used(reply)
    return reply


def retrying(
    client: Client,
    settings: LLMSettings,
    call: Callable[[], T],
    tally: Tally | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `call`, retrying Transient failures with backoff; Fatal ones fail at once."""
    last: Transient | None = None
    attempts = settings.retries + 1
    for attempt in range(attempts):
        if last is not None:
            sleep(retry_delay(attempt, settings.backoff, last.retry_after))
        if tally is not None:
            tally.sent(retry=attempt > 0)
        try:
            return call()
        except Transient as exc:
            last = exc
        except Fatal as exc:
            raise LLMError(explain(client, exc.reason, exc.status, settings, attempt + 1)) from exc
    assert last is not None
    if isinstance(last, Empty):
        raise EmptyAnswer(f"{client.model} at {client.server}: {last.reason} "
                          f"{attempts} time{'s' if attempts > 1 else ''}")
    raise LLMError(explain(client, last.reason, last.status, settings, attempts))


def retry_delay(attempt: int, backoff: float, retry_after: float | None) -> float:
    """Exponential backoff with jitter (so concurrent workers do not retry in lockstep)."""
    delay = backoff * 2 ** (attempt - 1) * (1 + 0.1 * random.random())
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
    return delay


def explain(client: Client, reason: str, status: int | None, s: LLMSettings, attempts: int) -> str:
    head = (f"{s.backend} server {client.server}, model {client.model!r}: {reason}"
            f" (after {attempts} attempt{'s' if attempts > 1 else ''})")
    return f"{head}. Check: {hint(client, reason, status, s)}"


def hint(client: Client, reason: str, status: int | None, s: LLMSettings) -> str:
    pull = f"`ollama pull {client.model}`" if s.backend == "ollama" else "load it on the server"
    if "refused" in reason or "unreachable" in reason or "resolve" in reason:
        return ("is the server running and listening there? Start it (e.g. `ollama serve`) "
                "or fix `url` in params.yaml")
    if "deadline" in reason:
        return (f"the reply took longer than {s.deadline:g} s in all: is the server overloaded? "
                "Raise `deadline`, lower `concurrency` or `max_tokens`")
    if "timed out" in reason:
        return (f"the server sent nothing for {s.timeout:g} s: is it overloaded? Raise `timeout`,"
                " lower `concurrency` or `max_tokens`")
    if "redirect" in reason:
        return "set `url` to the server's final address (redirects are not followed)"
    if "larger than" in reason or "reply shape" in reason:
        return ("that `url` and `backend` match the server's API (ollama: /api/chat, "
                "openai: /v1/chat/completions)")
    if status == 404 and "model" in reason.lower():
        return f"the model is not on the server: {pull}, or set `model` to one it lists"
    if status == 404:
        return "the URL path: `url` is the server's base URL (OpenAI-compatible: ending in /v1)"
    if status in (401, 403):
        return f"the API key: export it in the environment variable {s.api_key_env}"
    if "not JSON" in reason:
        return "that `url` points at the LLM API and not at some other web server"
    if status is not None and status >= 500 or status == 429:
        return "the server's log: it kept failing; retry later or lower `concurrency`"
    return "the server's log and the request settings in params.yaml"


# --- structured output ---------------------------------------------------------------------

SCHEMA_FIELDS = ("format", "schema", "grammar")  # "format" also matches response_format


def rejects_schema(exc: Fatal | Transient) -> bool:
    """A 4xx that names the structured-output field: the server cannot do it, plain text can.
    llama-cpp-python's server answers a request it cannot validate with a 500 naming it."""
    status, reason = exc.status, exc.reason.lower()
    if status is not None and 400 <= status < 500 and status not in (401, 403, 404):
        return any(f in reason for f in SCHEMA_FIELDS)
    return status == 500 and ("response_format" in reason or "json_schema" in reason)


def rejected(what: str, exc: Fatal | Transient) -> str:
    return f"{what} was rejected ({exc.reason[:200]}); asking for plain text and parsing it"


# --- Ollama native -------------------------------------------------------------------------


class OllamaClient:
    """Ollama's `/api/chat`; `stream=True` makes `timeout` bound silence, not the whole answer."""

    backend = "ollama"

    def __init__(self, url: str, model: str, timeout: float, stream: bool,
                 deadline: float = float("inf")):
        # user:password@ in `url` travels as a Basic Authorization header, never in the URL.
        url, self.headers, self.secrets = split_credentials(url.rstrip("/"))
        self.url, self.model, self.timeout, self.stream = url, model, timeout, stream
        self.server = redact_url(self.url)  # for messages: no credentials, no query
        self.deadline = deadline
        self._identity: str | None = None
        self.schema_fallback: str | None = None  # why schemas are no longer sent, once rejected

    def identity(self) -> str:
        # The digest changes when the model is re-pulled, so old answers are not reused.
        if self._identity is None:
            with deadline(self.deadline):
                tags = get_json(f"{self.url}/api/tags", self.headers, self.timeout,
                                self.secrets)
            models = [m for m in typed(tags, "models", list, []) if isinstance(m, dict)]
            digest = next((str(m.get("digest", "")) for m in models
                           if m.get("name") in (self.model, f"{self.model}:latest")), None)
            if digest is None:
                names = ", ".join(str(m.get("name", "?")) for m in models) or "none"
                raise Fatal(f"model {self.model!r} not found on the server (it has: {names})", 404)
            self._identity = f"ollama:{self.model}@{digest}"
        return self._identity

    def chat(self, messages: Sequence[Message], sampling: Sampling,
             schema: Schema | None = None) -> Reply:
        if schema is not None and self.schema_fallback is None:
            try:
                return replace(self.send(messages, sampling, schema), structured=True)
            except (Fatal, Transient) as exc:
                if not rejects_schema(exc):
                    raise
                # Ollama before 0.5 takes only "json" here: say so once, then stay plain.
                self.schema_fallback = rejected("Ollama's `format` (a JSON schema)", exc)
        return self.send(messages, sampling, None)

    def send(self, messages: Sequence[Message], sampling: Sampling,
             schema: Schema | None) -> Reply:
        options: dict[str, Any] = {"temperature": sampling.temperature,
                                   "num_predict": sampling.max_tokens}
        if sampling.seed is not None:
            options["seed"] = sampling.seed
        body: dict[str, Any] = {"model": self.model, "messages": list(messages),
                                "stream": self.stream, "options": options}
        if schema is not None:
            body["format"] = schema
        with deadline(self.deadline), post(f"{self.url}/api/chat", body, self.headers,
                                           self.timeout, self.secrets) as resp:
            if not self.stream:
                return ollama_reply(parse_json(read_body(resp, self.timeout), self.secrets), "")
            return ollama_stream(resp, self.timeout, self.secrets)


def ollama_stream(resp: Any, timeout: float, secrets: Sequence[str] = ()) -> Reply:
    parts: list[str] = []
    try:
        for raw in read_lines(resp):
            if not raw.strip():
                continue
            chunk = parse_json(raw, secrets)
            if isinstance(chunk, dict) and "error" in chunk:
                raise Transient(f"error mid-stream: {clip(str(chunk['error']), 300, secrets)}")
            parts.append(typed(typed(chunk, "message", dict, {}), "content", str, ""))
            if typed(chunk, "done", bool, False):
                return ollama_reply(chunk, "".join(parts))
    except (OSError, http.client.HTTPException) as exc:
        raise network_failure(exc, timeout) from exc
    raise Transient("connection dropped (the stream ended before done: true)")


def ollama_reply(data: Any, streamed: str) -> Reply:
    message = typed(data, "message", dict)
    if message is None and not streamed:
        raise shape_error(data)
    text = streamed or typed(message, "content", str, "")
    return Reply(text, normalise_finish(typed(data, "done_reason", str)),
                 count(data, "prompt_eval_count"), count(data, "eval_count"))


# --- OpenAI-compatible ---------------------------------------------------------------------

# Tried in this order until one is accepted: OpenAI's own (vLLM, llama.cpp's llama-server, LM
# Studio, Ollama >= 0.5), then llama-cpp-python's server, whose type is only text|json_object.
RESPONSE_FORMATS: dict[str, Callable[[Schema], dict[str, Any]]] = {
    "json_schema": lambda s: {"type": "json_schema",
                              "json_schema": {"name": "reply", "strict": True, "schema": s}},
    "json_object": lambda s: {"type": "json_object", "schema": s},
}


class OpenAIClient:
    """`POST {url}/chat/completions`; a URL without a path gets `/v1`."""

    backend = "openai"

    def __init__(self, url: str, model: str, timeout: float, api_key: str | None,
                 deadline: float = float("inf")):
        # user:password@ in `url` travels as a Basic Authorization header, never in the URL;
        # an API key takes its place where both are given.
        url, basic, url_secrets = split_credentials(url.rstrip("/"))
        parsed = urllib.parse.urlsplit(url)
        self.url = url + ("" if parsed.path else "/v1")
        self.server = redact_url(self.url)  # for messages: no credentials, no query
        self.model, self.timeout, self.deadline = model, timeout, deadline
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else basic
        self.secrets = ((api_key,) if api_key else ()) + url_secrets
        self.dialects = list(RESPONSE_FORMATS)  # the ones this server has not rejected yet
        self.schema_fallback: str | None = None

    def identity(self) -> str:
        return f"openai:{self.model}"

    def chat(self, messages: Sequence[Message], sampling: Sampling,
             schema: Schema | None = None) -> Reply:
        while schema is not None and self.dialects:
            dialect = self.dialects[0]
            try:
                reply = self.send(messages, sampling, RESPONSE_FORMATS[dialect](schema))
                return replace(reply, structured=True)
            except (Fatal, Transient) as exc:
                if not rejects_schema(exc):
                    raise
                self.dialects.pop(0)
                if not self.dialects:
                    self.schema_fallback = rejected("`response_format` with a JSON schema", exc)
        return self.send(messages, sampling, None)

    def send(self, messages: Sequence[Message], sampling: Sampling,
             response_format: dict[str, Any] | None) -> Reply:
        body: dict[str, Any] = {"model": self.model, "messages": list(messages),
                                "temperature": sampling.temperature,
                                "max_tokens": sampling.max_tokens, "stream": False}
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if response_format is not None:
            body["response_format"] = response_format
        with deadline(self.deadline), post(f"{self.url}/chat/completions", body, self.headers,
                                           self.timeout, self.secrets) as resp:
            data = parse_json(read_body(resp, self.timeout), self.secrets)
        choices = typed(data, "choices", list, [])
        if not choices:
            raise shape_error(data)
        choice = choices[0]
        text = typed(typed(choice, "message", dict, {}), "content", str, "")
        usage = typed(data, "usage", dict, {})
        return Reply(text, normalise_finish(typed(choice, "finish_reason", str)),
                     count(usage, "prompt_tokens"), count(usage, "completion_tokens"))


# --- construction --------------------------------------------------------------------------


def connect(s: LLMSettings, base: BaseModel | None = None) -> Client:
    if s.backend != "embedded" and not (s.timeout > 0 and s.deadline >= s.timeout):
        raise ConfigError(f"params.yaml: timeout ({s.timeout:g} s) must be > 0 and deadline "
                          f"({s.deadline:g} s) at least as long; raise deadline")
    if s.backend == "ollama":
        return OllamaClient(s.url, s.model, s.timeout, s.stream, s.deadline)
    if s.backend == "openai":
        return OpenAIClient(s.url, s.model, s.timeout, os.environ.get(s.api_key_env) or None,
                            s.deadline)
    return embedded(s.model, base)


def request_key(identity: str, messages: Iterable[Message], sampling: Sampling,
                schema: Schema | None = None) -> str:
    """Everything that affects a reply: the model, the rendered messages, the sampling, the
    schema (absent when None, so keys of plain requests stay what they were)."""
    request: dict[str, Any] = {"model": identity, "messages": list(messages),
                               "sampling": sampling.as_dict()}
    if schema is not None:
        request["schema"] = schema
    blob = json.dumps(request, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
