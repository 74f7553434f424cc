"""Tokenizer metadata in GGUF files, both ways: `tokenizer.*` fields from a Hugging Face
tokenizer.json (export) and a `tokenizers` byte-level BPE from GGUF fields (base_model import).

Only byte-level BPE ("gpt2" in llama.cpp terms) with the pre-tokenizers llama.cpp is known to
reproduce: gpt-2, smollm (digits then bytes) and llama-bpe (Llama 3). Raises GGUFError.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.gguf_io import file as gguf_file
from pipeline.gguf_io.file import GGUFError

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# llama.cpp pre-tokenizer name -> how to split text before byte-level BPE.
DIGITS_THEN_BYTES = "digits+bytelevel"
BYTES_ONLY = "bytelevel"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (  # Qwen 2, 2.5 and 3: single digits
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
PRE_TOKENIZERS = {
    "smollm": DIGITS_THEN_BYTES,
    "starcoder": DIGITS_THEN_BYTES,
    "gpt2": BYTES_ONLY,
    "gpt-2": BYTES_ONLY,
    "default": BYTES_ONLY,
    "llama-bpe": LLAMA3_SPLIT,
    "qwen2": QWEN2_SPLIT,
}
Field = tuple[Any, Any, Any]  # (value, GGUFValueType, array item type or None)


# --- Hugging Face -> GGUF --------------------------------------------------------------------


def tokenizer_fields(model_dir: Path, source: Path | None, n_vocab: int) -> tuple[dict, str]:
    """GGUF tokenizer.* fields as {key: (value, type, subtype)} and where they came from.

    The base GGUF's own fields are copied when the base came from a GGUF with the same tokens
    (exact llama.cpp types and pre-tokenizer name); otherwise they are rebuilt from tokenizer.json.
    The chat template always comes from the fused model (it is what MLX used).
    """
    template = chat_template(model_dir)
    fields = copy_tokenizer_fields(source, model_dir) if source is not None else None
    origin = f"base GGUF {source.name if source else ''}"
    if fields is None:
        fields = rebuild_tokenizer_fields(model_dir, n_vocab)
        origin = str(model_dir / "tokenizer.json")
    n_tokens = len(fields["tokenizer.ggml.tokens"][0])
    if n_tokens != n_vocab:
        raise GGUFError(
            f"{origin}: {n_tokens} tokens but the model has {n_vocab} embedding rows; "
            "the tokenizer does not belong to this model"
        )
    if template is not None:
        fields["tokenizer.chat_template"] = _string(template)
    elif "tokenizer.chat_template" not in fields:
        raise GGUFError(
            f"{model_dir}: no chat template (tokenizer_config.json chat_template or "
            "chat_template.jinja); runtimes would not know how to format a conversation"
        )
    return fields, origin


def chat_template(model_dir: Path) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    path = model_dir / "tokenizer_config.json"
    template = json.loads(path.read_text()).get("chat_template") if path.exists() else None
    if isinstance(template, list):  # named templates: runtimes use "default"
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    return template


def copy_tokenizer_fields(source: Path, model_dir: Path) -> dict | None:
    """The base GGUF's tokenizer.* fields, or None when its tokens differ from the fused model's."""
    reader = gguf_file.read(source)
    fields = {}
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        sub = f.types[1] if len(f.types) > 1 else None
        fields[key] = (f.contents(), f.types[0], sub)
    tokens = fields.get("tokenizer.ggml.tokens", ([], None, None))[0]
    if tokens != hf_token_list(model_dir, len(tokens)):
        return None
    return fields


def hf_token_list(model_dir: Path, n_vocab: int) -> list[str]:
    data = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = dict(data["model"]["vocab"])
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    by_id = {i: t for t, i in vocab.items()}
    size = max(n_vocab, max(by_id) + 1)
    return [by_id.get(i, f"[PAD{i}]") for i in range(size)]


def builtin_problem(model_dir: Path) -> str | None:
    """Why the built-in writer cannot write this tokenizer (None: it can)."""
    path = model_dir / "tokenizer.json"
    if not path.exists():
        return f"{path}: not found (a SentencePiece tokenizer.model only)"
    data = json.loads(path.read_text())
    model = data.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        return (f"{path}: tokenizer {model.get('type')!r} with byte_fallback="
                f"{model.get('byte_fallback')} (SentencePiece style); the built-in writer covers "
                "byte-level BPE")
    try:
        pre_tokenizer_name(data, path)
    except GGUFError as exc:
        return str(exc)
    return None


def pre_name_or_none(model_dir: Path) -> str | None:
    """llama.cpp's pre-tokenizer name for tokenizer.json's split rule, None if not known."""
    path = model_dir / "tokenizer.json"
    if not path.exists():
        return None
    try:
        return pre_tokenizer_name(json.loads(path.read_text()), path)
    except GGUFError:
        return None


def rebuild_tokenizer_fields(model_dir: Path, n_vocab: int) -> dict:
    """tokenizer.* fields for a byte-level BPE tokenizer.json (what llama.cpp calls "gpt2")."""
    import gguf

    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise GGUFError(f"{model_dir}: no tokenizer.json; export needs the HF fast tokenizer")
    data = json.loads(path.read_text())
    model = data.get("model", {})
    pre = pre_tokenizer_name(data, path)
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise GGUFError(
            f"{path}: tokenizer {model.get('type')!r} (byte_fallback={model.get('byte_fallback')})"
            " is not supported; supported: byte-level BPE (GPT-2 style, e.g. SmolLM, Llama 3)"
        )
    tokens = hf_token_list(model_dir, n_vocab)
    added = {a["content"]: a for a in data.get("added_tokens", [])}
    types = [
        (TOKEN_CONTROL if added[t].get("special") else TOKEN_USER_DEFINED) if t in added
        else TOKEN_UNUSED if t == f"[PAD{i}]" else TOKEN_NORMAL
        for i, t in enumerate(tokens)
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    arr, s, i32 = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING, gguf.GGUFValueType.INT32
    fields = {
        "tokenizer.ggml.model": _string("gpt2"),
        "tokenizer.ggml.pre": _string(pre),
        "tokenizer.ggml.tokens": (tokens, arr, s),
        "tokenizer.ggml.token_type": (types, arr, i32),
        "tokenizer.ggml.merges": (merges, arr, s),
    }
    fields.update(special_token_fields(model_dir, tokens))
    return fields


def pre_tokenizer_name(data: dict[str, Any], path: Path) -> str:
    """llama.cpp's pre-tokenizer name for the split rules in tokenizer.json."""
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        regex = steps[0].get("pattern", {}).get("Regex")
        if regex in SPLITS:
            return SPLITS[regex]
    raise GGUFError(
        f"{path}: pre-tokenizer {kinds} is not one llama.cpp is known to reproduce; supported: "
        "ByteLevel (gpt-2), Digits+ByteLevel (smollm), Llama-3 Split+ByteLevel (llama-bpe), "
        "Qwen-2 Split+ByteLevel (qwen2)"
    )


def special_token_fields(model_dir: Path, tokens: list[str]) -> dict:
    import gguf

    path = model_dir / "tokenizer_config.json"
    tok_config = json.loads(path.read_text()) if path.exists() else {}
    ids = {t: i for i, t in enumerate(tokens)}
    u32, b = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.BOOL
    fields = {}
    for role in ("bos", "eos", "unknown", "padding"):
        hf_key = {"unknown": "unk_token", "padding": "pad_token"}.get(role, f"{role}_token")
        text = tok_config.get(hf_key)
        text = text.get("content") if isinstance(text, dict) else text
        if text is not None and text in ids:
            fields[f"tokenizer.ggml.{role}_token_id"] = (ids[text], u32, None)
    if "tokenizer.ggml.eos_token_id" not in fields:
        raise GGUFError(
            f"{path}: no eos_token that is in the vocabulary; without it runtimes never stop: "
            "set eos_token (e.g. <|im_end|> for ChatML) in tokenizer_config.json"
        )
    fields["tokenizer.ggml.add_bos_token"] = (bool(tok_config.get("add_bos_token", False)), b, None)
    return fields


def _string(value: str) -> Field:
    import gguf

    return value, gguf.GGUFValueType.STRING, None


# --- GGUF -> Hugging Face --------------------------------------------------------------------


def write_tokenizer(meta: Mapping[str, Any], out: Path) -> None:
    """tokenizer.json and tokenizer_config.json (with the chat template) from GGUF metadata."""
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


def build_tokenizer(meta: Mapping[str, Any]) -> Any:
    """A `tokenizers` byte-level BPE equal to llama.cpp's for gpt2-style GGUF vocabularies."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    kind = meta.get("tokenizer.ggml.model")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in PRE_TOKENIZERS:
        raise GGUFError(
            f"tokenizer {kind!r} with pre-tokenizer {pre!r} is not supported for import; "
            f"supported: model 'gpt2' with pre-tokenizers {sorted(PRE_TOKENIZERS)}"
        )
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    split = PRE_TOKENIZERS[pre]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split not in SPLITS)
    if split == DIGITS_THEN_BYTES:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif split in SPLITS:
        regex = pre_tokenizers.Split(Regex(split), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence([regex, byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    specials = [AddedToken(t, special=True, normalized=False)
                for t, ty in zip(tokens, types) if int(ty) == TOKEN_CONTROL]
    tok.add_special_tokens(specials)
    if meta.get("tokenizer.ggml.add_bos_token") and meta.get("tokenizer.ggml.bos_token_id") is not None:
        bos_id = int(meta["tokenizer.ggml.bos_token_id"])
        bos = tokens[bos_id]
        tok.post_processor = TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return tok
