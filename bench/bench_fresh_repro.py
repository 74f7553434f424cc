"""Fresh repro: `python bench/bench_fresh_repro.py [--work /tmp/fresh] [--rev HEAD]`.

Clones this repository at REV into a new folder, runs `./scripts/setup.sh` there (timed; the
portable llama.cpp wheel and pip's cache are reused as on any second setup), then every stage of
dvc.yaml in order with `dvc repro --single-item STAGE` (the same work `./scripts/repro` does,
stage by stage), then `./scripts/repro` once more (must be a no-op). Per stage: wall seconds and
CPU seconds (user + system of the stage's processes: less sensitive than wall time to other jobs
on a shared machine). Prints a markdown table for bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return wall, cpu, out.stdout + out.stderr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=None, help="folder for the clone (new)")
    ap.add_argument("--rev", default="HEAD")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="tuneline-fresh-"))
    repo = work / "tuneline"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    subprocess.run(["git", "checkout", "-q", args.rev], cwd=repo, check=True)
    # A new user's shell: no virtualenv on PATH, none of the project's variables.
    env = {k: v for k, v in os.environ.items()
           if k in ("HOME", "LANG", "TERM", "TMPDIR") or k.startswith("PIP_")}
    env["PATH"] = ":".join(p for p in os.environ["PATH"].split(":")
                           if p and not (Path(p).parent / "pyvenv.cfg").exists())
    rows = [("setup (`./scripts/setup.sh`)", *timed(["./scripts/setup.sh"], repo, env)[:2])]
    load = [os.getloadavg()[0]]
    dvc_env = {**env, "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}
    for stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]:
        wall, cpu, _ = timed([".venv/bin/dvc", "repro", "--single-item", stage], repo, dvc_env)
        rows.append((stage, wall, cpu))
        load.append(os.getloadavg()[0])
        print(f"{stage}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    stages = rows[1:]
    rows.append(("**pipeline total (after setup)**", sum(r[1] for r in stages),
                 sum(r[2] for r in stages)))
    wall, cpu, said = timed(["./scripts/repro"], repo, env)
    assert "Running stage" not in said, said
    rows.append(("second `./scripts/repro` (no-op)", wall, cpu))
    print(f"\nclone: {repo}; load average (1 min) during the run: "
          f"{min(load):.1f}-{max(load):.1f}\n")
    print("| step | wall s | CPU s |\n|---|---|---|")
    for name, wall, cpu in rows:
        print(f"| {name} | {wall:.1f} | {cpu:.1f} |")


if __name__ == "__main__":
    main()
