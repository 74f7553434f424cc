"""Tiny random models of the architectures people tune, built in code: no downloads.

    make_tiny_arch("qwen2", out)   # also: llama-spm, mistral, llama3, llama3.1, qwen3, gemma2, phi3

Each directory loads in `mlx_lm.load` and carries what the Hub's models carry: config.json with
`architectures`, model.safetensors (float32, Hugging Face names), a tokenizer trained here with
the family's kind (SentencePiece with byte_fallback and tokenizer.model for llama-spm/mistral/
gemma2/phi3; byte-level BPE with the family's split regex for llama3/qwen2/qwen3), the family's
special tokens and a chat template shaped like the real one (mistral's and gemma's refuse a
system role, as theirs do).

Random weights never stop. `teach_stop` makes every model answer every chat prompt with a fixed
chain of tokens and then its end-of-turn token, through the tied or untied output layer alike, so
that the llama.cpp proof (stops by itself, agrees with MLX) can pass for every architecture.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from tiny import CORPUS

QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Mistral-7B-Instruct v0.1/v0.2: no system role, [INST] turns, eos after each answer.
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)
# Llama-2-chat: the system prompt inside the first [INST] between <<SYS>> markers.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Gemma 2: no system role, model instead of assistant.
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
PHI3 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# kind -> (model_type, HF architecture, tokenizer kind, chat specials, eos, template, add_bos)
ARCHS: dict[str, dict[str, Any]] = {
    "llama-spm": {"model_type": "llama", "arch": "LlamaForCausalLM", "tok": "spm",
                  "specials": (), "eos": "</s>", "template": LLAMA2, "add_bos": True},
    "mistral": {"model_type": "mistral", "arch": "MistralForCausalLM", "tok": "spm",
                "specials": (), "eos": "</s>", "template": MISTRAL, "add_bos": True},
    "llama3": {"model_type": "llama", "arch": "LlamaForCausalLM", "tok": "bpe",
               "split": LLAMA3_SPLIT, "bos": "<|begin_of_text|>", "eos": "<|eot_id|>",
               "specials": ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                            "<|end_header_id|>", "<|eot_id|>"),
               "template": LLAMA3, "add_bos": False},
    # Llama 3.1 / 3.2: Llama 3's tokenizer plus rope_scaling (rope_type llama3), which the
    # built-in writer leaves to llama.cpp's converter (it writes the rope_freqs tensor).
    "llama3.1": {"model_type": "llama", "arch": "LlamaForCausalLM", "tok": "bpe",
                 "split": LLAMA3_SPLIT, "bos": "<|begin_of_text|>", "eos": "<|eot_id|>",
                 "specials": ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                              "<|end_header_id|>", "<|eot_id|>"),
                 "template": LLAMA3, "add_bos": False},
    "qwen2": {"model_type": "qwen2", "arch": "Qwen2ForCausalLM", "tok": "bpe",
              "split": QWEN2_SPLIT, "specials": ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
              "bos": None, "eos": "<|im_end|>", "template": CHATML, "add_bos": False},
    "qwen3": {"model_type": "qwen3", "arch": "Qwen3ForCausalLM", "tok": "bpe",
              "split": QWEN2_SPLIT, "specials": ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
              "bos": None, "eos": "<|im_end|>", "template": CHATML, "add_bos": False},
    "gemma2": {"model_type": "gemma2", "arch": "Gemma2ForCausalLM", "tok": "spm",
               "specials": ("<start_of_turn>", "<end_of_turn>"), "eos": "<end_of_turn>",
               "template": GEMMA, "add_bos": True, "dummy_prefix": False,
               "cls": "GemmaTokenizer"},
    # Phi-3's chat tokens swallow the whitespace after them (rstrip), as in its tokenizer.json;
    # llama.cpp does the same for models whose general.name says phi3 (and needs <|endoftext|>).
    "phi3": {"model_type": "phi3", "arch": "Phi3ForCausalLM", "tok": "spm",
             "specials": ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
             "rstrip": ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), "eos": "<|end|>",
             "template": PHI3, "add_bos": False},
}
KINDS = tuple(ARCHS)
DIMS = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128}


# --- tokenizers ------------------------------------------------------------------------------


def spm_tokenizer(out: Path, specials: tuple[str, ...], dummy_prefix: bool,
                  rstrip: tuple[str, ...] = ()) -> Any:
    """A SentencePiece BPE (byte_fallback) trained on CORPUS: tokenizer.model, plus the
    tokenizer.json that `transformers` would make from it (Metaspace-style normalizer)."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(CORPUS) * 4), model_writer=model, vocab_size=420,
        model_type="bpe", byte_fallback=True, character_coverage=1.0,
        user_defined_symbols=list(specials), unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        split_digits=True, add_dummy_prefix=dummy_prefix, normalization_rule_name="identity",
        remove_extra_whitespaces=False, hard_vocab_limit=False, minloglevel=2)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    proc = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = [proc.id_to_piece(i) for i in range(proc.get_piece_size())]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = sorted(((p[:k], p[k:], i) for i, p in enumerate(pieces) if not proc.is_byte(i)
                     and not proc.is_control(i) and not proc.is_unknown(i) and p not in specials
                     for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab),
                    key=lambda m: (m[2], vocab[m[0]], vocab[m[1]]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for a, b, _ in merges],
                               unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    steps = [normalizers.Prepend("\u2581")] if dummy_prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    strip = [decoders.Strip(" ", 1, 0)] if dummy_prefix else []
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), *strip])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False, rstrip=t in rstrip)
                            for t in ("<unk>", "<s>", "</s>", *specials)])
    return tok


def bpe_tokenizer(split: str, specials: tuple[str, ...]) -> Any:
    """A byte-level BPE trained on CORPUS with the family's split regex (Llama 3, Qwen 2)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(CORPUS) * 4, trainer=trainer)
    return tok


def write_tokenizer(out: Path, spec: dict[str, Any]) -> Any:
    if spec["tok"] == "spm":
        tok = spm_tokenizer(out, spec["specials"], spec.get("dummy_prefix", True),
                            spec.get("rstrip", ()))
        bos, unk = "<s>", "<unk>"
    else:
        tok = bpe_tokenizer(spec["split"], spec["specials"])
        bos, unk = spec["bos"], spec["specials"][0]
    tok.save(str(out / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "special": True, "normalized": False,
                                       "lstrip": False, "rstrip": t in spec.get("rstrip", ()),
                                       "single_word": False}
             for t in ([unk, "<s>", "</s>", *spec["specials"]] if spec["tok"] == "spm"
                       else spec["specials"])}
    config = {"tokenizer_class": spec.get("cls", "LlamaTokenizer") if spec["tok"] == "spm"
              else "PreTrainedTokenizerFast",
              "bos_token": bos, "eos_token": spec["eos"], "unk_token": unk,
              "pad_token": spec["eos"], "add_bos_token": spec["add_bos"], "add_eos_token": False,
              "chat_template": spec["template"], "clean_up_tokenization_spaces": False,
              "legacy": True, "model_max_length": 4096, "added_tokens_decoder": added}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tok


# --- weights ---------------------------------------------------------------------------------


def arch_config(kind: str, n_vocab: int, tok: Any) -> dict[str, Any]:
    spec, d = ARCHS[kind], DIMS
    eos = tok.token_to_id(spec["eos"])
    bos_text = "<s>" if spec["tok"] == "spm" else spec.get("bos")
    config: dict[str, Any] = {
        "architectures": [spec["arch"]], "model_type": spec["model_type"],
        "hidden_size": d["hidden"], "num_hidden_layers": d["layers"],
        "intermediate_size": d["intermediate"], "num_attention_heads": d["heads"],
        "num_key_value_heads": d["kv_heads"], "head_dim": d["hidden"] // d["heads"],
        "rms_norm_eps": 1.0e-6, "rope_theta": 10000.0, "max_position_embeddings": 4096,
        "vocab_size": n_vocab, "eos_token_id": eos,
        "bos_token_id": tok.token_to_id(bos_text) if bos_text else None,
        "tie_word_embeddings": kind in ("gemma2", "qwen2", "llama-spm"),
        "hidden_act": "silu", "torch_dtype": "float32",
    }
    if kind == "qwen2":
        config["rope_theta"] = 1000000.0
    if kind == "llama3.1":  # short original context, so the scaling reaches these dimensions
        config.update(rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if kind == "gemma2":
        config.update(hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                      attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                      query_pre_attn_scalar=config["head_dim"], sliding_window=4096,
                      cache_implementation="hybrid")
    if kind == "phi3":
        config.update(original_max_position_embeddings=4096, rope_scaling=None,
                      partial_rotary_factor=1.0, sliding_window=None, resid_pdrop=0.0)
    return config


def random_weights(config: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    """The mlx-lm model's own parameter names and shapes, filled from a seeded generator."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    rng = np.random.default_rng(seed)
    gemma = config["model_type"] == "gemma2"
    out = {}
    for name, arr in tree_flatten(model.parameters()):
        shape = tuple(arr.shape)
        if len(shape) == 2:
            value = rng.standard_normal(shape) / np.sqrt(shape[1])
        elif name.endswith("bias"):
            value = 0.1 * rng.standard_normal(shape)
        else:  # norms: gemma stores weight - 1
            value = (0.0 if gemma else 1.0) + 0.1 * rng.standard_normal(shape)
        out[name] = value.astype(np.float32)
    return out


def teach_stop(weights: dict[str, np.ndarray], config: dict[str, Any], chain: list[int],
               seed: int) -> None:
    """Greedy decoding walks `chain` (last prompt token -> answer tokens -> end of turn).

    Block outputs are damped so the last hidden state is mostly the current token's embedding;
    the chain's embeddings span their own dimensions, and the final norm's signs (+1/-1) make
    the output scores a symmetric matrix S with S[i, i+1] largest in row i (tied output layers
    need a symmetric S; an untied one gets the same matrix)."""
    rng = np.random.default_rng(seed + 1)
    emb = weights["model.embed_tokens.weight"]
    hidden, k = emb.shape[1], len(chain)
    assert k + 4 < hidden and len(set(chain)) == k, chain
    scores = np.zeros((k, k))
    for i in range(k - 1):
        scores[i, i + 1] = scores[i + 1, i] = 1.0 + 0.5 * i  # rising: row i peaks at i + 1
    scores -= 2.0 * np.eye(k)
    values, vectors = np.linalg.eigh(scores)
    emb[:, :k] = 0.0
    emb[chain] = 0.0
    emb[chain, :k] = vectors * np.sqrt(np.abs(values))
    emb[chain] *= 6.0 * np.sqrt(hidden) / np.linalg.norm(emb[chain], axis=1, keepdims=True).max()
    sign = np.ones(hidden, np.float32)
    sign[:k] = np.sign(values)
    gemma = config["model_type"] == "gemma2"
    weights["model.norm.weight"] = sign - 1.0 if gemma else sign * (1 + 0.05 * rng.random(hidden))
    if "lm_head.weight" in weights:
        weights["lm_head.weight"] = emb.copy()
    for name, w in weights.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            w *= 0.05
        if gemma and name.endswith(("post_attention_layernorm.weight",
                                    "post_feedforward_layernorm.weight")):
            w[:] = -0.95  # the norm multiplies by 1 + weight


def make_tiny_arch(kind: str, out: Path | str, seed: int = 0, teach: bool = True) -> Path:
    """Write a tiny `kind` model that answers every chat prompt with a few tokens, then stops
    (`teach=False`: plain random weights, attention at full strength, for logit comparisons)."""
    import mlx.core as mx

    from pipeline.training import model as mlx_model

    spec, out = ARCHS[kind], Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = write_tokenizer(out, spec)
    config = arch_config(kind, tok.get_vocab_size(), tok)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    weights = random_weights(config, seed)
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    hf = load_tokenizer(out)
    prompt = mlx_model.prompt_ids(hf, [{"role": "user", "content": "Hi"}])
    answer = [i for i in dict.fromkeys(tok.encode("Use CREATE INDEX now").ids)
              if i not in (prompt[-1], config["eos_token_id"]) and not
              tok.id_to_token(i).startswith("<")][:4]
    if teach:
        teach_stop(weights, config, [prompt[-1], *answer, config["eos_token_id"]], seed)
    mx.save_safetensors(str(out / "model.safetensors"),
                        {k: mx.array(v) for k, v in weights.items()}, metadata={"format": "mlx"})
    return out
