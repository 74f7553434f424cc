"""Repository facts: what git and DVC say about this checkout, and content hashes of files.

Used by the publish gate (clean tree, outputs up to date and pushed), the model card (commit,
remote, DVC hashes of the dataset) and the export stage (content hashes of the dataset).

The git commit is not part of any artifact. A DVC output must be a function of its stage's
declared deps and params: a GGUF that embedded the commit would change bytes on every commit
(and read "-dirty" inside `dvc repro`, which modifies dvc.lock before it commits), so a teammate's
`dvc repro` at the same inputs would produce a different file, the DVC cache and remote would hold
a new copy of an unchanged model, and publish would see new content where there is none. The
commit is a fact about a release, so it is recorded where releases are recorded: the model card,
the manifest and the publish record, all made after the commit exists. Artifacts carry content
provenance only (dataset and base-model hashes).
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks (GGUF and safetensors files are gigabytes).

    Remembered per (path, size, mtime) within a process: the publish gate and the release both
    need the hashes of the same large files.
    """
    stat = Path(path).stat()
    return _sha256(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_hash(files: Iterable[Path]) -> dict[str, Any]:
    """One hash over the files that exist (by name and content), and each file's sha256."""
    found = {p.name: sha256_file(p) for p in sorted(files) if p.is_file()}
    if not found:
        return {"hash": "unknown", "files": {}}
    joined = "\n".join(f"{name} {digest}" for name, digest in sorted(found.items()))
    return {"hash": hashlib.sha256(joined.encode()).hexdigest()[:32], "files": found}


# --- git -------------------------------------------------------------------------------------


def git(*args: str) -> str | None:
    """stdout of a git command, or None outside a repository or without git."""
    try:
        proc = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def commit() -> str | None:
    return git("rev-parse", "HEAD")


def toplevel() -> Path | None:
    top = git("rev-parse", "--show-toplevel")
    return Path(top) if top else None


def changes() -> list[tuple[str, str]]:
    """(status, path) per uncommitted change, paths from the top of the work tree."""
    proc = subprocess.run(["git", "status", "--porcelain", "-z", "--untracked-files=all"],
                          capture_output=True, text=True, check=False)
    entries = proc.stdout.split("\0")
    found, i = [], 0
    while i < len(entries):
        entry = entries[i]
        if len(entry) > 3:
            found.append((entry[:2].strip(), entry[3:]))
            i += 1 if entry[0] in "RC" else 0  # a rename is followed by its old path
        i += 1
    return found


def committed(path: str) -> bool:
    """Git tracks `path` (a file, or a folder with tracked files and no ignored ones)."""
    tracked = git("ls-files", "--", path)
    return bool(tracked) and not git("ls-files", "--others", "--ignored", "--exclude-standard",
                                     "--", path)


def ignored(path: str) -> bool:
    """Git ignores `path`, or a file in it (True outside a git repository: nothing vouches)."""
    if git("rev-parse", "--show-toplevel") is None:
        return True
    hit = subprocess.run(["git", "check-ignore", "-q", "--", path], capture_output=True,
                         check=False).returncode == 0
    return hit or bool(git("ls-files", "--others", "--ignored", "--exclude-standard", "--",
                           path))


def remote_url(name: str = "origin") -> str | None:
    """The remote's URL with any credentials removed (safe for a public card)."""
    return clean_remote(git("remote", "get-url", name))


def clean_remote(url: str | None) -> str | None:
    """A git remote URL without credentials, safe to print in a public card.

    Everything between `://` and the last `@` goes: a password may hold `/` (git accepts it
    unencoded), so the first `/` does not end the credentials. scp-style `git@host:path` URLs
    name a user, never a secret, and stay as they are.
    """
    if not url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{rest.rsplit('@', 1)[1]}" if "@" in rest else url


def relative(path: Path, top: Path) -> str | None:
    """`path` relative to `top` (lexically, links not followed), or None when outside it."""
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(Path(os.path.abspath(top))).as_posix()
    except ValueError:
        return None


# --- DVC -------------------------------------------------------------------------------------


def dvc_status(skip: str = "publish", cloud: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`dvc status` without stage `skip`, `dvc status --cloud` when local is clean and `cloud`).

    Leaving publish out matters: inside `dvc repro` its own outputs are locked while it runs.
    """
    from dvc.repo import Repo

    with Repo() as repo:
        stages = [s.addressing for s in repo.index.stages if s.name != skip]
        local = repo.status(targets=stages) if stages else {}
        if local or not cloud:
            return local, {}
        return {}, repo.status(targets=stages, cloud=True) if stages else {}


def dvc_outputs(skip: str = "publish") -> list[str]:
    """Every output DVC tracks here (stages but `skip`, and .dvc files), relative to the top
    of the work tree; empty where DVC cannot read the project (up_to_date says why)."""
    from dvc.repo import Repo

    try:
        with Repo() as repo:
            top = toplevel() or Path(repo.root_dir)
            outs = [o for s in repo.index.stages if s.name != skip for o in s.outs]
            return [rel for o in outs if (rel := relative(Path(o.fs_path), top)) is not None]
    except Exception:  # noqa: BLE001 - DVC raises many kinds; all mean "nothing tracked"
        return []


def dvc_hashes(dvc_lock: Path, target: Path) -> list[dict[str, str]]:
    """Hashes DVC recorded in dvc.lock for `target` (a folder output, or the files under it)."""
    lock = _yaml(dvc_lock)
    want = target.as_posix().rstrip("/")
    found = []
    for stage in (lock.get("stages") or {}).values():
        for out in (stage or {}).get("outs") or []:
            path = str(out.get("path", "")).rstrip("/")
            digest = out.get("md5") or out.get("hash") or out.get("etag")
            if digest and (path == want or path.startswith(want + "/")):
                found.append({"path": path, "md5": str(digest)})
    return sorted(found, key=lambda item: item["path"])


def _yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class GitFacts:
    commit: str | None  # None outside a git repository
    remote: str | None  # origin URL with any credentials removed (remote_url)
