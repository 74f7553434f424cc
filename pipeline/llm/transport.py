"""HTTP for the LLM clients (pipeline/llm/clients.py): what a server may send back, and what it may not.

    with deadline(s.deadline), post(url, body, headers, s.timeout, secrets=(key,)) as resp:
        data = parse_json(read_body(resp, s.timeout))
        text = typed(typed(data, "message", dict, {}), "content", str, "")

Server replies are untrusted input: redirects are refused (urllib would resend the Authorization
header to any host, and turn the POST into a GET whose reply would pass for an answer); bodies and
stream lines are read up to a bound; a whole request has a deadline besides the silence timeout;
error bodies are redacted before they reach a message; JSON of the wrong shape is a `Transient`
failure (retried, then explained), never an AttributeError. Failures come out classified:
`Transient` (worth retrying) or `Fatal`.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import json
import math
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")
MAX_REPLY_BYTES = 8 << 20  # a chat reply is kilobytes; more is a wrong URL or a hostile server
MAX_LINE_BYTES = 1 << 20  # one streamed NDJSON chunk carries a few tokens
MAX_ERROR_BYTES = 64 << 10  # of an error body: enough for its message


class Transient(Exception):
    """A failure worth retrying; `retry_after` is the server's Retry-After in seconds."""

    def __init__(self, reason: str, retry_after: float | None = None, status: int | None = None):
        super().__init__(reason)
        self.reason, self.retry_after, self.status = reason, retry_after, status


class Fatal(Exception):
    """A failure retrying cannot fix (404, 401, bad request)."""

    def __init__(self, reason: str, status: int | None = None):
        super().__init__(reason)
        self.reason, self.status = reason, status



class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse every redirect: urllib would resend the Authorization header to any host and turn
    the POST into a GET whose reply would pass for an answer."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises HTTPError with the 3xx status


class _Deadline:
    """Shuts down a request's sockets when its time is up: a socket timeout only bounds silence,
    and a server that trickles a byte at a time would otherwise hold the request forever."""

    def __init__(self, seconds: float):
        self.seconds, self.expired = seconds, False
        self.sockets: list[socket.socket] = []
        self.timer = threading.Timer(max(seconds, 0.0), self._expire)
        self.timer.daemon = True
        if math.isfinite(seconds):  # no deadline: no timer (an infinite wait overflows)
            self.timer.start()

    def watch(self, sock: socket.socket) -> None:
        self.sockets.append(sock)
        if self.expired:
            self._expire()

    def _expire(self) -> None:
        self.expired = True
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


_REQUEST = threading.local()  # the deadline of the request this thread is making


class _HTTPConnection(http.client.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        if getattr(_REQUEST, "deadline", None) is not None:
            _REQUEST.deadline.watch(self.sock)


class _HTTPSConnection(http.client.HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        if getattr(_REQUEST, "deadline", None) is not None:
            _REQUEST.deadline.watch(self.sock)


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_HTTPConnection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_HTTPSConnection, req)


_OPENER = urllib.request.build_opener(_NoRedirect, _HTTPHandler, _HTTPSHandler)


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Bound everything inside (connect, headers, body, stream) to `seconds` in all."""
    limit = _Deadline(seconds)
    _REQUEST.deadline = limit
    try:
        yield
    except (Transient, Fatal, OSError, http.client.HTTPException) as exc:
        if limit.expired:
            raise Transient(f"no complete reply within the deadline of {seconds:g} s") from exc
        raise
    finally:
        limit.timer.cancel()
        _REQUEST.deadline = None
    if limit.expired:  # a reply cut short can still parse: never take it as the answer
        raise Transient(f"no complete reply within the deadline of {seconds:g} s")


def post(url: str, body: dict[str, Any], headers: dict[str, str], timeout: float,
         secrets: Sequence[str] = ()) -> Any:
    """POST JSON; returns the open response, or raises Transient/Fatal classified by cause."""
    data = json.dumps(body).encode("utf-8")
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    return _open(req, timeout, secrets)


def get_json(url: str, headers: dict[str, str], timeout: float,
             secrets: Sequence[str] = ()) -> Any:
    req = urllib.request.Request(url, headers=headers)
    with _open(req, timeout, secrets) as resp:
        return parse_json(read_body(resp, timeout), secrets)


def _open(req: urllib.request.Request, timeout: float, secrets: Sequence[str]) -> Any:
    try:
        return _OPENER.open(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise http_failure(exc.code, _read_error(exc), exc.headers.get("Retry-After"),
                           exc.headers.get("Location"), secrets) from exc
    except urllib.error.URLError as exc:
        raise network_failure(exc.reason, timeout) from exc
    except (OSError, http.client.HTTPException) as exc:
        raise network_failure(exc, timeout) from exc


def _read_error(exc: urllib.error.HTTPError) -> bytes:
    try:
        return exc.read(MAX_ERROR_BYTES)
    except (OSError, http.client.HTTPException):
        return b""


def read_body(resp: Any, timeout: float) -> bytes:
    """The whole body, refusing more than MAX_REPLY_BYTES."""
    try:
        raw = resp.read(MAX_REPLY_BYTES + 1)
    except (OSError, http.client.HTTPException) as exc:
        raise network_failure(exc, timeout) from exc
    if len(raw) > MAX_REPLY_BYTES:
        raise Fatal(f"the reply is larger than {MAX_REPLY_BYTES >> 20} MiB")
    return raw


def read_lines(resp: Any) -> Iterator[bytes]:
    """Stream lines, each at most MAX_LINE_BYTES, all together at most MAX_REPLY_BYTES."""
    total = 0
    while True:
        line = resp.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        total += len(line)
        if len(line) > MAX_LINE_BYTES:
            raise Fatal(f"a streamed line is larger than {MAX_LINE_BYTES >> 20} MiB")
        if total > MAX_REPLY_BYTES:
            raise Fatal(f"the streamed reply is larger than {MAX_REPLY_BYTES >> 20} MiB")
        yield line


def http_failure(status: int, body: bytes, retry_after: str | None, location: str | None = None,
                 secrets: Sequence[str] = ()) -> Exception:
    if 300 <= status < 400:
        where = redact_url(location or "") or "another address"
        return Fatal(f"HTTP {status}: the server redirected to {where}; redirects are not "
                     "followed", status)
    message = f"HTTP {status}: {error_message(body, secrets)}"
    if status in (408, 429) or status >= 500:
        return Transient(message, parse_retry_after(retry_after), status)
    return Fatal(message, status)


def network_failure(reason: Any, timeout: float) -> Transient:
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return Transient(f"timed out after {timeout:g} s")
    if isinstance(reason, ConnectionRefusedError):
        return Transient("connection refused")
    if isinstance(reason, socket.gaierror):
        return Transient(f"cannot resolve the host ({reason})")
    # The reason may quote the server's bytes (a bad status line): one line, redacted, bounded.
    return Transient(f"connection dropped ({type(reason).__name__}: "
                     f"{clip(' '.join(str(reason).split()), 200)})")


SECRET_PATTERNS = (
    re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{4,}"),
    re.compile(r"(?i)\b((?:api[_-]?key|access[_-]?token|token|secret|password|passwd|"
               r"authorization|key)[\"']?\s*[:=]\s*[\"']?)[^\s\"',;}&]{4,}"),
    re.compile(r"\b(sk|pk|rk|hf|ghp|gho|xox[abp])[-_][A-Za-z0-9_-]{8,}"),
)


def redact(text: str, secrets: Sequence[str] = ()) -> str:
    """Text from a server with secrets masked: the key we sent, and anything shaped like one."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    text = SECRET_PATTERNS[0].sub(lambda m: f"{m.group(1)} ***", text)
    text = SECRET_PATTERNS[1].sub(lambda m: f"{m.group(1)}***", text)
    return SECRET_PATTERNS[2].sub("***", text)


def clip(text: str, limit: int, secrets: Sequence[str] = ()) -> str:
    """At most `limit` characters of redacted text. Redact first: a secret cut in two by the
    limit no longer matches, and its first characters would leak."""
    return redact(text, secrets)[:limit]


def redact_url(url: str) -> str:
    """scheme://host[:port]/path: no user:password, no query (tokens travel there too)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6: urlsplit drops the brackets
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:  # not a number: say nothing rather than echo what may be a password
        port = None
    netloc = host + (f":{port}" if port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def split_credentials(url: str) -> tuple[str, dict[str, str], tuple[str, ...]]:
    """`http://user:password@host/...` -> (the URL without them, a Basic Authorization header,
    the secrets to redact). urllib would take `user:password@host` for the host name and echo
    it in its errors; the credentials travel in the header instead, and nowhere else."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, {}, ()
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    user, password = urllib.parse.unquote(user), urllib.parse.unquote(password)
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    bare = urllib.parse.urlunsplit((parts.scheme, hostport, parts.path, parts.query,
                                    parts.fragment))
    secrets = tuple(s for s in (password, token, userinfo) if s)
    return bare, {"Authorization": f"Basic {token}"}, secrets


def error_message(body: bytes, secrets: Sequence[str] = ()) -> str:
    """Ollama sends {"error": "..."}, OpenAI-style servers {"error": {"message": ...}};
    redacted, then cut to 300 characters."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # also numbers past Python's int-string limit
        return clip(text, 200, secrets) or "(empty body)"
    err = data.get("error", data.get("detail", data)) if isinstance(data, dict) else data
    if isinstance(err, dict):
        err = err.get("message", err)
    return clip(str(err), 300, secrets)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After is either seconds or an HTTP date; anything else (`soon`) is ignored, and
    the usual backoff applies."""
    if not value or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (ValueError, TypeError, OverflowError):
            return None
        seconds = when.timestamp() - time.time() if when else float("nan")
    return max(0.0, seconds) if math.isfinite(seconds) else None


def parse_json(raw: bytes, secrets: Sequence[str] = ()) -> Any:
    """A reply's JSON; what Python's parser refuses (bad syntax, bad UTF-8, nesting too deep,
    an integer past the int-string limit) is a Transient failure, retried, then explained."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError included
        snippet = clip(raw[:4096].decode("utf-8", "replace"), 80, secrets)
        raise Transient(f"the reply was not JSON: {snippet!r}") from None


def shape_error(data: Any) -> Transient:
    return Transient(f"unexpected reply shape: {clip(str(data)[:4096], 120)}")


def typed(data: Any, key: str, kind: type[T] | tuple[type, ...], default: Any = None) -> Any:
    """`data[key]` if `data` is an object and the value has the expected type; absent or null
    gives `default`; anything else is a reply of the wrong shape (retried, then explained)."""
    if not isinstance(data, dict):
        raise shape_error(data)
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise shape_error(data)
    return value


def count(data: Any, key: str) -> int:
    """A token count: a non-negative integer, 0 when the server leaves it out."""
    value = typed(data, key, (int, float), 0)
    if not math.isfinite(value):
        raise shape_error(data)
    return max(0, int(value))
