"""Sequence packing has the mathematics of padded batches (tiny llama built in code, CPU)."""

from __future__ import annotations

import dataclasses
import math

import gradients
import numpy as np
import pytest
from test_train import make_paths, params_train

from pipeline import evaluate as ev
from pipeline import train
from pipeline.training import batches, packing
from pipeline.training import model as mlx_model

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


def packed_rows(tokens, segs, by_tokens):
    """The rows a packed step holds, read back from its segments."""
    out = []
    for t, s in zip(np.array(tokens), np.array(segs)):
        for k in sorted(set(s.tolist()) - {0}):
            out.append(by_tokens[tuple(t[s == k].tolist())])
    return out


def test_stage_packed_steps_give_the_padded_gradients_and_loss_curve(tiny_model_dir):
    """The stage's own packed iterator (packing.batch_iterator) against padded batches of the
    same rows (batches.padded_arrays), both trained with SGD: at every step the targets counted,
    the loss and the gradient before the optimizer agree, and so do the weights after.

    Adam-trained weights could not show a constant gradient-scale error (Adam divides by the
    gradient's own size); gradients and SGD can: the check is asserted to fail on the padded
    gradient scaled by 1.01.
    """
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx import nn
    from mlx.utils import tree_flatten
    from mlx_lm import load

    cfg = params_train()
    trainers = {}
    for pack in (False, True):
        model, tok = load(str(tiny_model_dir))
        mx.random.seed(0)
        train.apply_adapters(model, cfg)
        loss_fn = packing.packed_loss if pack else mlx_model.masked_loss
        trainers[pack] = (model, optim.SGD(learning_rate=cfg.learning_rate),
                          nn.value_and_grad(model, loss_fn))
    encoded = rows(tok) * 2
    by_tokens = {tuple(t): (t, m) for t, m in encoded}
    steps = packing.batch_iterator(0, 256, 512)(encoded, 4, 256, loop=True)
    curves: dict[bool, list] = {False: [], True: []}
    for _ in range(4):
        tokens, mask, segs = next(steps)
        step_rows = packed_rows(tokens, segs, by_tokens)
        width = max(len(t) for t, _ in step_rows)
        padded_batch = tuple(mx.array(a) for a in batches.padded_arrays(step_rows, width))
        grads = {}
        for pack, batch in ((False, padded_batch), (True, (tokens, mask, segs))):
            model, opt, grad = trainers[pack]
            (loss, n), g = grad(model, *batch)
            curves[pack].append((loss.item(), int(n.item())))
            grads[pack] = {k: np.array(v) for k, v in tree_flatten(g)}
            opt.update(model, g)
            mx.eval(model.parameters(), opt.state)
        assert curves[True][-1][1] == sum(sum(m[1:]) for _, m in step_rows) > 0
        assert gradients.worst(grads[True], grads[False]) <= gradients.REL
        assert gradients.worst(grads[True], gradients.scaled(grads[False], 1.01)) > gradients.REL
    assert [n for _, n in curves[True]] == [n for _, n in curves[False]]
    for (packed_loss, _), (padded_loss, _) in zip(curves[True], curves[False]):
        assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    assert curves[True][-1][0] < curves[True][0][0]  # SGD at lr 1e-2 moved the loss
    weights = [{k: np.array(v) for k, v in tree_flatten(trainers[p][0].trainable_parameters())}
               for p in (True, False)]
    assert gradients.worst(*weights) <= gradients.REL


def quadratic_bins(lengths, capacity, candidates=255):
    """bins() as it was before issue 23 (a scan of every remaining row per sequence): the
    reference for the layout's quality."""
    left = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    size = [min(n, capacity) for n in lengths]
    groups = []
    while left:
        first = left[0]
        room = capacity - size[first]
        cand = [i for i in left[1:] if size[i] <= room][:candidates]
        reach, full = [1], (1 << (room + 1)) - 1
        for i in cand:
            reach.append((reach[-1] | (reach[-1] << size[i])) & full)
        total, chosen = reach[-1].bit_length() - 1, []
        for k in range(len(cand), 0, -1):
            if not (reach[k - 1] >> total) & 1:
                chosen.append(cand[k - 1])
                total -= size[cand[k - 1]]
        groups.append([first, *chosen[::-1]])
        taken = set(groups[-1])
        left = [i for i in left if i not in taken]
    return groups


def check_layout(groups, lengths, capacity):
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # each row once
    assert all(sum(min(lengths[i], capacity) for i in g) <= capacity for g in groups)


def test_bins_is_a_valid_layout_that_fills_as_well_as_the_quadratic_one():
    rng = np.random.default_rng(0)
    for lengths in (rng.integers(158, 485, 2000).tolist(),  # the shipped rows' range
                    np.minimum(rng.lognormal(5.3, 0.6, 2000), 1500).astype(int).tolist()):
        groups = packing.bins(lengths, 1025)
        check_layout(groups, lengths, 1025)
        before = quadratic_bins(lengths, 1025)
        assert len(groups) <= len(before)  # fill = tokens / (groups x capacity)
        assert groups == before  # same choice, row by row: the speed-up changed no layout


def test_bins_gives_the_quadratic_layout_on_awkward_lengths():
    """Empty rows, rows longer than a sequence, ties, a tiny candidate window."""
    rng = np.random.default_rng(1)
    for trial in range(200):
        capacity = int(rng.integers(1, 60))
        lengths = rng.integers(0, capacity + 8, int(rng.integers(0, 40))).tolist()
        candidates = int(rng.choice([1, 3, 255]))
        groups = packing.bins(lengths, capacity, candidates)
        check_layout(groups, lengths, capacity)
        assert groups == quadratic_bins(lengths, capacity, candidates), (trial, lengths)


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
