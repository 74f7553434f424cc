"""base_model stage: GGUF -> mlx-lm directory, on tiny GGUFs written here and on the real
embedded SmolLM2 (slow), checked against llama.cpp itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny import base_source

from pipeline import base_model
from pipeline.base_model import ModelError
from pipeline.gguf_io import file as gguf_file
from pipeline.gguf_io import tokenizer as gguf_tokenizer
from pipeline.gguf_io.file import permute_qk

SAMPLE = "PostgreSQL 16 的 VACUUM 很重要 🐘! Don't   panic:\n\tSELECT 12345 + 0.5;"


def write_gguf(model_dir: Path, out: Path, qtype: str = "F32") -> dict[str, np.ndarray]:
    """Write `model_dir` (tiny HF llama) as a llama.cpp-style GGUF; return the HF weights."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    weights = load_file(str(model_dir / "model.safetensors"))
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["content"] for t in tok["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in specials else 1 for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(gguf_tokenizer.CHATML_TEMPLATE)
    names = {v: k for k, v in gguf_file.GLOBAL_TENSORS.items()}
    for name, arr in weights.items():
        stem = name.rsplit(".", 1)[0]
        if stem in names:
            gname = names[stem] + ".weight"
        else:
            i, rest = name.split(".")[2], ".".join(name.split(".")[3:-1])
            block = {v: k for k, v in gguf_file.BLOCK_TENSORS.items()}[rest]
            gname = f"blk.{i}.{block}.weight"
        if "q_proj" in name:
            arr = permute_qk(arr, cfg["num_attention_heads"])
        elif "k_proj" in name:
            arr = permute_qk(arr, cfg["num_key_value_heads"])
        if qtype == "Q8_0" and arr.ndim == 2:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def test_f32_gguf_round_trips_weights_and_config(tiny_model_dir, tmp_path):
    weights = write_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    out = tmp_path / "out"
    base_model.run(base_source(str(tmp_path / "tiny.gguf")),
                   base_model.BasePaths(out))
    from safetensors.numpy import load_file

    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(weights)
    for name, arr in weights.items():
        np.testing.assert_array_equal(got[name], arr, err_msg=name)
    cfg = json.loads((out / "config.json").read_text())
    src = json.loads((tiny_model_dir / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size"):
        assert cfg[key] == src[key], key
    assert json.loads((out / "tuneline.json").read_text())["kind"] == "gguf"


def test_q8_gguf_dequantizes_close_to_original_and_model_runs_like_it(tiny_model_dir, tmp_path):
    import mlx.core as mx
    from mlx_lm import load

    weights = write_gguf(tiny_model_dir, tmp_path / "tiny-q8.gguf", qtype="Q8_0")
    out = tmp_path / "out"
    base_model.run(base_source(str(tmp_path / "tiny-q8.gguf")),
                   base_model.BasePaths(out))
    from safetensors.numpy import load_file

    got = load_file(str(out / "model.safetensors"))
    q = got["model.layers.0.self_attn.q_proj.weight"]
    ref = weights["model.layers.0.self_attn.q_proj.weight"]
    assert np.abs(q - ref).max() < 0.02 * np.abs(ref).max()  # Q8_0 error, not a row shuffle
    original, tok = load(str(tiny_model_dir))
    converted, tok2 = load(str(out))
    ids = tok.encode("How do I create an index?")
    assert ids == tok2.encode("How do I create an index?")
    a = np.array(original(mx.array([ids]))[0])
    b = np.array(converted(mx.array([ids]))[0])
    # Random tiny models have flat logits, so compare the whole distribution, not the argmax.
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
    assert np.abs(a - b).max() < 0.25


def test_truncated_gguf_gives_clear_error(tiny_model_dir, tmp_path):
    path = tmp_path / "bad.gguf"
    write_gguf(tiny_model_dir, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ModelError, match="truncated or corrupt"):
        base_model.run(base_source(str(path)), base_model.BasePaths(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_unknown_model_spec_names_the_accepted_forms(tmp_path):
    with pytest.raises(ModelError, match="neither 'embedded'"):
        base_model.resolve_source(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="not found"):
        base_model.resolve_source(str(tmp_path / "missing.gguf"))


@pytest.fixture(scope="session")
def embedded_base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("embedded") / "base"
    base_model.run(base_source("embedded"), base_model.BasePaths(out))
    return out


@pytest.mark.slow
def test_embedded_tokenizer_matches_llama_cpp_token_ids(embedded_base):
    import llama_cpp
    from tokenizers import Tokenizer

    llm = llama_cpp.Llama(model_path=str(base_model.embedded_gguf()), vocab_only=True,
                          verbose=False)
    ours = Tokenizer.from_file(str(embedded_base / "tokenizer.json"))
    for text in (SAMPLE, "<|im_start|>user\nHi<|im_end|>\n", "emoji 👩‍💻 and 中文标点。"):
        expected = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert ours.encode(text).ids == expected, text
    assert ours.decode(ours.encode(SAMPLE).ids) == SAMPLE


@pytest.mark.slow
def test_embedded_model_answers_coherently_and_stops(embedded_base):
    from mlx_lm import generate, load

    model, tok = load(str(embedded_base))
    cfg = json.loads((embedded_base / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>" and "<|im_start|>" in cfg["chat_template"]
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is PostgreSQL?"}],
                                     add_generation_prompt=True, tokenize=False)
    answer = generate(model, tok, prompt, max_tokens=40)
    assert "database" in answer.lower(), answer
