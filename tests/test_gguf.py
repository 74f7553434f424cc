"""The GGUF layer on its own: a tiny model written with plain values loads in llama.cpp and
computes what MLX computes; llama.cpp's load failures come back with its reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.gguf_io import file as gguf_file
from pipeline.gguf_io import proof as gguf_proof
from pipeline.gguf_io import tokenizer as gguf_tokenizer
from pipeline.gguf_io.file import permute_qk, unpermute_qk

GENERAL = {"name": "tiny-test", "license": "mit", "base": {"name": "tiny"}, "tuneline": {}}


def write_f16(model_dir: Path, out: Path) -> None:
    config = gguf_file.read_model_config(model_dir)
    weights = gguf_file.gguf_tensors(model_dir, config)
    tokenizer, _ = gguf_tokenizer.tokenizer_fields(model_dir, None, config["vocab_size"])
    gguf_file.write(out, config, weights, tokenizer, GENERAL)


def test_unpermute_inverts_llama_cpp_rotary_row_order():
    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    permuted = permute_qk(w, n_head=2)
    assert not np.array_equal(permuted, w)
    assert np.array_equal(unpermute_qk(permuted, n_head=2), w)


def test_llama_cpp_logits_match_mlx_on_random_weights(tiny_model_dir, tmp_path):
    out = tmp_path / "m.gguf"
    write_f16(tiny_model_dir, out)
    llama, mlx = logits_pair(tiny_model_dir, out)
    assert np.abs(llama - mlx).max() < 0.05 * np.abs(mlx).max()
    assert (llama.argmax(-1) == mlx.argmax(-1)).mean() == 1.0


def test_logit_check_catches_a_wrong_qk_row_order(tiny_model_dir, tmp_path, monkeypatch):
    # Without llama.cpp's rotary row order the model loads fine but computes something else.
    monkeypatch.setattr(gguf_file, "permute_qk", lambda w, n_head: w)
    out = tmp_path / "m.gguf"
    write_f16(tiny_model_dir, out)
    llama, mlx = logits_pair(tiny_model_dir, out)
    assert np.abs(llama - mlx).max() > 0.05 * np.abs(mlx).max()


def logits_pair(model_dir: Path, gguf_path: Path) -> tuple[np.ndarray, np.ndarray]:
    import mlx.core as mx
    import mlx_lm

    model, tok = mlx_lm.load(str(model_dir))
    ids = tok.encode("<|im_start|>user\nHow do I create an index? 42<|im_end|>\n",
                     add_special_tokens=False)
    mlx_logits = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    llm = gguf_proof.load_llama(gguf_path, n_ctx=64, seed=0)
    llm.eval(ids)
    llama_logits = np.asarray(llm.scores[: len(ids)]).copy()
    llm.close()
    return llama_logits, mlx_logits


def test_llama_cpp_load_failure_says_why(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_tokenizer, "pre_tokenizer_name", lambda data, path: "nonsense")
    out = tmp_path / "m.gguf"
    write_f16(tiny_model_dir, out)
    with pytest.raises(gguf_proof.ProofError, match="unknown pre-tokenizer type: 'nonsense'"):
        gguf_proof.load_llama(out, n_ctx=64, seed=0)
