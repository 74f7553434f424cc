"""Sequence packing has the mathematics of padded batches (tiny llama built in code, CPU)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from test_train import make_paths, params_train

from pipeline import evaluate as ev
from pipeline import train
from pipeline.training import model as mlx_model
from pipeline.training import packing

QUESTIONS = ["How do I vacuum table t?", "Where are the logs",
             "Which index fits a LIKE 'x%' query on a text column in PostgreSQL?", "Why?",
             "List the roles and their grants."]


def rows(tok, mask_prompt=True):
    """Rows of clearly different lengths, one of them two turns long."""
    out = []
    for i, q in enumerate(QUESTIONS):
        msgs = [{"role": "user", "content": q},
                {"role": "assistant", "content": "Use VACUUM ANALYZE on it. " * (1 + 2 * i)}]
        if i == 2:
            msgs += [{"role": "user", "content": "And then?"},
                     {"role": "assistant", "content": "Check pg_stat_user_tables."}]
        out.append(mlx_model.encode_chat(tok, msgs, mask_prompt))
    return out


def padded(encoded):
    import mlx.core as mx

    width = max(len(t) for t, _ in encoded)
    tokens = np.zeros((len(encoded), width), np.int32)
    mask = np.zeros((len(encoded), width), np.float32)
    for r, (t, m) in enumerate(encoded):
        tokens[r, : len(t)], mask[r, : len(t)] = t, m
    return mx.array(tokens), mx.array(mask)


def packed(encoded, width, n_seqs):
    import mlx.core as mx

    lengths = [len(t) for t, _ in encoded]
    groups = packing.bins(lengths, width + 1)
    assert len(groups) <= n_seqs
    return tuple(mx.array(a) for a in packing.layout(encoded, groups, width, n_seqs, 10_000))


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from mlx_lm import load

    return load(str(tiny_model_dir))


@pytest.mark.parametrize("mask_prompt", [True, False])
def test_packed_loss_equals_padded_loss_on_the_same_rows(loaded, mask_prompt):
    model, tok = loaded
    encoded = rows(tok, mask_prompt)
    loss, n = mlx_model.masked_loss(model, *padded(encoded))
    width = sum(len(t) for t, _ in encoded) // 2 + 8  # two or three rows share a sequence
    p_loss, p_n = packing.packed_loss(model, *packed(encoded, width, 4))
    assert int(p_n.item()) == int(n.item()) > 0
    assert p_loss.item() == pytest.approx(loss.item(), rel=1e-5)


def test_rows_in_one_sequence_do_not_see_each_other(loaded):
    """Changing one row changes no other row's loss: attention stops at the row boundary."""
    model, tok = loaded
    encoded = rows(tok)
    width = sum(len(t) for t, _ in encoded) + 8  # all rows in one sequence
    first, second = encoded[0], encoded[1:]
    loss, n = packing.packed_loss(model, *packed(encoded, width, 1))
    alone, n_alone = packing.packed_loss(model, *packed(second, width, 1))
    one, n_one = packing.packed_loss(model, *packed([first], width, 1))
    total = loss.item() * n.item()
    assert total == pytest.approx(alone.item() * n_alone.item() + one.item() * n_one.item(),
                                  rel=1e-5)
    changed = [([(t * 7 + 3) % 256 if m else t for t, m in zip(*first)], first[1])] + second
    c_loss, _ = packing.packed_loss(model, *packed(changed, width, 1))
    assert c_loss.item() != pytest.approx(loss.item(), rel=1e-6)  # the change is seen...
    c_rest = c_loss.item() * n.item() - one_changed(model, changed[0], width)
    assert c_rest == pytest.approx(alone.item() * n_alone.item(), rel=1e-5)  # ...only by itself


def one_changed(model, row, width):
    loss, n = packing.packed_loss(model, *packed([row], width, 1))
    return loss.item() * n.item()


def test_packed_training_steps_give_the_padded_adapter(tiny_model_dir):
    import mlx.core as mx
    from mlx import nn
    from mlx.utils import tree_flatten
    from mlx_lm import load

    cfg = params_train()
    adapters = []
    for pack in (False, True):
        model, tok = load(str(tiny_model_dir))
        mx.random.seed(0)
        train.apply_adapters(model, cfg)
        opt = train.build_optimizer(cfg, 3, 0)
        encoded = rows(tok)
        step_rows = [encoded[:3], encoded[3:], encoded]
        loss_fn = packing.packed_loss if pack else mlx_model.masked_loss
        grad = nn.value_and_grad(model, loss_fn)
        for group in step_rows:
            batch = packed(group, 256, 3) if pack else padded(group)
            _, g = grad(model, *batch)
            opt.update(model, g)
            mx.eval(model.parameters(), opt.state)
        adapters.append(dict(tree_flatten(model.trainable_parameters())))
    assert adapters[0].keys() == adapters[1].keys() and adapters[0]
    for name, w in adapters[0].items():
        a, b = np.array(w), np.array(adapters[1][name])
        # Within 5% of one Adam step (lr): float32 on CPU agrees far closer; on an H200 (CUDA
        # matmuls) the largest difference was 3.8e-4 at lr 1e-2. A row seeing another row's
        # tokens changes the gradients outright and the updates by about one step.
        assert np.allclose(a, b, rtol=0.0, atol=0.05 * cfg.learning_rate), (
            f"{name}: max |diff| {np.abs(a - b).max():.2e}, max |w| {np.abs(a).max():.2e}")


def test_every_row_is_packed_once_per_pass_within_the_width(loaded):
    _, tok = loaded
    encoded = rows(tok) * 3
    it = packing.batch_iterator(0, 256, 512)(encoded, 4, 256)  # one pass, as evaluation
    seen: dict[tuple, int] = {}
    for tokens, _, segs in it:
        assert tokens.shape == (2, 257)
        for t, s in zip(np.array(tokens), np.array(segs)):
            for k in set(s.tolist()) - {0}:
                key = tuple(t[s == k].tolist())
                seen[key] = seen.get(key, 0) + 1
    assert seen == {tuple(t): 3 for t, _ in rows(tok)}  # each copy of each row, once


def test_train_stage_packed_lowers_validation_loss_with_epochs_from_the_layout(
        tiny_model_dir, loaded, tmp_path):
    cfg = dataclasses.replace(params_train(), pack=True, pack_width=128, tokens_per_step=256,
                              max_seq_length=128, epochs=3.0, warmup=1)
    paths = make_paths(tmp_path, tiny_model_dir)
    result = train.run(cfg, dataclasses.replace(paths, checkpoints=tmp_path / "ckpt"), seed=0)
    curve = paths.curve.read_text().splitlines()
    first_val = float(curve[1].split("\t")[2])
    assert result.val_loss < first_val
    _, tok = loaded
    encoded = train.load_split(paths.data / "train.jsonl", tok, True)
    per_epoch = packing.steps_per_epoch(encoded, 128, 2, cfg.max_seq_length)
    assert result.iters == math.ceil(3.0 * per_epoch) and result.trained_tokens > 0


@pytest.mark.parametrize("change, message", [
    ({"tokens_per_step": 300}, "multiple of pack_width"),
    ({"pack_width": 64, "max_seq_length": 512}, "shorter than max_seq_length"),
])
def test_packing_settings_that_cannot_work_fail_with_the_key(tiny_model_dir, tmp_path, change,
                                                            message):
    cfg = dataclasses.replace(params_train(), **{"pack": True, "pack_width": 128,
                                                 "tokens_per_step": 256, "max_seq_length": 128,
                                                 **change})
    with pytest.raises(packing.PackingError, match=message):
        paths = make_paths(tmp_path, tiny_model_dir)
        train.run(cfg, dataclasses.replace(paths, checkpoints=tmp_path / "ckpt"), seed=0)


def test_evaluate_scores_the_same_loss_packed(loaded):
    model, tok = loaded
    encoded = rows(tok)
    plain, n_plain = ev.test_loss(model, encoded, 2, 512)
    pack, n_pack = ev.test_loss(model, encoded, 2, 512, pack_width=512)
    assert n_pack == n_plain
    assert pack == pytest.approx(plain, rel=1e-4)
