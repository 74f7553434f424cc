"""The README's first command with a Hub id: `./scripts/repro` from a plain shell (no project
variables, not offline) in a copy of the repository, `base.model` set to a tiny model that
tests/hub_standin.py serves, pinned to an older commit; every stage runs, scaled down. The copy
borrows this test's virtualenv (setup.sh finds it up to date), so no setup runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hub_standin import HubStandin
from test_e2e import copy_repo, user_env
from test_export import ANSWER
from tiny import make_tiny_llama

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "tiny-org/tiny-chat"
SMALL = {
    "generate": {"max_tokens": 24, "followup_max_tokens": 16, "structured_followup": False},
    "train": {"iters": 2, "warmup": 1, "steps_per_report": 1, "steps_per_eval": 2,
              "save_every": 2, "val_batches": 1, "learning_rate": 1.0e-6, "num_layers": 2},
    "evaluate": {"n_samples": 1, "max_tokens": 16},
    "export": {"quantizations": ["q8_0"], "modelfile_quantization": "q8_0", "license": "mit",
               "max_tokens": 24},
}


def venv_is_set_up_for(repo: Path) -> bool:
    """setup.sh's own test: the venv's stamp is this pyproject's and setup.sh's checksum."""
    stamp = Path(sys.prefix) / ".setup-stamp"
    text = (repo / "pyproject.toml").read_bytes() + (repo / "scripts/setup.sh").read_bytes()
    return stamp.exists() and any(
        stamp.read_text().strip() == subprocess.run(
            ["cksum"], input=text + mode, capture_output=True, check=True).stdout.split()[0].decode()
        for mode in (b"dev\n", b"repro\n"))


def configure(repo: Path, revision: str) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in SMALL.items():
        params[section].update(values)
    params["base"].update(model=REPO_ID, revision=revision)
    params["evaluate"]["prompts"] = params["evaluate"]["prompts"][:1]
    params["export"]["prompts"] = params["export"]["prompts"][:1]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    questions = (repo / "data/questions.jsonl").read_text().splitlines()
    (repo / "data/questions.jsonl").write_text("\n".join(questions[:4]) + "\n")


def test_repro_with_a_pinned_hub_id_runs_every_stage_on_that_commit(tmp_path):
    with HubStandin() as hub:
        pinned_dir = make_tiny_llama(tmp_path / "v1", answer=ANSWER)
        hub.add_model_dir(REPO_ID, pinned_dir)
        pinned = hub.repos[REPO_ID].head.oid
        newer = make_tiny_llama(tmp_path / "v2", seed=5, answer=ANSWER)
        hub.push(REPO_ID, {"model.safetensors": (newer / "model.safetensors").read_bytes()})
        repo = copy_repo(tmp_path / "tuneline")
        if not venv_is_set_up_for(repo):
            pytest.fail(f"{sys.prefix} was not set up from this pyproject.toml: run "
                        "./scripts/setup.sh --dev first (the copy borrows that venv)")
        (repo / ".venv").symlink_to(sys.prefix)
        configure(repo, pinned)
        for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                    ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "i"]):
            subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
        env = {**user_env(), "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1",
               "HF_HOME": str(tmp_path / "hf-home")}
        result = subprocess.run(["./scripts/repro"], cwd=repo, env=env, capture_output=True,
                                text=True, timeout=840, check=False)
    said = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, said
    provenance = json.loads((repo / "models/base/tuneline.json").read_text())
    assert provenance["kind"] == "hub" and provenance["commit"] == pinned
    assert (repo / "models/base/model.safetensors").read_bytes() == (
        pinned_dir / "model.safetensors").read_bytes()
    for path in ("models/adapters/adapters.safetensors", "reports/eval.json",
                 "models/gguf/model-f16.gguf", "reports/gguf.json", "reports/publish.json"):
        assert (repo / path).exists(), path
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["base_model"]["params"]["params.yaml"]["base.revision"] == pinned
