"""train and fuse stages on a tiny llama built in code: real mlx-lm training, a few seconds."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline import config, fuse, train
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
    assert metrics["tokens_per_second"] > 0 and metrics["peak_memory_gb"] > 0
    assert list(ckpts.iterdir()) == []  # checkpoints cleaned up on success


def test_same_seed_gives_identical_adapters(tiny_model_dir, tmp_path):
    import mlx.core as mx

    cfg = dataclasses.replace(params_train(), iters=4)
    outs = []
    for run_id in ("a", "b"):
        paths = make_paths(tmp_path / run_id, tiny_model_dir)
        train.run(cfg, replace(paths, checkpoints=tmp_path / run_id / "ckpt"), seed=7)
        outs.append(mx.load(str(paths.adapters / "adapters.safetensors")))
    for name in outs[0]:
        np.testing.assert_array_equal(np.array(outs[0][name]), np.array(outs[1][name]))


def test_interrupted_training_resumes_from_last_checkpoint(tiny_model_dir, tmp_path, monkeypatch,
                                                           capsys):
    paths = make_paths(tmp_path, tiny_model_dir)
    ckpts = tmp_path / "ckpt"
    original = train.MetricsLog.on_train_loss_report

    def crash_after_step_6(self, info):
        original(self, info)
        if info["iteration"] + self.offset >= 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(train.MetricsLog, "on_train_loss_report", crash_after_step_6)
    with pytest.raises(KeyboardInterrupt):
        train.run(params_train(), replace(paths, checkpoints=ckpts), seed=0)
    assert not paths.adapters.exists()  # no half-written DVC output
    monkeypatch.setattr(train.MetricsLog, "on_train_loss_report", original)
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
    assert result.val_loss == result.val_loss  # finite, not NaN
    tuned, _ = load(str(qdir), adapter_path=str(paths.adapters))
    assert any(type(m).__name__ == "QuantizedLinear" for _, m in tuned.named_modules())
