"""A small stand-in for an Ollama server (no Ollama binary installs here), on 127.0.0.1.

Follows Ollama's documented API closely enough for clients: `POST /api/chat` and
`POST /api/generate` (streaming NDJSON by default, one JSON object with `"stream": false`),
`GET /api/tags`, `GET /api/version`, `GET /`; errors as `{"error": "..."}` with Ollama's status
codes (404 for a model that is not pulled). Like Ollama it also serves the OpenAI-compatible
`POST /v1/chat/completions` (non-streaming) with `{"error": {"message": ...}}` errors.
Replies are deterministic text, or what `reply` returns.

Structured output as Ollama does it: `format` is "json" or a JSON schema (`/api/chat`,
`/api/generate`); on `/v1/chat/completions`, `response_format` json_object means "json" and
json_schema means its schema. `reply` sees the request's format as `options["format"]`, and a
reply that breaks it becomes a 500 (real Ollama constrains decoding, so it never sends one: a
stand-in reply that does is a bug in the test). `formats="json"` behaves like Ollama before 0.5:
`format` must be a string, so a schema object is a 400 from Go's JSON decoder, and json_schema
on the OpenAI endpoint is silently ignored.

Faults for the next requests are queued with `fail(...)`: an HTTP status with an Ollama error body
(and optional Retry-After), a body that is not JSON, an empty answer, a delay, or a dropped
connection. `parallel` limits concurrent generations like OLLAMA_NUM_PARALLEL (others queue).

In a test:    with StandIn(delay=0.01) as server: ... server.url ... server.requests
As a process: python tests/ollama_standin.py --port 0 --log requests.jsonl   (prints its URL)
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

Generated = tuple[str, int, int, str]  # text, prompt tokens, completion tokens, done_reason
ReplyFn = Callable[[list[dict[str, str]], dict[str, Any]], "str | Generated"]
DIGEST = "sha256:" + "5e" * 32


@dataclass
class Fault:
    kind: str  # status | notjson | empty | delay | drop | drop_midstream
    status: int = 500
    error: str = "an internal error occurred"
    retry_after: str | None = None
    seconds: float = 0.0


def echo_reply(messages: list[dict[str, str]], options: dict[str, Any]) -> str:
    last = messages[-1]["content"] if messages else ""
    text = f"Stand-in reply about: {last[:60]}"
    fmt = options.get("format")
    if fmt == "json":
        return json.dumps({"reply": text})
    return json.dumps(instance(fmt, text)) if isinstance(fmt, dict) else text


def instance(schema: dict[str, Any], text: str) -> Any:
    """The smallest value of a simple schema (patterns aside), strings filled with `text`."""
    kind = schema.get("type")
    if kind == "object":
        return {k: instance(v, text) for k, v in schema.get("properties", {}).items()
                if k in schema.get("required", [])}
    if kind == "array":
        items = schema.get("prefixItems") or [schema.get("items", {})] * schema.get("minItems", 1)
        return [instance(item, text) for item in items]
    if kind == "string" and "pattern" in schema:
        return fill(schema["pattern"], text)
    return {"integer": 0, "number": 0, "boolean": True, "null": None}.get(str(kind), text)


def fill(pattern: str, text: str) -> str:
    """`text` reduced to lowercase words, after the pattern's literal opening words (a starter)
    and before a question mark: fits tuneline's question patterns; format_problem checks."""
    head = re.match(r"\^((?:[A-Za-z']+ )*)", pattern)
    words = " ".join(re.sub(r"[^A-Za-z ]", " ", text).lower().split())[:60].strip()
    return f"{head.group(1) if head else ''}{words or 'stand in'}?"


def format_problem(text: str, fmt: Any) -> str | None:
    """Why `text` does not satisfy Ollama's `format` ("json" or a schema); None if it does."""
    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"not JSON ({exc})"
    if isinstance(fmt, dict):
        try:
            jsonschema.validate(value, fmt)
        except jsonschema.ValidationError as exc:
            return f"does not match the schema: {exc.message}"
    return None


class StandIn:
    def __init__(self, models: tuple[str, ...] = ("tiny",), reply: ReplyFn = echo_reply,
                 delay: float = 0.0, parallel: int = 4, port: int = 0,
                 log_path: Path | None = None, hold_after: int | None = None,
                 hold_file: Path | None = None, formats: str = "schema"):
        self.models, self.reply, self.delay = models, reply, delay
        # Generations after the first `hold_after` wait while `hold_file` exists: a test can kill
        # a client (or this server) mid-run however fast or slow the machine is.
        self.hold_after, self.hold_file, self.generated = hold_after, hold_file, 0
        self.formats = formats  # "schema": Ollama >= 0.5; "json": older, format is a string
        self.slots = threading.Semaphore(parallel)
        self.faults: collections.deque[Fault] = collections.deque()
        self.requests: list[dict[str, Any]] = []
        self.log_path, self.lock = log_path, threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), make_handler(self))
        self.httpd.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def fail(self, *faults: Fault) -> None:
        self.faults.extend(faults)

    def next_fault(self) -> Fault | None:
        with self.lock:
            return self.faults.popleft() if self.faults else None

    def record(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self.requests.append(entry)
            if self.log_path is not None:
                with self.log_path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def start(self) -> StandIn:
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> StandIn:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _hold(self) -> None:
        with self.lock:
            self.generated += 1
            held = self.hold_after is not None and self.generated > self.hold_after
        while held and self.hold_file is not None and self.hold_file.exists():
            time.sleep(0.02)

    def generate(self, messages: list[dict[str, str]], options: dict[str, Any]) -> Generated:
        self._hold()
        with self.slots:
            if self.delay:
                time.sleep(self.delay)
            out = self.reply(messages, options)
        if isinstance(out, tuple):
            return out
        words = out.split(" ")
        limit = int(options.get("num_predict", -1))
        reason = "stop"
        if 0 <= limit < len(words):
            words, reason = words[:limit], "length"
        prompt = sum(len(m.get("content", "").split()) for m in messages)
        return " ".join(words), prompt, len(words), reason


def now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def make_handler(server: StandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:
            if self.path == "/":
                self.send_text(200, "Ollama is running", "text/plain; charset=utf-8")
            elif self.path == "/api/version":
                self.send_json(200, {"version": "0.0.0-standin"})
            elif self.path == "/api/tags":
                models = [{"name": f"{m}:latest", "model": f"{m}:latest", "digest": DIGEST,
                           "size": 1, "modified_at": now()} for m in server.models]
                self.send_json(200, {"models": models})
            else:
                self.send_text(404, "404 page not found", "text/plain")

        def do_POST(self) -> None:
            if self.path not in ("/api/chat", "/api/generate", "/v1/chat/completions"):
                self.send_text(404, "404 page not found", "text/plain")
                return
            length = int(self.headers.get("Content-Length", 0))
            try:
                body = json.loads(self.rfile.read(length))
            except json.JSONDecodeError as exc:
                self.send_json(400, {"error": f"invalid character in request body: {exc}"})
                return
            model = str(body.get("model", ""))
            if model.split(":")[0] not in server.models:
                message = f'model "{model}" not found, try pulling it first'
                error = {"message": message, "type": "api_error"} if self.openai else message
                self.send_json(404, {"error": error})
                return
            self.answer(body, time.time())

        @property
        def openai(self) -> bool:
            return self.path.startswith("/v1/")

        def openai_format(self, body: dict[str, Any]) -> Any:
            rf = body.get("response_format") or {}
            if rf.get("type") == "json_object":
                return "json"
            if rf.get("type") == "json_schema" and server.formats == "schema":
                return (rf.get("json_schema") or {}).get("schema") or "json"
            return None  # "text", or json_schema on an Ollama that predates it: ignored

        def bad_format(self, fmt: Any) -> str | None:
            if fmt in (None, "", "json"):
                return None
            if isinstance(fmt, dict) and server.formats == "schema":
                return None
            if isinstance(fmt, dict):  # Ollama < 0.5: ChatRequest.Format is a Go string
                return ("json: cannot unmarshal object into Go struct field ChatRequest.format "
                        "of type string")
            return f'invalid format: {json.dumps(fmt)}; expected "json" or a valid JSON schema'

        def answer(self, body: dict[str, Any], started: float) -> None:
            chat = self.path != "/api/generate"
            messages = body.get("messages") if chat else prompt_messages(body)
            options = body.get("options", {})
            if self.openai:
                options = {"temperature": body.get("temperature"), "seed": body.get("seed"),
                           "num_predict": body.get("max_tokens", -1)}
            fmt = self.openai_format(body) if self.openai else body.get("format")
            problem = self.bad_format(fmt)
            if problem:
                self.send_json(400, {"error": problem})
                return
            fault = server.next_fault()
            if fault is not None and fault.kind == "delay":
                time.sleep(fault.seconds)
                fault = None
            # Record before replying: a client that has its reply must find its request logged.
            if fault is not None and fault.kind in ("status", "notjson", "drop"):
                server.record({"path": self.path, "messages": messages, "fault": fault.kind,
                               "start": started, "end": time.time()})
                self.send_fault(fault)
                return
            asked = {**options, "format": fmt} if fmt else options
            text, p_tokens, c_tokens, reason = server.generate(messages, asked)
            if fault is not None and fault.kind == "empty":
                text = ""
            broken = format_problem(text, fmt) if fmt and reason == "stop" else None
            if broken:
                server.record({"path": self.path, "messages": messages, "fault": "format",
                               "start": started, "end": time.time()})
                self.send_json(500, {"error": f"stand-in: the test's reply {broken}"})
                return
            final = {"model": body["model"], "created_at": now(), "done": True,
                     "done_reason": reason, "total_duration": 1, "prompt_eval_count": p_tokens,
                     "eval_count": c_tokens}
            server.record({"path": self.path, "model": body["model"], "messages": messages,
                           "options": options, "stream": body.get("stream", True),
                           "format": fmt,
                           "authorization": self.headers.get("Authorization"),
                           "completion_tokens": c_tokens,
                           "start": started, "end": time.time()})
            if self.openai:
                self.send_json(200, openai_completion(body["model"], text, p_tokens, c_tokens,
                                                      reason))
            elif body.get("stream", True):
                self.send_stream(chat, text, final, fault)
            else:
                self.send_json(200, {**final, **content(chat, text)})

        def send_fault(self, fault: Fault) -> None:
            if fault.kind == "drop":
                self.close_connection = True
                self.connection.close()
            elif fault.kind == "notjson":
                self.send_text(200, "<html><body>502 Bad Gateway</body></html>", "text/html")
            else:
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                error: Any = fault.error
                if self.openai:
                    error = {"message": fault.error, "type": "api_error"}
                self.send_json(fault.status, {"error": error}, headers)

        def send_stream(self, chat: bool, text: str, final: dict[str, Any],
                        fault: Fault | None) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            pieces = [w + " " for w in text.split(" ")[:-1]] + [text.split(" ")[-1]]
            for i, piece in enumerate(p for p in pieces if p):
                if fault is not None and fault.kind == "drop_midstream" and i == 1:
                    self.close_connection = True
                    self.connection.close()
                    return
                chunk = {"model": final["model"], "created_at": now(), "done": False,
                         **content(chat, piece)}
                self.write_chunk(json.dumps(chunk) + "\n")
            self.write_chunk(json.dumps({**final, **content(chat, "")}) + "\n")
            self.wfile.write(b"0\r\n\r\n")

        def write_chunk(self, line: str) -> None:
            data = line.encode("utf-8")
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def send_json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
            self.send_text(status, json.dumps(data), "application/json; charset=utf-8", headers)

        def send_text(self, status: int, text: str, ctype: str,
                      headers: dict[str, str] | None = None) -> None:
            data = text.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

    return Handler


def prompt_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    system = [{"role": "system", "content": body["system"]}] if body.get("system") else []
    return system + [{"role": "user", "content": str(body.get("prompt", ""))}]


def openai_completion(model: str, text: str, prompt: int, completion: int,
                      reason: str) -> dict[str, Any]:
    return {"id": "chatcmpl-standin", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "finish_reason": reason,
                                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion}}


def content(chat: bool, text: str) -> dict[str, Any]:
    return {"message": {"role": "assistant", "content": text}} if chat else {"response": text}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Ollama API stand-in")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--delay", type=float, default=0.0, help="seconds per generation")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--model", action="append", default=None)
    ap.add_argument("--log", type=Path, default=None, help="append each served request here")
    ap.add_argument("--hold-after", type=int, default=None,
                    help="generations after this many wait while --hold-file exists")
    ap.add_argument("--hold-file", type=Path, default=None)
    args = ap.parse_args(argv)
    server = StandIn(tuple(args.model or ["tiny"]), delay=args.delay, parallel=args.parallel,
                     port=args.port, log_path=args.log, hold_after=args.hold_after,
                     hold_file=args.hold_file)
    print(f"listening {server.url}", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
