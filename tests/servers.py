"""Real storage servers on 127.0.0.1 for remote tests and the remote benchmark.

    with s3_server(tmp) as s3: ...    # moto_server, one bucket already created
    with ssh_server(tmp) as ssh: ...  # OpenSSH sshd on a free high port, key login only

Each yields a `Server` whose `remote_config` is what `dvc remote add` + `dvc remote modify`
need, with secrets kept apart in `local_config` (they belong in .dvc/config.local) and `env`.
The pytest fixtures `s3` and `ssh` at the bottom (import `s3_fixture`, `ssh_fixture` into a
test module) wrap the context managers, one server per test module.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SSHD = Path("/usr/sbin/sshd")
SFTP_SERVER = Path("/usr/lib/openssh/sftp-server")
BUCKET = "tuneline-remote"
# moto accepts any key pair; these only exist so botocore finds *some* credentials.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class Server:
    kind: str                       # "s3" | "ssh"
    url: str                        # remote url for `dvc remote add`
    remote_config: dict[str, str]   # non-secret options (committed .dvc/config)
    local_config: dict[str, str] = field(default_factory=dict)  # secrets: .dvc/config.local
    env: dict[str, str] = field(default_factory=dict)           # secrets: environment
    port: int = 0
    process: subprocess.Popen | None = None
    root: Path | None = None        # where the server keeps objects on disk (ssh only)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, what: str, log: Path,
                  timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{what} exited with {proc.returncode}: {tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def start(cmd: list[str], log: Path, **kwargs) -> subprocess.Popen:
    # Output goes to a file: an unread pipe fills up (64 KiB) and freezes a chatty server.
    with log.open("ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, **kwargs)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def s3_server(workdir: Path, bucket: str = BUCKET) -> Iterator[Server]:
    """moto's S3 server with `bucket` created (DVC never creates buckets)."""
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "moto_server.log"
    proc = start([*cmd, "-H", "127.0.0.1", "-p", str(port)], log, env={**os.environ, **S3_ENV})
    try:
        wait_for_port(port, proc, "moto_server", log)
        endpoint = f"http://127.0.0.1:{port}"
        server = Server(
            kind="s3", url=f"s3://{bucket}", port=port, process=proc,
            remote_config={"endpointurl": endpoint}, env=dict(S3_ENV),
        )
        s3_client(server).create_bucket(Bucket=bucket)
        yield server
    finally:
        stop(proc)


def _boto_keys() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_ENV["AWS_DEFAULT_REGION"],
    }


def s3_client(server: Server):
    import boto3

    return boto3.client("s3", endpoint_url=server.remote_config["endpointurl"], **_boto_keys())


def s3_keys(server: Server, prefix: str = "", bucket: str = BUCKET) -> list[str]:
    pages = s3_client(server).get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                        Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def s3_get(server: Server, key: str, bucket: str = BUCKET) -> bytes:
    return s3_client(server).get_object(Bucket=bucket, Key=key)["Body"].read()


def s3_put(server: Server, key: str, data: bytes, bucket: str = BUCKET) -> None:
    s3_client(server).put_object(Bucket=bucket, Key=key, Body=data)


def s3_delete(server: Server, key: str, bucket: str = BUCKET) -> None:
    s3_client(server).delete_object(Bucket=bucket, Key=key)


def sshd_available() -> str | None:
    """None when sshd can run here, else what to install."""
    if not SSHD.exists() or not SFTP_SERVER.exists():
        return "OpenSSH server missing: run scripts/setup.sh (installs openssh-server)"
    return None


@contextmanager
def ssh_server(workdir: Path) -> Iterator[Server]:
    """OpenSSH sshd on a free high port of 127.0.0.1 for the current user, key login only."""
    missing = sshd_available()
    if missing:
        raise RuntimeError(missing)
    workdir.mkdir(parents=True, exist_ok=True)
    host_key, user_key = workdir / "host_ed25519", workdir / "user_ed25519"
    for key in (host_key, user_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    shutil.copy(f"{user_key}.pub", workdir / "authorized_keys")
    port = free_port()
    config = workdir / "sshd_config"
    config.write_text(_sshd_config(workdir, host_key, port))
    _privsep_dir()
    log = workdir / "sshd.log"
    proc = start([str(SSHD), "-D", "-e", "-f", str(config)], log)
    root = workdir / "store"
    root.mkdir()
    user = _user()
    try:
        wait_for_port(port, proc, "sshd", log)
        yield Server(
            kind="ssh", url=f"ssh://{user}@127.0.0.1:{port}{root}", port=port, process=proc,
            remote_config={}, local_config={"keyfile": str(user_key)}, root=root,
        )
    finally:
        stop(proc)


def _sshd_config(workdir: Path, host_key: Path, port: int) -> str:
    # A private config: nothing from /etc/ssh, no PAM, public keys from our own file only.
    return "\n".join([
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        f"HostKey {host_key}",
        f"PidFile {workdir / 'sshd.pid'}",
        f"AuthorizedKeysFile {workdir / 'authorized_keys'}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "UsePAM no",
        "StrictModes no",  # temp dirs are world-traversable; the test owns them anyway
        f"Subsystem sftp {SFTP_SERVER}",
        "MaxStartups 100",
        "MaxSessions 100",  # DVC opens many SFTP channels over one connection
        "LogLevel ERROR",
        "",
    ])


def _privsep_dir() -> None:
    # sshd refuses to start without it; a package install normally creates it at boot.
    run_sshd = Path("/run/sshd")
    if not run_sshd.exists() and os.geteuid() == 0:
        run_sshd.mkdir(mode=0o755, parents=True)


def _user() -> str:
    import getpass

    return getpass.getuser()


@pytest.fixture(scope="module", name="s3")
def s3_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(scope="module", name="ssh")
def ssh_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with ssh_server(tmp_path_factory.mktemp("ssh")) as server:
        yield server
