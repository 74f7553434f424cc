"""The `tuneline` command: registers commands, loads params, calls the stage modules.

No logic lives here; each command imports its module lazily so `tuneline --help` stays fast and
one stage's heavy dependencies never slow another.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline import config
from pipeline.errors import UserError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

ParamsOpt = Annotated[Path, typer.Option("--params", help="params.yaml to read")]


def fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.command("base-model")
def base_model(
    out: Annotated[Path, typer.Option(help="directory to write the mlx-lm model to")],
    params: ParamsOpt = config.PARAMS_FILE,
) -> None:
    """Convert `base.model` (embedded GGUF, .gguf, directory or HF id) into an mlx-lm model."""
    from pipeline import base_model as stage

    cfg = config.load(stage.BaseConfig, "base", params)
    result = stage.run(cfg, out)
    typer.echo(f"base model ({result.kind}) {result.source} -> {result.out}")


@app.command()
def train(
    model: Annotated[Path, typer.Option(help="base model directory")],
    data: Annotated[Path, typer.Option(help="folder with train.jsonl and valid.jsonl")],
    adapters: Annotated[Path, typer.Option(help="adapter output directory")],
    metrics: Annotated[Path, typer.Option(help="reports/train.json")],
    curve: Annotated[Path, typer.Option(help="reports/train_loss.tsv")],
    params: ParamsOpt = config.PARAMS_FILE,
) -> None:
    """Fine-tune the base model with mlx-lm (LoRA, DoRA or full) on the curated dataset."""
    from pipeline import base_model, train as stage

    cfg = config.load(stage.TrainConfig, "train", params)
    seed = config.load(base_model.BaseConfig, "base", params).seed
    result = stage.run(cfg, seed, stage.TrainPaths(model, data, adapters, metrics, curve))
    typer.echo(f"trained {result.iters} steps: val loss {result.val_loss:.3f} -> {adapters}")


@app.command()
def fuse(
    model: Annotated[Path, typer.Option(help="base model directory")],
    adapters: Annotated[Path, typer.Option(help="adapter directory")],
    out: Annotated[Path, typer.Option(help="fused model directory")],
) -> None:
    """Merge the adapter into the base weights: a standalone mlx-lm model."""
    from pipeline import fuse as stage

    stage.run(model, adapters, out)
    typer.echo(f"fused model -> {out}")


@app.command()
def doctor(
    params: ParamsOpt = config.PARAMS_FILE,
) -> None:
    """Say what this machine runs on (MLX device, BLAS, dtype), what is missing, how to fix it."""
    from pipeline import doctor as stage

    report = stage.run(params)
    typer.echo(stage.render(report))
    if not report.ok:
        raise typer.Exit(1)


def main() -> None:
    from pipeline import accel

    accel.prefer_fast_blas()
    try:
        app()
    except UserError as exc:
        # Known, user-fixable problems: one clear line, no traceback.
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2 if isinstance(exc, config.ConfigError) else 1)


if __name__ == "__main__":
    main()
