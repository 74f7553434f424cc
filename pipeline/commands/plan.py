"""What fits, before training: `tuneline plan [--model DIR] [--memory GIB] [--device cpu|gpu]`

Reads the base's config.json (models/base, else what base.model points at: a folder, the
embedded GGUF's header, or config.json alone from the Hub) and params.yaml's train, base and
launch knobs; prints the parameter count, the predicted peak memory by part, whether it fits
this machine (or `--memory`), and which knobs would make it fit. The formula and its
calibration: pipeline/training/fit.py; the README's "What fits" table comes from `table()`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.core import config as params_config
from pipeline.core import model_source
from pipeline.training import fit

# Shapes of the table's models (their config.json values), and the machines it covers.
TABLE_MODELS = {
    "1B (Llama-3.2-1B)": fit.Shape(2048, 16, 32, 8, 64, 8192, 128256, True),
    "3B (Llama-3.2-3B)": fit.Shape(3072, 28, 24, 8, 128, 8192, 128256, True),
    "7-8B (Llama-3.1-8B)": fit.Shape(4096, 32, 32, 8, 128, 14336, 128256, False),
    "14B (Qwen2.5-14B)": fit.Shape(5120, 48, 40, 8, 128, 13824, 152064, False),
}
MAC_SHARE = 0.75  # Metal's recommended working set: about 3/4 of a Mac's unified memory
TABLE_MACHINES = {**{f"Mac {g} GB": g * 1e9 * MAC_SHARE for g in (16, 24, 32, 64)},
                  **{f"GPU {g} GB": g * 2**30 for g in (24, 48, 80)}}


@dataclass(frozen=True)
class Plan:
    model: str
    where: str  # where config.json came from
    shape: fit.Shape
    run: fit.Run
    estimate: fit.Estimate
    available: int
    memory_source: str
    suggestions: list[str]

    @property
    def fits(self) -> bool:
        return self.estimate.total <= self.available


def run(params: Path, model_dir: Path | None, memory_gib: float | None,
        device: str | None) -> Plan:
    from pipeline.training import launch

    base = params_config.load(params_config.BaseConfig, "base", params)
    train = params_config.load_keys(fit.TrainKnobs, "train", params)
    world = params_config.load(launch.LaunchConfig, "launch", params).processes
    config, where = base_config(base.model, model_dir)
    gpu = _on_gpu() if device is None else device == "gpu"
    if base.quantize and "quantization" not in config:
        config = {**config, "quantization": {"bits": base.quantize,
                                             "group_size": base.quantize_group_size}}
    pack = gpu if train.pack == "auto" else bool(train.pack)
    shape = fit.Shape.from_config(config)
    run_ = fit.run_for(replace(train, pack=pack), config, 2 if gpu else 4, world,
                       train.max_seq_length)
    available, source = (int(memory_gib * 2**30), "--memory") if memory_gib else \
        fit.device_memory()
    est = fit.estimate(shape, run_)
    helps = [] if est.total <= available else fit.suggestions(shape, run_, available)
    return Plan(base.model, where, shape, run_, est, available, source, helps)


def base_config(model: str, model_dir: Path | None) -> tuple[dict[str, Any], str]:
    """config.json of the base: the given or built folder, else from base.model itself."""
    for folder in (model_dir, Path("models/base")):
        if folder is not None and (folder / "config.json").exists():
            return json.loads((folder / "config.json").read_text()), str(folder / "config.json")
    source, kind = model_source.resolve_source(model)
    if kind == "dir":
        return json.loads((Path(source) / "config.json").read_text()), source
    if kind == "gguf":
        from pipeline.gguf_io import file as gguf_file

        reader = gguf_file.read(Path(source))
        config = gguf_file.hf_config(gguf_file.metadata(reader), Path(source))
        config["tie_word_embeddings"] = not any(t.name == "output.weight" for t in reader.tensors)
        return config, f"{Path(source).name} (GGUF header)"
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(model, "config.json")
    except Exception as exc:  # noqa: BLE001 - one line with what to do
        raise model_source.ModelError(model_source.hub_problem(exc, model, None)) from None
    return json.loads(Path(path).read_text()), f"{model} on the Hub (config.json)"


def _on_gpu() -> bool:
    import mlx.core as mx

    return mx.default_device() != mx.cpu


def render(plan: Plan) -> str:
    r, e, gib = plan.run, plan.estimate, fit.GIB
    bits = f"{r.bits}-bit" if r.bits else ("bf16" if r.dtype_bytes == 2 else "float32")
    blocks = plan.shape.layers if r.num_layers == -1 else r.num_layers
    lines = [
        (f"base: {plan.model} ({plan.where}): {e.parameters / 1e9:.2f}B parameters, "
         f"{plan.shape.layers} blocks, hidden {plan.shape.hidden}"),
        (f"run: {r.fine_tune_type} rank {r.rank} on {blocks} blocks of a {bits} base, "
         f"{r.sequences}x{r.seq_len} positions a step per process, grad_checkpoint "
         f"{'on' if r.grad_checkpoint else 'off'}"),
        f"predicted peak memory: {e.total / gib:.1f} GiB",
        f"  weights           {e.weights / gib:7.2f} GiB",
        (f"  trainable + AdamW {e.trainable / gib:7.2f} GiB "
         f"({e.trainable_parameters / 1e6:.1f}M trainable)"),
        f"  activations       {e.activations / gib:7.2f} GiB",
        f"  attention         {e.attention / gib:7.2f} GiB",
        f"  MLX workspace     {e.cache / gib:7.2f} GiB",
        (f"this machine: {plan.available / gib:.1f} GiB ({plan.memory_source}): "
         f"{'fits' if plan.fits else 'does NOT fit'}"),
    ]
    lines += [f"  would fit with: {s}" for s in plan.suggestions]
    return "\n".join(lines)


def table(run: fit.Run) -> str:
    """README's "What fits": predicted peak GiB at bf16 and 4 bits, and where each fits."""
    machines = list(TABLE_MACHINES)
    rows = ["| model | peak bf16 / 4-bit | " + " | ".join(machines) + " |",
            "|---|---|" + "---|" * len(machines)]
    for name, shape in TABLE_MODELS.items():
        full = fit.estimate(shape, replace(run, bits=None)).total
        quant = fit.estimate(shape, replace(run, bits=4)).total
        cells = ["bf16" if full <= m else "4-bit" if quant <= m else "no"
                 for m in TABLE_MACHINES.values()]
        rows.append(f"| {name} | {full / fit.GIB:.1f} / {quant / fit.GIB:.1f} GiB | "
                    + " | ".join(cells) + " |")
    return "\n".join(rows)
