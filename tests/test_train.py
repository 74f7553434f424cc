"""train and fuse stages on a tiny llama built in code: real mlx-lm training, a few seconds."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from killing import kill_at

from pipeline import fuse, train
from pipeline.core import config
from pipeline.rows.jsonl import timings_path
from pipeline.train import TrainConfig, TrainError, TrainPaths

ROWS = [
    {"id": f"r{i}", "source": "expert", "messages": [
        {"role": "user", "content": f"How do I vacuum table t{i}?"},
        {"role": "assistant", "content": "Use VACUUM ANALYZE on it."}]}
    for i in range(12)
]


def params_train() -> TrainConfig:
    """The repository's own params.yaml train section, shrunk for a tiny model."""
    cfg = config.load(TrainConfig, "train", Path(__file__).parents[1] / "params.yaml")
    return dataclasses.replace(cfg, num_layers=2, iters=12, learning_rate=1.0e-2, warmup=2,
                               steps_per_report=2, steps_per_eval=6, save_every=4, val_batches=2)


def make_paths(root: Path, model: Path) -> TrainPaths:
    data = root / "dataset"
    data.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", ROWS[:8]), ("valid", ROWS[8:])):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return TrainPaths(model, data, root / "adapters", root / "reports/train.json",
                      root / "reports/train_loss.tsv")


def crash_after(monkeypatch: pytest.MonkeyPatch, step: int) -> Callable[[], None]:
    """Training stops with Ctrl+C once a loss report reaches `step`; call the returned function
    to train normally again."""
    original = train.MetricsLog.on_train_loss_report

    def crash(self, info):
        original(self, info)
        if info["iteration"] + self.offset >= step:
            raise KeyboardInterrupt

    monkeypatch.setattr(train.MetricsLog, "on_train_loss_report", crash)
    return lambda: monkeypatch.setattr(train.MetricsLog, "on_train_loss_report", original)


def test_training_lowers_validation_loss_and_leaves_only_the_final_adapter(tiny_model_dir, tmp_path):
    paths = make_paths(tmp_path, tiny_model_dir)
    ckpts = tmp_path / "ckpt"
    result = train.run(params_train(), replace(paths, checkpoints=ckpts), seed=0)
    assert sorted(p.name for p in paths.adapters.iterdir()) == [
        "adapter_config.json", "adapters.safetensors"]
    curve = paths.curve.read_text().splitlines()
    assert curve[0] == "step\ttrain_loss\tval_loss" and len(curve) == 1 + 12 // 2
    first_val = float(curve[1].split("\t")[2])
    assert result.val_loss < first_val * 0.8, (first_val, result.val_loss)
    metrics = json.loads(paths.metrics.read_text())
    assert metrics["iters"] == 12 and metrics["trained_tokens"] > 0
    timings = json.loads(timings_path(paths.metrics).read_text())  # volatile, untracked
    assert timings["tokens_per_second"] > 0 and timings["peak_memory_gb"] > 0
    assert "tokens_per_second" not in metrics
    assert list(ckpts.iterdir()) == []  # checkpoints cleaned up on success


TRAIN_ONCE = """
import dataclasses, sys
from pathlib import Path
import test_train
from pipeline import train
paths = test_train.make_paths(Path(sys.argv[1]), Path(sys.argv[2]))
cfg = dataclasses.replace(test_train.params_train(), iters=4)
train.run(cfg, dataclasses.replace(paths, checkpoints=Path(sys.argv[1]) / "ckpt"), seed=7)
"""


def test_same_seed_gives_identical_adapters_in_a_fresh_process_and_another_seed_does_not(
        tiny_model_dir, tmp_path):
    """Seed 7 here and seed 7 in a new Python process write the same adapter bytes (nothing
    carried over in process state: MLX's global RNG, patched classes, caches); seed 8 differs,
    so the seed is what decides."""
    import os
    import subprocess
    import sys

    cfg = dataclasses.replace(params_train(), iters=4)
    files = {}
    for run_id, seed in (("here", 7), ("other_seed", 8)):
        paths = make_paths(tmp_path / run_id, tiny_model_dir)
        train.run(cfg, replace(paths, checkpoints=tmp_path / run_id / "ckpt"), seed=seed)
        files[run_id] = (paths.adapters / "adapters.safetensors").read_bytes()
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}
    subprocess.run([sys.executable, "-c", TRAIN_ONCE, str(tmp_path / "fresh"), str(tiny_model_dir)],
                   check=True, capture_output=True, env=env, timeout=300)
    fresh = (make_paths(tmp_path / "fresh", tiny_model_dir).adapters / "adapters.safetensors")
    assert fresh.read_bytes() == files["here"]
    assert files["other_seed"] != files["here"]


def test_interrupted_training_resumes_from_last_checkpoint(tiny_model_dir, tmp_path, monkeypatch,
                                                           capsys):
    paths = make_paths(tmp_path, tiny_model_dir)
    ckpts = tmp_path / "ckpt"
    resume = crash_after(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        train.run(params_train(), replace(paths, checkpoints=ckpts), seed=0)
    assert not paths.adapters.exists()  # no half-written DVC output
    resume()
    result = train.run(params_train(), replace(paths, checkpoints=ckpts), seed=0)
    assert result.resumed_from == 4  # save_every=4: the last checkpoint before the crash
    assert "resuming from checkpoint" in capsys.readouterr().out
    steps = [int(line.split("\t")[0]) for line in paths.curve.read_text().splitlines()[1:]]
    assert steps == [2, 4, 6, 8, 10, 12]


@pytest.mark.parametrize("change, message", [
    ({"num_layers": 9}, "asked for 9 layers, the model has 2"),
    ({"batch_size": 20}, "train.jsonl has 8"),
    ({"warmup": 12}, "warmup: 12 must be in 0..iters-1"),
    ({"keys": ("self_attn.nope",)}, "none of \\['self_attn.nope'\\] names a linear module"),
])
def test_inconsistent_settings_fail_with_the_numbers(tiny_model_dir, tmp_path, change, message):
    paths = make_paths(tmp_path, tiny_model_dir)
    with pytest.raises(TrainError, match=message):
        train.run(dataclasses.replace(params_train(), **change),
                  replace(paths, checkpoints=tmp_path / "ckpt"), seed=0)


def test_fused_model_matches_base_plus_adapter(tiny_model_dir, tmp_path):
    import mlx.core as mx
    from mlx_lm import load

    paths = make_paths(tmp_path, tiny_model_dir)
    train.run(dataclasses.replace(params_train(), iters=4),
              replace(paths, checkpoints=tmp_path / "ckpt"), seed=0)
    fuse.run(fuse.FusePaths(tiny_model_dir, paths.adapters, tmp_path / "fused"))
    with_adapter, tok = load(str(tiny_model_dir), adapter_path=str(paths.adapters))
    fused, _ = load(str(tmp_path / "fused"))
    plain, _ = load(str(tiny_model_dir))
    ids = mx.array([tok.encode("How do I vacuum table t3?")])
    a, b, c = (np.array(m(ids)) for m in (with_adapter, fused, plain))
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert np.abs(a - c).max() > 1e-3  # the adapter changed something
    assert (tmp_path / "fused" / "tokenizer.json").exists()


def test_quantized_base_trains_as_qlora(tiny_model_dir, tmp_path):
    import shutil

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.utils import quantize_model

    model, _ = load(str(tiny_model_dir))
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    model, cfg = quantize_model(model, cfg, group_size=32, bits=4)
    qdir = tmp_path / "q4"
    qdir.mkdir()
    mx.save_safetensors(str(qdir / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (qdir / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tiny_model_dir / name, qdir / name)
    paths = make_paths(tmp_path, qdir)
    result = train.run(dataclasses.replace(params_train(), iters=4),
                       replace(paths, checkpoints=tmp_path / "ckpt"), seed=0)
    adapter = mx.load(str(paths.adapters / "adapters.safetensors"))
    assert adapter and all(k.endswith(("lora_a", "lora_b")) for k in adapter)
    assert math.isfinite(result.val_loss)
    tuned, _ = load(str(qdir), adapter_path=str(paths.adapters))
    assert any(type(m).__name__ == "QuantizedLinear" for _, m in tuned.named_modules())


# Every value params.yaml documents for train (its comments list them) trains a few steps.
DOCUMENTED = [
    {"lr_schedule": "constant", "warmup": 0},
    {"lr_schedule": "constant", "warmup": 1},
    {"lr_schedule": "cosine", "warmup": 0},
    {"optimizer": "adam"},
    {"optimizer": "adamw", "weight_decay": 0.01},
    {"optimizer": "sgd"},
    {"optimizer": "adafactor"},
    {"fine_tune_type": "lora"},
    {"fine_tune_type": "dora"},
    {"fine_tune_type": "full"},
    {"num_layers": -1},
    {"keys": ("self_attn.q_proj", "mlp.up_proj")},
    {"epochs": 1.0},
    {"grad_checkpoint": True},
    {"mask_prompt": False},
    {"grad_accumulation_steps": 2},
    {"val_batches": -1},
]


def test_params_yaml_documents_the_values_tested_here():
    text = (Path(__file__).parents[1] / "params.yaml").read_text()
    assert "constant | cosine" in text and "lora | dora | full" in text
    assert "adam | adamw | sgd | adafactor" in text


@pytest.mark.parametrize("change", DOCUMENTED, ids=lambda c: ",".join(f"{k}={v}" for k, v in
                                                                     c.items()))
def test_every_documented_setting_trains_a_few_steps(tiny_model_dir, tmp_path, change):
    import mlx.core as mx

    cfg = dataclasses.replace(params_train(), iters=3, warmup=1, steps_per_report=1,
                              steps_per_eval=3, save_every=2)
    cfg = dataclasses.replace(cfg, **change)
    paths = make_paths(tmp_path, tiny_model_dir)
    result = train.run(cfg, replace(paths, checkpoints=tmp_path / "ckpt"), seed=0)
    assert math.isfinite(result.val_loss) and math.isfinite(result.train_loss)
    weights = mx.load(str(paths.adapters / "adapters.safetensors"))
    kind = json.loads((paths.adapters / "adapter_config.json").read_text())["fine_tune_type"]
    assert kind == cfg.fine_tune_type
    if cfg.fine_tune_type == "dora":
        assert any(k.endswith(".m") for k in weights)
    elif cfg.fine_tune_type == "full":
        assert not any("lora" in k for k in weights) and weights
    else:
        assert all(k.endswith(("lora_a", "lora_b")) for k in weights)


def test_gradient_checkpointing_does_not_leak_into_later_runs(tiny_model_dir, tmp_path):
    from mlx_lm import load

    model, _ = load(str(tiny_model_dir))
    layer_type = type(model.layers[0])
    before = layer_type.__call__
    cfg = dataclasses.replace(params_train(), iters=3, warmup=1, grad_checkpoint=True,
                              steps_per_eval=3)
    train.run(cfg, replace(make_paths(tmp_path, tiny_model_dir), checkpoints=tmp_path / "ckpt"),
              seed=0)
    assert layer_type.__call__ is before  # mlx-lm patches the class for the whole process


def test_constant_schedule_returns_mlx_arrays():
    import mlx.core as mx

    cfg = dataclasses.replace(params_train(), lr_schedule="constant", warmup=0)
    opt = train.build_optimizer(cfg, iters=10, start=0)
    assert isinstance(opt.learning_rate, mx.array)


def test_a_torn_checkpoint_is_skipped_on_resume(tmp_path):
    import mlx.core as mx

    weights = {"w": mx.ones((64, 64))}
    for step in (4, 8, 12):
        for kind in ("adapters", "optimizer"):
            mx.save_safetensors(str(tmp_path / f"{step:07d}_{kind}.safetensors"), weights)
    torn = tmp_path / "0000012_adapters.safetensors"
    torn.write_bytes(torn.read_bytes()[:5000])  # a kill mid-write
    (tmp_path / "0000008_optimizer.safetensors").write_bytes(b"")  # weights without their state
    assert train.latest_checkpoint(tmp_path) == (4, tmp_path / "0000004_adapters.safetensors")


KILLED_TRAIN = """
import sys
from pathlib import Path
import test_train
from pipeline import train
original = train.save_checkpoint
def save_then_die(model, optimizer, ckpt_dir, step):
    original(model, optimizer, ckpt_dir, step)
    if step >= 8:
        print("saved", step, flush=True)
        import time; time.sleep(600)
train.save_checkpoint = save_then_die
import dataclasses, json
paths = test_train.make_paths(Path(sys.argv[1]), Path(sys.argv[2]))
cfg = dataclasses.replace(test_train.params_train(), **json.loads(sys.argv[3]))
train.run(cfg, dataclasses.replace(paths, checkpoints=Path(sys.argv[1]) / "ckpt"), seed=0)
"""


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{}, {"dropout": 0.2}, {  # dropout: the random stream too
    "pack": True, "pack_width": 128, "max_seq_length": 128, "tokens_per_step": 512}],
    ids=["plain", "dropout", "packed"])
def test_sigkill_mid_training_then_rerun_gives_the_uninterrupted_adapter(tiny_model_dir, tmp_path,
                                                                         extra):
    import mlx.core as mx

    kill_at(KILLED_TRAIN, str(tmp_path / "killed"), str(tiny_model_dir), json.dumps(extra),
            marker=lambda line: line.startswith("saved 8"))
    killed = make_paths(tmp_path / "killed", tiny_model_dir)
    assert not killed.adapters.exists()
    ckpts = tmp_path / "killed" / "ckpt"
    # A write that the kill cut short, as mlx-lm's own saves left them: must be skipped.
    [run_dir] = ckpts.iterdir()
    (run_dir / "0000012_adapters.safetensors").write_bytes(b"\x10\x00\x00")
    cfg = dataclasses.replace(params_train(), **extra)
    result = train.run(cfg, replace(killed, checkpoints=ckpts), seed=0)
    assert result.resumed_from == 8
    clean = make_paths(tmp_path / "clean", tiny_model_dir)
    expected = train.run(cfg, replace(clean, checkpoints=tmp_path / "c2"), seed=0)
    assert result.adapter_sha256 == expected.adapter_sha256
    a = mx.load(str(killed.adapters / "adapters.safetensors"))
    b = mx.load(str(clean.adapters / "adapters.safetensors"))
    assert all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in b)
