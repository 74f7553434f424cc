"""The `tuneline` command: registers commands, loads params, calls the stage modules.

No logic lives here; each command imports its module lazily so `tuneline --help` stays fast and
one stage's heavy dependencies never slow another. `--params` belongs to the app (`tuneline
--params p.yaml train ...`; written after the command it is read the same), and a `UserError`
becomes one red line and the exit code its class carries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.commands.app import register
from pipeline.core import config
from pipeline.core.cli_support import (
    Params,
    TunelineGroup,
    evaluate_prompts,
    near_dup_threshold,
    params_of,
)

app = typer.Typer(cls=TunelineGroup, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)


@app.callback()
def options(
    ctx: typer.Context,
    params: Annotated[Path, typer.Option("--params", help="params.yaml to read")] = (
        config.PARAMS_FILE),
) -> None:
    """Turn a list of questions into a fine-tuned, versioned, shareable LLM (DVC + mlx-lm)."""
    from pipeline.core.model_source import offline_for_params
    ctx.obj = Params(params)
    offline_for_params(params)  # the embedded default and local paths never ask the network


@app.command("base-model")
def base_model(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="directory to write the mlx-lm model to")],
) -> None:
    """Convert `base.model` (embedded GGUF, .gguf, directory or HF id) into an mlx-lm model."""
    from pipeline import base_model as stage

    params = params_of(ctx)  # the whole base section is checked; base.seed is not read
    cfg = stage.SourceConfig(params.base.model, params.base.revision, params.base.quantize,
                             params.base.quantize_group_size)
    result = stage.run(cfg, stage.BasePaths(out))
    typer.echo(f"base model ({result.kind}) {result.source} -> {result.out}")


@app.command()
def generate(
    ctx: typer.Context,
    questions: Annotated[Path, typer.Option(help="data/questions.jsonl")],
    out: Annotated[Path, typer.Option(help="data/generated/answers.jsonl")],
    metrics: Annotated[Path, typer.Option(help="reports/generate.json")],
    cache: Annotated[Path, typer.Option(help="reply cache directory (kept outside DVC outputs)")],
    base_model: Annotated[Path, typer.Option(help="base model directory (embedded backend)")],
) -> None:
    """Answer every question and draft its follow-up with the configured LLM (cached, resumable)."""
    from pipeline import generate as stage
    from pipeline.llm import clients as llm

    params = params_of(ctx)
    cfg, seed, model = params.load(stage.GenerateConfig, "generate"), params.base.seed, params.base.model
    paths = stage.GeneratePaths(questions, out, metrics, cache)
    r = stage.run(cfg, paths, seed=seed, base=llm.BaseModel(model, base_model))
    typer.echo(f"{r.questions} questions: {r.generated} generated, {r.reused} reused, "
               f"{len(r.failed)} failed; {r.requests} requests in {r.wall_s:.1f} s -> {out}")


@app.command()
def curate(
    ctx: typer.Context,
    generated: Annotated[Path, typer.Option(help="generated answers (absent: none yet)")],
    questions: Annotated[Path, typer.Option(help="data/questions.jsonl")],
    corrections: Annotated[Path, typer.Option(help="expert corrections (absent: none)")],
    imports: Annotated[Path, typer.Option(help="folder of *.jsonl in any supported layout")],
    out: Annotated[Path, typer.Option(help="dataset folder: train/valid/test.jsonl")],
    report: Annotated[Path, typer.Option(help="reports/curate.json")],
) -> None:
    """Merge generated answers, imports and expert corrections; dedupe; split train/valid/test."""
    from pipeline import curate as stage

    params = params_of(ctx)
    cfg = params.load(stage.CurateConfig, "curate")
    r = stage.run(cfg, stage.CuratePaths(generated, questions, corrections, imports, out, report),
                  held_out=evaluate_prompts(params))
    counts = ", ".join(f"{k} {v}" for k, v in r.counts.items())
    typer.echo(f"dataset -> {out}: {counts}; removed {r.duplicates} duplicates, "
               f"{r.dropped} dropped (details in {report})")


@app.command()
def validate(
    ctx: typer.Context,
    paths: Annotated[list[Path], typer.Argument(help="JSONL files, or dataset folders")],
    json_out: Annotated[bool, typer.Option("--json", help="full report on stdout")] = False,
    tokenizer: Annotated[Path, typer.Option(help="tokenizer.json or a model folder")] = Path(
        "models/base"),
    report: Annotated[Path | None, typer.Option(help="metrics file to write")] = None,
    docs: Annotated[Path | None, typer.Option(help="write GX Data Docs HTML here")] = None,
) -> None:
    """Check JSONL training data with Great Expectations. Exit 0 clean, 1 data errors, 2 usage."""
    import json

    from pipeline import validate as stage
    from validation.leakage import Leakage

    params = params_of(ctx)
    cfg = params.load(stage.ValidateConfig, "validate")
    limits = config.load_keys(stage.TrainLimits, "train", params.path)
    leak = Leakage(near_dup_threshold(params), evaluate_prompts(params))
    result = stage.run(cfg, stage.ValidatePaths(paths, tokenizer, report, docs),
                       max_seq_length=limits.max_seq_length, leak=leak)
    typer.echo(stage.render(result), err=True)
    if json_out:
        typer.echo(json.dumps(result.to_json(), ensure_ascii=False, indent=2))
    if not result.ok:
        raise typer.Exit(1)


@app.command()
def train(
    ctx: typer.Context,
    model: Annotated[Path, typer.Option(help="base model directory")],
    data: Annotated[Path, typer.Option(help="folder with train.jsonl and valid.jsonl")],
    adapters: Annotated[Path, typer.Option(help="adapter output directory")],
    metrics: Annotated[Path, typer.Option(help="reports/train.json")],
    curve: Annotated[Path, typer.Option(help="reports/train_loss.tsv")],
    live: Annotated[Path | None, typer.Option(
        help="DVCLive folder updated while training (dvc exp show, dvc plots show)")] = None,
    reference: Annotated[Path | None, typer.Option(
        help="each pair's reference log-probs (objective dpo; empty otherwise)")] = None,
    reference_cache: Annotated[Path | None, typer.Option(
        help="folder keeping reference log-probs per row between runs")] = None,
    sft_cache: Annotated[Path | None, typer.Option(
        help="folder keeping finished SFT adapters: a dpo/orpo run's SFT-only baseline")] = None,
) -> None:
    """Fine-tune the base model with mlx-lm (LoRA, DoRA or full) on the curated dataset
    (train.objective sft), or on its preference pairs (dpo, orpo)."""
    from pipeline import train as stage
    from pipeline.training import launch

    params = params_of(ctx)
    cfg, seed = params.load(stage.TrainConfig, "train"), params.base.seed
    if launch.relaunch(params.load(launch.LaunchConfig, "launch")):
        return  # the ranks ran this command under mlx.launch; rank 0 wrote the outputs
    result = stage.run(cfg, stage.TrainPaths(model, data, adapters, metrics, curve, live=live,
                                             reference=reference,
                                             reference_cache=reference_cache,
                                             sft_cache=sft_cache), seed=seed)
    launch.mark_done()
    typer.echo(f"trained {result.iters} steps: val loss {result.val_loss:.3f}; kept step "
               f"{result.kept_iteration} ({cfg.keep}) -> {adapters}")


@app.command()
def fuse(
    model: Annotated[Path, typer.Option(help="base model directory")],
    adapters: Annotated[Path, typer.Option(help="adapter directory")],
    out: Annotated[Path, typer.Option(help="fused model directory")],
) -> None:
    """Merge the adapter into the base weights: a standalone mlx-lm model."""
    from pipeline import fuse as stage

    stage.run(stage.FusePaths(model, adapters, out))
    typer.echo(f"fused model -> {out}")


@app.command()
def export(
    ctx: typer.Context,
    model: Annotated[Path, typer.Option(help="fused model directory (mlx-lm layout)")],
    base: Annotated[Path, typer.Option(help="base model directory (for tokenizer provenance)")],
    dataset: Annotated[Path, typer.Option(help="dataset folder (hashed into the provenance)")],
    out: Annotated[Path, typer.Option(help="GGUF output directory")],
    report: Annotated[Path, typer.Option(help="reports/gguf.json")],
    adapters: Annotated[Path | None, typer.Option(
        help="LoRA adapter directory: also write adapter-f16.gguf for llama.cpp/Ollama")] = None,
) -> None:
    """Write F16 + quantized GGUFs, the LoRA adapter GGUF and Ollama Modelfiles; prove each runs
    in llama.cpp."""
    from pipeline import export as stage

    params = params_of(ctx)
    cfg, seed = params.load(stage.ExportConfig, "export"), params.base.seed
    result = stage.run(cfg, stage.ExportPaths(model, base, dataset, out, report, adapters),
                       seed=seed)
    for qtype, path in result.files.items():
        info = result.report["files"][qtype]
        typer.echo(f"{path}: agreement with MLX {info['agreement']:.3f}, "
                   f"{info['tokens_per_second']} tokens/s in llama.cpp")
    lora = result.adapter
    if lora.get("written"):
        typer.echo(f"{out / lora['file']} ({lora['size_bytes'] / 1e6:.1f} MB) on {lora['base_file']}: "
                   f"agreement with the fused F16 GGUF {lora['agreement_with_fused_f16']:.3f}")
    else:
        typer.echo(f"no adapter GGUF: {lora.get('reason')}")


@app.command()
def evaluate(
    ctx: typer.Context,
    model: Annotated[Path, typer.Option(help="base model directory")],
    adapters: Annotated[Path, typer.Option(help="adapter directory")],
    test: Annotated[Path, typer.Option(help="held-out split, data/dataset/test.jsonl")],
    metrics: Annotated[Path, typer.Option(help="reports/eval.json")],
    html: Annotated[Path, typer.Option(help="reports/compare.html")],
    cache: Annotated[Path | None, typer.Option(
        help="folder keeping the base model's results between runs (not a DVC output)")] = None,
    pairs: Annotated[Path | None, typer.Option(
        help="held-out preference pairs: preference accuracy and margin of base, the SFT-only "
        "adapter (adapters/sft, after a dpo/orpo run) and tuned")] = None,
) -> None:
    """Test loss, perplexity and greedy answers of the base and the tuned model, side by side;
    preference accuracy on held-out pairs."""
    from pipeline import evaluate as stage

    params = params_of(ctx)
    cfg, seed = params.load(stage.EvalConfig, "evaluate"), params.base.seed
    spec = stage.loss_spec(params.path)
    paths = stage.EvalPaths(model, adapters, test, metrics, html, cache, pairs)
    result = stage.run(cfg, paths, spec=spec, seed=seed)
    typer.echo(f"test loss base {result.base_loss:.4f} -> tuned {result.tuned_loss:.4f} "
               f"({result.improvement:+.4f}); {result.answers} answers each -> {html}")


@app.command()
def publish(
    ctx: typer.Context,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="check the gate and build the release, upload nothing")] = False,
    stage: Annotated[bool, typer.Option(
        "--stage", help="the dvc stage: judge what can be judged inside dvc repro, list what "
        "waits for git commit and dvc push, upload nothing, exit 0")] = False,
    exit_zero: Annotated[bool, typer.Option(
        "--exit-zero", help="exit 0 even if the gate fails")] = False,
    card: Annotated[Path, typer.Option(help="model card preview (git-ignored folder)")] = Path(
        ".tuneline/model_card.md"),
    dataset_card: Annotated[Path, typer.Option(
        help="dataset card preview, with publish.dataset.enabled")] = Path(
        ".tuneline/dataset_card.md"),
    report: Annotated[Path, typer.Option(
        help="this run's verdict (the dvc stage writes reports/publish.json)")] = Path(
        ".tuneline/publish.json"),
    releases: Annotated[Path, typer.Option(
        help="folder keeping one record per upload attempt (commit it)")] = Path(
        "reports/releases"),
    validation: Annotated[Path, typer.Option()] = Path("reports/validation.json"),
    eval_report: Annotated[Path, typer.Option("--eval")] = Path("reports/eval.json"),
    gguf_report: Annotated[Path, typer.Option()] = Path("reports/gguf.json"),
    train_report: Annotated[Path, typer.Option()] = Path("reports/train.json"),
    dataset: Annotated[Path, typer.Option()] = Path("data/dataset"),
    dvc_lock: Annotated[Path, typer.Option()] = Path("dvc.lock"),
    base: Annotated[Path, typer.Option()] = Path("models/base"),
    adapters: Annotated[Path, typer.Option()] = Path("models/adapters"),
    fused: Annotated[Path, typer.Option()] = Path("models/fused"),
    gguf: Annotated[Path, typer.Option()] = Path("models/gguf"),
) -> None:
    """Publish to the Hugging Face Hub behind the gate in params.yaml `publish:`.

    Uploads only if publish.enabled, publish.repo_id and HF_TOKEN are all set; else a dry run.
    """
    from pipeline import publish as stage_module

    params = params_of(ctx)
    cfg = params.load(stage_module.PublishConfig, "publish")
    paths = stage_module.PublishPaths(params.path, validation, eval_report, gguf_report,
                                      train_report, dataset, dvc_lock, base, adapters, fused,
                                      gguf, report, card, None if stage else releases,
                                      dataset_card)
    result = stage_module.run(cfg, paths, dry_run=dry_run, stage=stage)
    typer.echo(stage_module.render(result))
    if not result.passed and not (exit_zero or stage):
        raise typer.Exit(1)


register(app)  # questions, review, chat, compare, plan, doctor (pipeline/commands/app.py)


def main() -> None:
    from pipeline.training import accel

    accel.prefer_fast_blas()
    app()


if __name__ == "__main__":
    main()
