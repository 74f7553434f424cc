"""Packed preference steps: both sides of each pair in one packed sequence (train.pack with
train.objective dpo | orpo).

A pair is one unit of packing (pipeline/training/packing.py bins units by length): its chosen
side and its rejected side are two consecutive rows of one sequence, with their own segment ids
(attention and targets stay inside each side, as for SFT rows). A data-parallel rank therefore
always holds both sides of its pairs, which the DPO and ORPO losses need (they are not sums over
rows). Each step has one shape: `tokens_per_step / pack_width` sequences of `pack_width` inputs,
and room for `slots` pairs (the most any step holds; unused slots weigh 0).

The per-side log-probabilities come from one forward pass over the packed sequences: each
target token carries the index of its side (`slot`), and a one-hot sum gathers the sides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from pipeline.training import packing, preference
from pipeline.training.preference import PairRow, PreferenceError, objective_loss


def check(pack_width: int, max_seq_length: int) -> None:
    if pack_width + 1 < 2 * max_seq_length:
        raise PreferenceError(f"params.yaml:train.pack_width: {pack_width} cannot hold both sides "
                              f"of a pair of max_seq_length {max_seq_length}; use pack_width >= "
                              f"{2 * max_seq_length - 1} or lower max_seq_length")


def unit_lengths(rows: Sequence[PairRow], max_seq_length: int) -> list[int]:
    return [min(len(r.chosen[0]), max_seq_length) + min(len(r.rejected[0]), max_seq_length)
            for r in rows]


def layout(rows: Sequence[PairRow], groups: Sequence[Sequence[int]], width: int, n_seqs: int,
           max_seq_length: int, slots: int) -> tuple[np.ndarray, ...]:
    """(tokens, mask, segs, slot) each (n_seqs, width + 1), ref (2 * slots,), weight (slots,).
    slot: the side each position belongs to (2p chosen, 2p + 1 rejected of the p-th pair of
    these sequences), -1 on padding."""
    sides: list[Any] = []
    seq_groups = []
    for group in groups:
        seq_groups.append(list(range(len(sides), len(sides) + 2 * len(group), 1)))
        for i in group:
            sides += [rows[i].chosen, rows[i].rejected]
    tokens, mask, segs = packing.layout(sides, seq_groups, width, n_seqs, max_seq_length)
    slot = np.full(segs.shape, -1, np.int32)
    for s, members in enumerate(seq_groups):
        base = members[0] if members else 0
        inside = segs[s] > 0
        slot[s, inside] = base + segs[s, inside] - 1  # segment k of sequence s is side base+k-1
    pairs = [rows[i] for group in groups for i in group]
    if len(pairs) > slots:
        raise PreferenceError(f"{len(pairs)} pairs in one step, room for {slots}")
    ref = np.zeros(2 * slots, np.float32)
    weight = np.zeros(slots, np.float32)
    for p, row in enumerate(pairs):
        ref[p], ref[slots + p], weight[p] = row.ref[0], row.ref[1], 1.0
    # sides are ordered (c0, r0, c1, r1, ...): slot 2p is pair p's chosen side
    return tokens, mask, segs, slot, ref, weight


def batch_iterator(seed: int, pack_width: int, tokens_per_step: int
                   ) -> Callable[..., Iterator[tuple[Any, ...]]]:
    """mlx-lm's `iterate_batches` signature over PairRows, packed; every rank draws the same
    order and takes its own sequences (with their pairs) of each step."""
    import mlx.core as mx

    def iterate(dataset, batch_size, max_seq_length, loop=False, comm_group=None, **_):
        rank, size = (comm_group.rank(), comm_group.size()) if comm_group is not None else (0, 1)
        per_rank = packing.check_settings(pack_width, tokens_per_step, max_seq_length, size)
        check(pack_width, max_seq_length)
        lengths = unit_lengths(dataset, max_seq_length)
        groups = (packing.round_bins(lengths, pack_width + 1)[0] if loop
                  else packing.bins(lengths, pack_width + 1))
        slots = per_rank * max(len(g) for g in groups)  # one shape for the whole run
        rng = np.random.default_rng(seed)
        pending: list[list[int]] = []
        while True:
            pending += [groups[g] for g in rng.permutation(len(groups))]
            while len(pending) >= per_rank * size or (pending and not loop):
                step, pending = pending[: per_rank * size], pending[per_rank * size:]
                mine = step[rank * per_rank : (rank + 1) * per_rank]
                arrays = layout(dataset, mine, pack_width, per_rank, max_seq_length, slots)
                every = [dataset[i] for g in step for i in g]
                if loop:
                    scale = [len(every) / size,
                             sum(float(sum(r.chosen[1][1:max_seq_length])) for r in every) / size]
                else:
                    own = [dataset[i] for g in mine for i in g]
                    scale = [max(len(own), 1.0), max(sum(
                        float(sum(r.chosen[1][1:max_seq_length])) for r in own), 1.0)]
                yield (*(mx.array(a) for a in arrays), mx.array(np.array(scale, np.float32)))
            if not loop:
                return

    return iterate


def make_loss(objective: str, beta: float) -> Callable[..., tuple[Any, Any]]:
    """loss(model, tokens, mask, segs, slot, ref, weight, scale) -> (loss, pairs)."""
    import mlx.core as mx
    from mlx import nn

    if objective not in ("dpo", "orpo"):
        raise PreferenceError(f"params.yaml:train.objective: {objective!r} is not dpo or orpo")

    def loss(model: Any, tokens: Any, mask: Any, segs: Any, slot: Any, ref: Any, weight: Any,
             scale: Any):
        inputs, in_segs = tokens[:, :-1], segs[:, :-1]
        caches = [packing.SegmentMask(in_segs) for _ in model.layers]
        logits = model(inputs, cache=caches)
        if not any(c.asked for c in caches):
            raise packing.PackingError("params.yaml:train.pack: the model takes no attention "
                                       "mask from its cache; set train.pack: false")
        weights = mask[:, 1:] * (segs[:, 1:] == in_segs) * (in_segs > 0)
        logp = -nn.losses.cross_entropy(logits, tokens[:, 1:]).astype(mx.float32) * weights
        n = weight.shape[0]
        onehot = (slot[:, 1:, None] == mx.arange(2 * n)[None, None, :]).astype(mx.float32)
        sums = (logp[..., None] * onehot).sum(axis=(0, 1))  # (2n,): c0, r0, c1, r1, ...
        counts = (weights[..., None] * onehot).sum(axis=(0, 1))
        return objective_loss(objective, beta, (sums[0::2], sums[1::2]),
                              (counts[0::2], counts[1::2]), ref, weight, scale)

    return loss


def steps_per_epoch(rows: Sequence[PairRow], width: int, n_seqs: int, max_seq_length: int
                    ) -> float:
    groups, k = packing.round_bins(unit_lengths(rows, max_seq_length), width + 1)
    return len(groups) / (k * n_seqs)


def batching(cfg: Any, model: Any, train_set: list, world_size: int
             ) -> tuple[Callable[[int], Any], Callable[..., Any], float | None]:
    """The train stage's (seed -> iterate_batches, loss, steps per epoch or None) for pairs:
    padded batches of `batch_size` pairs, or packed steps when `cfg.pack`."""
    if not cfg.pack:
        return preference.batch_iterator, preference.make_loss(cfg.objective, cfg.beta), None
    packing.check_model(model)
    check(cfg.pack_width, cfg.max_seq_length)
    per_rank = packing.check_settings(cfg.pack_width, cfg.tokens_per_step, cfg.max_seq_length,
                                      world_size)
    per_epoch = steps_per_epoch(train_set, cfg.pack_width, per_rank * world_size,
                                cfg.max_seq_length)
    return (lambda seed: batch_iterator(seed, cfg.pack_width, cfg.tokens_per_step),
            make_loss(cfg.objective, cfg.beta), per_epoch)
