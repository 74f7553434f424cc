"""Resumable training state: when a checkpoint is due (on whole optimizer steps), loading one,
the metrics log kept beside them, and the file hashes that name a run (train.py `run_key`;
train.py writes and finds checkpoints with the atomic writes of pipeline.rows).

    hashes = checkpoints.folder_hashes(Path("models/base"), memo_file)   # base identity
    iterate = checkpoints.checkpointing(iterate, every, save, skip=step, accumulate=k)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def folder_hashes(folder: Path, memo_file: Path) -> dict[str, str]:
    """sha256 of each file under `folder` by relative path. Weights are gigabytes: a file's hash
    is reused while its path, size, mtime and inode are those it was hashed at (`memo_file`)."""
    memo = _read_memo(memo_file)
    hashes, fresh = {}, {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
        fresh[key] = memo.get(key) or _sha256(path)
        hashes[path.relative_to(folder).as_posix()] = fresh[key]
    if fresh.keys() - memo.keys():  # a torn memo is unreadable JSON, ignored: no atomic write
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        memo_file.write_text(json.dumps({**memo, **fresh}, indent=0))
    return hashes


def _read_memo(memo_file: Path) -> dict[str, str]:
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: hash again
    return memo if isinstance(memo, dict) else {}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def checkpointing(iterate: Callable[..., Iterator[Any]], every: int, save: Callable[[int], None],
                  skip: int = 0, accumulate: int = 1) -> Callable[..., Iterator[Any]]:
    """Wrap mlx-lm's batch iterator: when it asks for the batch after step n, step n is done and
    evaluated; save then (mlx-lm's own checkpoint writes are not atomic: a kill tears them).

    A resumed run skips the `skip` batches already trained on, so it sees the batches an
    uninterrupted run would have seen. Saves fall on gradient-accumulation boundaries only
    (`save_due`): a checkpoint holds no half-accumulated gradient to lose.
    """

    def wrapped(*args: Any, loop: bool = False, **kw: Any) -> Iterator[Any]:
        batches = iterate(*args, loop=loop, **kw)
        if not loop:  # validation
            yield from batches
            return
        for _ in range(skip):
            next(batches)
        for n, batch in enumerate(batches):
            if n and save_due(skip + n, every, accumulate):
                save(skip + n)
            yield batch

    return wrapped


def save_due(step: int, every: int, accumulate: int) -> bool:
    """Save after `step` batches: at the first accumulation boundary at or after each multiple
    of `every` (with `every` 3 and `accumulate` 2: steps 4, 6, 10, 12, ...)."""
    return step % accumulate == 0 and step % every < accumulate


def load_checkpoint(model: Any, optimizer: Any, path: Path) -> None:
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    model.load_weights(str(path), strict=False)
    state = mx.load(str(path.with_name(path.name.replace("_adapters.", "_optimizer."))))
    optimizer.state = tree_unflatten(list(state.items()))


def _log_row(line: str) -> dict[str, Any] | None:
    try:
        return json.loads(line) if line else None
    except ValueError:
        return None  # the line a kill cut short


class MetricsLog:
    """mlx-lm training callback: keeps the curves, persists them beside the checkpoints."""

    def __init__(self, log_file: Path, offset: int, write: bool = True):
        self.log_file, self.offset, self.write = log_file, offset, write
        self.rows: list[dict[str, Any]] = []
        if log_file.exists():
            self.rows = [r for r in map(_log_row, log_file.read_text().splitlines())
                         if r is not None and r["step"] <= offset]
        trains = [r for r in self.rows if r["kind"] == "train"]
        self.token_base = trains[-1]["trained_tokens"] if trains else 0  # tokens before resume
        self.held_peak = 0.0  # GB of device memory MLX held (arrays + cache), at reports

    def _add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if not self.write:
            return
        with self.log_file.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def on_train_loss_report(self, info: dict[str, Any]) -> None:
        from pipeline.training import memory

        self.held_peak = max(self.held_peak, memory.held_gb())
        self._add({"kind": "train", "step": info["iteration"] + self.offset,
                   "loss": info["train_loss"], "tokens_per_second": info["tokens_per_second"],
                   "steps_per_second": info["iterations_per_second"],
                   "trained_tokens": info["trained_tokens"] + self.token_base,
                   "peak_memory": info["peak_memory"],
                   "learning_rate": info["learning_rate"]})

    def on_val_loss_report(self, info: dict[str, Any]) -> None:
        self._add({"kind": "val", "step": info["iteration"] + self.offset, "loss": info["val_loss"]})

    def curve_tsv(self) -> str:
        """step, train_loss, val_loss: val_loss is the latest validation at or before the step."""
        lines = ["step\ttrain_loss\tval_loss"]
        vals = sorted((r["step"], r["loss"]) for r in self.rows if r["kind"] == "val")
        for r in sorted((r for r in self.rows if r["kind"] == "train"), key=lambda r: r["step"]):
            seen = [v for s, v in vals if s <= r["step"]]
            val = f"{seen[-1]:.5f}" if seen else ""
            lines.append(f"{r['step']}\t{r['loss']:.5f}\t{val}")
        return "\n".join(lines) + "\n"
