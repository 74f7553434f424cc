"""The curated dataset as a Hugging Face dataset repository: its files and its dataset card.

`tuneline publish` pushes it (pipeline/hub/client.py, repo_type "dataset", one commit) when
`publish.dataset.enabled`, behind the same gate as the model; the model card's `datasets:`
metadata then names it. The card is a `huggingface_hub.DatasetCard`: license, languages, size
category, task, a `configs:` block mapping the JSONL files to the Hub's split names (so the
dataset viewer and `datasets.load_dataset(repo)` find them), and a body with the source breakdown
(expert / imported / generated), the generating model and prompts, the validation summary and the
DVC hashes.

    from pipeline.hub import dataset_card
    facts = dataset_card.collect_facts(inputs, cfg, model_repo="me/model")
    text = dataset_card.render(facts, git)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core import config
from pipeline.hub import modelcard
from pipeline.hub.repo_facts import GitFacts

CARD_SECTIONS = ("base", "generate", "questions")  # params sections the dataset card records
HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}  # file stem -> Hub split
SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                   (1_000_000, "100K<n<1M"))


@dataclass(frozen=True)
class DatasetConfig:
    enabled: bool  # also push data/dataset to a Hub dataset repository
    repo_id: str | None  # namespace/name of the dataset repository
    private: bool  # create it private; refuse to upload into a public one
    license: str | None  # SPDX id of the dataset (yours to choose: see the card); null = unset
    languages: tuple[str, ...]  # ISO 639-1 codes of the conversations


@dataclass(frozen=True)
class DatasetInputs:
    params: Path
    dataset: Path  # data/dataset with train/valid/test.jsonl
    dvc_lock: Path
    validation: Path  # reports/validation.json


def split_files(dataset: Path) -> list[tuple[str, Path]]:
    """(repo path, local file) of each split file present, in train/valid/test order."""
    return [(f"{stem}.jsonl", dataset / f"{stem}.jsonl") for stem in HUB_SPLITS
            if (dataset / f"{stem}.jsonl").is_file()]


def size_category(rows: int) -> str:
    return next((name for limit, name in SIZE_CATEGORIES if rows < limit), "n>1M")


def collect_facts(inputs: DatasetInputs, cfg: DatasetConfig, *, model_repo: str | None,
                  files: list[tuple[str, int]]) -> dict[str, Any]:
    """Everything the dataset card says except the git commit (JSON-safe, deterministic)."""
    params = {name: _section(name, inputs.params) for name in CARD_SECTIONS}
    summary = modelcard.dataset_summary(inputs.dataset, inputs.dvc_lock)
    return {
        "repo_id": cfg.repo_id,
        "name": (cfg.repo_id or "tuneline-dataset").split("/")[-1],
        "license": cfg.license,
        "languages": list(cfg.languages),
        "model_repo": model_repo,
        "files": [{"path": p, "size": s} for p, s in files],
        "summary": summary,
        "generation": generation_facts(params),
        "validation": validation_summary(inputs.validation),
    }


def _section(name: str, path: Path) -> dict[str, Any]:
    """A section for the record, or {} when this params file has none (the card says less)."""
    try:
        return config.section(name, path)
    except config.ConfigError:
        return {}


def generation_facts(params: dict[str, Any]) -> dict[str, Any]:
    """The model and prompts that wrote the generated answers and the drafted questions."""
    gen = params.get("generate") or {}
    questions = params.get("questions") or {}
    base_model = (params.get("base") or {}).get("model")
    model = gen.get("model")
    return {
        "backend": gen.get("backend"),
        "model": base_model if model == "base" else model,
        "base_model_hf_id": modelcard.base_hf_id(base_model) if model == "base" else None,
        "temperature": gen.get("temperature"),
        "max_tokens": gen.get("max_tokens"),
        "system": gen.get("system"),
        "answer_template": gen.get("answer_template"),
        "followup_template": gen.get("followup_template"),
        "questions_prompt": (questions.get("prompts") or {}).get(questions.get("prompt")),
    }


def validation_summary(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    return {k: data.get(k) for k in ("ok", "rows", "errors", "warnings")}


def render(facts: dict[str, Any], git: GitFacts) -> str:
    """README.md of the dataset repository: metadata the Hub indexes, then the body."""
    from huggingface_hub import DatasetCard, DatasetCardData

    rows = facts["summary"]["rows"]
    present = {p["path"] for p in facts["files"]}
    data = DatasetCardData(
        license=facts["license"], language=facts["languages"] or None,
        size_categories=[size_category(rows)], task_categories=["text-generation"],
        pretty_name=facts["name"], tags=["tuneline", "chat", "conversational", "dvc"],
        configs=[{"config_name": "default", "data_files": [
            {"split": split, "path": f"{stem}.jsonl"} for stem, split in HUB_SPLITS.items()
            if f"{stem}.jsonl" in present]}],
    )
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body(facts, git)}"))


def body(facts: dict[str, Any], git: GitFacts) -> str:
    summary, gen = facts["summary"], facts["generation"]
    lines = [f"# {facts['name']}", "",
             (f"Chat conversations (mlx-lm `messages` layout, one JSON object per line, with "
              f"`id` and `source`) curated by tuneline: {summary['rows']} rows."), ""]
    if facts["model_repo"]:
        repo = facts["model_repo"]
        lines += [f"Model trained on it: [{repo}](https://huggingface.co/{repo})", ""]
    lines += ["## Splits", "", "| file | Hub split | rows |", "|---|---|---|"]
    lines += [f"| `{stem}.jsonl` | {split} | {summary['splits'].get(stem, 0)} |"
              for stem, split in HUB_SPLITS.items() if stem in summary["splits"]]
    lines += ["", "## Sources", "", "| source | rows | what it is |", "|---|---|---|"]
    meaning = {"expert": "answers written or corrected by a domain expert",
               "imported": "conversations imported from existing files",
               "generated": "answers generated by the model below"}
    lines += [f"| {name} | {count} | {meaning.get(name, '')} |"
              for name, count in summary["sources"].items()]
    lines += ["", "## How the generated answers were made", "",
              f"- Model: `{gen['model']}` ({gen['backend']} backend)"
              + (f", i.e. [{gen['base_model_hf_id']}](https://huggingface.co/"
                 f"{gen['base_model_hf_id']})" if gen["base_model_hf_id"] else ""),
              f"- Temperature {gen['temperature']}, at most {gen['max_tokens']} tokens per answer",
              f"- System prompt: {_quote(gen['system'])}",
              f"- User turn template: {_quote(gen['answer_template'])}",
              f"- Follow-up question prompt: {_quote(gen['followup_template'])}",
              f"- Question drafting prompt: {_quote(gen['questions_prompt'])}", ""]
    lines += ["## Validation", "", _validation_line(facts["validation"]), ""]
    dvc = [f"- DVC `{h['path']}`: md5 `{h['md5']}`" for h in summary["dvc"]] \
        or ["- DVC: no hash in dvc.lock yet (run `dvc repro`)"]
    remote = f" of {git.remote}" if git.remote else ""
    lines += ["## Versions", "", f"- Git commit: `{git.commit or 'unknown'}`{remote}", *dvc,
              (f"- License: `{facts['license']}`. Generated answers inherit the terms of the "
               "model that wrote them; check them before choosing this license."), ""]
    return "\n".join(lines)


def _quote(text: Any) -> str:
    if not text:
        return "(none)"
    return "`" + str(text).replace("`", "'").replace("\n", " / ") + "`"


def _validation_line(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return "No validation report (run `dvc repro validate`)."
    verdict = "passed" if summary.get("ok") else "FAILED"
    return (f"Great Expectations suite {verdict}: {summary.get('rows')} rows, "
            f"{summary.get('errors')} errors, {summary.get('warnings')} warnings "
            "(reports/validation.json).")


def release_files(dataset: Path) -> list[Any]:
    from pipeline.hub.client import ReleaseFile

    return [ReleaseFile.local(repo_path, local) for repo_path, local in split_files(dataset)]


def content_id(files: list[Any], facts: dict[str, Any]) -> str:
    import hashlib

    payload = {"files": {f.path: f.sha256 for f in files}, "facts": facts}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


