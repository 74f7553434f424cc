"""DVCLive through mlx-lm's training callback: a running experiment's step and losses reach
`dvc exp show` while it trains, in DVCLive's standard layout, without touching dvc.yaml."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from test_train import make_paths, params_train

from pipeline import train
from pipeline.training import metrics as train_metrics

LIVE = "reports/train_live"


def _sh(cwd: Path, *cmd: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
    return proc.stdout


def _repo(root: Path) -> Path:
    """A git + DVC repository whose dvc.yaml declares the live files as the train stage does."""
    root.mkdir(parents=True)
    dvc_yaml = {"metrics": [f"{LIVE}/metrics.json"], "plots": [f"{LIVE}/plots/metrics"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml))
    _sh(root, "git", "init", "-q", "-b", "main")
    _sh(root, "git", "config", "user.email", "t@example.com")
    _sh(root, "git", "config", "user.name", "t")
    _sh(root, sys.executable, "-m", "dvc", "init", "-q")
    _sh(root, "git", "add", "-A")
    _sh(root, "git", "commit", "-qm", "init")
    return root


def _exp_show(repo: Path) -> dict[str, Any]:
    """The workspace's metrics as `dvc exp show --json` reports them."""
    rows = json.loads(_sh(repo, sys.executable, "-m", "dvc", "exp", "show", "--json"))
    workspace = next(r for r in rows if r["rev"] == "workspace")
    return workspace["data"]["metrics"][f"{LIVE}/metrics.json"]["data"]


def test_running_training_shows_its_progress_in_dvc_exp_show(tiny_model_dir, tmp_path, monkeypatch):
    repo = _repo(tmp_path / "repo")
    paths = dataclasses.replace(make_paths(tmp_path, tiny_model_dir), live=repo / LIVE,
                                checkpoints=tmp_path / "ckpt")
    seen: list[dict[str, Any]] = []
    report = train_metrics.LiveMetrics.on_train_loss_report

    def report_then_look(self: Any, info: dict[str, Any]) -> None:
        report(self, info)
        if info["iteration"] == 4:  # mid-run, as `dvc exp show` in another terminal would see it
            seen.append(_exp_show(repo))

    monkeypatch.setattr(train_metrics.LiveMetrics, "on_train_loss_report", report_then_look)
    result = train.run(params_train(), paths, seed=0)

    assert seen and seen[0]["step"] == 4 and seen[0]["train"]["loss"] > 0
    final = _exp_show(repo)
    assert final["step"] == 12 and "loss" in final["val"]
    curve = (repo / LIVE / "plots/metrics/train/loss.tsv").read_text().splitlines()
    assert curve[0].split("\t") == ["step", "loss"] and len(curve) == 1 + 12 // 2
    ours = paths.curve.read_text().splitlines()[1:]  # the stage's own curve: the same numbers
    assert [round(float(r.split("\t")[1]), 4) for r in curve[1:]] == \
        [round(float(r.split("\t")[1]), 4) for r in ours]
    assert (repo / LIVE / "plots/metrics/val/loss.tsv").is_file()
    assert result.iters == 12
    # DVCLive wrote nothing else: dvc.yaml untouched, only the declared folder is new.
    status = _sh(repo, "git", "status", "--porcelain", "--untracked-files=all").splitlines()
    assert all(line.startswith(f"?? {LIVE}/") for line in status), status


def test_resumed_run_replays_earlier_reports_into_the_live_files(tmp_path):
    class Inner:
        def __init__(self) -> None:
            self.rows: list[dict[str, Any]] = []

        def on_train_loss_report(self, info: dict[str, Any]) -> None: ...

    earlier = [{"kind": "train", "step": 2, "loss": 3.0, "learning_rate": 0.1,
                "tokens_per_second": 10.0, "trained_tokens": 40},
               {"kind": "val", "step": 2, "loss": 3.5}]
    inner = Inner()
    inner.rows = earlier
    live = train_metrics.wrap(inner, tmp_path / "live", offset=2)
    live.on_train_loss_report({"iteration": 2, "train_loss": 2.0, "learning_rate": 0.1,
                               "tokens_per_second": 11.0, "trained_tokens": 40})
    live.end()
    rows = (tmp_path / "live/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]
    assert [tuple(r.split("\t")[:2]) for r in rows] == [("2", "3.0"), ("4", "2.0")]
    assert json.loads((tmp_path / "live/metrics.json").read_text())["val"]["loss"] == 3.5


def test_live_files_are_written_in_a_git_repository_with_no_commit_yet(tmp_path, monkeypatch):
    # A new project's first `dvc repro` before any commit: DVCLive used to raise SCMError.
    _sh(tmp_path, "git", "init", "-q")
    _sh(tmp_path, sys.executable, "-m", "dvc", "init", "-q")
    monkeypatch.chdir(tmp_path)

    class Inner:
        def __init__(self) -> None:
            self.rows: list[dict[str, Any]] = []

        def on_train_loss_report(self, info: dict[str, Any]) -> None: ...

    live = train_metrics.wrap(Inner(), tmp_path / "live", offset=0)
    live.on_train_loss_report({"iteration": 5, "train_loss": 2.5, "learning_rate": 0.1,
                               "tokens_per_second": 11.0, "trained_tokens": 40})
    live.end()
    assert json.loads((tmp_path / "live/metrics.json").read_text())["train"]["loss"] == 2.5
