"""The real project's stages under DVC's team features: `dvc exp run -S`, `dvc queue start`, and a
teammate's `git clone` + `dvc pull`.

A scaled-down copy of this repository (its dvc.yaml, .dvc/config and code unchanged; params.yaml
with a tiny base model built in code that answers every prompt with one sentence, few
questions, a few training steps) is reproduced up to `train` by "alice" and pushed to a bare
git remote and the committed default DVC remote (../../tuneline-storage, a sibling folder).
tests/test_remotes.py runs the same team flows on stand-in stages over S3 and SSH; these run the
real stage commands (scripts/tuneline), so what DVC records is what the project writes.
Measured on the shared 2-core machine: the fixture 43 s, the experiments 107 s, the pull 4 s
(three to four times that while other jobs ran).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from test_remotes import BIN, Remote, Team, make_team, snapshot
from tiny import make_tiny_llama

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SMALL = {
    "generate": {"max_tokens": 16, "followup_max_tokens": 12, "structured_followup": False},
    "train": {"num_layers": 2, "iters": 4, "warmup": 1, "steps_per_report": 2,
              "steps_per_eval": 2, "save_every": 2, "val_batches": 1, "learning_rate": 2.0e-4},
}
N_QUESTIONS = 16
ANSWER = "Use CREATE INDEX."  # distinct tokens: tests/tiny.py teaches it as a bigram chain
PULLED = ["models/base", "data/generated/answers.jsonl", "data/dataset", "models/adapters",
          "reports/train.json", "reports/validation.json"]


def copy_project(dest: Path) -> Path:
    """The repository as git would commit it, without outputs (they are DVC's) or dvc.lock."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for rel in files:
        src = REPO / rel
        if src.is_file() and not rel.startswith(("models/", "reports/", "data/dataset/")) \
                and rel not in ("dvc.lock", "data/generated/answers.jsonl"):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(src.read_bytes())
            (dest / rel).chmod(src.stat().st_mode)
    return dest


def scale_down(repo: Path, base: Path) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["base"]["model"] = str(base)
    for section, values in SMALL.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    questions = (repo / "data/questions.jsonl").read_text().splitlines()[:N_QUESTIONS]
    (repo / "data/questions.jsonl").write_text("\n".join(questions) + "\n")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Team, Path]:
    """Alice's scaled-down project, reproduced up to train, committed and pushed."""
    work = tmp_path_factory.mktemp("project")
    base = make_tiny_llama(work / "tiny-base", seed=0, answer=ANSWER)
    team = make_team(work, Remote("local", "../../tuneline-storage",
                                  root=work / "tuneline-storage"))
    team.env["HF_HUB_OFFLINE"] = "1"
    team.git(work, "init", "-q", "--bare", "-b", "main", str(team.origin))
    alice = copy_project(work / "alice")
    scale_down(alice, base)
    team.git(alice, "init", "-q", "-b", "main")
    team.git(alice, "remote", "add", "origin", str(team.origin))
    team.git(alice, "add", "-A")  # committed first, as a clone of the project is
    team.git(alice, "commit", "-q", "-m", "scaled-down project")
    team.dvc(alice, "repro", "-q", "train")
    team.git(alice, "add", "-A")
    team.git(alice, "commit", "-q", "-m", "reproduced up to train")
    team.dvc(alice, "push", "-q")
    team.git(alice, "push", "-q", "origin", "main")
    return team, alice


def test_teammate_clone_and_pull_gets_the_pushers_bytes(project):
    team, alice = project
    bob = team.base / "bob"
    team.git(team.base, "clone", "-q", str(team.origin), "bob")
    assert not (bob / "models/adapters").exists() and not (bob / "data/dataset").exists()
    team.dvc(bob, "pull", "-q", "--with-deps", "train")  # what alice reproduced and pushed
    mine, theirs = snapshot(bob, PULLED), snapshot(alice, PULLED)
    assert mine == theirs
    assert {"data/dataset/train.jsonl", "models/adapters/adapters.safetensors",
            "models/base/model.safetensors"} <= mine.keys()
    status = team.dvc(bob, "status", "train").stdout
    assert "Data and pipelines are up to date" in status, status
    assert team.git(bob, "status", "--porcelain") == ""


def exp_rows(team: Team, repo: Path) -> dict[str, dict]:
    """Experiment name -> {"params": train params, "metrics": reports/train.json} of
    `dvc exp show --json` (every experiment of the workspace's commit)."""
    shown = json.loads(team.dvc(repo, "exp", "show", "--json", "-A").stdout)
    out = {}
    for commit in shown:
        for exp in [commit, *(e for group in commit.get("experiments") or []
                              for e in group.get("revs") or [])]:
            data = exp.get("data") or {}
            if exp.get("error") or not data:
                continue
            params = data.get("params", {}).get("params.yaml", {}).get("data", {})
            metrics = data.get("metrics", {}).get("reports/train.json", {}).get("data", {})
            out[exp.get("name") or data.get("rev")] = {"train": params.get("train", {}),
                                                        "metrics": metrics}
    return out


def start_queue(team: Team, repo: Path) -> None:
    """`dvc queue start` leaves a worker behind that holds the pipes it was given: output
    to a file, or waiting for the command waits for the whole queue."""
    log = repo.parent / "queue-start.log"
    with log.open("w") as out:
        code = subprocess.run([str(BIN / "dvc"), "queue", "start"], cwd=repo, env=team.env,
                              stdout=out, stderr=subprocess.STDOUT, timeout=120,
                              check=False).returncode
    assert code == 0, log.read_text()


def wait_for_queue(team: Team, repo: Path, deadline_s: float = 600) -> str:
    started = time.monotonic()
    while time.monotonic() - started < deadline_s:
        status = team.dvc(repo, "queue", "status").stdout
        if not any(word in status for word in ("Queued", "Running")):
            return status
        time.sleep(3)
    raise AssertionError(f"queued experiments still running after {deadline_s} s:\n{status}")


def test_exp_run_set_param_and_queue_record_distinct_metrics(project):
    team, alice = project
    baseline = json.loads((alice / "reports/train.json").read_text())
    team.dvc(alice, "exp", "run", "-q", "-n", "lr-high", "-S", "train.learning_rate=1.0e-2",
             "train")
    for name, settings in (("rank-4", ["train.rank=4"]),
                           ("lr-mid", ["train.learning_rate=3.0e-3"])):
        team.dvc(alice, "exp", "run", "--queue", "-n", name,
                 *(a for s in settings for a in ("-S", s)), "train")
    start_queue(team, alice)
    status = wait_for_queue(team, alice)
    assert "Failed" not in status, status + team.dvc(alice, "queue", "logs", "rank-4",
                                                     check=False).stdout
    rows = exp_rows(team, alice)
    assert {"lr-high", "rank-4", "lr-mid"} <= rows.keys(), sorted(rows)
    assert rows["lr-high"]["train"]["learning_rate"] == 1.0e-2
    assert rows["rank-4"]["train"]["rank"] == 4
    assert rows["lr-mid"]["train"]["learning_rate"] == 3.0e-3
    losses = [baseline["val_loss"]] + [rows[n]["metrics"]["val_loss"]
                                       for n in ("lr-high", "rank-4", "lr-mid")]
    assert all(isinstance(v, float) for v in losses), rows
    assert len(set(losses)) == 4, losses  # each knob trained a different adapter
    assert rows["lr-high"]["metrics"]["iters"] == 4
    # a workspace run leaves its results in the workspace; queued ones ran in copies
    # (`dvc exp show` leaves out metrics whose value is null, e.g. stopped_early_at)
    written = json.loads((alice / "reports/train.json").read_text())
    assert {k: v for k, v in written.items() if v is not None} == rows["lr-high"]["metrics"]
