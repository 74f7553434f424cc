"""In-process LLM clients, no server: llama.cpp on a GGUF (the embedded default; ~7x faster than
mlx on the embedded model, bench/README.md "Generation") and mlx-lm on a model directory.

    client = embedded("base", BaseModel("embedded", Path("models/base")))
    reply = client.chat([{"role": "user", "content": "Hi"}], Sampling(0.0, 0, 64))
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.llm.transport import Fatal
from pipeline.llm.types import Client, LLMError, Message, Reply, Sampling, Schema, normalise_finish

EMBEDDED_CTX = 4096  # llama.cpp context: question + answer + follow-up fit with room to spare

class LlamaCppClient:
    """llama.cpp in-process. One model, one lock: concurrent calls queue (the CPU is the limit)."""

    backend = "embedded"

    def __init__(self, gguf: Path):
        from llama_cpp import Llama

        self.model, self.server = gguf.name, "in-process llama.cpp"
        self.path = gguf
        # llama-cpp-python's default thread count (half the cores): its threads spin-wait, and
        # with all cores busy elsewhere 2 threads ran 6x slower than 1 here (bench/README.md).
        self.llm = Llama(model_path=str(gguf), n_ctx=EMBEDDED_CTX, verbose=False)
        # Without a template in the GGUF llama.cpp would fall back to llama-2's format.
        if "tokenizer.chat_template" not in self.llm.metadata:
            self.llm.chat_format = "chatml"
        self.lock = threading.Lock()
        self.grammars: dict[str, Any] = {}  # schema JSON -> compiled grammar
        self.schema_fallback: str | None = None

    def identity(self) -> str:
        return f"llama.cpp:{file_digest(self.path)}"

    def grammar(self, schema: Schema) -> Any:
        """The schema as a llama.cpp grammar; None (and a note) for one it cannot express."""
        from llama_cpp import LlamaGrammar

        key = json.dumps(schema, sort_keys=True)
        if key not in self.grammars:
            try:
                self.grammars[key] = LlamaGrammar.from_json_schema(key, verbose=False)
            except (ValueError, AssertionError, KeyError, TypeError, RecursionError) as exc:
                self.schema_fallback = (f"llama.cpp cannot turn the JSON schema into a grammar "
                                        f"({type(exc).__name__}: {exc}); parsing plain text")
                self.grammars[key] = None
        return self.grammars[key]

    def chat(self, messages: Sequence[Message], sampling: Sampling,
             schema: Schema | None = None) -> Reply:
        # Our own grammar, not response_format: llama-cpp-python silently falls back to
        # "any JSON" when a schema does not convert.
        grammar = self.grammar(schema) if schema is not None else None
        with self.lock:
            try:
                out = self.llm.create_chat_completion(
                    messages=list(messages), temperature=sampling.temperature,
                    max_tokens=sampling.max_tokens, seed=sampling.seed, grammar=grammar)
            except ValueError as exc:  # e.g. the prompt does not fit the context
                raise Fatal(f"llama.cpp: {exc} (context: {EMBEDDED_CTX} tokens; shorten the "
                            "question or lower max_tokens)") from exc
        choice, usage = out["choices"][0], out.get("usage") or {}
        return Reply(choice["message"].get("content") or "",
                     normalise_finish(choice.get("finish_reason")),
                     int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)),
                     structured=grammar is not None)


class MlxClient:
    """mlx-lm in-process on a model directory (a base model that is not a GGUF)."""

    backend = "embedded"

    def __init__(self, model_dir: Path):
        from pipeline.training import model as mlx_model

        self.model, self.server, self.path = model_dir.name, "in-process mlx-lm", model_dir
        # The checkpoint's own dtype: cached replies are keyed on the files, not on the backend.
        self.mlx_model, self.tokenizer = mlx_model.load(model_dir, backend_dtype=False)
        self.lock = threading.Lock()
        self.schema_fallback: str | None = None

    def identity(self) -> str:
        return f"mlx:{dir_digest(self.path)}"

    def chat(self, messages: Sequence[Message], sampling: Sampling,
             schema: Schema | None = None) -> Reply:
        if schema is not None:  # mlx-lm has no constrained decoding: the caller parses text
            self.schema_fallback = ("mlx-lm cannot constrain a reply to a JSON schema; "
                                    "parsing plain text")
        import mlx.core as mx

        from pipeline.training import model as mlx_model

        parts, last = [], None
        with self.lock:
            if sampling.seed is not None:
                mx.random.seed(sampling.seed)
            for last in mlx_model.stream(self.mlx_model, self.tokenizer, messages,
                                         sampling.max_tokens, sampling.temperature):
                parts.append(last.text)
        if last is None:
            return Reply("", "stop", len(mlx_model.prompt_ids(self.tokenizer, messages)), 0)
        return Reply("".join(parts), normalise_finish(last.finish_reason), last.prompt_tokens,
                     last.generation_tokens)


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file, memoised per (path, size, mtime) for the life of the process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def dir_digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    lines = "".join(f"{p.relative_to(path)} {file_digest(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


# --- construction --------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseModel:
    """Where the embedded backend finds `model: base`: base.model and the base_model stage's dir."""

    source: str
    directory: Path


def embedded(model: str, base: BaseModel | None) -> Client:
    """`base`: the GGUF itself when base.model is one (llama.cpp is faster), else the mlx dir."""
    from pipeline.core.model_source import resolve_source

    if model == "base":
        if base is None:
            raise LLMError("embedded backend with model 'base' needs the base model's location")
        where, kind = resolve_source(base.source)
        target = Path(where) if kind == "gguf" else base.directory
    else:
        target = Path(model).expanduser()
    if not target.exists():
        raise LLMError(f"embedded model {target} not found: run `dvc repro base_model` or set "
                       "`model` in params.yaml to a .gguf file or an mlx-lm directory")
    return LlamaCppClient(target) if target.suffix == ".gguf" else MlxClient(target)

