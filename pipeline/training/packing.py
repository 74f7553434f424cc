"""Sequence packing: chat rows laid end to end in fixed-width sequences, one shape per step.

Unpacked training pads each batch to its longest row, so every step has a new width (a new
`mx.compile` trace, new kernels) and short steps leave a GPU idle. Packed training fills
`tokens_per_step` positions per step in sequences of `pack_width` inputs, with the same
mathematics as unpacked batches of the same rows:

- attention never crosses a row: a block-diagonal causal mask built from per-token segment ids
  (row 1, 2, ... of the sequence; 0 = padding). mlx-lm's models take no `mask` argument, but
  every attention layer asks its cache for one (`cache.make_mask`); `SegmentMask` is a cache
  that passes keys and values through and answers with the segment mask;
- positions restart at each row in effect: rotary embeddings make a query-key score depend only
  on the distance between the two tokens, and inside one row that distance is the same at any
  offset in the sequence. Models whose rotary scaling depends on the absolute position or the
  length (su/longrope, dynamic NTK) or that have learned absolute positions are refused;
- the loss counts a target only when it and the token before it belong to the same row, and only
  where the row's mask marks an assistant token, as `masked_loss` does.

Rows longer than `max_seq_length` are truncated as in unpacked training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from pipeline.core.errors import UserError

Row = tuple[Sequence[int], Sequence[int]]  # (token ids, 0/1 target mask)
RELATIVE_ROPES = ("RoPE", "Llama3RoPE", "YarnRoPE")  # scores depend on distance only


class PackingError(UserError):
    """Settings or a model that cannot be packed, with the key to change."""


# --- layout ----------------------------------------------------------------------------------


def bins(lengths: Sequence[int], capacity: int, candidates: int = 255) -> list[list[int]]:
    """Row indices grouped so each group's lengths sum to <= capacity, few groups.

    Largest row first, then the subset of (up to `candidates`) remaining rows, largest first,
    that fills the room best (subset sum on a bitset). On the shipped rows (158-484 tokens, 1025
    per sequence) this leaves 6% of positions empty where first-fit decreasing leaves 10%.
    Rows wait in one queue per length, so a group costs O(candidates), not a scan of all rows.
    """
    queues = _LengthQueues(lengths, capacity)
    groups: list[list[int]] = []
    while (first := queues.pop_largest()) is not None:
        room = capacity - queues.size[first]
        cand = queues.peek_fitting(room, candidates)
        chosen = _best_subset([queues.size[i] for i in cand], room)
        for k in chosen:
            queues.take(cand[k])
        groups.append([first, *(cand[k] for k in chosen)])
    return groups


def _best_subset(sizes: Sequence[int], room: int) -> list[int]:
    """Positions in `sizes` of the subset with the largest sum <= room; earlier ones preferred."""
    reach, full = [1], (1 << (room + 1)) - 1  # reach[k]: sums reachable with sizes[:k]
    for n in sizes:
        reach.append((reach[-1] | (reach[-1] << n)) & full)
        if reach[-1] >> room:  # room filled exactly: later sizes cannot improve it
            break
    total, chosen = reach[-1].bit_length() - 1, []
    for k in range(len(reach) - 1, 0, -1):
        if not (reach[k - 1] >> total) & 1:  # the sum needs sizes[k - 1]
            chosen.append(k - 1)
            total -= sizes[k - 1]
    return chosen[::-1]


class _LengthQueues:
    """Rows not yet binned, in (length descending, index ascending) order: a queue per length,
    and a union-find pointer from each length to the largest length <= it with rows left."""

    def __init__(self, lengths: Sequence[int], capacity: int):
        self.size = [min(n, capacity) for n in lengths]
        self.queue: list[list[int]] = [[] for _ in range(capacity + 1)]
        for i, n in enumerate(self.size):
            self.queue[n].append(i)
        self.queue[capacity].sort(key=lambda i: -lengths[i])  # truncated rows: longest first
        self.head = [0] * (capacity + 1)
        # below[n + 1]: n itself while rows of length n are left, else a pointer further down
        self.below = [0] + [n + 1 if self.queue[n] else n for n in range(capacity + 1)]

    def _largest(self, n: int) -> int:
        """The largest length <= n with rows left, or -1."""
        p = n + 1
        root = p
        while self.below[root] != root:
            root = self.below[root]
        while self.below[p] != root:  # path compression
            self.below[p], p = root, self.below[p]
        return root - 1

    def take(self, i: int) -> None:
        """Remove row i, which must be the next one of its length (binning takes them in order)."""
        n = self.size[i]
        assert self.queue[n][self.head[n]] == i
        self.head[n] += 1
        if self.head[n] == len(self.queue[n]):
            self.below[n + 1] = n

    def pop_largest(self) -> int | None:
        n = self._largest(len(self.queue) - 1)
        if n < 0:
            return None
        i = self.queue[n][self.head[n]]
        self.take(i)
        return i

    def peek_fitting(self, room: int, limit: int) -> list[int]:
        """The first `limit` rows of length <= room, in order, less those of a length that
        cannot all fit at once (room // length of each length can; the rest cannot change
        the best subset); they stay queued."""
        out: list[int] = []
        seen, n = 0, self._largest(room)
        while n >= 0 and seen < limit:
            q, h = self.queue[n], self.head[n]
            run = min(len(q) - h, limit - seen)
            out += q[h : h + min(run, room // n if n else 0)]
            seen += run
            n = self._largest(n - 1)
        return out


def passes(lengths: Sequence[int], capacity: int) -> int:
    """Passes over the rows binned together: small datasets fill sequences better over 2 or 4
    (a row then appears that many times per round, as it would over that many epochs)."""
    best, best_fill = 1, 0.0
    if not lengths:
        return best
    for k in (1, 2, 4):
        fill = sum(lengths) * k / (len(bins(list(lengths) * k, capacity)) * capacity)
        if fill > best_fill + 0.01:
            best, best_fill = k, fill
        if best_fill >= 0.97 or len(lengths) * k > 2000:
            break
    return best


def round_bins(lengths: Sequence[int], capacity: int) -> tuple[list[list[int]], int]:
    """(groups of row indices for one round, passes per round)."""
    k = passes(lengths, capacity)
    n = len(lengths)
    return [[i % n for i in g] for g in bins(list(lengths) * k, capacity)], k


def layout(rows: Sequence[Row], groups: Sequence[Sequence[int]], width: int, n_seqs: int,
           max_seq_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, target mask, segment ids), each (n_seqs, width + 1); unused sequences all padding.

    Each sequence holds `width` + 1 tokens, so the model sees `width` inputs (a fixed shape).
    """
    tokens = np.zeros((n_seqs, width + 1), np.int32)
    mask = np.zeros((n_seqs, width + 1), np.float32)
    segs = np.zeros((n_seqs, width + 1), np.int32)
    for s, group in enumerate(groups):
        at = 0
        for k, i in enumerate(group, start=1):
            t, m = rows[i]
            n = min(len(t), max_seq_length)
            tokens[s, at : at + n], mask[s, at : at + n] = t[:n], m[:n]
            segs[s, at : at + n] = k
            at += n
    return tokens, mask, segs


def steps_per_epoch(rows: Sequence[Row], width: int, n_seqs: int, max_seq_length: int
                    ) -> float:
    lengths = [min(len(t), max_seq_length) for t, _ in rows]
    groups, k = round_bins(lengths, width + 1)
    return len(groups) / (k * n_seqs)


def wanted(pack: bool | str) -> bool:
    """`train.pack`: true, false, or auto = packed on a GPU, padded batches on a CPU.

    Measured (bench/README.md): on an H200 packed steps of 2x1024 train 1.16-1.42x faster than
    padded 4-row batches at the same peak memory. CPUs keep padded batches: packing was not measured
    faster there (and a CPU has no idle time between small steps for it to fill).
    """
    if pack == "auto":
        import mlx.core as mx

        return mx.default_device().type == mx.DeviceType.gpu
    return bool(pack)


def check_settings(pack_width: int, tokens_per_step: int, max_seq_length: int,
                   world_size: int) -> int:
    """Sequences per step (per process), or a PackingError naming the key to change."""
    where = "params.yaml:train"
    if pack_width < max_seq_length:
        raise PackingError(f"{where}.pack_width: {pack_width} is shorter than max_seq_length "
                           f"{max_seq_length}; a packed sequence must hold the longest row")
    if tokens_per_step < pack_width or tokens_per_step % pack_width:
        raise PackingError(f"{where}.tokens_per_step: {tokens_per_step} must be a multiple of "
                           f"pack_width {pack_width}")
    n_seqs = tokens_per_step // pack_width
    if n_seqs % world_size:
        raise PackingError(f"{where}.tokens_per_step: {n_seqs} sequences of {pack_width} per step "
                           f"must be divisible by the {world_size} distributed processes")
    return n_seqs // world_size


def batch_iterator(seed: int, pack_width: int, tokens_per_step: int
                   ) -> Callable[..., Iterator[tuple[Any, Any, Any]]]:
    """mlx-lm's `iterate_batches` signature, yielding packed (tokens, mask, segment ids).

    Rows are binned once (`round_bins`); each round visits the bins in a new order from the seed,
    so steps mix different rows across rounds. Every rank draws the same order and
    takes its own sequences of each step. The last step of a round is topped up with the next
    round's bins when looping (training) and with empty sequences otherwise (evaluation).
    """
    import mlx.core as mx

    def iterate(dataset, batch_size, max_seq_length, loop=False, comm_group=None, **_):
        rank, size = (comm_group.rank(), comm_group.size()) if comm_group is not None else (0, 1)
        per_rank = check_settings(pack_width, tokens_per_step, max_seq_length, size)
        n_seqs = per_rank * size
        lengths = [min(len(t), max_seq_length) for t, _ in dataset]
        # evaluation scores each row once; training bins several passes when that fills better
        groups = round_bins(lengths, pack_width + 1)[0] if loop else bins(lengths, pack_width + 1)
        rng = np.random.default_rng(seed)
        pending: list[list[int]] = []
        while True:
            pending += [groups[g] for g in rng.permutation(len(groups))]
            while len(pending) >= n_seqs or (pending and not loop):
                step, pending = pending[:n_seqs], pending[n_seqs:]
                whole = layout(dataset, step, pack_width, n_seqs, max_seq_length)
                mine = tuple(a[rank * per_rank : (rank + 1) * per_rank] for a in whole)
                extra = (rank_denominator(targets(*whole), size),) if loop and size > 1 else ()
                yield tuple(mx.array(a) for a in mine + extra)
            if not loop:
                return

    return iterate


def targets(tokens: np.ndarray, mask: np.ndarray, segs: np.ndarray) -> int:
    """Targets `packed_loss` scores in these sequences."""
    return int((mask[:, 1:] * (segs[:, 1:] == segs[:, :-1]) * (segs[:, :-1] > 0)).sum())


def rank_denominator(step_targets: int, size: int) -> np.ndarray:
    """What each rank divides its summed loss by so that mlx-lm's plain average of the ranks'
    gradients is the gradient of the mean over the whole step (as on one process): ranks hold
    different numbers of targets, and an average of per-rank means would weight them unequally."""
    return np.array(max(step_targets, 1) / size, np.float32)


# --- the model side --------------------------------------------------------------------------


class SegmentMask:
    """A stand-in KV cache for one forward pass: keys and values pass through unchanged, and
    `make_mask` answers with the block-diagonal causal mask of the segment ids."""

    offset = 0

    def __init__(self, segs: Any):
        self.segs = segs  # (batch, length) int32
        self.asked = False

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        import mlx.core as mx

        self.asked = True
        pos = mx.arange(n)
        allowed = pos[:, None] >= pos[None]
        if window_size is not None:
            allowed = allowed & (pos[:, None] < pos[None] + window_size)
        same = self.segs[:, None, :, None] == self.segs[:, None, None, :]
        return same & allowed  # (batch, 1, n, n), broadcast over heads

    def update_and_fetch(self, keys: Any, values: Any) -> tuple[Any, Any]:
        return keys, values


def check_model(model: Any) -> None:
    """Refuse models where packing would change the mathematics (see the module doc)."""
    attn = getattr(model.layers[0], "self_attn", None)
    rope = getattr(attn, "rope", None)
    kind = type(rope).__name__
    if kind not in RELATIVE_ROPES:
        model_type = getattr(getattr(model, "args", None), "model_type", type(model).__name__)
        raise PackingError(f"params.yaml:train.pack: model type {model_type} has position "
                           f"encoding {kind or 'none found'}, not a relative rotary one, so rows "
                           "cannot share a sequence; set train.pack: false")


def packed_loss(model: Any, tokens: Any, mask: Any, segs: Any, denominator: Any = None):
    """Mean cross-entropy over the assistant tokens of every packed row; (loss, n_tokens).

    `denominator`: a data-parallel training rank's share of the step's targets
    (`rank_denominator`), in place of its own count."""

    inputs, in_segs = tokens[:, :-1], segs[:, :-1]
    caches = [SegmentMask(in_segs) for _ in model.layers]
    logits = model(inputs, cache=caches)
    if not any(c.asked for c in caches):
        raise PackingError(f"params.yaml:train.pack: {type(model).__module__} takes no attention "
                           "mask from its cache, so packed rows would see each other; set "
                           "train.pack: false")
    return row_loss(logits, tokens, mask, segs, denominator)


def row_loss(logits: Any, tokens: Any, mask: Any, segs: Any, denominator: Any = None):
    """(mean cross-entropy over the scored targets of packed rows, their count): the loss every
    packed attention layout shares (pipeline/training/attention.py)."""
    import mlx.core as mx
    from mlx import nn

    in_segs = segs[:, :-1]
    # A target counts only inside its row: the first token of a row is not predicted from the
    # previous row's last token (masked_loss never scores a row's first token either).
    weights = mask[:, 1:] * (segs[:, 1:] == in_segs) * (in_segs > 0)
    ce = nn.losses.cross_entropy(logits, tokens[:, 1:]).astype(mx.float32) * weights
    ntoks = weights.sum()
    denom = mx.maximum(ntoks, 1) if denominator is None else denominator
    return ce.sum() / denom, ntoks.astype(mx.int32)

