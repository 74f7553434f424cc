"""The Hugging Face Hub client of `tuneline publish`: one commit with a whole release, or nothing.

`push` checks the token, reads what the repository holds, and makes a single `create_commit`
with every file (and the deletion of files an earlier publish put there that this one no longer
has), so the Hub shows all of a release or none of it. A repository this run had to create is
deleted again when the commit fails or is interrupted (Ctrl+C): the Hub has no "create with first
commit" call, and an empty repository left behind would look like a release that went missing.
What is uploaded is a private `snapshot` of the checked files, hashed as it is copied.

The token is handed to `huggingface_hub` only and scrubbed from every message (`redact`); every
failure comes out as one HubError line naming the URL and what to do, never the client's chained
exception (which carries request headers).

Reads (whoami, repo info, the previous manifest) are retried on a 429/5xx reply or a network error,
up to READ_ATTEMPTS times with a short backoff: a proxy's passing 502 should not fail a release.
The commit is never retried (it is not idempotent; a lost reply to a commit that landed would
otherwise become a second commit); huggingface_hub retries LFS transfers itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from pipeline.core.errors import UserError
from pipeline.hub.repo_facts import CHUNK, sha256_file

DEFAULT_ENDPOINT = "https://huggingface.co"
READ_ATTEMPTS = 3
READ_BACKOFF_S = 0.5  # doubled after each failed attempt
RETRY_STATUS = (429, 500, 502, 503, 504)
T = TypeVar("T")
NOTHING_PUBLISHED = (
    "Nothing was published: the Hub shows a new revision only once its single commit succeeds."
)


class HubError(UserError):
    """Publishing to the Hub failed or cannot start; the message says why (never the token)."""


@dataclass(frozen=True)
class ReleaseFile:
    path: str  # path in the Hub repo
    size: int
    sha256: str
    source: Path | None  # local file, or None for generated content
    data: bytes | None = field(default=None, repr=False)
    volatile: bool = False  # names the git commit: not compared when deciding "already there"

    @classmethod
    def local(cls, repo_path: str, local: Path) -> ReleaseFile:
        return cls(repo_path, local.stat().st_size, sha256_file(local), local)

    @classmethod
    def generated(cls, repo_path: str, data: bytes, *, volatile: bool = False) -> ReleaseFile:
        return cls(repo_path, len(data), hashlib.sha256(data).hexdigest(), None, data, volatile)


@dataclass(frozen=True)
class Upload:
    repo_id: str
    private: bool  # create private; refuse to write into a public repo
    files: Sequence[ReleaseFile]
    manifest: str  # repo path of the manifest that lists what tuneline put there
    content_id: str  # same id + same bytes on the Hub = nothing to do
    title: str  # commit title
    description: str
    repo_type: str = "model"  # or "dataset"


@contextmanager
def snapshot(files: Sequence[ReleaseFile], folder: Path) -> Iterator[list[ReleaseFile]]:
    """The files to upload, copied into a private folder under `folder` and hashed as they are
    copied: a copy whose sha256 is not the one the gate checked (and the manifest records)
    stops the upload, and later changes to the originals (a swap with the same size and mtime
    included) cannot reach the Hub. Removed afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(prefix="publish-snapshot-", dir=folder))  # mode 0700
    try:
        copies = []
        for i, f in enumerate(files):
            if f.source is None:
                copies.append(f)
                continue
            copy = private / f"{i:05d}-{Path(f.path).name}"
            size, digest = _copy_hashing(Path(f.source), copy)
            if (size, digest) != (f.size, f.sha256):
                raise HubError(f"{f.source} changed after the gate checked it (sha256 "
                               f"{f.sha256[:12]}..., now {digest[:12]}...): re-run `tuneline "
                               f"publish` once nothing writes to it. {NOTHING_PUBLISHED}")
            copies.append(replace(f, source=copy))
        yield copies
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _copy_hashing(source: Path, target: Path) -> tuple[int, str]:
    """Copy `source` to a new file `target` (owner-only); size and sha256 of what was written."""
    digest, size = hashlib.sha256(), 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
        for chunk in iter(lambda: src.read(CHUNK), b""):
            digest.update(chunk)
            dst.write(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def redact(text: str, token: str | None) -> str:
    return text.replace(token, "<HF_TOKEN>") if token and len(token) >= 4 else text


def push(upload: Upload, token: str | None,
         endpoint: str) -> tuple[Literal["published", "unchanged"], str, str]:
    """One commit with the whole release, or nothing if the Hub already has this content."""
    from huggingface_hub import HfApi

    repo_id = upload.repo_id
    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(repo_id, endpoint, token):
        _check_token(api)
        remote = _remote_info(api, upload)
        if remote is not None and remote.private is False and upload.private:
            raise HubError(f"{endpoint}/{repo_id} is public but publish.private is true: make "
                           "it private in its settings, or set publish.private: false")
        previous = _previous_manifest(api, upload, remote)
        if remote is not None and _already_there(upload, previous, remote):
            return "unchanged", f"{endpoint}/{repo_id}/commit/{remote.sha}", str(remote.sha)
        if remote is None:
            # exist_ok=False: a repo someone else created meanwhile is theirs, never deleted below.
            api.create_repo(repo_id, private=upload.private, exist_ok=False,
                            repo_type=upload.repo_type)
        try:
            info = _commit(api, upload, remote, previous)
        except BaseException as exc:  # Ctrl+C too: never leave an empty repository behind
            if remote is None:
                _delete_created(api, exc, upload, endpoint)
            raise
    return "published", str(info.commit_url), str(info.oid)


def _commit(api: Any, upload: Upload, remote: Any, previous: dict[str, Any] | None) -> Any:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    current = {f.path for f in upload.files}
    present = {s.rfilename for s in (remote.siblings or [])} if remote is not None else set()
    stale = sorted(p for p in (previous or {}).get("files", {}) if p not in current
                   and p in present)
    operations: list[Any] = [
        CommitOperationAdd(f.path, f.data if f.data is not None else str(f.source))
        for f in upload.files]
    for f, op in zip(upload.files, operations):  # the client's own hash of what it sends
        if op.upload_info.sha256.hex() != f.sha256:
            raise HubError(f"{f.source or f.path} is not the file the gate checked (sha256 "
                           f"{f.sha256[:12]}..., sent {op.upload_info.sha256.hex()[:12]}...); "
                           f"re-run `tuneline publish`. {NOTHING_PUBLISHED}")
    operations += [CommitOperationDelete(path) for path in stale]
    return api.create_commit(
        upload.repo_id, operations, repo_type=upload.repo_type, commit_message=upload.title,
        commit_description=f"{upload.description}\n{len(upload.files)} files, "
                           f"{len(stale)} removed",
        parent_commit=remote.sha if remote is not None else None)


def _delete_created(api: Any, exc: BaseException, upload: Upload, endpoint: str) -> None:
    """Remove the repo this run created for a commit that failed or was interrupted; say so
    if that fails too."""
    repo_id = upload.repo_id
    try:
        _read(lambda: api.delete_repo(repo_id, repo_type=upload.repo_type, missing_ok=True))
    except Exception as cleanup:  # noqa: BLE001 - reported, with the original failure
        if not isinstance(exc, Exception):  # interrupted: name the leftover, keep the signal
            print(f"warning: the empty repository {endpoint}/{repo_id} this run created could "
                  f"not be deleted: delete it at {endpoint}/{repo_id}/settings", file=sys.stderr)
            return
        raise HubError(
            f"{explain(exc, repo_id, endpoint)} The empty repository this run created could not "
            f"be deleted ({type(cleanup).__name__}): delete it at {endpoint}/{repo_id}/settings."
        ) from None


def _read(call: Callable[[], T]) -> T:
    """`call()`, retried on 429/5xx replies and network errors (idempotent calls only)."""
    for attempt in range(READ_ATTEMPTS):
        try:
            return call()
        except Exception as exc:
            if attempt == READ_ATTEMPTS - 1 or not _transient(exc):
                raise
            time.sleep(READ_BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


def _transient(exc: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    cause = _root_cause(exc)
    if isinstance(cause, HfHubHTTPError) and cause.response is not None:
        return cause.response.status_code in RETRY_STATUS
    return _is_network(cause)


def _check_token(api: Any) -> None:
    who = _read(api.whoami)
    auth = who.get("auth") if isinstance(who, dict) else None
    role = ((auth or {}).get("accessToken") or {}).get("role") if isinstance(auth, dict) else None
    if role == "read":
        raise HubError("HF_TOKEN is a read-only token: create one with write access at "
                       "https://huggingface.co/settings/tokens and export it as HF_TOKEN. "
                       + NOTHING_PUBLISHED)


def _remote_info(api: Any, upload: Upload) -> Any:
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return _read(lambda: api.repo_info(upload.repo_id, repo_type=upload.repo_type,
                                           revision="main", files_metadata=True))
    except RepositoryNotFoundError:
        return None  # a first publish: the repo is created just before the commit


def _previous_manifest(api: Any, upload: Upload, remote: Any) -> dict[str, Any] | None:
    """What an earlier publish put in the repo (to delete what this one no longer has)."""
    if remote is None or upload.manifest not in {s.rfilename for s in remote.siblings or []}:
        return None
    with tempfile.TemporaryDirectory(prefix="tuneline-hub-") as cache:
        path = _read(lambda: api.hf_hub_download(
            upload.repo_id, upload.manifest, repo_type=upload.repo_type, revision=remote.sha,
            cache_dir=cache))
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # edited by hand: publish everything again, delete nothing
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


def _already_there(upload: Upload, previous: dict[str, Any] | None, remote: Any) -> bool:
    """Same content id, and every artifact still on the Hub with the same bytes."""
    if previous is None or previous.get("content_id") != upload.content_id:
        return False
    siblings = {s.rfilename: s for s in remote.siblings or []}
    for f in upload.files:
        sibling = siblings.get(f.path)
        if sibling is None:
            return False
        if f.volatile:
            continue  # names the git commit, which may differ for the same content
        if not _same_bytes(f, sibling):
            return False
    return True


def _same_bytes(local: ReleaseFile, sibling: Any) -> bool:
    if sibling.lfs is not None:
        return sibling.lfs.sha256 == local.sha256
    from huggingface_hub.utils import sha

    data = local.data if local.data is not None else Path(str(local.source)).read_bytes()
    return sibling.blob_id == sha.git_hash(data)


# --- errors ----------------------------------------------------------------------------------


@contextmanager
def hub_errors(repo_id: str, endpoint: str, token: str | None) -> Iterator[None]:
    """Turn what the Hub client raises into one clear, token-free HubError."""
    try:
        yield
    except HubError as exc:
        raise HubError(redact(str(exc), token)) from None
    except Exception as exc:  # noqa: BLE001 - every failure must come out token-free
        raise HubError(redact(explain(exc, repo_id, endpoint, token), token)) from None


def explain(exc: BaseException, repo_id: str, endpoint: str, token: str | None = None) -> str:
    """What went wrong and what to do, from the innermost HTTP or network error: one line."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    cause = _root_cause(exc)
    where = f"{endpoint}/{repo_id}"
    if isinstance(cause, OfflineModeIsEnabled):
        text = "HF_HUB_OFFLINE is set, so the Hub cannot be reached: unset it to publish."
    elif isinstance(cause, HfHubHTTPError) and cause.response is not None:
        text = _explain_http(cause, repo_id, endpoint, token)
    elif _is_network(cause):
        text = (f"network error talking to {endpoint} ({type(cause).__name__}: "
                f"{_first_line(cause, token)}): check the connection and re-run "
                "`tuneline publish`.")
    elif isinstance(cause, ValueError) and "README.md" in str(cause):
        text = f"the Hub rejected the model card metadata for {where}: {_first_line(cause, token)}."
    else:
        text = (f"publishing to {where} failed ({type(cause).__name__}: "
                f"{_first_line(cause, token)}): "
                f"the reply was not what the Hub sends; check HF_ENDPOINT and re-run later.")
    return f"{text} {NOTHING_PUBLISHED}"


def _explain_http(exc: Any, repo_id: str, endpoint: str, token: str | None) -> str:
    status = exc.response.status_code
    namespace = repo_id.split("/")[0]
    if status == 401:
        return (f"{endpoint} rejected HF_TOKEN (401): it is invalid, expired or revoked; create a "
                "token with write access at https://huggingface.co/settings/tokens and export it "
                "as HF_TOKEN.")
    if status == 403:
        return (f"{endpoint} refused (403) to write to {repo_id}: HF_TOKEN has no write access "
                f"to the namespace '{namespace}'; use a token with write access there, or change "
                "publish.repo_id.")
    if status == 404:
        return (f"{repo_id} was not found on {endpoint} (404), or HF_TOKEN cannot see it: check "
                "publish.repo_id and the token's permissions.")
    if status in (409, 412):
        return (f"{endpoint}/{repo_id} changed on the Hub while publishing ({status}): someone "
                "else committed or created it; re-run `tuneline publish`.")
    return (f"the Hub answered {status} for {endpoint}/{repo_id} ({_first_line(exc, token)}): "
            "re-run later.")


def _root_cause(exc: BaseException) -> BaseException:
    """The Hub client wraps upload failures (RuntimeError from ...): find the real one."""
    from huggingface_hub.errors import HfHubHTTPError

    seen = exc
    while True:
        if isinstance(seen, HfHubHTTPError) or _is_network(seen):
            return seen
        nxt = seen.__cause__ or seen.__context__
        if nxt is None or nxt is seen:
            return exc
        seen = nxt


def _is_network(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"TransportError", "TimeoutException", "NetworkError"}) or \
        isinstance(exc, (ConnectionError, TimeoutError))


def _first_line(exc: BaseException, token: str | None = None) -> str:
    """Redacted before it is cut: a token cut in two would no longer match, and leak."""
    return redact((str(exc).strip().splitlines() or [type(exc).__name__])[0], token)[:300]
