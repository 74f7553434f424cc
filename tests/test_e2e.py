"""The README's first command for real, as a new user runs it: `./scripts/repro` in a fresh git
clone, from a plain shell (no virtualenv on PATH, none of the project's variables), sets up its
own .venv and runs every stage on the embedded model; a second run does nothing, `dvc status` is
clean, `dvc push` works. CPU-sized: 4 questions, a few training steps, one quantization.
Setup reuses what any second setup on this machine reuses: pip's cache and the portable
llama.cpp wheel in ~/.cache/tuneline/wheels."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]  # a loaded 2-core machine: 23 min

SMALL = {
    "generate": {"max_tokens": 48, "followup_max_tokens": 24},
    "train": {"iters": 4, "warmup": 1, "steps_per_report": 2, "steps_per_eval": 2,
              "save_every": 2, "val_batches": 1},
    "evaluate": {"n_samples": 1, "max_tokens": 24},
    "export": {"quantizations": ["q8_0"], "modelfile_quantization": "q8_0"},
}
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
        if src.is_file() and not rel.startswith(("models/", "reports/", "data/dataset/")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for stale in ("dvc.lock", "data/generated/answers.jsonl"):
        (dest / stale).unlink(missing_ok=True)
    return dest


def shrink(repo: Path) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in SMALL.items():
        params[section].update(values)
    params["evaluate"]["prompts"] = params["evaluate"]["prompts"][:1]
    params["export"]["prompts"] = params["export"]["prompts"][:1]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    questions = (repo / "data/questions.jsonl").read_text().splitlines()
    (repo / "data/questions.jsonl").write_text("\n".join(questions[:4]) + "\n")


@pytest.fixture(scope="module")
def repro(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    work = tmp_path_factory.mktemp("e2e")
    origin = copy_repo(work / "origin")
    shrink(origin)
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
    answers = [json.loads(x) for x in (repo / "data/generated/answers.jsonl").read_text().splitlines()]
    assert len(answers) == 4 and all(a["answer"].strip() for a in answers)
    train = json.loads((repo / "reports/train.json").read_text())
    assert train["iters"] == 4 and train["tokens_per_second"] > 0
    said = result.stdout + result.stderr
    assert "setup: ready" in said  # it set itself up, saying so
    assert "\x1b[" not in said  # no colour codes in captured output (train's display)
    assert "SetuptoolsDeprecationWarning" not in said and "DEPRECATION:" not in said  # quiet setup


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
