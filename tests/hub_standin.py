"""A local stand-in for the Hugging Face Hub, for the real `huggingface_hub` client in tests.

It speaks the protocol the client uses with `HF_HUB_DISABLE_XET=1` (measured with
huggingface_hub 2.4): `GET /api/whoami-v2`; `POST /api/repos/create`;
`GET /api/models/{repo}[/revision/{rev}]` (model_info, `?blobs=true` for sizes and hashes);
`GET /api/models/{repo}/tree/{rev}` (list_repo_tree, what snapshot_download lists);
`POST /api/validate-yaml` (the card's metadata); `POST /api/models/{repo}/preupload/{rev}`;
`POST /{repo}.git/info/lfs/objects/batch`; `PUT` upload and `POST` verify per LFS object;
`POST /api/models/{repo}/commit/{rev}` with an NDJSON body;
`HEAD`/`GET /{repo}/resolve/{rev}/{path}` (with `Range: bytes=N-` for resumed downloads: 206);
`DELETE /api/repos/delete` (delete_repo, JSON body
with name and organization). Dataset repositories (`type: dataset` on create and delete) use the
same calls under `/api/datasets/`, `/datasets/{repo}.git/...` and `/datasets/{repo}/resolve/...`;
they are kept under the key `datasets/{namespace}/{name}` (see `key`).
Gated model repos (`create_repo(..., gated=...)`) answer model_info to anyone, as the Hub does,
and file downloads with 401 (no token) or 403 (an account that has not accepted the license),
X-Error-Code GatedRepo.

Files are stored as bytes per commit, so a test can check that what arrived is byte-identical.
Tokens map to accounts (write or read role, namespaces); errors follow the Hub: 401 with
"Invalid credentials in Authorization header" for a bad token, 404 + X-Error-Code RepoNotFound,
403 without write rights, 409 on an existing repo, 412 when parentCommit is stale. `fail()`
injects faults: a status code, a dropped connection, a reply cut off after `cut` body bytes
(a download interrupted mid-file), a message that echoes the caller's
Authorization header (to prove the caller scrubs its token), or a raw reply body (an HTML error
page from a proxy, JSON of the wrong shape) with any status. `on()` runs a test's action when a
given request arrives (to change the world at an exact moment of the protocol).

    with HubStandin() as hub:
        hub.add_account("hf_write", "alice")
        os.environ["HF_ENDPOINT"] = hub.url
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".npz", ".onnx")
LFS_SIZE = 10 * 1024 * 1024  # the Hub stores larger files in LFS whatever their name
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES)
BAD_TOKEN = "Invalid credentials in Authorization header"
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
KIND = r"(?P<kind>models|datasets)"  # /api/{kind}/...
PREFIX = r"(?P<prefix>datasets/)?"  # /{prefix}{repo}.git/... and /{prefix}{repo}/resolve/...
DATASETS = "datasets/"


def key(repo_id: str, repo_type: str = "model") -> str:
    """Where the stand-in keeps a repo: model ids as they are, datasets under datasets/."""
    return f"{DATASETS}{repo_id}" if repo_type == "dataset" else repo_id


def namespace_of(repo_key: str) -> str:
    return repo_key.removeprefix(DATASETS).split("/")[0]


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Account:
    name: str
    role: str = "write"  # "write" | "read"
    orgs: tuple[str, ...] = ()

    def owns(self, namespace: str) -> bool:
        return namespace == self.name or namespace in self.orgs


@dataclass(frozen=True)
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
                f"size {len(self.data)}\n").encode()

    @property
    def oid(self) -> str:
        """What preupload calls the remote oid: sha256 for LFS, the git blob sha1 otherwise."""
        return self.sha256 if self.lfs else git_blob_sha1(self.data)


@dataclass
class Commit:
    oid: str
    title: str
    description: str
    files: dict[str, StoredFile]
    tag: str | None = None  # a tag name pointing at this commit (revision pinning tests)


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)
    gated: tuple[str, ...] | None = None  # None: open; else the account names with access

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def at(self, revision: str) -> Commit | None:
        if revision == "main":
            return self.head
        return next((c for c in self.commits if c.oid == revision or c.tag == revision), None)


@dataclass
class Fault:
    method: str
    pattern: re.Pattern[str]
    status: int
    times: int
    drop: bool
    message: str
    echo_auth: bool
    body: bytes | None = None  # reply with exactly these bytes instead of a JSON error
    content_type: str = "application/json"
    cut: int | None = None  # resolve: send the headers, this many body bytes, then hang up


class HubStandin:
    def __init__(self) -> None:
        self.accounts: dict[str, Account] = {}
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> bytes (uploaded, committed or not)
        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
        self.uploaded_bytes = 0  # bytes received by LFS PUTs
        self.faults: list[Fault] = []
        self.range_requests: list[tuple[str, str]] = []  # (path, Range header) of resolve GETs
        self.hooks: list[tuple[str, re.Pattern[str], Any]] = []  # run once, before the route
        self.lock = threading.RLock()
        self._counter = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread: threading.Thread | None = None

    # --- lifecycle

    def start(self) -> HubStandin:
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> HubStandin:  # noqa: PYI034 - no typing.Self on 3.10
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- test set-up and inspection

    def add_account(self, token: str, name: str, role: str = "write",
                    orgs: tuple[str, ...] = ()) -> Account:
        self.accounts[token] = Account(name, role, orgs)
        return self.accounts[token]

    def create_repo(self, repo_id: str, private: bool = True,
                    files: dict[str, bytes] | None = None,
                    gated: tuple[str, ...] | None = None) -> Repo:
        """A repo as the Hub creates it (one commit with .gitattributes), plus `files`."""
        with self.lock:
            tree = {".gitattributes": StoredFile(GITATTRIBUTES.encode(), False)}
            repo = Repo(repo_id, private, [Commit(self._oid(repo_id), "initial commit", "", tree)],
                        gated)
            self.repos[repo_id] = repo
            if files:
                self.push(repo_id, files)
            return repo

    def push(self, repo_id: str, files: dict[str, bytes], tag: str | None = None) -> str:
        """A new commit on main replacing `files` (the rest kept); returns its sha."""
        with self.lock:
            repo = self.repos[repo_id]
            tree = dict(repo.head.files)
            tree.update({p: self._stored(p, d) for p, d in files.items()})
            repo.commits.append(Commit(self._oid(repo_id), "update", "", tree, tag))
            return repo.head.oid

    def add_model_dir(self, repo_id: str, folder: Any, private: bool = False,
                      gated: tuple[str, ...] | None = None) -> Repo:
        """A model repository holding every file of `folder` (e.g. tests/tiny.py's model)."""
        from pathlib import Path

        files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
        return self.create_repo(repo_id, private=private, files=files, gated=gated)

    def fail(self, method: str, path: str, status: int = 500, times: int = 1,
             drop: bool = False, message: str = "injected failure",
             echo_auth: bool = False, body: bytes | None = None,
             content_type: str = "application/json", cut: int | None = None) -> None:
        """The next `times` requests matching `method` and regex `path` fail this way."""
        with self.lock:
            self.faults.append(Fault(method.upper(), re.compile(path), status, times, drop,
                                     message, echo_auth, body, content_type, cut))

    def ranges(self, pattern: str) -> list[str]:
        """Range headers of the GETs whose path matches `pattern` ("" for none), in order."""
        return [r for p, r in self.range_requests if re.search(pattern, p)]

    def on(self, method: str, path: str, action: Any) -> None:
        """Call `action()` once, in the server's thread, when the first request matching
        `method` and regex `path` arrives, before it is answered (a file swapped between the
        gate and the upload, a Ctrl+C in the middle of a commit)."""
        with self.lock:
            self.hooks.append((method.upper(), re.compile(path), action))

    def file_bytes(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        commit = self.repos[repo_id].at(revision)
        assert commit is not None, f"no revision {revision} in {repo_id}"
        return commit.files[path].data

    def paths(self, repo_id: str, revision: str = "main") -> set[str]:
        commit = self.repos[repo_id].at(revision)
        assert commit is not None
        return set(commit.files)

    def calls(self, method: str, pattern: str) -> int:
        return sum(1 for m, p in self.requests if m == method and re.search(pattern, p))

    # --- internals

    def _oid(self, seed: str) -> str:
        self._counter += 1
        return hashlib.sha1(f"{seed}:{self._counter}".encode()).hexdigest()

    def _stored(self, path: str, data: bytes) -> StoredFile:
        return StoredFile(data, path.endswith(LFS_SUFFIXES) or len(data) > LFS_SIZE)

    def _take_hook(self, method: str, path: str) -> Any:
        with self.lock:
            for i, (verb, pattern, action) in enumerate(self.hooks):
                if verb == method and pattern.search(path):
                    del self.hooks[i]
                    return action
        return None

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.times > 0 and fault.method == method and fault.pattern.search(path):
                    fault.times -= 1
                    return fault
        return None


class _Reply(Exception):
    """Raised inside a route to answer with an error."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.body = body if body is not None else {"error": message}


def _handler(hub: HubStandin) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubHandler):
        pass

    Handler.hub = hub
    return Handler


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubStandin

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # --- plumbing

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path, self.query = unquote(url.path), parse_qs(url.query)
        self.body = self._read_body()
        with self.hub.lock:
            self.hub.requests.append((method, path))
        hook = self.hub._take_hook(method, path)
        if hook is not None:
            hook()
        fault = self.hub._take_fault(method, path)
        self.cut = fault.cut if fault is not None else None
        if fault is not None and fault.cut is not None:
            fault = None  # served, then cut short by `resolve`
        if fault is not None and fault.drop:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault is not None and fault.body is not None:
            self._send_raw(fault.status, fault.body, fault.content_type)
            return
        try:
            if fault is not None:
                auth = self.headers.get("Authorization", "")
                message = f"{fault.message} (request had {auth})" if fault.echo_auth \
                    else fault.message
                raise _Reply(fault.status, message)
            self._route(method, path)
        except _Reply as reply:
            self._send_json(reply.status, reply.body, error=reply.message, code=reply.code)

    def _route(self, method: str, path: str) -> None:
        routes = [
            ("GET", r"/api/whoami-v2", self.whoami),
            ("POST", r"/api/repos/create", self.create),
            ("DELETE", r"/api/repos/delete", self.delete),
            ("POST", r"/api/validate-yaml", self.validate_yaml),
            ("GET", rf"/api/{KIND}/{REPO}(?:/revision/(?P<rev>[^/]+))?", self.model_info),
            ("GET", rf"/api/{KIND}/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<folder>.*))?", self.tree),
            ("POST", rf"/api/{KIND}/{REPO}/preupload/(?P<rev>[^/]+)", self.preupload),
            ("POST", rf"/api/{KIND}/{REPO}/commit/(?P<rev>[^/]+)", self.commit),
            ("POST", rf"/{PREFIX}{REPO}\.git/info/lfs/objects/batch", self.lfs_batch),
            ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", self.lfs_put),
            ("POST", rf"/lfs-verify/{PREFIX}{REPO}", self.lfs_verify),
            ("GET", rf"/{PREFIX}{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self.resolve),
            ("HEAD", rf"/{PREFIX}{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self.resolve),
        ]
        for verb, pattern, route in routes:
            match = re.fullmatch(pattern, path)
            if verb == method and match:
                args = match.groupdict()
                dataset = args.pop("kind", None) == "datasets" or args.pop("prefix", None)
                if "repo" in args:
                    args["repo"] = key(args["repo"], "dataset" if dataset else "model")
                route(**args)
                return
        raise _Reply(404, f"no route for {method} {path}")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as exc:
            raise _Reply(400, f"body is not JSON: {exc}") from exc

    def _send_raw(self, status: int, payload: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _send_json(self, status: int, data: Any, *, error: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if error is not None:
            self.send_header("X-Error-Message", error.replace("\n", " ")[:500])
        if code is not None:
            self.send_header("X-Error-Code", code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    # --- auth

    def _account(self) -> Account | None:
        header = self.headers.get("Authorization")
        if not header:
            return None
        token = header.removeprefix("Bearer ").strip()
        account = self.hub.accounts.get(token)
        if account is None:
            raise _Reply(401, BAD_TOKEN)
        return account

    def _readable(self, repo_id: str) -> Repo:
        account = self._account()
        repo = self.hub.repos.get(repo_id)
        visible = repo is not None and (not repo.private or (
            account is not None and account.owns(namespace_of(repo_id))))
        if not visible:
            status = 401 if account is None else 404
            raise _Reply(status, "Repository not found", code="RepoNotFound")
        assert repo is not None
        return repo

    def _writable(self, repo_id: str) -> Repo:
        repo = self._readable(repo_id)
        account = self._account()
        if account is None or account.role != "write" or not account.owns(namespace_of(repo_id)):
            raise _Reply(403, f"You don't have the rights to write to {repo_id}")
        return repo

    # --- routes

    def whoami(self) -> None:
        account = self._account()
        if account is None:
            raise _Reply(401, BAD_TOKEN)
        self._send_json(200, {
            "type": "user", "name": account.name,
            "orgs": [{"name": org} for org in account.orgs],
            "auth": {"type": "access_token",
                     "accessToken": {"displayName": "test", "role": account.role}},
        })

    def create(self) -> None:
        account = self._account()
        body = self._json()
        namespace = body.get("organization") or (account.name if account else None)
        repo_id = f"{namespace}/{body.get('name')}"
        if account is None:
            raise _Reply(401, BAD_TOKEN)
        if account.role != "write" or not account.owns(str(namespace)):
            raise _Reply(403, f'You don\'t have the rights to create a model under the namespace '
                              f'"{namespace}"')
        if body.get("type") not in (None, "model", "dataset"):
            raise _Reply(400, "the stand-in hosts model and dataset repos only")
        repo_id = key(repo_id, body.get("type") or "model")
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            raise _Reply(409, "You already created this model repo",
                         body={"error": "You already created this model repo", "url": url})
        private = body.get("visibility") == "private" or body.get("private") is True
        self.hub.create_repo(repo_id, private=private)
        plain = repo_id.removeprefix(DATASETS)
        self._send_json(200, {"url": url, "name": plain, "id": plain})

    def delete(self) -> None:
        """delete_repo: 404 RepoNotFound if absent, 403 without write rights; 200 empty body."""
        account = self._account()
        body = self._json()
        namespace = body.get("organization") or (account.name if account else None)
        repo_id = f"{namespace}/{body.get('name')}"
        if body.get("type") not in (None, "model", "dataset"):
            raise _Reply(400, "the stand-in hosts model and dataset repos only")
        repo_id = key(repo_id, body.get("type") or "model")
        self._writable(repo_id)
        with self.hub.lock:
            del self.hub.repos[repo_id]
        self._send_raw(200, b"", "text/plain")

    def validate_yaml(self) -> None:
        self._account()
        content = str(self._json().get("content", ""))
        errors = _metadata_errors(content)
        status = 400 if errors else 200
        self._send_json(status, {"errors": [{"message": e} for e in errors], "warnings": []},
                        error="; ".join(errors) if errors else None)

    def model_info(self, repo: str, rev: str | None = None) -> None:
        stored = self._readable(repo)
        commit = stored.at(rev or "main")
        if commit is None:
            raise _Reply(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        blobs = self.query.get("blobs") == ["True"] or self.query.get("blobs") == ["true"]
        siblings = []
        for path, f in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=len(f.data),
                               blobId=git_blob_sha1(f.pointer if f.lfs else f.data))
                if f.lfs:
                    sibling["lfs"] = {"size": len(f.data), "sha256": f.sha256,
                                      "pointerSize": len(f.pointer)}
            siblings.append(sibling)
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        plain = repo.removeprefix(DATASETS)
        self._send_json(200, {"id": plain, "modelId": plain, "sha": commit.oid,
                              "private": stored.private, "lastModified": now, "tags": [],
                              "siblings": siblings})

    def tree(self, repo: str, rev: str, folder: str | None = None) -> None:
        """list_repo_tree (snapshot_download lists files with it): one page, files only."""
        stored = self._readable(repo)
        commit = stored.at(rev)
        if commit is None:
            raise _Reply(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        prefix = f"{folder.rstrip('/')}/" if folder else ""
        entries = []
        for path, f in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            entry: dict[str, Any] = {"type": "file", "path": path, "size": len(f.data),
                                     "oid": git_blob_sha1(f.pointer if f.lfs else f.data)}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": len(f.data),
                                "pointerSize": len(f.pointer)}
            entries.append(entry)
        self._send_json(200, entries)

    def preupload(self, repo: str, rev: str) -> None:
        stored = self._writable(repo)
        head = stored.at(rev)
        if head is None:
            raise _Reply(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        files = []
        for item in self._json().get("files", []):
            path, size = item["path"], int(item["size"])
            lfs = path.endswith(LFS_SUFFIXES) or size > LFS_SIZE
            remote = head.files.get(path)
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular",
                          "shouldIgnore": False, "oid": remote.oid if remote else None})
        self._send_json(200, {"files": files, "commitOid": head.oid})

    def lfs_batch(self, repo: str) -> None:
        self._writable(repo)
        objects = []
        for obj in self._json().get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size}
            if oid not in self.hub.lfs:
                entry["authenticated"] = True
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.url}/lfs-upload/{oid}"},
                    "verify": {"href": f"{self.hub.url}/lfs-verify/{repo}"},
                }
            objects.append(entry)
        self._send_json(200, {"transfer": "basic", "objects": objects},
                        headers={"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_put(self, oid: str) -> None:
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise _Reply(400, "uploaded content does not match its sha256")
        with self.hub.lock:
            self.hub.lfs[oid] = self.body
            self.hub.uploaded_bytes += len(self.body)
        self._send_json(200, {})

    def lfs_verify(self, repo: str) -> None:
        self._writable(repo)
        body = self._json()
        data = self.hub.lfs.get(body.get("oid", ""))
        if data is None or len(data) != body.get("size"):
            raise _Reply(404, "LFS object not found or size mismatch")
        self._send_json(200, {})

    def commit(self, repo: str, rev: str) -> None:
        stored = self._writable(repo)
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        header = lines[0]["value"] if lines and lines[0].get("key") == "header" else None
        if header is None or not header.get("summary"):
            raise _Reply(400, "commit needs a header line with a summary")
        with self.hub.lock:
            head = stored.at(rev)
            if head is None:
                raise _Reply(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
            parent = header.get("parentCommit")
            if parent is not None and parent != stored.head.oid:
                raise _Reply(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(head.files)
            for line in lines[1:]:
                self._apply(tree, line["key"], line["value"])
            commit = Commit(self.hub._oid(repo), header["summary"],
                            header.get("description", ""), tree)
            stored.commits.append(commit)
        self._send_json(200, {"success": True, "commitOid": commit.oid,
                              "commitUrl": f"{self.hub.url}/{repo}/commit/{commit.oid}",
                              "pullRequestUrl": None})

    def _apply(self, tree: dict[str, StoredFile], key: str, value: dict[str, Any]) -> None:
        path = value["path"]
        if key == "file":
            tree[path] = StoredFile(base64.b64decode(value["content"]), False)
        elif key == "lfsFile":
            data = self.hub.lfs.get(value["oid"])
            if data is None:
                raise _Reply(400, f"LFS object {value['oid']} for {path} was never uploaded")
            tree[path] = StoredFile(data, True)
        elif key == "deletedFile":
            if path not in tree:
                raise _Reply(404, "A file with this name doesn't exist", code="EntryNotFound")
            del tree[path]
        elif key == "deletedFolder":
            for name in [p for p in tree if p.startswith(path.rstrip("/") + "/")]:
                del tree[name]
        else:
            raise _Reply(400, f"unknown commit operation {key!r}")

    def resolve(self, repo: str, rev: str, file: str) -> None:
        stored = self._readable(repo)
        self._check_gate(stored)
        commit = stored.at(rev)
        if commit is None:
            raise _Reply(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        f = commit.files.get(file)
        if f is None:
            raise _Reply(404, "Entry not found", code="EntryNotFound")
        start = self._range_start(f"/{repo}/resolve/{rev}/{file}")
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(f.data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(f.data) - 1}/{len(f.data)}")
        self.send_header("ETag", f'"{f.oid}"')
        self.send_header("X-Repo-Commit", commit.oid)
        self.end_headers()
        if self.command == "HEAD":
            return
        body = f.data[start:]
        if self.cut is not None:  # an interrupted download: part of the body, then hang up
            self.wfile.write(body[: self.cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def _range_start(self, path: str) -> int:
        header = self.headers.get("Range", "") if self.command == "GET" else ""
        if self.command == "GET":
            with self.hub.lock:
                self.hub.range_requests.append((path, header))
        match = re.fullmatch(r"bytes=(\d+)-", header.strip())
        return int(match.group(1)) if match else 0

    def _check_gate(self, repo: Repo) -> None:
        """The Hub's answer to a download from a gated repo without access."""
        if repo.gated is None:
            return
        account = self._account()
        if account is not None and account.name in repo.gated:
            return
        message = (f"Access to model {repo.repo_id} is restricted. You must have access to it "
                   "and be authenticated to access it. Please log in.")
        if account is not None:
            message = (f"Access to model {repo.repo_id} is restricted and you are not in the "
                       "authorized list. Visit its page to ask for access.")
        raise _Reply(401 if account is None else 403, message, code="GatedRepo")


def _metadata_errors(content: str) -> list[str]:
    """The checks the Hub's validate-yaml applies that matter for a model card."""
    match = re.match(r"^---\r?\n(.*?)\r?\n---", content, re.DOTALL)
    if not match:
        return []
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        return [f"YAML metadata is not valid: {exc}"]
    if meta is None:
        return []
    if not isinstance(meta, dict):
        return ["metadata must be a YAML mapping"]
    errors = []
    if "license" in meta and not isinstance(meta["license"], str):
        errors.append('"license" must be a string')
    if "tags" in meta and not (isinstance(meta["tags"], list)
                               and all(isinstance(t, str) for t in meta["tags"])):
        errors.append('"tags" must be a list of strings')
    for entry in meta.get("model-index") or []:
        for result in entry.get("results") or []:
            for key in ("task", "dataset"):
                if not isinstance(result.get(key), dict) or "type" not in result[key]:
                    errors.append(f'"model-index" result needs {key}.type')
            for metric in result.get("metrics") or []:
                if "type" not in metric or "value" not in metric:
                    errors.append('"model-index" metrics need type and value')
    return errors
