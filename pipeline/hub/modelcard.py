"""Model card: `tuneline publish --dry-run --card reports/model_card.md` writes a preview.

The card is a `huggingface_hub.ModelCard` whose metadata (license, base model, tags, model-index)
the Hub indexes and whose body tells the whole lineage: dataset rows and sources with the DVC hash,
training params, metrics base vs tuned, evaluation samples, how to run it in mlx-lm, llama.cpp and
Ollama, limitations, the git commit and the command that reproduces it.

`collect_facts` gathers everything except the git commit into a JSON-safe dict: publish hashes it
to decide whether a revision is already on the Hub (a commit that only records the last publish
must not count as a new model). `render` adds the git facts and returns the README.md text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.core import config
from pipeline.core.errors import UserError
from pipeline.core.model_source import EMBEDDED, EMBEDDED_HF_ID, EMBEDDED_LICENSE
from pipeline.hub import card_text as modelcard_text
from pipeline.hub import repo_facts

SOURCES = ("generated", "expert", "imported")
SPLITS = ("train", "valid", "test")


class CardError(UserError):
    """An input of the model card that cannot be read, with the file and what to do."""


@dataclass(frozen=True)
class CardInputs:
    params: Path  # params.yaml (base model, train section)
    dataset: Path  # folder with train/valid/test.jsonl
    dvc_lock: Path  # where the DVC hash of the dataset comes from
    train_report: Path  # reports/train.json (optional)
    eval_report: Path  # reports/eval.json
    base_model: Path  # models/base (its license, when the base_model stage recorded one)


def collect_facts(
    inputs: CardInputs,
    *,
    repo_id: str | None,
    private: bool,
    license: str | None,
    tags: Iterable[str],
    upload: Iterable[str],
    files: Iterable[tuple[str, int]],
    samples: int,
) -> dict[str, Any]:
    """Everything the card says except the git commit, as a deterministic JSON-safe dict."""
    base = config.section("base", inputs.params)
    evaluation = _tolerant_json(inputs.eval_report)
    upload = list(upload)
    return {
        "repo_id": repo_id,
        "model_name": (repo_id or "tuneline-model").split("/")[-1],
        "private": private,
        "base": base_facts(base, _tolerant_json(inputs.base_model / "tuneline.json")),
        "license": license,
        "tags": _tags(tags, upload),
        "upload": upload,
        "files": [{"path": p, "size": s} for p, s in files],
        "dataset": dataset_summary(inputs.dataset, inputs.dvc_lock),
        "training": {
            "seed": base.get("seed"),
            "params": config.section("train", inputs.params),
            "report": _scalars(_tolerant_json(inputs.train_report)),
        },
        "eval": {
            "base": _scalars(evaluation.get("base") or {}),
            "tuned": _scalars(evaluation.get("tuned") or {}),
            "judge": _judge(evaluation.get("judge")),
            "samples": eval_samples(evaluation, samples),
            **_sft_baseline(evaluation),
        },
    }


def _sft_baseline(evaluation: dict[str, Any]) -> dict[str, Any]:
    """A dpo/orpo run's SFT-only side and the judge's verdict against it; nothing otherwise."""
    if not isinstance(evaluation.get("sft"), dict):
        return {}
    return {"sft": _scalars(evaluation["sft"]), "judge_vs_sft": _judge(evaluation.get("judge_vs_sft"))}


def render(facts: dict[str, Any], git: repo_facts.GitFacts) -> str:
    """README.md text: YAML metadata the Hub indexes, then the body."""
    from huggingface_hub import ModelCard

    body = modelcard_text.body(facts, git)
    card = ModelCard(f"---\n{card_data(facts).to_yaml()}\n---\n\n{body}")
    return str(card)


def card_data(facts: dict[str, Any]) -> Any:
    from huggingface_hub import EvalResult, ModelCardData

    tuned = facts["eval"]["tuned"]
    test_rows = facts["dataset"]["splits"].get("test", 0)
    results = [
        EvalResult(
            task_type="text-generation",
            task_name="Text Generation",
            dataset_type="tuneline-held-out",
            dataset_name=f"held-out test split ({modelcard_text.n(test_rows, 'conversation')})",
            dataset_split="test",
            metric_type=metric,
            metric_name=f"test {metric.replace('_', ' ')}",
            metric_value=tuned[key],
        )
        for key, metric in (("test_loss", "loss"), ("test_ppl", "perplexity"),
                            ("perplexity", "perplexity"))
        if isinstance(tuned.get(key), (int, float))
    ]
    return ModelCardData(
        license=facts["license"],
        base_model=facts["base"]["hf_id"],
        base_model_relation=base_model_relation(facts["upload"]) if facts["base"]["hf_id"]
        else None,
        datasets=facts.get("datasets") or None,
        library_name="mlx" if {"fused", "adapter"} & set(facts["upload"]) else None,
        pipeline_tag="text-generation",
        tags=facts["tags"],
        model_name=facts["model_name"],
        eval_results=results or None,
    )


def base_model_relation(upload: Iterable[str]) -> str:
    """How this repo relates to `base_model`, in the Hub's terms (adapter, merge, quantized,
    finetune). Set explicitly because the Hub infers it from the files: GGUF files alone would
    read as "quantized", i.e. the base model itself quantized, which a fine-tune's GGUF is not.
    Only an adapter without fused weights is an "adapter" repo."""
    upload = set(upload)
    return "adapter" if "adapter" in upload and not {"fused", "gguf"} & upload else "finetune"


# --- facts -----------------------------------------------------------------------------------


def base_facts(base: dict[str, Any], provenance: dict[str, Any]) -> dict[str, Any]:
    """The base model as the card names it: Hub id, the commit it was pinned to, and how it was
    quantized for training (QLoRA), from the base_model stage's record."""
    return {"model": base.get("model"), "hf_id": base_hf_id(base.get("model")),
            "commit": provenance.get("commit"), "quantized": provenance.get("quantized")}


def base_hf_id(model: Any) -> str | None:
    """The Hub id of the base model when there is one (the card's `base_model` must be an id)."""
    if model == EMBEDDED:
        return EMBEDDED_HF_ID
    if isinstance(model, str) and model.count("/") == 1 and not Path(model).exists():
        return model
    return None


def base_license(model: Any, base_dir: Path) -> tuple[str | None, str]:
    """The base model's license and where it was found (or why it is unknown)."""
    for name in ("tuneline.json", "README.md"):
        found = _license_in(base_dir / name)
        if found:
            return found.lower(), f"{base_dir / name}"
    if model == EMBEDDED:
        return EMBEDDED_LICENSE, f"the embedded base model, {EMBEDDED_HF_ID}"
    return None, f"no license recorded in {base_dir}/tuneline.json or README.md"


def _license_in(path: Path) -> str | None:
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json":
        try:
            value = json.loads(text).get("license")
        except (json.JSONDecodeError, AttributeError):
            return None
        return value if isinstance(value, str) else None
    match = re.match(r"^---\n(.*?)\n---", text, re.DOTALL)
    if not match:
        return None
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


def dataset_summary(dataset: Path, dvc_lock: Path) -> dict[str, Any]:
    splits: dict[str, int] = {}
    sources = {name: 0 for name in SOURCES}
    for split in SPLITS:
        path = dataset / f"{split}.jsonl"
        if not path.is_file():
            continue
        from pipeline.rows.jsonl import read_jsonl

        rows = read_jsonl(path)
        splits[split] = len(rows)
        for row in rows:
            source = str(row.get("source") or "unknown")
            sources[source] = sources.get(source, 0) + 1
    return {
        "path": str(dataset),
        "rows": sum(splits.values()),
        "splits": splits,
        "sources": sources,
        "dvc": repo_facts.dvc_hashes(dvc_lock, dataset),
    }


def eval_samples(evaluation: dict[str, Any], limit: int) -> list[dict[str, str]]:
    """Up to `limit` question/base/tuned triples: a `samples` list, or evaluate's layout
    (`prompts` with id/question/reference, and `answers` with id/answer under base and tuned)."""
    rows = evaluation.get("samples")
    if not isinstance(rows, list):
        rows = _joined(evaluation)
    samples = []
    for row in rows:
        if not isinstance(row, dict):
            continue
        prompt = _first(row, "prompt", "question", "input")
        tuned_answer = _first(row, "tuned", "answer", "output")
        if prompt is None or tuned_answer is None:
            continue
        sample = {"prompt": prompt, "tuned": tuned_answer}
        for key, names in (("base", ("base",)), ("reference", ("reference", "expected"))):
            value = _first(row, *names)
            if value is not None:
                sample[key] = value
        samples.append(sample)
    return samples[:limit]


def _joined(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    prompts = [p for p in evaluation.get("prompts") or [] if isinstance(p, dict)]
    base = _answers(evaluation.get("base"))
    tuned = _answers(evaluation.get("tuned"))
    rows = []
    for i, answer in enumerate(tuned):
        prompt = _match(prompts, answer, i)
        rows.append({**prompt, **{k: v for k, v in answer.items() if k != "answer"},
                     "tuned": answer.get("answer"), "base": _match(base, answer, i).get("answer")})
    return rows


def _match(items: list[dict[str, Any]], answer: dict[str, Any], index: int) -> dict[str, Any]:
    """The item with the answer's id, else the one at the same position."""
    if answer.get("id") is not None:
        for item in items:
            if item.get("id") == answer["id"]:
                return item
    return items[index] if index < len(items) else {}


def _answers(section: Any) -> list[dict[str, Any]]:
    if not isinstance(section, dict):
        return []
    for key in ("answers", "samples", "generations"):
        if isinstance(section.get(key), list):
            return [_as_answer(item) for item in section[key]]
    return []


def _as_answer(item: Any) -> dict[str, Any]:
    if isinstance(item, dict):
        return {**item, "answer": _first(item, "answer", "output", "text", "completion")}
    return {"answer": str(item)}


def _first(row: dict[str, Any], *keys: str) -> str | None:
    for key in keys:
        value = row.get(key)
        if isinstance(value, str) and value.strip():
            return value
    return None


def _judge(section: Any) -> dict[str, Any] | None:
    if not isinstance(section, dict) or section.get("enabled") is False:
        return None
    return _scalars(section) or None


def _tags(extra: Iterable[str], upload: list[str]) -> list[str]:
    tags = ["tuneline", "fine-tuned", "text-generation"]
    tags += ["mlx"] if {"fused", "adapter"} & set(upload) else []
    tags += ["lora"] if "adapter" in upload else []
    tags += ["gguf"] if "gguf" in upload else []
    tags += ["ollama"] if "modelfile" in upload else []
    return list(dict.fromkeys([*tags, *extra]))


def _scalars(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, (str, int, float, bool)) or v is None}


def read_json(path: Path) -> Any:
    """A JSON report, or None when it does not exist; a broken one is a CardError."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CardError(f"{path}: not valid JSON ({exc}); re-run the stage that writes it") from exc


def _tolerant_json(path: Path) -> dict[str, Any]:
    """A report for the card, or {} when it is missing or broken (the gate says which)."""
    try:
        data = read_json(path)
    except CardError:
        return {}
    return data if isinstance(data, dict) else {}
