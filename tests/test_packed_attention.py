"""Packed attention on the fused kernel (pipeline/training/attention.py) has the reference's
mathematics: the same loss and the same gradients as the block-diagonal mask and as padded
batches, on a tiny llama built in code (CPU, float32)."""

from __future__ import annotations

import types

import numpy as np
import pytest

# The same rows, padded batch and packed layout as the packing tests.
from test_packing import packed, padded, rows

from pipeline.training import attention, packing
from pipeline.training import model as mlx_model


@pytest.fixture()
def loaded(tiny_model_dir):
    from mlx_lm import load

    return load(str(tiny_model_dir))


def grads(model, loss_fn, *batch):
    """(loss, every parameter's gradient flattened) of loss_fn on the batch, all unfrozen."""
    from mlx import nn
    from mlx.utils import tree_flatten

    model.unfreeze()
    value, g = nn.value_and_grad(model, lambda m, *b: loss_fn(m, *b)[0])(model, *batch)
    return value.item(), {k: np.array(v) for k, v in tree_flatten(g)}


def assert_same_grads(a: dict, b: dict, rel: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    scale = max(float(np.abs(v).max()) for v in a.values())
    assert scale > 0
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst <= rel * scale, f"largest gradient difference {worst:.3g} (scale {scale:.3g})"


def segmented_batch(model, encoded, width, n_seqs):
    import mlx.core as mx

    assert attention.install(model)
    tokens, mask, segs = packed(encoded, width, n_seqs)
    inverse, gathers = attention.plan(np.array(segs)[:, :-1], {})
    return tokens, mask, segs, mx.array(inverse), *map(mx.array, gathers)


@pytest.mark.parametrize("n_seqs", [1, 4])
def test_segment_and_bias_attention_give_the_mask_paths_gradients_and_padded_ones(loaded, n_seqs):
    model, tok = loaded
    encoded = rows(tok)
    # all rows in one sequence; or two or three rows a sequence, one sequence left empty
    width = sum(len(t) for t, _ in encoded) // (1 if n_seqs == 1 else 2) + 8
    ref_loss, ref = grads(model, packing.packed_loss, *packed(encoded, width, n_seqs))
    pad_loss, pad = grads(model, mlx_model.masked_loss, *padded(encoded))
    seg_loss, seg = grads(model, attention.segmented_loss,
                          *segmented_batch(model, encoded, width, n_seqs))
    bias_loss, bias = grads(model, attention.bias_loss, *packed(encoded, width, n_seqs))
    assert seg_loss == pytest.approx(ref_loss, rel=1e-5)
    assert bias_loss == pytest.approx(ref_loss, rel=1e-5)
    assert pad_loss == pytest.approx(ref_loss, rel=1e-5)
    assert_same_grads(ref, seg)
    assert_same_grads(ref, bias)
    assert_same_grads(pad, seg)


def test_rows_do_not_see_each_other_through_segment_attention(loaded):
    """Another row in the same sequence changes neither a row's loss nor its token count."""
    model, tok = loaded
    encoded = rows(tok)
    width = sum(len(t) for t, _ in encoded) + 8
    _, n = attention.segmented_loss(model, *segmented_batch(model, encoded, width, 1))
    # the same rows, the first one replaced by a row of other tokens of the same length
    t0, m0 = encoded[0]
    changed = [([(x + 7) % 300 + 1 for x in t0], [0] * len(m0)), *encoded[1:]]
    alone, n_alone = attention.segmented_loss(model, *segmented_batch(model, encoded[1:], width, 1))
    other, n_other = attention.segmented_loss(model, *segmented_batch(model, changed, width, 1))
    assert int(n_other.item()) == int(n_alone.item()) < int(n.item())
    assert other.item() == pytest.approx(alone.item(), rel=1e-5)


def test_segment_loss_divides_by_a_given_denominator(loaded):
    import mlx.core as mx

    model, tok = loaded
    encoded = rows(tok)
    batch = segmented_batch(model, encoded, sum(len(t) for t, _ in encoded) // 2 + 8, 4)
    mean, n = attention.segmented_loss(model, *batch)
    share = attention.segmented_loss(model, *batch, mx.array(2.0 * int(n.item())))[0]
    assert share.item() == pytest.approx(mean.item() / 2, rel=1e-5)


def test_plan_sends_every_row_position_to_its_own_slot_and_back():
    segs = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1] * 5 + [2] * 3], np.int32)
    capacity: dict[int, int] = {}
    inverse, gathers = attention.plan(segs, capacity)
    assert [g.shape for g in gathers] == [(6, 128)]  # 5 rows of <= 128 tokens: 6 slots
    slots = np.concatenate([g.reshape(-1) for g in gathers] + [np.array([-1])])
    flat = np.arange(segs.size).reshape(segs.shape)
    real = segs > 0
    assert (slots[inverse[real]] == flat[real]).all()  # each position reads its own output
    assert (slots[inverse[~real]] == -1).all()  # padding reads the zero row
    # a slot holds one row only: its first len(row) entries are that row's positions, in order
    for g in gathers:
        for slot in g:
            seg_ids = segs.reshape(-1)[slot]
            assert len(set(seg_ids[: np.argmax(np.diff(slot) != 1) + 1])) == 1


def test_slot_capacity_only_grows_along_a_ladder():
    capacity: dict[int, int] = {}
    segs = np.repeat(np.arange(1, 6), 200)[None].astype(np.int32)  # 5 rows of 200 tokens
    attention.plan(segs, capacity)
    assert capacity == {256: 6}  # 5 rounded up the ladder
    attention.plan(np.ones((1, 300), np.int32), capacity)  # one row, another width
    assert capacity == {256: 6, 384: 1}
    inverse, gathers = attention.plan(np.pad(segs[:, :400], ((0, 0), (0, 8))), capacity)  # 2 rows
    assert [g.shape for g in gathers] == [(6, 256), (1, 384)]  # shapes kept
    assert inverse.max() == 6 * 256 + 384  # the zero row after all slots


def test_with_plan_adds_inverse_and_gathers_before_the_denominator():
    import mlx.core as mx

    def iterate(*_, **__):
        segs = np.array([[1, 1, 2, 2, 0]], np.int32)
        yield mx.zeros((1, 5)), mx.zeros((1, 5)), mx.array(segs), mx.array(3.0)

    batch = next(attention.with_plan(iterate)(None, 1, 512))
    assert [a.ndim for a in batch] == [2, 2, 2, 2, 2, 0]
    assert batch[4].shape == (2, 128)


def test_a_model_without_mlx_lm_attention_function_trains_on_the_mask():
    model = types.SimpleNamespace(layers=[types.SimpleNamespace(self_attn=object())])
    loss, wrap, mode = attention.choose(model)
    assert (loss, mode) == (packing.packed_loss, "mask")
    assert wrap(iter) is iter
    with pytest.raises(ValueError, match="packed attention mode"):
        attention.choose(model, "flash")
