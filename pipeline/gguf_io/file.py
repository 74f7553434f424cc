"""The GGUF layer: llama-family GGUF files read into Hugging Face form and written from it.

Used by the `base_model` stage (a GGUF base becomes an mlx-lm directory) and the `export` stage
(the fused model becomes an F16 GGUF). Tensor names, llama.cpp's rotary row order, hyperparameter
keys and `general.*` metadata live here and nowhere else; tokenizer metadata lives in
pipeline/gguf_io/tokenizer.py. Functions take plain values and raise GGUFError.

    from pipeline.gguf_io import file as gguf_file
    meta = gguf_file.metadata(gguf_file.read(path))
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import UserError

# GGUF tensor name (per block) -> Hugging Face llama name.
BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
HF_TO_GGUF = {hf: gg for gg, hf in {**BLOCK_TENSORS, **GLOBAL_TENSORS}.items()}
# Fused projections of phi3 (only adapters are named here for it; its model file is converted).
HF_TO_GGUF.update({"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"})
SUPPORTED_ARCHS = ("llama",)  # GGUF general.architecture values read
SUPPORTED_MODEL_TYPES = ("llama", "mistral")  # HF model_type values written as GGUF arch "llama"
IGNORED_WEIGHTS = ("rotary_emb.inv_freq",)


class GGUFError(UserError):
    """A GGUF file or model directory this layer cannot read or write, with what to do."""


# --- reading ---------------------------------------------------------------------------------


def read(path: Path) -> Any:
    """A `gguf.GGUFReader`, or a GGUFError that names the file for damaged ones."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as exc:  # gguf raises bare ValueError/struct errors on damaged files
        raise GGUFError(
            f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc}); "
            "the file may be truncated or corrupt: re-export or re-download it"
        ) from exc


def metadata(reader: Any, prefix: str = "") -> dict[str, Any]:
    """Key/value metadata (the GGUF.* header fields left out), optionally only `prefix` keys."""
    return {key: field.contents() for key, field in reader.fields.items()
            if not key.startswith("GGUF.") and key.startswith(prefix)}


def hf_config(meta: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """config.json for mlx-lm from a llama GGUF's hyperparameters."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise GGUFError(
            f"{path}: architecture {arch!r} is not supported for import; "
            f"supported: {list(SUPPORTED_ARCHS)} (Llama, Mistral, SmolLM)"
        )
    n_head = int(meta[f"{arch}.attention.head_count"])
    hidden = int(meta[f"{arch}.embedding_length"])
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // n_head))
    tokens = meta["tokenizer.ggml.tokens"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": int(meta[f"{arch}.block_count"]),
        "intermediate_size": int(meta[f"{arch}.feed_forward_length"]),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "rms_norm_eps": float(meta[f"{arch}.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 2048)),
        "vocab_size": len(tokens),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }


def hf_weights(reader: Any, config: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Every tensor de-quantized to float32 under its Hugging Face name and row order."""
    from gguf.quants import dequantize

    out = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        shape = tuple(int(d) for d in reversed(tensor.shape))
        array = dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
        if name.endswith("q_proj.weight"):
            array = unpermute_qk(array, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            array = unpermute_qk(array, config["num_key_value_heads"])
        out[name] = array
    return out


def hf_tensor_name(gguf_name: str) -> str:
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in BLOCK_TENSORS:
        return f"model.layers.{parts[1]}.{BLOCK_TENSORS[parts[2]]}.{suffix}"
    raise GGUFError(f"GGUF tensor {gguf_name!r} has no llama equivalent; unsupported model")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for rotary embeddings (interleaved pairs), as its converter writes."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape
    )


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo `permute_qk`: back to the Hugging Face (half-split) row order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape
    )


# --- writing ---------------------------------------------------------------------------------


def write(out: Path, config: Mapping[str, Any], weights: Mapping[str, np.ndarray],
          tokenizer: Mapping[str, tuple[Any, Any, Any]], general: Mapping[str, Any]) -> None:
    """An F16 llama GGUF. `general`: {name, license, base: {name, organization?, repo_url?},
    tuneline: {key: text}}; `tokenizer`: tokenizer.* keys as (value, type, subtype)."""
    import gguf

    writer = gguf.GGUFWriter(str(out), "llama")
    add_general(writer, general)
    add_hparams(writer, config)
    for key, (value, vtype, sub) in tokenizer.items():
        writer.add_key_value(key, value, vtype, sub)
    finish(writer, weights)


def finish(writer: Any, tensors: Mapping[str, np.ndarray]) -> None:
    """Add the tensors to a `gguf.GGUFWriter` holding its keys, and write the file."""
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """config.json of an mlx-lm directory, checked for what the built-in writer supports."""
    config = read_config(model_dir)
    problem = builtin_problem(config)
    if problem is not None:
        raise GGUFError(f"{model_dir / 'config.json'}: {problem}")
    config["num_key_value_heads"] = config.get("num_key_value_heads") or config["num_attention_heads"]
    config["head_dim"] = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return config


def read_config(model_dir: Path) -> dict[str, Any]:
    """config.json of a model directory, whatever its architecture (quantization keys dropped)."""
    path = model_dir / "config.json"
    if not path.exists():
        raise GGUFError(f"{path}: not found; run the fuse stage first (dvc repro fuse)")
    config = json.loads(path.read_text())
    # An MLX-quantized directory (a QLoRA base for base-f16.gguf) is de-quantized on reading
    # (load_weights): the GGUF describes the float model.
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    return config


def builtin_problem(config: Mapping[str, Any]) -> str | None:
    """Why the built-in writer does not write this model (None: it does)."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        return (f"model_type {model_type!r} cannot be exported by the built-in writer; supported: "
                f"{list(SUPPORTED_MODEL_TYPES)} (the llama family: Llama, Mistral, SmolLM)")
    unsupported = {
        "rope_scaling": config.get("rope_scaling"),
        "attention_bias": config.get("attention_bias", False) or None,
        "mlp_bias": config.get("mlp_bias", False) or None,
    }
    for key, value in unsupported.items():
        if value:
            return f"{key}={value!r} is not supported by the built-in writer"
    if config.get("hidden_act", "silu") != "silu":
        return f"hidden_act {config['hidden_act']!r}; a llama GGUF needs silu"
    return None


def gguf_tensors(model_dir: Path, config: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """HF-named float weights -> GGUF names, Q/K rows in llama.cpp's rotary order, F16 matrices."""
    out = {}
    for name, array in load_weights(model_dir).items():
        if name.endswith(IGNORED_WEIGHTS):
            continue
        gg_name = gguf_name(name, model_dir)
        if name.endswith("q_proj.weight"):
            array = permute_qk(array, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            array = permute_qk(array, config["num_key_value_heads"])
        # llama.cpp keeps norms (1-D) in F32; matrices go to F16 like its converter's --outtype f16.
        out[gg_name] = array.astype(np.float16 if array.ndim > 1 else np.float32)
        if not np.isfinite(out[gg_name]).all():
            raise GGUFError(f"{model_dir}: {name} has values beyond float16 range (or NaN); "
                            "the fine-tune diverged: lower train.learning_rate and retrain")
    n_vocab = out["token_embd.weight"].shape[0]
    if n_vocab != config["vocab_size"]:
        raise GGUFError(
            f"{model_dir}: embedding has {n_vocab} rows, config.json says vocab_size "
            f"{config['vocab_size']}; the model directory is inconsistent: re-run fuse"
        )
    return dict(sorted(out.items(), key=lambda kv: _tensor_order(kv[0])))


def _tensor_order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[1]), name) if parts[0] == "blk" else (-1 if "token_embd" in name else 10**6, name)


def load_weights(model_dir: Path) -> dict[str, np.ndarray]:
    import mlx.core as mx

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise GGUFError(f"{model_dir}: no *.safetensors weights; run the fuse stage first")
    raw: dict[str, Any] = {}
    for path in files:
        raw.update(mx.load(str(path)))
    quant = json.loads((model_dir / "config.json").read_text()).get("quantization") \
        if (model_dir / "config.json").exists() else None
    weights: dict[str, np.ndarray] = {}
    for name, arr in raw.items():
        if name.endswith((".scales", ".biases")) and quant and \
                name.rsplit(".", 1)[0] + ".weight" in raw:
            continue  # folded into their weight below
        stem = name.removesuffix(".weight")
        if quant and f"{stem}.scales" in raw:
            arr = mx.dequantize(arr, raw[f"{stem}.scales"], raw.get(f"{stem}.biases"),
                                group_size=quant["group_size"], bits=quant["bits"],
                                mode=quant.get("mode", "affine"))
        weights[name] = np.array(arr.astype(mx.float32))
    return weights


def gguf_name(hf_name: str, model_dir: Path) -> str:
    stem, _, suffix = hf_name.rpartition(".")
    if stem in HF_TO_GGUF:
        return f"{HF_TO_GGUF[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) >= 4 and parts[:2] == ["model", "layers"]:
        inner = ".".join(parts[3:])
        if inner in HF_TO_GGUF:
            return f"blk.{parts[2]}.{HF_TO_GGUF[inner]}.{suffix}"
    raise GGUFError(
        f"{model_dir}: weight {hf_name!r} has no llama GGUF equivalent; "
        f"supported: {list(SUPPORTED_MODEL_TYPES)} models without extra modules"
    )


def add_hparams(writer: Any, config: Mapping[str, Any]) -> None:
    import gguf

    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(config["head_dim"])
    if config["head_dim"] != hidden // heads:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1.0e-5)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_general(writer: Any, general: Mapping[str, Any]) -> None:
    base = general["base"]
    writer.add_type(general.get("type", "model"))  # "adapter" for LoRA adapter files
    writer.add_name(general["name"])
    if general["license"]:
        writer.add_license(general["license"])
    writer.add_base_model_count(1)
    writer.add_base_model_name(0, base["name"])
    if "organization" in base:
        writer.add_base_model_organization(0, base["organization"])
    if "repo_url" in base:
        writer.add_base_model_repo_url(0, base["repo_url"])
    for key, value in general["tuneline"].items():
        writer.add_string(f"general.tuneline.{key}", value)
    writer.add_tags(["tuneline", "fine-tuned"])
