"""The DVC remote this repository pushes to and pulls from, and whether it answers.

    tuneline doctor        # shows `remote_status(Path("."))` as one line plus its warnings

Reads the same merged config DVC reads (.dvc/config, .dvc/config.local, user and system files),
asks the remote a cheap question (does the path / bucket exist) with a time limit, and turns the
usual failures (nothing listening, no credentials, login refused, missing bucket) into one sentence
that says what to do. Secrets are never printed: passwords in URLs are replaced by `***`.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

CHECK_TIMEOUT_S = 10.0
# Remote options that are secrets: they belong in .dvc/config.local or the environment.
SECRET_KEYS = frozenset({
    "password", "passphrase", "access_key_id", "secret_access_key", "session_token",
    "account_key", "sas_token", "connection_string", "client_secret", "token",
    "gdrive_client_secret", "gdrive_user_credentials_file", "credentialpath",
})
DEFAULT_PORTS = {"ssh": 22, "http": 80, "https": 443}


def remote_status(
    repo_root: Path, name: str | None = None, timeout: float = CHECK_TIMEOUT_S
) -> dict[str, Any]:
    """{name, url (redacted), kind, reachable, detail, warnings} of the default or named remote."""
    try:
        config = _load_config(repo_root)
    except Exception as exc:  # a broken config is itself the finding
        return _status(name, None, None, False, f"cannot read the DVC config: {exc}")
    name = name or config["core"].get("remote")
    if not name:
        return _status(None, None, None, False,
                       "no default remote: `dvc remote add -d storage ../tuneline-storage` "
                       "(or see docs/remotes.md for S3 and SSH)")
    conf = config["remote"].get(name)
    if conf is None:
        return _status(name, None, None, False,
                       f"core.remote is '{name}' but there is no [remote \"{name}\"] section; "
                       f"`dvc remote list` shows the ones defined")
    url = conf["url"]
    kind = remote_kind(url)
    reachable, detail = _probe(config, name, kind, conf, timeout)
    status = _status(name, redact_url(url), kind, reachable, _scrub(detail, conf))
    status["warnings"] = committed_secrets(repo_root) + _verify_warning(name, conf)
    return status


def format_status(status: dict[str, Any]) -> str:
    """One line for `tuneline doctor`."""
    state = "reachable" if status["reachable"] else "NOT reachable"
    where = f"'{status['name']}' ({status['kind']}) {status['url']}" if status["url"] else "-"
    return f"remote {where}: {state}; {status['detail']}"


def _status(name, url, kind, reachable: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "url": url, "kind": kind, "reachable": reachable, "detail": detail,
            "warnings": []}


def _load_config(repo_root: Path):
    from dvc.config import Config

    return Config(dvc_dir=Path(repo_root) / ".dvc")


def remote_kind(url: str) -> str:
    scheme = urlsplit(url).scheme
    # Windows drive letters parse as one-letter schemes.
    return "local" if len(scheme) <= 1 or scheme == "file" else scheme


def redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _scrub(text: str, conf: dict[str, Any]) -> str:
    # Exception texts may echo a URL or an option value; never let a secret through.
    for key in SECRET_KEYS:
        value = conf.get(key)
        if isinstance(value, str) and len(value) >= 4:
            text = text.replace(value, "***")
    password = urlsplit(conf.get("url", "")).password
    return text.replace(password, "***") if password else text


def committed_secrets(repo_root: Path) -> list[str]:
    """Warnings for secrets written into the committed .dvc/config (any remote)."""
    try:
        repo_level = _load_config(repo_root).load_one("repo")
    except Exception:
        return []
    found = []
    for name, conf in repo_level.get("remote", {}).items():
        keys = sorted(SECRET_KEYS & set(conf))
        if urlsplit(str(conf.get("url", ""))).password is not None:
            keys.append("password in url")
        if keys:
            found.append(
                f"remote '{name}': {', '.join(keys)} in the committed .dvc/config; move it to "
                f".dvc/config.local (`dvc remote modify --local {name} KEY VALUE`) or the "
                "environment, and rotate it: git history keeps the old value"
            )
    return found


def _verify_warning(name: str, conf: dict[str, Any]) -> list[str]:
    if conf.get("verify"):
        return []
    return [(f"remote '{name}': verify is off, so `dvc pull` trusts downloaded bytes and a "
             f"corrupted object reaches the workspace unnoticed; `dvc remote modify {name} verify "
             "true` (committed) makes pull re-hash and refuse it")]


def _probe(config, name: str, kind: str, conf: dict[str, Any], timeout: float) -> tuple[bool, str]:
    if kind == "local":
        return _probe_local(Path(conf["url"]))
    endpoint = _endpoint(kind, conf)
    if endpoint is not None:
        refused = _tcp_refusal(*endpoint, kind, timeout=min(timeout, 5.0))
        if refused:
            return False, refused
    return _with_timeout(lambda: _probe_fs(config, name, kind), timeout, kind, name, conf)


def _probe_local(path: Path) -> tuple[bool, str]:
    if path.is_dir():
        if not os.access(path, os.W_OK):
            return False, f"{path} exists but is not writable by this user: `dvc push` will fail"
        return True, f"directory {path} exists"
    if path.exists():
        return False, f"{path} is a file, not a directory: point the remote url at a folder"
    ancestor = next(p for p in path.parents if p.exists())
    if os.access(ancestor, os.W_OK):
        return True, f"{path} does not exist yet; the first `dvc push` creates it"
    return False, f"{path} does not exist and {ancestor} is not writable: create it or change url"


def _endpoint(kind: str, conf: dict[str, Any]) -> tuple[str, int] | None:
    if kind == "s3" and conf.get("endpointurl"):
        parts = urlsplit(conf["endpointurl"])
        return parts.hostname or "", parts.port or DEFAULT_PORTS.get(parts.scheme, 443)
    if kind in ("ssh", "http", "https"):
        parts = urlsplit(conf["url"])
        return parts.hostname or "", parts.port or int(conf.get("port") or DEFAULT_PORTS[kind])
    return None


def _tcp_refusal(host: str, port: int, kind: str, timeout: float) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        reason = "no answer" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc))
        setting = "endpointurl" if kind == "s3" else "host and port in the url"
        return (f"nothing answers at {host}:{port} ({reason}): check {setting} and that the "
                "server runs")


def _with_timeout(
    check: Callable[[], str], timeout: float, kind: str, name: str, conf: dict[str, Any]
) -> tuple[bool, str]:
    # Remote clients retry for minutes; a doctor answers in seconds, so the check runs aside.
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["detail"] = check()
        except BaseException as exc:  # reported, not raised: this is a diagnosis
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return False, f"no answer within {timeout:.0f} s"
    if "error" in box:
        return False, explain(box["error"], kind, name, conf)
    return True, box["detail"]


def _probe_fs(config, name: str, kind: str) -> str:
    from dvc.fs import get_cloud_fs

    cls, fs_conf, path = get_cloud_fs(config, name=name)
    fs = cls(**fs_conf)
    if kind == "s3":
        bucket = path.split("/", 1)[0]
        fs.ls(bucket)  # raises on credentials, permissions and a missing bucket
    if fs.exists(path):
        return f"{path} exists"
    return f"{path} does not exist yet; the first `dvc push` creates it"


def explain(exc: BaseException, kind: str, name: str, conf: dict[str, Any]) -> str:
    """A sentence for the usual remote failures; the exception text otherwise."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    text = str(exc) or type(exc).__name__
    if "NoCredentialsError" in names or "Unable to locate credentials" in text:
        return ("no S3 credentials found: export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                f"(or AWS_PROFILE), or `dvc remote modify --local {name} access_key_id ...` and "
                "`... secret_access_key ...`")
    if "PermissionDenied" in names or (kind == "ssh" and isinstance(exc, PermissionError)):
        user = urlsplit(conf["url"]).username or conf.get("user") or "(your user)"
        return (f"ssh login as {user} refused ({text}): `dvc remote modify --local {name} "
                "keyfile ~/.ssh/id_ed25519` or add your public key to the server's authorized_keys")
    if isinstance(exc, FileNotFoundError) and kind == "s3":
        return f"bucket not found ({text}): create it first, DVC does not create buckets"
    if isinstance(exc, PermissionError):
        return f"access denied ({text}): the credentials are wrong or lack permission"
    if "EndpointConnectionError" in names:
        return f"{text}: check endpointurl"
    if "RemoteMissingDepsError" in names:
        return text.replace("\n", " ")
    return f"{type(exc).__name__}: {text}"
