"""Packed attention: each row of a packed sequence attends within itself, three ways.

`mask` (the reference, `packing.packed_loss`, and the default by measurement) gives every
attention layer a boolean (batch, 1, L, L) block-diagonal mask. On CUDA, MLX 0.32's fused
attention (cuDNN) takes it as an additive bias, forward and backward, when L is a multiple of 128.
Two layouts without that L x L mask live here:

- `segments`: the rows of a step are regrouped, per attention layer, into a few fixed widths
  (multiples of 128: cuDNN's fused backward needs a query length that is one), one row per slot,
  and attend with the plain causal mask: `mx.fast.scaled_dot_product_attention(...,
  mask="causal")`, no L x L array anywhere. Work is the sum of the rows' squared widths instead of
  L^2. The slots per width are fixed for a run (grown when a step needs more), so the compiled
  step keeps one shape. The layout (`plan`) is computed from the segment ids on the host, beside
  the batch (`with_plan`);
- `bias`: one additive (batch, 1, L, L) mask in the model's dtype per step, shared by all layers
  (no per-layer conversion of a boolean mask).

Measured on an H100 (7B, LoRA q/v top 16 blocks, packed 2x1024, bench/README.md, issue 26):
mask 15,915 trained tok/s, bias 15,650, segments 12,769 (the gathers and their scatter-add
gradients cost more than the attention they save), and one causal mask over the whole sequence
(rows seeing each other: wrong mathematics, a speed bound) 16,098. Attention is not where packed
training loses time on CUDA, so `DEFAULT_MODE` is `mask`. On Metal MLX trains with its unfused
attention in every mode (its source: faster there for training), which materialises the scores:
L x L per sequence with `mask`/`bias`, the rows' own squares with `segments` (not measured).
tests/test_packed_attention.py compares the gradients of all three with padded batches.
`segments` needs the model's attention module to call mlx-lm's
`models.base.scaled_dot_product_attention` by that name (llama, mistral, qwen2/3, gemma, phi3,
...): `install` wraps it there once, and a model without it trains on the reference mask.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from pipeline.training import packing

MODES = ("segments", "bias", "mask")
DEFAULT_MODE = "mask"  # fastest on an H100 (module doc, bench/README.md, issue 26)
WIDTH_STEP = 128  # cuDNN's fused attention backward needs query lengths that are multiples of 128
NICE = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


# --- layout (host side) ----------------------------------------------------------------------


def spans(in_segs: np.ndarray) -> list[tuple[int, int, int]]:
    """(sequence, start, length) of every row (segment id > 0) in the model's input positions."""
    out = []
    for b, row in enumerate(in_segs):
        edges = np.flatnonzero(np.diff(row, prepend=-1))  # where a new segment starts
        ends = np.append(edges[1:], len(row))
        out += [(b, int(s), int(e - s)) for s, e in zip(edges, ends) if row[s] > 0]
    return out


def width_of(length: int) -> int:
    return -(-length // WIDTH_STEP) * WIDTH_STEP


def nice(n: int) -> int:
    """Slot counts grow along a coarse ladder, so a run retraces its compiled step few times."""
    return next((k for k in NICE if k >= n), -(-n // 256) * 256)


def plan(in_segs: np.ndarray, capacity: dict[int, int]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(inverse, gathers) for the segment ids of the model's inputs (batch, L).

    gathers: one (slots, W) int32 array per width W with rows, ascending: flat input positions
    (b * L + p) of each row, one row per slot, left-aligned; the rest of a slot repeats its row's
    first position (a causal query never sees later keys, so that tail stays unseen), and unused
    slots point at position 0. inverse: (batch, L) int32, for every input position the index of
    its output in the gathered outputs laid end to end (slots x W per width, ascending); positions
    outside any row point at one extra zero row after them. `capacity` (width -> slots) is grown
    in place when this step needs more slots than it holds.
    """
    n_seqs, length = in_segs.shape
    rows = spans(in_segs)
    by_width: dict[int, list[tuple[int, int, int]]] = {}
    for b, start, n in rows:
        by_width.setdefault(width_of(n), []).append((b, start, n))
    for w, members in by_width.items():
        if len(members) > capacity.get(w, 0):
            capacity[w] = nice(len(members))
    gathers, base = [], 0
    inverse = np.empty(n_seqs * length, np.int32)
    zero_row = sum(w * k for w, k in capacity.items())
    inverse.fill(zero_row)
    for w in sorted(capacity):
        g = np.zeros((capacity[w], w), np.int32)
        for slot, (b, start, n) in enumerate(by_width.get(w, [])):
            first = b * length + start
            g[slot, :n] = np.arange(first, first + n)
            g[slot, n:] = first
            inverse[first : first + n] = base + slot * w + np.arange(n)
        gathers.append(g)
        base += capacity[w] * w
    return inverse.reshape(n_seqs, length), gathers


def with_plan(iterate: Callable[..., Iterator[tuple[Any, ...]]]
              ) -> Callable[..., Iterator[tuple[Any, ...]]]:
    """Wrap a packed batch iterator (tokens, mask, segs, *extra): yield (tokens, mask, segs,
    inverse, *gathers, *extra) for `segmented_loss`. One capacity per iterator: the slots only
    grow, so a run's step shapes settle after the first steps."""
    import mlx.core as mx

    def wrapped(*args: Any, **kw: Any) -> Iterator[tuple[Any, ...]]:
        capacity: dict[int, int] = {}
        for tokens, mask, segs, *extra in iterate(*args, **kw):
            inverse, gathers = plan(np.array(segs)[:, :-1], capacity)
            yield (tokens, mask, segs, mx.array(inverse), *map(mx.array, gathers), *extra)

    return wrapped


# --- the model side --------------------------------------------------------------------------


class SegmentCache:
    """A stand-in KV cache for one forward pass: keys and values pass through; the wrapped
    `scaled_dot_product_attention` (`install`) sends attention here, per row."""

    offset = 0

    def __init__(self, inverse: Any, gathers: Sequence[Any]):
        self.inverse, self.gathers = inverse, list(gathers)
        self.attended = False

    def make_mask(self, n: int, return_array: bool = False,
                  window_size: int | None = None) -> None:
        """No mask: `attend` keeps attention inside rows."""
        if window_size is not None:
            raise packing.PackingError("params.yaml:train.pack: sliding-window attention is not "
                                       "supported by packed rows; set train.pack: false")

    def update_and_fetch(self, keys: Any, values: Any) -> tuple[Any, Any]:
        return keys, values

    def attend(self, queries: Any, keys: Any, values: Any, scale: float, sinks: Any = None):
        """Fused causal attention of each row on its own, back in the packed (B, H, L, D)."""
        import mlx.core as mx

        self.attended = True
        b, hq, length, d = queries.shape

        def flat(x):  # (B, H, L, D) -> (B * L, H, D)
            return x.transpose(0, 2, 1, 3).reshape(b * length, x.shape[1], d)

        q, k, v = flat(queries), flat(keys), flat(values)
        outs = []
        for g in self.gathers:
            slots, w = g.shape
            idx = g.reshape(-1)

            def take(x, idx=idx, slots=slots, w=w):
                return x[idx].reshape(slots, w, x.shape[1], d).transpose(0, 2, 1, 3)

            o = mx.fast.scaled_dot_product_attention(take(q), take(k), take(v), scale=scale,
                                                     mask="causal", sinks=sinks)
            outs.append(o.transpose(0, 2, 1, 3).reshape(slots * w, hq, d))
        outs.append(mx.zeros((1, hq, d), dtype=queries.dtype))
        out = mx.concatenate(outs, axis=0)[self.inverse.reshape(-1)]
        return out.reshape(b, length, hq, d).transpose(0, 2, 1, 3)


def install(model: Any) -> bool:
    """Wrap `scaled_dot_product_attention` in the module of the model's attention layers (once),
    so that a `SegmentCache` takes the call. False when that module has no such function."""
    attn = getattr(model.layers[0], "self_attn", None) if hasattr(model, "layers") else None
    module = sys.modules.get(type(attn).__module__) if attn is not None else None
    original = getattr(module, "scaled_dot_product_attention", None)
    if original is None:
        return False
    if getattr(original, "_tuneline_segments", False):
        return True

    def sdpa(queries, keys, values, cache, scale, mask, sinks=None, **kw):
        if isinstance(cache, SegmentCache):
            return cache.attend(queries, keys, values, scale, sinks)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks,
                        **kw)

    sdpa._tuneline_segments = True  # type: ignore[attr-defined]
    module.scaled_dot_product_attention = sdpa
    return True


def segmented_loss(model: Any, tokens: Any, mask: Any, segs: Any, inverse: Any, *rest: Any):
    """`packing.packed_loss` with attention through `SegmentCache`: the same (loss, n_tokens).
    rest: the (slots, W) gathers, then a data-parallel rank's denominator (a scalar) if any."""

    gathers = [r for r in rest if r.ndim == 2]
    denominator = next((r for r in rest if r.ndim == 0), None)
    caches = [SegmentCache(inverse, gathers) for _ in model.layers]
    logits = model(tokens[:, :-1], cache=caches)
    if not all(c.attended for c in caches):
        raise packing.PackingError(
            f"params.yaml:train.pack: {type(model).__module__} does not call mlx-lm's "
            "scaled_dot_product_attention, so packed rows would see each other; set "
            "train.pack: false")
    return packing.row_loss(logits, tokens, mask, segs, denominator)


class BiasMask(packing.SegmentMask):
    """`packing.SegmentMask` answering with one additive mask in the model's dtype, made once
    per forward pass: the fused kernel takes it as is (a boolean one is converted per layer)."""

    def __init__(self, segs: Any, dtype: Any, shared: dict):
        super().__init__(segs)
        self.dtype, self.shared = dtype, shared

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        import mlx.core as mx

        if "mask" not in self.shared:
            allowed = super().make_mask(n, return_array, window_size)
            self.shared["mask"] = mx.where(allowed, mx.array(0, self.dtype),
                                           mx.array(-float("inf"), self.dtype))
        self.asked = True
        return self.shared["mask"]


def compute_dtype(model: Any) -> Any:
    """The dtype of the model's floating-point parameters (scales of a quantized model too)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    for _, p in tree_flatten(model.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            return p.dtype
    return mx.float32


def bias_loss(model: Any, tokens: Any, mask: Any, segs: Any, denominator: Any = None):
    """`packing.packed_loss` with one additive bf16/f32 mask for all layers."""

    inputs, in_segs = tokens[:, :-1], segs[:, :-1]
    shared: dict = {}
    caches = [BiasMask(in_segs, compute_dtype(model), shared) for _ in model.layers]
    logits = model(inputs, cache=caches)
    if not any(c.asked for c in caches):
        raise packing.PackingError(f"params.yaml:train.pack: {type(model).__module__} takes no "
                                   "attention mask from its cache; set train.pack: false")
    return packing.row_loss(logits, tokens, mask, segs, denominator)


def choose(model: Any, mode: str | None = None
           ) -> tuple[Callable[..., Any], Callable[[Callable[..., Iterator[Any]]], Any], str]:
    """(loss, wrapper for a packed batch iterator, mode used) for packed training of `model`;
    `segments` falls back to `mask` when `install` cannot reach the model's attention."""
    mode = mode or DEFAULT_MODE
    if mode not in MODES:
        raise ValueError(f"packed attention mode {mode!r}: one of {MODES}")
    if mode == "segments" and install(model):
        return segmented_loss, with_plan, mode
    if mode == "bias":
        return bias_loss, (lambda iterate: iterate), mode
    return packing.packed_loss, (lambda iterate: iterate), "mask"
