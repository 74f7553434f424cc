"""DPO and ORPO on a tiny llama built in code: the losses against a hand computation in float64
numpy, their gradients against finite differences, batching across ranks, the reference cache."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.rows.pairs import Pair
from pipeline.training import preference

PAIRS = [
    Pair("p1", ({"role": "user", "content": "How do I create an index?"},),
         "Use CREATE INDEX name ON table (column);", "You cannot.", "correction"),
    Pair("p2", ({"role": "user", "content": "Where do I find the logs?"},
                {"role": "assistant", "content": "In log/."},
                {"role": "user", "content": "Which folder?"}),
         "They live in the data directory under log/.", "Somewhere.", "correction"),
    Pair("p3", ({"role": "system", "content": "you are a helpful assistant"},
                {"role": "user", "content": "What does VACUUM do?"}),
         "VACUUM reclaims storage.", "It collects statistics for the query planner.",
         "correction"),
]
REFS = [(-30.5, -12.25), (-41.0, -20.0), (-18.0, -33.5)]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from pipeline.training import model as mlx_model

    model, tokenizer = mlx_model.load(tiny_model_dir)
    rows = [preference.PairRow(r.id, r.chosen, r.rejected, ref)
            for r, ref in zip(preference.encode_pairs(tokenizer, PAIRS), REFS)]
    return model, tokenizer, rows


def batch(rows, scale=None):
    import mlx.core as mx

    tokens, mask, ref = preference.layout(rows, 512)
    counts = [float(sum(r.chosen[1][1:])) for r in rows]
    scale = scale or [len(rows), sum(counts)]
    return (mx.array(tokens), mx.array(mask), mx.array(ref), mx.ones(len(rows)),
            mx.array(np.array(scale, np.float32)))


def hand_logps(model, rows):
    """Summed log-probabilities of each side's answer tokens, in float64 numpy, token by token."""
    import mlx.core as mx

    out = []
    for side in ("chosen", "rejected"):
        for r in rows:
            tokens, mask = getattr(r, side)
            logits = np.array(model(mx.array([tokens[:-1]]))[0].astype(mx.float32), np.float64)
            total, n = 0.0, 0
            for t in range(1, len(tokens)):
                if mask[t]:
                    row = logits[t - 1]
                    lse = row.max() + math.log(np.exp(row - row.max()).sum())
                    total += row[tokens[t]] - lse
                    n += 1
            out.append((total, n))
    b = len(rows)
    return out[:b], out[b:]


def test_the_answer_mask_covers_only_the_last_answer(tiny):
    _, tokenizer, rows = tiny
    tokens, mask = rows[1].chosen
    marked = tokenizer.decode([t for t, m in zip(tokens, mask) if m])
    assert marked.startswith("They live in the data directory") and "In log/." not in marked


def test_dpo_loss_equals_the_hand_computation(tiny):
    model, _, rows = tiny
    beta = 0.1
    loss, n = preference.make_loss("dpo", beta)(model, *batch(rows))
    chosen, rejected = hand_logps(model, rows)
    per = [math.log1p(math.exp(-beta * ((c - rc) - (r - rr))))
           for (c, _), (r, _), (rc, rr) in zip(chosen, rejected, REFS)]
    assert int(n.item()) == 3
    assert loss.item() == pytest.approx(sum(per) / 3, rel=1e-5)


def test_orpo_loss_equals_the_hand_computation(tiny):
    model, _, rows = tiny
    beta = 0.25
    loss, _ = preference.make_loss("orpo", beta)(model, *batch(rows))
    chosen, rejected = hand_logps(model, rows)

    def log_odds(mean):
        return mean - math.log1p(-math.exp(mean))

    nll = -sum(c for c, _ in chosen) / sum(k for _, k in chosen)
    ratio = [log_odds(c / kc) - log_odds(r / kr) for (c, kc), (r, kr) in zip(chosen, rejected)]
    odds_term = sum(math.log1p(math.exp(-x)) for x in ratio) / 3
    assert loss.item() == pytest.approx(nll + beta * odds_term, rel=1e-5)


def test_dpo_loss_is_log_two_when_the_policy_is_the_reference(tiny):
    model, _, rows = tiny
    refs = preference.score(model, rows, 2, 512)
    same = [preference.PairRow(r.id, r.chosen, r.rejected, ref) for r, ref in zip(rows, refs)]
    loss, _ = preference.make_loss("dpo", 0.5)(model, *batch(same))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)


def lora_model(model_dir, seed=0):
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(str(model_dir))
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0})
    rng = np.random.default_rng(seed)  # lora_b is zero at first: give it a gradient to move
    weights = [(k, mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32)))
               for k, v in tree_flatten(model.trainable_parameters())]
    model.update(tree_unflatten(weights))
    model.eval()
    return model


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_gradients_match_finite_differences(tiny, tiny_model_dir, objective):
    import mlx.core as mx
    from mlx import nn
    from mlx.utils import tree_flatten, tree_unflatten

    _, _, rows = tiny
    model = lora_model(tiny_model_dir)
    loss_fn = preference.make_loss(objective, 0.5)
    args = batch(rows)
    value_and_grad = nn.value_and_grad(model, loss_fn)
    (_, _), grads = value_and_grad(model, *args)
    theta = tree_flatten(model.trainable_parameters())
    grad = dict(tree_flatten(grads))
    rng = np.random.default_rng(1)
    for _ in range(3):
        direction = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in theta}
        analytic = sum(float((np.array(grad[k]) * direction[k]).sum()) for k, _ in theta)
        eps = 1.0e-3

        def at(sign, direction=direction, eps=eps):
            model.update(tree_unflatten([(k, v + sign * eps * mx.array(direction[k]))
                                         for k, v in theta]))
            value = loss_fn(model, *args)[0].item()
            model.update(tree_unflatten(theta))
            return value

        numeric = (at(1) - at(-1)) / (2 * eps)
        assert abs(analytic) > 1.0e-2  # a direction the loss really moves in
        assert numeric == pytest.approx(analytic, rel=2e-2, abs=1e-3), (numeric, analytic)


def test_ranks_together_give_the_one_process_loss(tiny):
    """Two ranks, each with its pairs of the step and the step's shares as divisors: the sum
    of their losses / 2 (what averaging gradients does to them) is the one-process loss."""
    model, _, rows = tiny

    class Rank:
        def __init__(self, rank):
            self.r = rank

        def rank(self):
            return self.r

        def size(self):
            return 2

    rows4 = rows + rows[:1]
    for objective in ("dpo", "orpo"):
        loss = preference.make_loss(objective, 0.3)
        [one] = list(preference.batch_iterator(0)(rows4, 4, 512, loop=False))
        whole = loss(model, *one)[0].item()
        parts = []
        for rank in (0, 1):
            step = next(preference.batch_iterator(0)(rows4, 4, 512, loop=True,
                                                     comm_group=Rank(rank)))
            parts.append(loss(model, *step)[0].item())
        assert sum(parts) / 2 == pytest.approx(whole, rel=1e-5), objective


def test_validation_batches_score_every_pair_once(tiny):
    _, _, rows = tiny
    batches = list(preference.batch_iterator(0)(rows, 2, 512, loop=False))
    assert [int(b[3].sum().item()) for b in batches] == [2, 1]


def test_reference_log_probs_are_cached_per_row(tiny, tmp_path):
    model, _, rows = tiny
    first = preference.with_reference(model, rows[:2], 2, 512, "m" * 64, tmp_path)
    calls = []
    real = preference.score

    def counting(model, todo, *a):
        calls.append(len(todo))
        return real(model, todo, *a)

    preference.score = counting
    try:
        again = preference.with_reference(model, rows, 2, 512, "m" * 64, tmp_path)
    finally:
        preference.score = real
    assert calls == [1]  # only the new row was scored
    assert [r.ref for r in again[:2]] == [r.ref for r in first]
    assert again[2].ref == pytest.approx(real(model, rows[2:], 1, 512)[0], rel=1e-6)


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_packed_pairs_give_the_padded_loss_and_gradient(tiny, tiny_model_dir, objective):
    """Both sides of each pair in one packed sequence, attention kept inside each side: the
    loss and its gradient are those of padded batches of the same pairs."""
    from mlx import nn
    from mlx.utils import tree_flatten

    from pipeline.training import preference_packing as packed

    _, _, rows = tiny
    model = lora_model(tiny_model_dir)
    padded = preference.make_loss(objective, 0.5)
    [one] = list(preference.batch_iterator(0)(rows, 4, 64, loop=False))
    steps = list(packed.batch_iterator(0, 128, 128 * 4)(rows, 4, 64, loop=False))
    assert len(steps) == 1 and steps[0][0].shape == (4, 129)  # one shape: 4 x (128 + 1)
    loss_a, grad_a = nn.value_and_grad(model, padded)(model, *one)
    loss_b, grad_b = nn.value_and_grad(model, packed.make_loss(objective, 0.5))(model, *steps[0])
    assert loss_b[0].item() == pytest.approx(loss_a[0].item(), rel=1e-5)
    assert int(loss_b[1].item()) == 3
    ga, gb = dict(tree_flatten(grad_a)), dict(tree_flatten(grad_b))
    for k, value in ga.items():
        assert np.allclose(np.array(value), np.array(gb[k]), rtol=1e-3, atol=1e-6), k


def test_a_pack_too_narrow_for_both_sides_names_the_key():
    from pipeline.training import preference_packing as packed

    with pytest.raises(preference.PreferenceError, match="pack_width: 100"):
        packed.check(100, 64)
