"""Tiny random llama-family models built in code, for tests: no downloads, a few seconds on CPU.

`make_tiny_llama(dir)` writes a directory that `mlx_lm.load(dir)` loads: config.json
(model_type llama), model.safetensors (float32) and a byte-level BPE tokenizer trained here on a
small corpus, with the ChatML special tokens and chat template (the layout of SmolLM2-Instruct).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 as in SmolLM2
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = (
    "How do I create an index in PostgreSQL? Use CREATE INDEX name ON table (column);",
    "Where do I find the logs? They live in the data directory under log/.",
    "The quick brown fox jumps over the lazy dog 0123456789 times.",
    "system user assistant: you are a helpful assistant. Answer briefly and stop.",
    "VACUUM reclaims storage; ANALYZE collects statistics for the query planner.",
    "Sphinx of black quartz, judge my vow! Pack my box with five dozen liquor jugs.",
)


def make_tiny_tokenizer(out: Path | str, vocab_size: int = 384) -> int:
    """Train a byte-level BPE on CORPUS and write tokenizer.json + tokenizer_config.json.

    Returns the vocabulary size (256 bytes + 3 specials + merges, at most `vocab_size`).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    # gpt2-style split + bytes: llama.cpp's "gpt2" pre-tokenizer behaves the same.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(CORPUS) * 4, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "add_bos_token": False,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    specials = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return tok.get_vocab_size()


def tiny_llama_config(
    vocab_size: int, layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int,
    tie: bool,
) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": intermediate,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "rms_norm_eps": 1.0e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "vocab_size": vocab_size,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": tie,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }


def tiny_llama_weights(config: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    """Random float32 weights in Hugging Face llama naming (half-split Q/K rows)."""
    rng = np.random.default_rng(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config["head_dim"]
    q_rows = config["num_attention_heads"] * head_dim
    kv_rows = config["num_key_value_heads"] * head_dim

    def mat(rows: int, cols: int) -> np.ndarray:
        # Scaled so activations stay O(1) and greedy decoding is not a constant token.
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)

    w = {"model.embed_tokens.weight": mat(config["vocab_size"], hidden), "model.norm.weight": norm()}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = mat(q_rows, hidden)
        w[p + "self_attn.k_proj.weight"] = mat(kv_rows, hidden)
        w[p + "self_attn.v_proj.weight"] = mat(kv_rows, hidden)
        w[p + "self_attn.o_proj.weight"] = mat(hidden, q_rows)
        w[p + "mlp.gate_proj.weight"] = mat(inter, hidden)
        w[p + "mlp.up_proj.weight"] = mat(inter, hidden)
        w[p + "mlp.down_proj.weight"] = mat(hidden, inter)
    if not config["tie_word_embeddings"]:
        w["lm_head.weight"] = mat(config["vocab_size"], hidden)
    return w


def make_tiny_llama(
    out: Path | str,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab_size: int = 384,
    tie: bool = True,
    model_type: str = "llama",
    answer: str | None = None,
) -> Path:
    """Write an mlx-lm loadable tiny llama into `out` and return `out`.

    Random weights never emit the end-of-turn token. With `answer`, the model instead replies to
    any chat prompt with exactly `answer` followed by <|im_end|> (see `teach_answer`), so stopping
    can be tested. `model_type` other than "llama" only changes config.json.
    """
    from safetensors.numpy import save_file

    out = Path(out)
    n_vocab = make_tiny_tokenizer(out, vocab_size)
    tie = tie and answer is None
    config = tiny_llama_config(n_vocab, layers, hidden, heads, kv_heads, intermediate, tie)
    config["model_type"] = model_type
    weights = tiny_llama_weights(config, seed)
    if answer is not None:
        teach_answer(weights, out / "tokenizer.json", answer, seed)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out


def teach_answer(weights: dict[str, np.ndarray], tokenizer: Path, answer: str, seed: int) -> None:
    """Make the model a bigram chain: "\n" -> answer tokens -> <|im_end|> (every ChatML generation
    prompt ends in "assistant\n"). Attention and MLP outputs are damped, not removed, so all
    tensors still shape the logits while the chain's margin keeps greedy decoding exact.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    chain = [tok.token_to_id("\u010a"), *tok.encode(answer).ids, tok.token_to_id("<|im_end|>")]
    if len(set(chain)) != len(chain):
        raise ValueError(f"answer {answer!r} repeats a token; a bigram chain needs distinct tokens")
    rng = np.random.default_rng(seed + 1)
    emb = weights["model.embed_tokens.weight"]
    emb *= np.sqrt(emb.shape[1]) / np.linalg.norm(emb, axis=1, keepdims=True)  # RMS 1 rows
    head = (0.1 * rng.standard_normal(emb.shape)).astype(np.float32)
    for cur, nxt in itertools.pairwise(chain):
        head[nxt] = 0.25 * emb[cur]  # logit ~ 0.25 * hidden for the successor, ~N(0, 1) others
    weights["lm_head.weight"] = head
    for name, w in weights.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            w *= 0.1


def make_tiny_adapter(model_dir: Path, out: Path, *, rank: int = 4, scale: float = 2.0,
                      std: float = 0.05, seed: int = 0, fine_tune_type: str = "lora",
                      num_layers: int = -1) -> Path:
    """An mlx-lm adapter directory for `model_dir` with random (non-zero) lora_a and lora_b on
    every linear of every block, as `mlx_lm.lora` would save it after training."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(str(model_dir))
    model.freeze()
    n_layers = len(model.layers) if num_layers == -1 else num_layers
    params = {"rank": rank, "scale": scale, "dropout": 0.0}
    linear_to_lora_layers(model, n_layers, params, use_dora=fine_tune_type == "dora")
    rng = np.random.default_rng(seed)
    weights = {name: mx.array(rng.normal(0.0, std, arr.shape).astype(np.float32))
               if name.endswith(("lora_a", "lora_b")) else arr
               for name, arr in tree_flatten(model.trainable_parameters())}
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    config = {"fine_tune_type": fine_tune_type, "num_layers": n_layers, "lora_parameters": params}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def base_source(model: str, revision: str | None = None, quantize: int | None = None,
                group_size: int = 64) -> Any:
    """The base_model stage's config for `model` (params.yaml's `base` keys it reads)."""
    from pipeline.base_model import SourceConfig

    return SourceConfig(model=model, revision=revision, quantize=quantize,
                        quantize_group_size=group_size)
