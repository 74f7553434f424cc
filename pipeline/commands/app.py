"""The commands for people beside the stages, added to the `tuneline` app by pipeline/cli.py:
`questions draft`, `review export|apply|serve`, `chat`, `compare`, `plan`, `doctor`. No logic, as
in cli.py: each imports its module lazily and prints its result. No stage runs these, so no
dvc.yaml stage depends on this file (tests/test_dvc_yaml.py: DISPATCH)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from pipeline.core import config
from pipeline.core.cli_support import near_dup_threshold, params_of


def register(app: typer.Typer) -> None:
    app.add_typer(questions_app, name="questions")
    app.add_typer(review_app, name="review")
    for command in (chat, compare, plan, doctor):
        app.command()(command)


questions_app = typer.Typer(no_args_is_help=True, help="Draft and manage the question list.")


@questions_app.command("draft")
def questions_draft(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="question list to append to")] = Path(
        "data/questions.jsonl"),
    topic: Annotated[str | None, typer.Option(help="default: questions.topic")] = None,
    count: Annotated[int | None, typer.Option(help="default: questions.count")] = None,
    prompt: Annotated[str | None, typer.Option(help="template name in questions.prompts")] = None,
    category: Annotated[list[str] | None, typer.Option(
        help="audience category, repeatable (default: questions.categories)")] = None,
    base_model: Annotated[Path, typer.Option(help="base model directory (embedded backend)")] = Path(
        "models/base"),
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print, append nothing")] = False,
) -> None:
    """Ask the LLM for questions; append new, deduplicated ones with provenance."""
    import dataclasses

    from pipeline.commands import questions as stage
    from pipeline.llm import clients as llm

    params = params_of(ctx)
    cfg = params.load(stage.DraftConfig, "questions")
    given = {"topic": topic, "count": count, "prompt": prompt,
             "categories": tuple(category) if category else None}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None})
    base_cfg = params.base
    r = stage.run(cfg, base_cfg.seed, out, base=llm.BaseModel(base_cfg.model, base_model),
                  dry_run=dry_run, near_dup_threshold=near_dup_threshold(params))
    if r.note:
        typer.echo(f"note: {r.note}")
    for row in r.added:
        typer.echo(f"{'(dry run) ' if dry_run else ''}{row['id']} [{row.get('category', '-')}] "
                   f"{row['question']}")
    typer.echo(f"parsed {r.parsed}, dropped {len(r.duplicates)} near-duplicates, "
               f"{'would append' if dry_run else 'appended'} {len(r.added)} to {out} "
               f"(prompt {r.prompt_id})")


review_app = typer.Typer(no_args_is_help=True, help="Review the dataset in a sheet or the browser; "
                         "edits become data/corrections.jsonl lines.")
SheetOpt = Annotated[Path, typer.Option(help="the review sheet (CSV)")]
DatasetOpt = Annotated[Path, typer.Option(help="dataset folder")]
CorrectionsOpt = Annotated[Path, typer.Option(help="corrections file")]


@review_app.command("export")
def review_export(
    sheet: SheetOpt = Path("review.csv"),
    dataset: DatasetOpt = Path("data/dataset"),
    corrections: CorrectionsOpt = Path("data/corrections.jsonl"),
    questions: Annotated[Path, typer.Option(help="question list")] = Path("data/questions.jsonl"),
) -> None:
    """Write the current dataset (and dropped questions) as an editable CSV sheet."""
    from pipeline.commands import review as stage

    r = stage.export(dataset, corrections, questions, sheet)
    typer.echo(f"{sheet}: {r.rows} rows ({r.dropped} dropped); edit it, then "
               f"`tuneline review apply --sheet {sheet}`")


@review_app.command("apply")
def review_apply(
    sheet: SheetOpt = Path("review.csv"),
    dataset: DatasetOpt = Path("data/dataset"),
    corrections: CorrectionsOpt = Path("data/corrections.jsonl"),
) -> None:
    """Turn the cells you changed in the sheet into corrections (idempotent)."""
    from pipeline.commands import review as stage

    r = stage.apply(sheet, corrections, dataset)
    for line in r.changed:
        typer.echo(line)
    for note in r.notes:
        typer.secho(f"note: {note}", err=True)
    typer.echo(f"{len(r.changed)} corrections changed in {corrections}"
               + ("; run `dvc repro` to rebuild the dataset" if r.changed else ""))


@review_app.command("serve")
def review_serve(
    port: Annotated[int, typer.Option(help="port on 127.0.0.1")] = 8765,
    open_browser: Annotated[bool, typer.Option("--open", help="open the page in a browser")] = False,
    host: Annotated[str, typer.Option(help="address to listen on (127.0.0.1, ::1, 0.0.0.0...); "
                                      "others on the network can edit your data if you widen "
                                      "it")] = "127.0.0.1",
    dataset: DatasetOpt = Path("data/dataset"),
    corrections: Annotated[Path, typer.Option(help="corrections file (inside data/)")] = Path(
        "data/corrections.jsonl"),
    questions: Annotated[Path, typer.Option(help="questions file")] = Path(
        "data/questions.jsonl"),
    validation: Annotated[Path, typer.Option(help="validate's report")] = Path(
        "reports/validation.json"),
    evaluation: Annotated[Path, typer.Option(help="evaluate's report")] = Path("reports/eval.json"),
) -> None:
    """Review and correct the dataset in the browser; saves become data/corrections.jsonl lines."""
    from pipeline.commands import review_server as stage

    paths = stage.ServePaths(Path.cwd(), dataset, corrections, questions, validation, evaluation)
    stage.serve(paths, host, port, open_browser)


def chat(
    model: Annotated[Path | None, typer.Option(
        help="model directory (default: models/base + models/adapters; or models/fused)")] = None,
    adapters: Annotated[Path | None, typer.Option(
        help="adapter to apply (default: models/adapters when --model is not given)")] = None,
    max_tokens: Annotated[int, typer.Option(help="longest reply, in tokens")] = 512,
    temp: Annotated[float, typer.Option(help="sampling temperature; 0 = greedy")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="sampling seed (with --temp > 0)")] = None,
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
) -> None:
    """Chat with the tuned model in the terminal: history kept, /reset, /exit."""
    from pipeline.commands import chat as stage

    model_dir, adapter_dir = stage.resolve(model, adapters)
    loaded, tokenizer = stage.load_model(model_dir, adapter_dir)
    if seed is not None:
        import mlx.core as mx

        mx.random.seed(seed)
    typer.echo(f"chatting with {model_dir}" + (f" + {adapter_dir}" if adapter_dir else ""))
    stage.chat_loop(stage.stream_reply(loaded, tokenizer, max_tokens, temp), sys.stdin,
                    sys.stdout, system)


def compare(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="the question to ask both models")],
    model: Annotated[Path, typer.Option(help="base model directory")] = Path("models/base"),
    adapters: Annotated[Path, typer.Option(help="adapter directory")] = Path("models/adapters"),
    max_tokens: Annotated[int | None, typer.Option(
        help="answer budget (default: evaluate.max_tokens)")] = None,
) -> None:
    """Answer one prompt with the base and the tuned model (greedy) and show both side by side."""
    from pipeline.commands import chat as stage

    if max_tokens is None:
        max_tokens = config.load_keys(stage.AnswerBudget, "evaluate", params_of(ctx).path).max_tokens
    base, tuned = stage.compare(model, adapters, prompt, max_tokens)
    typer.echo(stage.side_by_side([("base", base["answer"]), ("tuned", tuned["answer"])]))


def plan(ctx: typer.Context,
         model: Annotated[Path | None, typer.Option(help="folder with config.json")] = None,
         memory: Annotated[float | None, typer.Option(help="GiB to plan for")] = None,
         device: Annotated[str | None, typer.Option(help="cpu (f32) | gpu (bf16)")] = None) -> None:
    """What fits, before training: parameters, predicted peak memory, the knobs that help."""
    from pipeline.commands import plan as stage

    typer.echo(stage.render(result := stage.run(params_of(ctx).path, model, memory, device)))
    raise typer.Exit(0 if result.fits else 1)


def doctor(ctx: typer.Context) -> None:
    """Say what this machine runs on (MLX device, BLAS, dtype), what is missing, how to fix it."""
    from pipeline.commands import doctor as stage

    report = stage.run(params_of(ctx).path)
    typer.echo(stage.render(report))
    if not report.ok:
        raise typer.Exit(1)
