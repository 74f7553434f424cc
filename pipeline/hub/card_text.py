"""The markdown body of the model card: lineage, files, how to run it, data, training,
evaluation, limitations, how to reproduce. Pure text from the facts pipeline/hub/modelcard.py
collects; model output is fenced so it cannot break out of its block.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.hub.repo_facts import GitFacts

METHODS = {"lora": "LoRA", "dora": "DoRA", "full": "full fine-tuning"}
QUANT_RE = re.compile(r"(i?q\d(?:_k)?(?:_[a-z0-9]+)?|bf16|f16|f32)(?=\.gguf$)", re.IGNORECASE)


def body(facts: dict[str, Any], git: GitFacts) -> str:
    return "\n".join([
        _intro(facts, git),
        _files_section(facts),
        _run_section(facts),
        _data_section(facts),
        _training_section(facts),
        _eval_section(facts),
        _limitations_section(facts),
        _reproduce_section(facts, git),
    ])


def _intro(facts: dict[str, Any], git: GitFacts) -> str:
    base = facts["base"]
    base_ref = f"[{base['hf_id']}](https://huggingface.co/{base['hf_id']})" if base["hf_id"] \
        else f"`{base['model']}`"
    method = METHODS.get(str(facts["training"]["params"].get("fine_tune_type")), "fine-tuning")
    data = facts["dataset"]
    return (
        f"# {facts['model_name']}\n\n"
        f"{base_ref} fine-tuned with {method} on {n(data['rows'], 'conversation')} "
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
    ggufs = [f["path"] for f in facts["files"] if f["path"].endswith(".gguf")
             and f["path"] not in LORA_GGUFS]
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
    if set(LORA_GGUFS) <= {f["path"] for f in facts["files"]}:
        parts.append(_lora_gguf_section(repo, "modelfile" in upload))
    return "\n".join(parts)


def _lora_gguf_section(repo: str, modelfile: bool) -> str:
    adapter, base = LORA_GGUFS
    text = (
        "### llama.cpp with the LoRA adapter GGUF\n\n"
        f"`{adapter}` is the adapter alone (a few MB) for `{base}`, the base model it was "
        "trained on (its sha256 is in the adapter's `general.tuneline.base_gguf_sha256`):\n\n"
        f"```sh\nhf download {repo} {base} {adapter} --local-dir .\n"
        f"llama-cli -m {base} --lora {adapter} -cnv\n```\n")
    if modelfile:
        text += ("\nOllama: `hf download` also `Modelfile.adapter`, then "
                 "`ollama create NAME -f Modelfile.adapter` (`FROM` the base, `ADAPTER` the "
                 "adapter).\n")
    return text


LORA_GGUFS = ("adapter-f16.gguf", "base-f16.gguf")  # export's adapter route (gguf_adapter.py)


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
    text += _base_lines(facts["base"])
    if train["report"]:
        text += "\nTraining run (`reports/train.json`):\n\n| Metric | Value |\n|---|---|\n"
        text += "\n".join(f"| {k} | {_cell(v)} |" for k, v in train["report"].items()) + "\n"
    return text


def _base_lines(base: dict[str, Any]) -> str:
    """Which base weights were trained on: the pinned commit, and QLoRA's quantization."""
    text = f"\nBase model `{base['model']}`" + (
        f" at commit `{base['commit']}`.\n" if base.get("commit") else ".\n")
    q = base.get("quantized")
    if q:
        text += (f"\nThe base was quantized to {q['bits']} bits (group size {q['group_size']}) "
                 "for training (QLoRA): the adapter learned on the quantized weights, and the "
                 "fused model and its GGUFs are the de-quantized base plus the adapter.\n")
    return text


def _eval_section(facts: dict[str, Any]) -> str:
    ev = facts["eval"]
    keys = [k for k in ev["tuned"] if isinstance(ev["tuned"][k], (int, float))]
    sft = ev.get("sft")  # a dpo/orpo run: its SFT-only adapter, same settings, same data
    text = "## Evaluation\n\nOn the held-out test split, never seen in training:\n\n"
    text += ("| Metric | Base | SFT only | Tuned |\n|---|---|---|---|\n" if sft is not None
             else "| Metric | Base | Tuned |\n|---|---|---|\n")
    text += "\n".join(f"| {k} | {_cell(ev['base'].get(k, '-'))} |"
                      + (f" {_cell(sft.get(k, '-'))} |" if sft is not None else "")
                      + f" {_cell(ev['tuned'][k])} |" for k in keys) + "\n"
    if sft is not None:
        objective = facts.get("training", {}).get("params", {}).get("objective", "preference")
        text += ("\n`SFT only`: an adapter trained with the same settings and data but objective "
                 f"sft, the baseline the {objective} adapter (Tuned) is compared with.\n")
    if "preference_accuracy" in keys:
        text += ("\n`preference_accuracy`: share of held-out expert corrections where the model "
                 "gives the expert's answer a higher log-probability than the generated answer "
                 "it replaced; `preference_margin`: the mean difference, in nats.\n")
    for key, label in (("judge", "tuned vs base"), ("judge_vs_sft", "tuned vs SFT only")):
        if ev.get(key):
            text += f"\nLLM judge ({label}): " + ", ".join(
                f"{k} {_cell(v)}" for k, v in ev[key].items()) + "\n"
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
        f"- A small model tuned on {n(data['rows'], 'conversation')} of one domain: expect "
        "confident mistakes outside it, and check facts that matter.\n"
        f"- {share} of the training answers were written by an LLM; experts reviewed what they "
        "corrected, not necessarily every row.\n"
        f"- Evaluated on {n(data['splits'].get('test', 0), 'held-out conversation')} by loss "
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


def n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"
