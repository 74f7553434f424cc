"""Benchmark DVC push/pull to each remote: `python bench/bench_remotes.py [--mb 300] [--keep]`.

Builds an artifact set shaped like a real one (two GGUF files, an adapter, three dataset splits;
random bytes, so nothing compresses), tracks it with DVC in a temp repo and times, per remote
(local folder, S3 on moto_server, SSH on sshd; servers on 127.0.0.1 from tests/servers.py):
  push  `dvc push` of everything into an empty remote
  pull  `dvc pull` into an empty cache and workspace (a teammate's fresh clone), verify = true
        (the committed setting), and once with verify = false from the local folder
against the floor for the same bytes in the same run: a plain copy (`cp -r`) on this disk and the
raw transfer with the same protocol (boto3 upload/download, scp). Markdown rows go to stdout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import servers

BIN = Path(sys.executable).parent
# Share of the artifact set per file, like a fine-tuned SmolLM2-135M: two GGUFs dominate.
LAYOUT = {
    "models/gguf/model-q8_0.gguf": 0.48,
    "models/gguf/model-q4_k_m.gguf": 0.34,
    "models/adapters/adapters.safetensors": 0.14,
    "data/dataset/train.jsonl": 0.03,
    "data/dataset/valid.jsonl": 0.005,
    "data/dataset/test.jsonl": 0.005,
}
TRACKED = ["data/dataset", "models/adapters", "models/gguf"]


def make_artifacts(repo: Path, total_mb: int) -> int:
    size = 0
    for rel, share in LAYOUT.items():
        path = repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        n = int(total_mb * share * 2**20)
        with path.open("wb") as fh:
            for start in range(0, n, 2**24):
                fh.write(os.urandom(min(2**24, n - start)))
        size += n
    return size


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def set_remote(repo: Path, name: str, url: str, options: dict[str, str],
               local: dict[str, str], verify: bool = True) -> None:
    lines = [f"['remote \"{name}\"']", f"    url = {url}", f"    verify = {str(verify).lower()}"]
    lines += [f"    {k} = {v}" for k, v in options.items()]
    with (repo / ".dvc/config").open("a") as fh:
        fh.write("\n".join(lines) + "\n")
    if local:
        with (repo / ".dvc/config.local").open("a") as fh:
            fh.write("\n".join([f"['remote \"{name}\"']"] +
                               [f"    {k} = {v}" for k, v in local.items()]) + "\n")


def forget_everything(repo: Path) -> None:
    """A teammate's fresh clone: no cache, no index, no outputs."""
    for rel in [".dvc/cache", ".dvc/tmp", *TRACKED]:
        shutil.rmtree(repo / rel, ignore_errors=True)


def dvc_round_trip(repo: Path, name: str, env: dict[str, str]) -> tuple[float, float]:
    push = run([str(BIN / "dvc"), "push", "-q", "-r", name], repo, env)
    before = {p: (repo / p).stat().st_size for p in LAYOUT}
    digests = {p: _md5(repo / p) for p in LAYOUT}
    forget_everything(repo)
    pull = run([str(BIN / "dvc"), "pull", "-q", "-r", name], repo, env)
    assert {p: (repo / p).stat().st_size for p in LAYOUT} == before
    assert {p: _md5(repo / p) for p in LAYOUT} == digests, "pulled bytes differ"
    return push, pull


def _md5(path: Path) -> str:
    import hashlib

    h = hashlib.md5()
    with path.open("rb") as fh:
        while chunk := fh.read(2**22):
            h.update(chunk)
    return h.hexdigest()


def copy_floor(repo: Path, work: Path) -> tuple[float, float]:
    dest, back = work / "copy-out", work / "copy-back"
    up = timed(lambda: [shutil.copytree(repo / t, dest / t) for t in TRACKED])
    down = timed(lambda: [shutil.copytree(dest / t, back / t) for t in TRACKED])
    shutil.rmtree(dest)
    shutil.rmtree(back)
    return up, down


def s3_floor(server: servers.Server, repo: Path, work: Path) -> tuple[float, float]:
    client = servers.s3_client(server)
    up = timed(lambda: [client.upload_file(str(repo / p), servers.BUCKET, f"raw/{p}")
                        for p in LAYOUT])
    (work / "s3-back").mkdir()
    down = timed(lambda: [client.download_file(servers.BUCKET, f"raw/{p}",
                                               str(work / "s3-back" / Path(p).name))
                          for p in LAYOUT])
    shutil.rmtree(work / "s3-back")
    return up, down


def scp_floor(server: servers.Server, repo: Path, work: Path) -> tuple[float, float]:
    target = server.root / "raw"
    target.mkdir()
    base = ["scp", "-q", "-P", str(server.port), "-i", server.local_config["keyfile"],
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    host = f"{servers._user()}@127.0.0.1"
    up = timed(lambda: subprocess.run(
        [*base, *[str(repo / p) for p in LAYOUT], f"{host}:{target}/"], check=True))
    (work / "scp-back").mkdir()
    down = timed(lambda: subprocess.run(
        [*base, f"{host}:{target}/*", str(work / "scp-back")], check=True))
    shutil.rmtree(work / "scp-back")
    shutil.rmtree(target)
    return up, down


def row(name: str, size: int, push: float, pull: float, raw: tuple[float, float],
        raw_name: str, copy: tuple[float, float]) -> str:
    mb = size / 2**20
    return (f"| {name} | {push:.1f} | {mb / push:.0f} | {pull:.1f} | {mb / pull:.0f} | "
            f"{raw_name} {raw[0]:.1f} / {raw[1]:.1f} | {push / raw[0]:.1f}x / "
            f"{pull / raw[1]:.1f}x | {push / copy[0]:.1f}x / {pull / copy[1]:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=300, help="size of the artifact set in MiB")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-remotes-"))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", **servers.S3_ENV,
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    try:
        print(bench(work, args.mb, env))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def bench(work: Path, total_mb: int, env: dict[str, str]) -> str:
    repo = work / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    run([str(BIN / "dvc"), "init", "-q"], repo, env)
    size = make_artifacts(repo, total_mb)
    add = run([str(BIN / "dvc"), "add", "-q", *TRACKED], repo, env)
    header = ("| remote | push s | push MiB/s | pull s | pull MiB/s | same protocol, raw: s up / "
              "down | DVC / raw (push / pull) | DVC / plain copy (push / pull) |")
    lines = [f"artifact set: {size / 2**20:.0f} MiB in {len(LAYOUT)} files; `dvc add` {add:.1f} s",
             "", header, "|---|---|---|---|---|---|---|---|"]
    copy = copy_floor(repo, work)
    set_remote(repo, "local", str(work / "storage"), {}, {})
    push, pull = dvc_round_trip(repo, "local", env)
    lines.append(row("local folder", size, push, pull, copy, "cp -r", copy))
    set_remote(repo, "unverified", str(work / "storage"), {}, {}, verify=False)
    forget_everything(repo)
    unverified = run([str(BIN / "dvc"), "pull", "-q", "-r", "unverified"], repo, env)
    lines.append(f"| local folder, verify = false | | | {unverified:.1f} | "
                 f"{size / 2**20 / unverified:.0f} | | | - / {unverified / copy[1]:.1f}x |")
    with servers.s3_server(work / "s3") as s3:
        set_remote(repo, "s3", f"{s3.url}/bench", s3.remote_config, {})
        push, pull = dvc_round_trip(repo, "s3", env)
        lines.append(row("S3 (moto_server)", size, push, pull, s3_floor(s3, repo, work),
                         "boto3", copy))
    with servers.ssh_server(work / "ssh") as ssh:
        set_remote(repo, "ssh", f"{ssh.url}/bench", {}, ssh.local_config)
        push, pull = dvc_round_trip(repo, "ssh", env)
        lines.append(row("SSH (sshd, sftp)", size, push, pull, scp_floor(ssh, repo, work),
                         "scp", copy))
    lines.append(f"| plain copy (`cp -r`) | {copy[0]:.1f} | {size / 2**20 / copy[0]:.0f} | "
                 f"{copy[1]:.1f} | {size / 2**20 / copy[1]:.0f} | | | 1.0x / 1.0x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
