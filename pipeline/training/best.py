"""Which adapter the train stage writes: `train.keep: last | best_val`, and early stopping.

mlx-lm computes the validation loss every `steps_per_eval` steps and throws it away. `Keeper` sits
in the training callback: at each validation it remembers the weights if the loss is the lowest
so far (mx arrays are immutable, so holding the trainable arrays is a snapshot: the optimizer's
update makes new ones), and on the lead rank saves them as `best_{step:07d}.safetensors` beside
the checkpoints, so a resumed run picks the same best. With `early_stop_patience` N, training
ends after N validations in a row without a new best (the batch iterator simply stops: mlx-lm's
loop ends with it).

    keeper = best.Keeper("best_val", 3, model, ckpt_dir, lead=True, offset=done, rows=log.rows)
    train(..., iterate_batches=keeper.stopping(batches), training_callback=keeper.wrap(callback))
    keeper.restore(model)        # the kept weights back into the model
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BEST_RE = re.compile(r"^best_(\d{7})\.safetensors$")


class Keeper:
    def __init__(self, keep: str, patience: int | None, model: Any, folder: Path, *,
                 lead: bool, offset: int, rows: list[dict[str, Any]]):
        self.keep, self.patience, self.model, self.folder = keep, patience, model, folder
        self.lead, self.offset = lead, offset
        self.best: tuple[int, float] | None = None
        self.since_best = 0
        self.snapshot: dict[str, Any] | None = None
        self.stopped_at: int | None = None
        for row in rows:  # a resumed run: the validations before the checkpoint
            if row["kind"] == "val" and row["step"] <= offset:
                self._judge(int(row["step"]), float(row["loss"]))
        if self.best is not None and keep == "best_val":
            self._load(self.best[0])

    def _judge(self, step: int, loss: float) -> bool:
        if self.best is None or loss < self.best[1]:
            self.best, self.since_best = (step, loss), 0
            return True
        self.since_best += 1
        return False

    @property
    def stop(self) -> bool:
        return self.patience is not None and self.since_best >= self.patience

    def on_val(self, iteration: int, loss: float) -> None:
        step = iteration + self.offset
        if self._judge(step, loss) and self.keep == "best_val":
            from mlx.utils import tree_flatten

            self.snapshot = dict(tree_flatten(self.model.trainable_parameters()))
            if self.lead:
                self._save(step)

    def _save(self, step: int) -> None:
        import mlx.core as mx

        path = self.folder / f"best_{step:07d}.safetensors"
        tmp = path.with_name(f".{path.stem}.tmp.safetensors")  # renamed once complete
        mx.save_safetensors(str(tmp), self.snapshot)
        os.replace(tmp, path)

    def _load(self, step: int) -> None:
        import mlx.core as mx

        path = self.folder / f"best_{step:07d}.safetensors"
        if path.exists():
            self.snapshot = dict(mx.load(str(path)))

    def restore(self, model: Any) -> None:
        """Put the kept weights into `model` (keep: best_val); keep: last changes nothing."""
        if self.keep != "best_val" or self.snapshot is None:
            return
        from mlx.utils import tree_unflatten

        model.update(tree_unflatten(list(self.snapshot.items())))

    def kept(self, last_step: int, last_val: float) -> tuple[int, float]:
        """(iteration, validation loss) of the adapter written."""
        if self.keep == "best_val" and self.best is not None:
            return self.best
        return last_step, last_val

    def wrap(self, callback: Any) -> Any:
        return _Callback(callback, self)

    def stopping(self, iterate: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        """The batch iterator, ending once patience ran out (training batches only)."""

        def wrapped(*args: Any, loop: bool = False, **kw: Any) -> Iterator[Any]:
            for n, batch in enumerate(iterate(*args, loop=loop, **kw)):
                if loop and self.stop:
                    self.stopped_at = self.offset + n
                    return
                yield batch

        return wrapped


class _Callback:
    """mlx-lm's training callback: the stage's own, then the keeper on validation reports."""

    def __init__(self, inner: Any, keeper: Keeper):
        self.inner, self.keeper = inner, keeper

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def on_train_loss_report(self, info: dict[str, Any]) -> None:
        self.inner.on_train_loss_report(info)

    def on_val_loss_report(self, info: dict[str, Any]) -> None:
        self.inner.on_val_loss_report(info)
        self.keeper.on_val(int(info["iteration"]), float(info["val_loss"]))


def check(keep: str, patience: int | None, n_valid: int) -> None:
    from pipeline.core.errors import UserError

    if patience is not None and patience < 1:
        raise UserError(f"params.yaml:train.early_stop_patience: {patience} must be >= 1 "
                        "(validations without a new best) or null")
    if (keep == "best_val" or patience is not None) and n_valid == 0:
        raise UserError("params.yaml:train.keep/early_stop_patience: there is no validation "
                        "data to pick by (the valid split is empty); use keep: last and "
                        "early_stop_patience: null, or give curate a valid split")
