"""Live training metrics the DVC way: DVCLive behind mlx-lm's training callback.

While the train stage runs, `reports/train_live/` is rewritten at every loss report:
`metrics.json` (the latest step, train/loss, val/loss, learning rate, trained tokens; declared as a DVC
metric, so `dvc exp show` and `dvc metrics show` show a running experiment's progress) and
`plots/metrics/{train,val}/*.tsv` (DVCLive's standard plots layout: `dvc plots show`, the VS Code
extension and Studio read it). reports/train.json and reports/train_loss.tsv stay as they are.

DVCLive is told not to touch dvc.yaml (`dvcyaml=False`: the train stage declares the files) and
not to save experiments itself (`save_dvc_exp=False`: `dvc exp run` does): its outputs are stage
outputs, so a second `dvc repro` has nothing to rerun and git sees only the declared reports.

    log = train_metrics.LiveMetrics(Path("reports/train_live"), inner=metrics_log)
    train(..., training_callback=log); log.end()
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# No speed here: these files are tracked, and a speed differs on every rerun (it is in
# reports/train.timings.json and on the progress line instead).
TRAIN_KEYS = {"loss": "loss", "learning_rate": "learning_rate", "trained_tokens": "trained_tokens"}


class LiveMetrics:
    """An mlx-lm training callback that forwards to `inner` (the stage's own MetricsLog) and
    logs every report to DVCLive. `rows` already logged (a resumed run) are replayed first, so
    the live files always cover the whole run."""

    def __init__(self, folder: Path, inner: Any, offset: int = 0,
                 rows: list[dict[str, Any]] | None = None):
        self.inner, self.offset = inner, offset
        self.live = _live(folder)
        for row in rows or []:
            self._log(row)

    def on_train_loss_report(self, info: dict[str, Any]) -> None:
        self.inner.on_train_loss_report(info)
        self._log({"kind": "train", "step": info["iteration"] + self.offset,
                   "loss": info["train_loss"], "learning_rate": info["learning_rate"],
                   "trained_tokens": info["trained_tokens"]})

    def on_val_loss_report(self, info: dict[str, Any]) -> None:
        self.inner.on_val_loss_report(info)
        self._log({"kind": "val", "step": info["iteration"] + self.offset,
                   "loss": info["val_loss"]})

    def _log(self, row: dict[str, Any]) -> None:
        self.live.step = int(row["step"])
        keys = TRAIN_KEYS if row["kind"] == "train" else {"loss": "loss"}
        for key, name in keys.items():
            if key in row:
                self.live.log_metric(f"{row['kind']}/{name}", _number(row[key]))
        self.live.make_summary()  # metrics.json now: what `dvc exp show` reads mid-run

    def end(self) -> None:
        self.live.end()


def _number(value: Any) -> float:
    """mlx scalars and numpy floats as plain Python numbers (DVCLive serializes them)."""
    return float(value.item() if hasattr(value, "item") else value)


def _live(folder: Path) -> Any:
    """DVCLive writing to `folder`. In a git repository with no commit yet (a new project's
    first `dvc repro`), DVCLive 3.x asks git for HEAD before it checks that there is one and
    raises; it then logs as it does outside git (the same files, no experiment metadata)."""
    from unittest import mock

    from dvclive import Live
    from scmrepo.exceptions import SCMError

    def make() -> Any:
        return Live(str(folder), dvcyaml=False, save_dvc_exp=False, report=None)

    try:
        return make()
    except SCMError:
        with mock.patch("dvclive.live.get_dvc_repo", return_value=None):
            return make()


def wrap(inner: Any, folder: Path | None, offset: int) -> Any:
    """The training callback: `inner` alone, or with DVCLive writing to `folder`."""
    if folder is None:
        return inner
    return LiveMetrics(folder, inner, offset=offset, rows=getattr(inner, "rows", None))


def finish(callback: Any) -> None:
    if isinstance(callback, LiveMetrics):
        callback.end()


def mark_kept(callback: Any, step: int, loss: float) -> None:
    """Mark the adapter the stage writes (train.keep) on the DVCLive curve: `kept/val_loss`,
    one point at its step (plots/metrics/kept/val_loss.tsv) and in metrics.json."""
    if not isinstance(callback, LiveMetrics) or math.isnan(loss):  # no live folder or val loss
        return
    last = callback.live.step
    callback.live.step = int(step)
    callback.live.log_metric("kept/val_loss", _number(loss))
    callback.live.step = last
    callback.live.make_summary()
