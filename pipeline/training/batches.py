"""Padded batches for the train stage, in mlx-lm's `iterate_batches` shape: rows sorted by length,
`batch_size` a batch, shuffled with the stage's own seed, each data-parallel rank taking its slice
and dividing by its share of the batch's targets. A short last batch is filled with all-padding
rows, so every row trains each epoch and every batch splits evenly over the ranks.

    iterate = batch_iterator(seed)
    for tokens, mask in iterate(dataset, batch_size=4, max_seq_length=2048): ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from pipeline.core.errors import UserError


class BatchError(UserError):
    """Batch settings the data-parallel ranks cannot share."""


def batch_iterator(seed: int) -> Callable[..., Iterator[tuple[Any, Any]]]:
    """mlx-lm's `iterate_batches` signature, yielding (tokens, target mask) with our own RNG."""
    import mlx.core as mx

    from pipeline.training import packing

    def iterate(dataset, batch_size, max_seq_length, loop=False, comm_group=None, **_):
        rank, size = (comm_group.rank(), comm_group.size()) if comm_group is not None else (0, 1)
        if batch_size % size:
            raise BatchError(f"params.yaml:train.batch_size: {batch_size} must be divisible by the "
                             f"{size} distributed processes")
        batches = padded_batches([len(t) for t, _ in dataset], batch_size)
        rng = np.random.default_rng(seed)  # same seed on every rank: same batch, own slice
        while True:
            for b in rng.permutation(len(batches)):
                rows = [dataset[j] for j in batches[b] if j is not None]
                # every rank divides by its share of the batch's targets: the ranks' averaged
                # gradient is then the one-process gradient (pipeline/packing.rank_denominator)
                step = sum(sum(m[1:max_seq_length]) for _, m in rows)
                extra = (mx.array(packing.rank_denominator(step, size)),) if loop and size > 1 else ()
                width = min(max(len(t) for t, _ in rows), max_seq_length)
                mine = [dataset[j] if j is not None else None for j in batches[b][rank::size]]
                yield (*(mx.array(a) for a in padded_arrays(mine, width)), *extra)
            if not loop:
                return

    return iterate


def padded_batches(lengths: list[int], batch_size: int) -> list[list[int | None]]:
    """Row indices by length, `batch_size` a batch; a short last batch is filled up with None
    (all padding, no target): every row trains each epoch, every batch splits over the ranks."""
    order: list[int | None] = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if batches:
        batches[-1] += [None] * (batch_size - len(batches[-1]))
    return batches


def padded_arrays(rows: list[Any], width: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, target mask), each (len(rows), width); a None row is all padding."""
    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.float32)
    for r, row in enumerate(rows):
        if row is not None:
            t, m = row
            n = min(len(t), width)
            tokens[r, :n], mask[r, :n] = t[:n], m[:n]
    return tokens, mask


def batching(cfg: Any, model: Any, train_set: list, world_size: int
             ) -> tuple[Callable[[int], Any], Callable[..., Any], float | None]:
    """The train stage's (seed -> iterate_batches, loss, steps per epoch or None): padded or
    packed rows for sft, padded or packed pairs for dpo/orpo (preference_packing.py)."""
    if cfg.objective != "sft":
        from pipeline.training import preference_packing

        return preference_packing.batching(cfg, model, train_set, world_size)
    from pipeline.training.model import masked_loss

    if not cfg.pack:
        return batch_iterator, masked_loss, None
    from pipeline.training import attention, packing

    packing.check_model(model)
    per_rank = packing.check_settings(cfg.pack_width, cfg.tokens_per_step, cfg.max_seq_length,
                                      world_size)
    per_epoch = packing.steps_per_epoch(train_set, cfg.pack_width, per_rank * world_size,
                                        cfg.max_seq_length)
    # attention inside each row through the fused kernel (pipeline/training/attention.py)
    loss, wrap, _ = attention.choose(model)
    return (lambda seed: wrap(packing.batch_iterator(seed, cfg.pack_width, cfg.tokens_per_step)),
            loss, per_epoch)
