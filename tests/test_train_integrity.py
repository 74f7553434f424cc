"""What a train run is made of: which base its checkpoints belong to, every row each epoch,
resumes that equal uninterrupted runs under gradient accumulation, and splits that cannot train.
Real mlx-lm training on the tiny llama built in code (tests/tiny.py)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from killing import kill_at
from test_train import KILLED_TRAIN, ROWS, crash_after, make_paths, params_train
from tiny import make_tiny_llama

from pipeline import train

# --- which base a checkpoint belongs to ------------------------------------------------------


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """A second tiny llama with the same config.json and tokenizer, other weights."""
    return make_tiny_llama(tmp_path_factory.mktemp("other") / "model", seed=1)


def test_run_key_tells_bases_with_the_same_config_apart(tiny_model_dir, other_base, tmp_path):
    assert (other_base / "config.json").read_bytes() == (tiny_model_dir / "config.json").read_bytes()
    paths = make_paths(tmp_path, tiny_model_dir)
    key = train.run_key(params_train(), 0, paths)
    assert train.run_key(params_train(), 0, replace(paths, model=other_base)) != key
    # the tokenizer counts too: same weights and config, one tokenizer file changed
    retokenized = tmp_path / "retokenized"
    shutil.copytree(tiny_model_dir, retokenized)
    config = json.loads((retokenized / "tokenizer_config.json").read_text())
    (retokenized / "tokenizer_config.json").write_text(json.dumps({**config, "x": 1}))
    assert train.run_key(params_train(), 0, replace(paths, model=retokenized)) != key
    # a byte-identical copy elsewhere is the same base: its checkpoints are reused
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert train.run_key(params_train(), 0, replace(paths, model=copy)) == key


def test_file_hashes_are_memoised_by_size_and_mtime(tiny_model_dir, tmp_path):
    from pipeline.training import checkpoints

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    memo = tmp_path / "memo.json"
    first = checkpoints.folder_hashes(base, memo)
    assert set(first) >= {"model.safetensors", "config.json", "tokenizer.json"}
    # A memo entry is used while the file's size, mtime and inode are unchanged: prove it by
    # planting a wrong hash for the unchanged file; a rewritten file is hashed again.
    recorded = json.loads(memo.read_text())
    [weights_key] = [k for k in recorded if "model.safetensors|" in k]
    memo.write_text(json.dumps({**recorded, weights_key: "planted"}))
    assert checkpoints.folder_hashes(base, memo)["model.safetensors"] == "planted"
    data = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").unlink()
    (base / "model.safetensors").write_bytes(data)  # a new inode and mtime, same bytes
    assert checkpoints.folder_hashes(base, memo) == first


def test_checkpoints_of_another_base_are_not_resumed(tiny_model_dir, other_base, tmp_path,
                                                    monkeypatch):
    ckpts = tmp_path / "ckpt"
    paths = replace(make_paths(tmp_path, tiny_model_dir), checkpoints=ckpts)
    resume = crash_after(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        train.run(params_train(), paths, seed=0)
    resume()
    result = train.run(params_train(), replace(paths, model=other_base), seed=0)
    assert result.resumed_from == 0  # base A's step-4 checkpoint is not base B's


# --- resume under gradient accumulation --------------------------------------------------------


def test_checkpoints_fall_on_accumulation_boundaries():
    from pipeline.training import checkpoints

    due = [s for s in range(1, 13) if checkpoints.save_due(s, 3, 2)]
    assert due == [4, 6, 10, 12]  # after 3, 6, 9, 12 batches, on whole optimizer steps
    assert [s for s in range(1, 13) if checkpoints.save_due(s, 4, 1)] == [4, 8, 12]
    assert [s for s in range(1, 7) if checkpoints.save_due(s, 1, 3)] == [3, 6]


@pytest.mark.slow
def test_sigkill_under_gradient_accumulation_resumes_to_the_uninterrupted_run(tiny_model_dir,
                                                                            tmp_path):
    """save_every 3 with 2 batches per optimizer step: a checkpoint after batch 9 would hold
    half a step whose gradient the resumed run never sees (and mlx-lm would restart its
    accumulation count), so the adapters and the loss curve after the resume would differ."""
    import mlx.core as mx

    extra = {"grad_accumulation_steps": 2, "save_every": 3}
    kill_at(KILLED_TRAIN, str(tmp_path / "killed"), str(tiny_model_dir), json.dumps(extra),
            marker=lambda line: line.startswith("saved "))
    killed = make_paths(tmp_path / "killed", tiny_model_dir)
    cfg = dataclasses.replace(params_train(), **extra)
    result = train.run(cfg, replace(killed, checkpoints=tmp_path / "killed" / "ckpt"), seed=0)
    assert 8 <= result.resumed_from < 12
    clean = make_paths(tmp_path / "clean", tiny_model_dir)
    expected = train.run(cfg, replace(clean, checkpoints=tmp_path / "c2"), seed=0)
    assert result.adapter_sha256 == expected.adapter_sha256
    a = mx.load(str(killed.adapters / "adapters.safetensors"))
    b = mx.load(str(clean.adapters / "adapters.safetensors"))
    assert all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in b)
    assert train_losses(killed.curve) == train_losses(clean.curve)  # 5 decimals, steps 2..12
    assert len(train_losses(clean.curve)) == 6


def train_losses(curve):
    rows = [line.split("\t") for line in curve.read_text().splitlines()[1:]]
    return [(int(step), float(loss)) for step, loss, _ in rows]


# --- every row, every epoch --------------------------------------------------------------------


class Group:
    """What the batch iterators read of mlx's distributed group: rank and size."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def distinct_rows(n):
    """Row i: i + 2 tokens, all learned: each row is told apart by its length."""
    return [(list(range(1, i + 3)), [1] * (i + 2)) for i in range(n)]


def rows_seen(batches):
    seen: dict[int, int] = {}
    for tokens, mask, *_ in batches:
        for t, m in zip(np.array(tokens), np.array(mask)):
            if m.any():
                seen[int((t > 0).sum())] = seen.get(int((t > 0).sum()), 0) + 1
    return seen


@pytest.mark.parametrize("ranks", [1, 2])
def test_padded_batches_train_every_row_each_epoch(ranks):
    """10 rows, 4 a batch: the 2 longest rows used to be left out of every epoch."""
    dataset = distinct_rows(10)
    every_row_once = {i + 2: 1 for i in range(10)}
    per_epoch = train.total_iters(dataclasses.replace(params_train(), epochs=1.0, batch_size=4),
                                  len(dataset))
    assert per_epoch == 3
    evaluation, epoch = {}, {}
    for rank in range(ranks):
        group = Group(rank, ranks) if ranks > 1 else None
        for size, n in rows_seen(train.batch_iterator(0)(dataset, 4, 64,
                                                         comm_group=group)).items():
            evaluation[size] = evaluation.get(size, 0) + n
        looped = train.batch_iterator(0)(dataset, 4, 64, loop=True, comm_group=group)
        for size, n in rows_seen(next(looped) for _ in range(per_epoch)).items():
            epoch[size] = epoch.get(size, 0) + n
    assert evaluation == every_row_once
    assert epoch == every_row_once


def test_one_epoch_trains_on_every_target_token(tiny_model_dir, tmp_path):
    """8 rows, 3 a batch: 3 steps, the last of 2 rows; trained_tokens counts every target."""
    from pipeline.training import model as mlx_model

    paths = make_paths(tmp_path, tiny_model_dir)
    cfg = dataclasses.replace(params_train(), epochs=1.0, batch_size=3, warmup=1,
                              steps_per_report=1, steps_per_eval=3)
    result = train.run(cfg, replace(paths, checkpoints=tmp_path / "ckpt"), seed=0)
    _, tok = mlx_model.load(tiny_model_dir)
    encoded = train.load_split(paths.data / "train.jsonl", tok, True)
    assert result.iters == 3
    assert result.trained_tokens == sum(sum(m[1:]) for _, m in encoded)


# --- splits that cannot train --------------------------------------------------------------------

PACKED = {"pack": True, "pack_width": 128, "tokens_per_step": 256, "max_seq_length": 128}


@pytest.mark.parametrize("split", ["train", "valid"])
@pytest.mark.parametrize("extra", [PACKED, {}], ids=["packed", "padded"])
def test_an_empty_split_fails_with_its_file(tiny_model_dir, tmp_path, split, extra):
    """Packed, an empty train split divided by zero and an empty valid split gave a NaN
    validation loss (padded batches stopped at batch_size, with a message about batch_size)."""
    paths = make_paths(tmp_path, tiny_model_dir)
    (paths.data / f"{split}.jsonl").write_text("")
    cfg = dataclasses.replace(params_train(), **extra)
    with pytest.raises(train.TrainError, match=f"{split}.jsonl has no rows"):
        train.run(cfg, replace(paths, checkpoints=tmp_path / "ckpt"), seed=0)


def test_a_valid_split_without_assistant_tokens_fails_before_a_nan_loss(tiny_model_dir,
                                                                        tmp_path):
    paths = make_paths(tmp_path, tiny_model_dir)
    rows = [{**r, "messages": r["messages"][:1]} for r in ROWS[8:]]  # questions only
    (paths.data / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(train.TrainError, match="no row has an assistant token"):
        train.run(dataclasses.replace(params_train(), **PACKED),
                  replace(paths, checkpoints=tmp_path / "ckpt"), seed=0)
