"""QLoRA on tiny llamas built in code: `base.quantize` writes an MLX-quantized base, LoRA and DoRA
train on it, fuse de-quantizes, export proves the GGUFs and the adapter (on the de-quantized
base) in llama.cpp, and the model card says the base was quantized for training. Tiny dims keep
MLX's slow CPU quantized kernels to seconds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from test_export import ANSWER, make_cfg
from test_train import make_paths, params_train
from tiny import base_source, make_tiny_llama

from pipeline import base_model, export, fuse, train
from pipeline.base_model import ModelError
from pipeline.hub import card_text, modelcard

PROMPT = [[1, 20, 31, 45, 52, 60, 2, 7, 9]]


def quantized_base(source: Path, out: Path, bits: int = 4, group: int = 32) -> Path:
    base_model.run(base_source(str(source), quantize=bits, group_size=group),
                   base_model.BasePaths(out))
    return out


def logits(model_dir: Path, adapters: Path | None = None) -> np.ndarray:
    import mlx.core as mx

    from pipeline.training import model as mlx_model

    model, _ = mlx_model.load(model_dir, adapters, backend_dtype=False)
    model.eval()
    return np.array(model(mx.array(PROMPT)).astype(mx.float32))


@pytest.mark.parametrize("bits", [4, 8])
def test_base_quantize_writes_an_mlx_quantized_model_close_to_the_float_one(tiny_model_dir,
                                                                             tmp_path, bits):
    base = quantized_base(tiny_model_dir, tmp_path / "base", bits)
    config = json.loads((base / "config.json").read_text())
    assert config["quantization"]["bits"] == bits and config["quantization"]["group_size"] == 32
    assert json.loads((base / "tuneline.json").read_text())["quantized"] == {
        "bits": bits, "group_size": 32, "by": "base_model"}
    assert sorted(p.name for p in base.glob("*.safetensors")) == ["model.safetensors"]
    full, quant = logits(tiny_model_dir), logits(base)
    error = np.linalg.norm(quant - full) / np.linalg.norm(full)  # relative RMS of the logits
    assert error < (0.3 if bits == 4 else 0.03), error
    assert error > 0  # it really is another model


def test_an_already_quantized_folder_is_kept_and_not_quantized_twice(tiny_model_dir, tmp_path):
    mlx_community = quantized_base(tiny_model_dir, tmp_path / "mlx-community", 4)
    base_model.run(base_source(str(mlx_community)), base_model.BasePaths(tmp_path / "as-is"))
    assert json.loads((tmp_path / "as-is/tuneline.json").read_text())["quantized"] == {
        "bits": 4, "group_size": 32, "by": "source"}
    with pytest.raises(ModelError, match="already quantized.*base.quantize: null"):
        quantized_base(mlx_community, tmp_path / "again", 8)


@pytest.fixture(scope="module")
def answering_q4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("qlora")
    source = make_tiny_llama(root / "float", answer=ANSWER)
    return quantized_base(source, root / "base", 4)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_lora_and_dora_train_on_a_4_bit_base_and_fuse_de_quantizes(answering_q4, tmp_path, kind):
    paths = make_paths(tmp_path, answering_q4)
    cfg = dataclasses.replace(params_train(), fine_tune_type=kind, iters=4, warmup=1,
                              steps_per_eval=4, learning_rate=1.0e-3)
    result = train.run(cfg, dataclasses.replace(paths, checkpoints=tmp_path / "ckpt"), seed=0)
    assert result.iters == 4 and np.isfinite(result.val_loss)
    fused = fuse.run(fuse.FusePaths(answering_q4, paths.adapters, tmp_path / "fused"))
    config = json.loads((fused / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    import mlx.core as mx

    weights = mx.load(str(fused / "model.safetensors"))
    assert not any(k.endswith(".scales") for k in weights)
    assert all(mx.issubdtype(w.dtype, mx.floating) for w in weights.values())
    # The fused float model is the quantized base plus the adapter, de-quantized.
    tuned, merged = logits(answering_q4, paths.adapters), logits(fused)
    np.testing.assert_allclose(merged, tuned, atol=2e-3 * np.abs(tuned).max())


def test_a_qlora_run_exports_gguf_and_adapter_that_llama_cpp_proves(answering_q4, tmp_path):
    paths = make_paths(tmp_path, answering_q4)
    cfg = dataclasses.replace(params_train(), iters=2, warmup=1, steps_per_eval=2,
                              learning_rate=1.0e-4)
    train.run(cfg, dataclasses.replace(paths, checkpoints=tmp_path / "ckpt"), seed=0)
    fused = fuse.run(fuse.FusePaths(answering_q4, paths.adapters, tmp_path / "fused"))
    gguf_paths = export.ExportPaths(fused, answering_q4, paths.data, tmp_path / "gguf",
                                    tmp_path / "reports/gguf.json", paths.adapters)
    result = export.run(make_cfg(adapter=True, quantizations=("q8_0",)), gguf_paths, seed=0)
    files = result.report["files"]
    assert files["f16"]["failures"] == [] and files["f16"]["agreement"] >= 0.98
    assert files["adapter"]["failures"] == [] and files["adapter"]["agreement"] >= 0.99
    assert all(a["answer"] == ANSWER for a in files["f16"]["answers"])
    assert result.adapter["written"]


def test_model_card_says_the_base_was_quantized_for_training(answering_q4):
    provenance = json.loads((answering_q4 / "tuneline.json").read_text())
    base = modelcard.base_facts({"model": "org/model"}, provenance)
    assert base["quantized"] == {"bits": 4, "group_size": 32, "by": "base_model"}
    facts = {"training": {"seed": 0, "params": {"rank": 8}, "report": {}}, "base": base}
    text = card_text._training_section(facts)
    assert "quantized to 4 bits (group size 32) for training (QLoRA)" in text
    plain = card_text._training_section({**facts, "base": {**base, "quantized": None}})
    assert "QLoRA" not in plain


def test_quantize_accepts_only_4_8_or_null_and_names_the_key():
    from pipeline.core import config

    good = {"seed": 0, "model": "embedded", "revision": None, "quantize": 4,
            "quantize_group_size": 64}
    assert config.from_mapping(config.BaseConfig, good, "params.yaml:base").quantize == 4
    for key, bad in (("quantize", 3), ("quantize_group_size", 48)):
        with pytest.raises(config.ConfigError, match=f"params.yaml:base.{key}"):
            config.from_mapping(config.BaseConfig, {**good, key: bad}, "params.yaml:base")
