"""The walls around `tuneline review serve`: who may read the page and who may write.

- Host: only the names the server was started for (localhost, 127.0.0.1, ::1, the --host given
  and, when bound to every address, this machine's own names and addresses) are answered. A page on
  another site whose name was made to resolve to this machine (DNS rebinding) sends its own name as
  Host and gets 400, whatever address the server listens on.
- Origin: a request that carries one must come from a page of this server (an allowed name, this
  port); Origin is checked against the allow-list, never against Host (both are the attacker's).
- Writes carry the session token the served page holds (review_server checks it).
- Every answer gets a strict Content-Security-Policy and no-store.
"""

from __future__ import annotations

import json
import socket
from typing import Any
from urllib.parse import urlsplit

LOOPBACK = ("127.0.0.1", "localhost", "::1")
ANY = ("0.0.0.0", "::")
TOKEN_HEADER = "x-tuneline-token"
TOKEN_SLOT = "__TUNELINE_SESSION_TOKEN__"  # in index.html, replaced when the page is served
# Only the page's own script and style may run or load: a second wall behind the escaping.
CSP = (b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class TooLarge(Exception):
    """A request body past the limit, noticed while it is read."""


def bare(host: str) -> str:
    """"[::1]" -> "::1": the address as sockets take it."""
    host = host.strip()
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def url_host(host: str) -> str:
    """The host part of a URL that reaches a server listening on `host`."""
    host = bare(host)
    if host in ANY:
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def allowed_names(host: str) -> frozenset[str]:
    """The names and addresses this server answers to (lower case, no brackets, no port)."""
    host = bare(host).lower()
    names = {*LOOPBACK, host}
    if host in ANY:  # reachable by this machine's own names and addresses too
        names |= _own_names()
    return frozenset(n.lower().rstrip(".").split("%")[0] for n in names if n)


def _own_names() -> set[str]:
    names = {socket.gethostname(), socket.getfqdn()}
    for name in list(names):
        try:
            names |= {str(info[4][0]) for info in socket.getaddrinfo(name, None)}
        except OSError:
            continue
    try:  # every interface's address (psutil comes with DVC)
        import psutil

        names |= {a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                  if a.family in (socket.AF_INET, socket.AF_INET6)}
    except (ImportError, OSError):
        pass
    for family, probe in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((probe, 9))  # UDP: picks the outgoing address, sends nothing
                names.add(s.getsockname()[0])
        except OSError:
            continue
    return names


def host_name(header: str) -> str:
    """The name in a Host header, as allowed_names spells it: "[::1]:8765" -> "::1"."""
    value = header.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 and value[end + 1:end + 2] in ("", ":") else ""
    if value.count(":") > 1:
        return ""  # an IPv6 address must be in brackets
    return value.split(":", 1)[0].rstrip(".")


def origin_problem(origin: str, names: frozenset[str], port: int | None) -> str | None:
    try:
        parts = urlsplit(origin)
        origin_port = parts.port or (80 if parts.scheme == "http" else 443)
    except ValueError:
        return f"a page from {origin!r} may not use this server"
    name = (parts.hostname or "").rstrip(".")
    if parts.scheme != "http" or name not in names or (port is not None and origin_port != port):
        return f"a page from {origin} may not use this server"
    return None


def guard(inner: Any, names: frozenset[str]) -> Any:
    """ASGI app: Host allow-list, Origin allow-list and security headers around `inner`."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await inner(scope, receive, send)
            return
        hosts = [v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"host"]
        origins = [v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"origin"]
        name = host_name(hosts[0]) if len(hosts) == 1 else ""
        server = scope.get("server")
        if name not in names:
            shown = ", ".join(sorted(names))
            why = (f"this server answers only to {shown}; open the page by one of these names "
                   "(a page from another site is refused)")
            problem: tuple[int, str | None] = (400, why)
        elif origins:
            problem = (403, origin_problem(origins[0], names, server[1] if server else None))
        else:
            problem = (0, None)
        if problem[1] is not None:
            await _refuse(send, *problem)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).extend([
                    (b"content-security-policy", CSP),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"cache-control", b"no-store")])
            await send(message)
        await inner(scope, receive, send_with_headers)

    return app


async def _refuse(send: Any, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"content-security-policy", CSP), (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": body})
