"""train.objective dpo | orpo, train.keep and early stopping, on a tiny llama built in code."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import test_train
from killing import kill_at

from pipeline import train
from pipeline.rows import pairs
from pipeline.training import model as mlx_model
from pipeline.training import preference

TOPICS = ["vacuum", "index", "backup", "logs", "users", "tables", "roles", "locks", "views",
          "joins", "types", "dumps", "slots", "stats", "casts", "rules", "hooks", "ports",
          "hosts", "files", "pages", "plans", "scans", "sorts", "dates", "keys", "seqs", "cols"]


def pair(i: int) -> dict:
    # The base model prefers the vague answer on every held-out question (accuracy 0.0: the
    # expert's is 3 tokens longer, so its summed log-probability starts ~25 nats lower).
    return pairs.Pair(f"p{i}", ({"role": "user", "content": f"How do I manage {TOPICS[i]}?"},),
                      "Use VACUUM ANALYZE on it.", "I do not know.", "correction").row()


def make_paths(root: Path, model: Path) -> train.TrainPaths:
    paths = test_train.make_paths(root, model)
    split = {"train": range(16), "valid": range(16, 20), "test": range(20, 28)}
    for name, ids in split.items():
        path = paths.data / "preference" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(pair(i)) + "\n" for i in ids))
    return replace(paths, reference=root / "reference_logps.jsonl",
                   reference_cache=root / "refcache", checkpoints=root / "ckpt",
                   sft_cache=root / "sftcache")


def params(**change) -> train.TrainConfig:
    base = {"objective": "dpo", "beta": 0.1, "learning_rate": 5.0e-3}
    return dataclasses.replace(test_train.params_train(), **{**base, **change})


def held_out_accuracy(model_dir: Path, data: Path, adapters: Path | None) -> float:
    model, tokenizer = mlx_model.load(model_dir)
    if adapters is not None:
        mlx_model.attach_adapters(model, adapters)
    rows = preference.encode_pairs(tokenizer, pairs.read(data / "preference" / "test.jsonl"))
    return preference.accuracy(model, rows, 4, 512)["accuracy"]


PACKED = {"pack": True, "pack_width": 128, "max_seq_length": 64, "tokens_per_step": 256}


@pytest.mark.parametrize("extra", [{}, PACKED], ids=["padded", "packed"])
def test_a_short_dpo_run_raises_held_out_preference_accuracy(tiny_model_dir, tmp_path, extra):
    paths = make_paths(tmp_path, tiny_model_dir)
    result = train.run(params(**extra), paths, seed=0)
    base = held_out_accuracy(tiny_model_dir, paths.data, None)
    tuned = held_out_accuracy(tiny_model_dir, paths.data, paths.adapters)
    assert tuned > base, (base, tuned)
    refs = [json.loads(line) for line in paths.reference.read_text().splitlines()]
    assert len(refs) == 20 and {r["split"] for r in refs} == {"train", "valid"}
    assert np.isfinite(result.val_loss) and result.val_loss < np.log(2)  # below the start


def test_orpo_trains_and_writes_no_reference(tiny_model_dir, tmp_path):
    paths = make_paths(tmp_path, tiny_model_dir)
    result = train.run(params(objective="orpo", iters=4, steps_per_eval=2), paths, seed=0)
    assert np.isfinite(result.val_loss) and paths.reference.read_text() == ""
    config = json.loads((paths.adapters / "adapter_config.json").read_text())
    assert config["tuneline"]["objective"] == "orpo"


def test_sft_writes_an_empty_reference_and_trains_as_before(tiny_model_dir, tmp_path):
    paths = make_paths(tmp_path, tiny_model_dir)
    result = train.run(params(objective="sft", iters=3, steps_per_eval=3), paths, seed=0)
    assert paths.reference.read_text() == "" and result.kept_iteration == 3


def test_too_few_pairs_say_how_to_get_more(tiny_model_dir, tmp_path):
    paths = make_paths(tmp_path, tiny_model_dir)
    with pytest.raises(preference.PreferenceError, match="16 pairs.*batch_size=32"):
        train.run(params(batch_size=32), paths, seed=0)


def test_keep_best_val_writes_the_named_step_and_early_stop_ends_training(tiny_model_dir,
                                                                          tmp_path):
    # A learning rate this high overfits 8 rows within a few steps: validation loss turns up.
    cfg = params(objective="sft", learning_rate=1.0e-1, iters=16, steps_per_eval=2,
                 steps_per_report=2, keep="best_val", early_stop_patience=2, warmup=0)
    paths = make_paths(tmp_path, tiny_model_dir)
    valid = [{**row, "messages": [row["messages"][0], {
        "role": "assistant", "content": "Pack my box with five dozen liquor jugs."}]}
        for row in test_train.ROWS[8:]]  # answers unlike train's: fitting train hurts them
    (paths.data / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in valid))
    result = train.run(cfg, replace(paths, live=tmp_path / "live"), seed=0)
    assert result.stopped_early_at is not None and result.stopped_early_at < 16
    assert result.kept_iteration < result.stopped_early_at
    assert result.val_loss == pytest.approx(result.kept_val_loss, rel=1e-5)  # the kept weights
    report = json.loads(paths.metrics.read_text())
    assert report["kept_iteration"] == result.kept_iteration
    kept = (tmp_path / "live/plots/metrics/kept/val_loss.tsv").read_text().splitlines()
    assert kept[1].split("\t")[0] == str(result.kept_iteration)
    # the written adapter scores the kept validation loss, not the last step's
    from mlx_lm.tuner.trainer import evaluate

    model, tokenizer = mlx_model.load(tiny_model_dir)
    mlx_model.attach_adapters(model, paths.adapters)
    valid_set = train.load_split(paths.data / "valid.jsonl", tokenizer, True)
    written = evaluate(model, valid_set, cfg.batch_size, cfg.val_batches, cfg.max_seq_length,
                       loss=mlx_model.masked_loss, iterate_batches=train.batch_iterator(0))
    assert written == pytest.approx(result.kept_val_loss, rel=1e-5)
    last_val = float(paths.curve.read_text().splitlines()[-1].split("\t")[2])
    assert last_val > result.kept_val_loss


KILLED_DPO = """
import sys, dataclasses, json
from pathlib import Path
import test_train_preference as t
from pipeline import train
original = train.save_checkpoint
def save_then_die(model, optimizer, ckpt_dir, step):
    original(model, optimizer, ckpt_dir, step)
    if step >= 8:
        print("saved", step, flush=True)
        import time; time.sleep(600)
paths = t.make_paths(Path(sys.argv[1]), Path(sys.argv[2]))
cfg = t.params(**json.loads(sys.argv[3]))
from pipeline.training import launch, packing
cfg = dataclasses.replace(cfg, pack=packing.wanted(cfg.pack))
train.sft_baseline(cfg, paths, 0, launch.init_world())  # the SFT-only baseline first, unkilled
train.save_checkpoint = save_then_die
train.run(cfg, paths, seed=0)
"""


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{}, {"keep": "best_val", "steps_per_eval": 3}],
                         ids=["dpo", "dpo-best-val"])
def test_sigkill_during_dpo_then_rerun_gives_the_uninterrupted_adapter(tiny_model_dir, tmp_path,
                                                                       extra):
    kill_at(KILLED_DPO, str(tmp_path / "killed"), str(tiny_model_dir), json.dumps(extra),
            marker=lambda line: line.startswith("saved 8"))
    killed = make_paths(tmp_path / "killed", tiny_model_dir)
    assert not killed.adapters.exists()
    result = train.run(params(**extra), killed, seed=0)
    assert result.resumed_from == 8
    expected = train.run(params(**extra), make_paths(tmp_path / "clean", tiny_model_dir), seed=0)
    assert result.adapter_sha256 == expected.adapter_sha256
    assert result.kept_iteration == expected.kept_iteration
