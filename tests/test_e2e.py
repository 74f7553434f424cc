"""The README's first command for real, as a new user runs it: `./scripts/repro` in a fresh git
clone of the project exactly as committed (params, questions, dvc.lock and reports unaltered),
from a plain shell (no virtualenv on PATH, none of the project's variables). It sets up its own
.venv and runs every stage on the embedded model; the gate's checks pass and the tuned model
beats the base, read from what the run wrote; `git status` stays clean (every tracked byte,
dvc.lock and metrics included, came out the same); a second run does nothing; `dvc push` works.
Setup reuses what any second setup on this machine reuses: pip's cache and the portable
llama.cpp wheel in ~/.cache/tuneline/wheels."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]  # a loaded 2-core machine: 23 min

# What a new user's shell has: machine settings (home, locale, package index, proxies), nothing
# of this project and no virtualenv.
MACHINE_VARS = ("HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_ALL", "TERM", "TMPDIR",
                "XDG_CACHE_HOME", "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY",
                "HTTPS_PROXY", "NO_PROXY", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")


def user_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in MACHINE_VARS or k.startswith("PIP_")}
    # PATH without any virtualenv's bin (a venv's bin has pyvenv.cfg one level up).
    env["PATH"] = ":".join(p for p in os.environ["PATH"].split(":")
                           if p and not (Path(p).parent / "pyvenv.cfg").exists())
    return env


def sh(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=user_env(), capture_output=True, text=True,
                          timeout=2700, check=False)


def copy_repo(dest: Path) -> Path:
    """The working tree as git would commit it (tracked and new files, not ignored ones)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def repro(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    work = tmp_path_factory.mktemp("e2e")
    origin = copy_repo(work / "origin")
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=origin, check=True)
    subprocess.run(["git", "clone", "-q", str(origin), str(work / "tuneline")], check=True)
    repo = work / "tuneline"
    return repo, sh(["./scripts/repro"], repo)


def test_repro_runs_every_stage_and_writes_every_output(repro):
    repo, result = repro
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for path in ("models/base/model.safetensors", "data/generated/answers.jsonl",
                 "data/dataset/train.jsonl", "data/dataset/valid.jsonl", "data/dataset/test.jsonl",
                 "reports/validation.json", "models/adapters/adapters.safetensors",
                 "reports/train.json", "reports/train_loss.tsv", "reports/eval.json",
                 "reports/compare.html", "models/fused/model.safetensors",
                 "models/gguf/model-f16.gguf", "models/gguf/Modelfile", "reports/gguf.json",
                 "models/gguf/adapter-f16.gguf", "models/gguf/base-f16.gguf",
                 "models/gguf/Modelfile.adapter", "reports/train_live/metrics.json",
                 "reports/publish.json"):
        assert (repo / path).exists(), path
    assert sorted(p.name for p in (repo / "models/adapters").iterdir()) == [
        "adapter_config.json", "adapters.safetensors"]
    questions = (repo / "data/questions.jsonl").read_text().splitlines()
    answers = [json.loads(x) for x in (repo / "data/generated/answers.jsonl").read_text().splitlines()]
    assert len(answers) == len(questions) and all(a["answer"].strip() for a in answers)
    timings = json.loads((repo / "reports/train.timings.json").read_text())
    assert timings["tokens_per_second"] > 0  # measured, and kept out of the tracked report
    assert "tokens_per_second" not in json.loads((repo / "reports/train.json").read_text())
    said = result.stdout + result.stderr
    assert "setup: ready" in said  # it set itself up, saying so
    assert "\x1b[" not in said  # no colour codes in captured output (train's display)
    assert "SetuptoolsDeprecationWarning" not in said and "DEPRECATION:" not in said  # quiet setup


def test_the_gate_passes_and_the_tuned_model_beats_the_base(repro):
    repo, first = repro
    assert first.returncode == 0
    evaluation = json.loads((repo / "reports/eval.json").read_text())
    assert evaluation["tuned"]["test_loss"] < evaluation["base"]["test_loss"], evaluation
    verdict = json.loads((repo / "reports/publish.json").read_text())
    judged = {c["name"]: c for c in verdict["checks"] if not c["pending"]}
    assert {"validation", "improvement", "gguf", "license", "artifacts"} <= set(judged)
    assert all(c["passed"] for c in judged.values()), judged
    pending = {c["name"] for c in verdict["checks"] if c["pending"]}
    assert pending <= {"git_clean", "dvc_pushed", "up_to_date"}, pending  # judged at upload


def test_repro_of_an_unaltered_clone_changes_no_tracked_byte(repro):
    """dvc.lock, the metrics and the plots come out byte for byte as committed: timings live in
    untracked reports/*.timings.json, and every output is deterministic."""
    repo, first = repro
    assert first.returncode == 0
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True,
                            text=True, check=True).stdout
    diff = subprocess.run(["git", "diff", "--stat"], cwd=repo, capture_output=True, text=True,
                          check=True).stdout
    assert status == "", status + diff


def test_second_repro_does_nothing_and_status_is_clean(repro):
    repo, first = repro
    assert first.returncode == 0
    again = sh(["./scripts/repro"], repo)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Running stage" not in again.stdout, again.stdout
    assert "setup:" not in again.stdout  # setup is done: nothing to install
    status = sh([".venv/bin/dvc", "status"], repo)
    assert "Data and pipelines are up to date" in status.stdout, status.stdout


def test_push_sends_every_output_to_the_default_remote(repro):
    repo, first = repro
    assert first.returncode == 0
    pushed = sh([".venv/bin/dvc", "push"], repo)
    assert pushed.returncode == 0, pushed.stderr[-2000:]
    cloud = sh([".venv/bin/dvc", "status", "--cloud"], repo)
    assert "Cache and remote 'local' are in sync" in cloud.stdout, cloud.stdout
