"""A real HTTP server on 127.0.0.1 whose replies a test scripts byte by byte: hostile servers
(redirects, trickled bytes, oversized or oddly shaped replies) that no well-behaved stand-in sends.

    def respond(req: Request, out: BinaryIO) -> None:
        out.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\n{}")
    with Scripted(respond) as server: ... server.url ... server.requests
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes


Respond = Callable[[Request, BinaryIO], None]


def response(status: int, body: bytes | str | Any, headers: dict[str, str] | None = None,
             reason: str = "X") -> bytes:
    """A whole HTTP/1.1 response; a non-bytes, non-str body is sent as JSON."""
    if not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    raw = body.encode() if isinstance(body, str) else body
    head = {"Content-Type": "application/json", "Content-Length": str(len(raw)),
            "Connection": "close", **(headers or {})}
    lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in head.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + raw


class Scripted:
    def __init__(self, respond: Respond):
        self.respond = respond
        self.requests: list[Request] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Scripted:  # noqa: PYI034
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.sock.close()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as rfile, conn.makefile("wb", buffering=0) as wfile:
            try:
                req = read_request(rfile)
                self.requests.append(req)
                self.respond(req, wfile)
            except OSError:
                pass  # the client hung up: expected when it gives up on a hostile reply


def read_request(rfile: BinaryIO) -> Request:
    method, path, _ = rfile.readline().decode("latin-1").split(" ", 2)
    headers = {}
    while (line := rfile.readline().decode("latin-1").strip()):
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = rfile.read(int(headers.get("content-length", 0)))
    return Request(method, path, headers, body)
