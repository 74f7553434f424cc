"""The LoRA adapter GGUF on its own: llama.cpp applies it to the base GGUF and computes what the
fused model computes (layout, transposes, alpha and the q/k rotary row order all matter)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiny import make_tiny_adapter, make_tiny_llama

from pipeline import fuse
from pipeline.gguf_io import adapter as gguf_adapter
from pipeline.gguf_io import file as gguf_file
from pipeline.gguf_io import proof as gguf_proof
from pipeline.gguf_io import tokenizer as gguf_tokenizer

GENERAL = {"name": "tiny-test", "license": "mit", "base": {"name": "tiny"}, "tuneline": {}}
PROMPT = "<|im_start|>user\nHow do I create an index? 42<|im_end|>\n"


def write_f16(model_dir: Path, out: Path) -> None:
    config = gguf_file.read_model_config(model_dir)
    weights = gguf_file.gguf_tensors(model_dir, config)
    tokenizer, _ = gguf_tokenizer.tokenizer_fields(model_dir, None, config["vocab_size"])
    gguf_file.write(out, config, weights, tokenizer, GENERAL)


@pytest.fixture(scope="module")
def files(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("adapter")
    adapters = make_tiny_adapter(tiny_model_dir, tmp / "adapters", rank=4, scale=2.0)
    fused = fuse.run(fuse.FusePaths(tiny_model_dir, adapters, tmp / "fused"))
    paths = {"base": tmp / "base.gguf", "fused": tmp / "fused.gguf", "adapter": tmp / "a.gguf",
             "adapters": adapters}
    write_f16(tiny_model_dir, paths["base"])
    write_f16(fused, paths["fused"])
    config = gguf_file.read_model_config(tiny_model_dir)
    gguf_adapter.write(adapters, config, paths["adapter"], GENERAL, paths["base"])
    return paths


def logits(path: Path, lora: Path | None = None) -> np.ndarray:
    llm = gguf_proof.load_llama(path, n_ctx=64, seed=0, lora_path=lora)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    llm.eval(ids)
    out = np.asarray(llm.scores[: len(ids)]).copy()
    llm.close()
    return out


def test_adapter_file_has_llama_cpp_lora_metadata_and_shapes(files):
    reader = gguf_file.read(files["adapter"])
    meta = gguf_file.metadata(reader)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == "llama"
    assert meta["adapter.lora.alpha"] == pytest.approx(8.0)  # mlx-lm scale 2.0 * rank 4
    shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    # GGUF shapes (ne0, ne1): lora_a (n_in, rank), lora_b (rank, n_out); k_proj is GQA (32 out).
    assert shapes["blk.0.attn_k.weight.lora_a"] == [64, 4]
    assert shapes["blk.0.attn_k.weight.lora_b"] == [4, 32]
    assert shapes["blk.1.ffn_down.weight.lora_a"] == [128, 4]


def test_base_plus_adapter_in_llama_cpp_computes_the_fused_model(files):
    fused, base = logits(files["fused"]), logits(files["base"])
    with_adapter = logits(files["base"], lora=files["adapter"])
    scale = np.abs(fused).max()
    assert np.abs(base - fused).max() > 0.05 * scale  # the adapter changes the model visibly
    assert np.abs(with_adapter - fused).max() < 0.01 * scale
    assert (with_adapter.argmax(-1) == fused.argmax(-1)).all()


def test_adapter_without_qk_row_order_computes_something_else(files, tmp_path, monkeypatch):
    config = gguf_file.read_model_config(files["adapters"].parent / "fused")
    monkeypatch.setattr(gguf_file, "permute_qk", lambda w, n_head: w)
    wrong = tmp_path / "wrong.gguf"
    gguf_adapter.write(files["adapters"], config, wrong, GENERAL, files["base"])
    monkeypatch.undo()
    fused = logits(files["fused"])
    assert np.abs(logits(files["base"], lora=wrong) - fused).max() > 0.01 * np.abs(fused).max()


@pytest.mark.parametrize("kind, words", [("dora", "DoRA's magnitude"), ("full", "no low-rank")])
def test_dora_and_full_fine_tunes_say_why_there_is_no_adapter_file(tiny_model_dir, tmp_path, kind,
                                                                   words):
    adapters = make_tiny_adapter(tiny_model_dir, tmp_path / "a", fine_tune_type=kind)
    assert words in gguf_adapter.unsupported_reason(adapters)
    lora = make_tiny_adapter(tiny_model_dir, tmp_path / "b")
    assert gguf_adapter.unsupported_reason(lora) is None


def test_adapter_for_another_base_fails_with_llama_cpps_reason(files, tmp_path):
    other = make_tiny_llama(tmp_path / "wider", hidden=96, heads=4, kv_heads=2)
    base = tmp_path / "wider.gguf"
    write_f16(other, base)
    with pytest.raises(gguf_proof.ProofError, match=r"wider.gguf \+ .*a.gguf: llama.cpp cannot load.*incorrect shape"):
        gguf_proof.load_llama(base, n_ctx=64, seed=0, lora_path=files["adapter"])


def test_missing_adapter_weights_name_the_file(files, tmp_path):
    broken = tmp_path / "adapters"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((files["adapters"] / "adapter_config.json").read_text())
    config = gguf_file.read_model_config(files["adapters"].parent / "fused")
    with pytest.raises(gguf_file.GGUFError, match=r"adapters.safetensors: not found .*dvc repro train"):
        gguf_adapter.write(broken, config, tmp_path / "x.gguf", GENERAL, files["base"])
