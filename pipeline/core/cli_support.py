"""What the `tuneline` command stands on, apart from its commands (pipeline/cli.py): the typer group
that hoists `--params` and turns a `UserError` into one red line and its exit code, and `Params`,
the params.yaml a command reads. Also the few keys one command reads from another stage's section
(evaluate.prompts for curate, curate.near_dup_threshold for questions and validate)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
import typer
from typer.core import TyperGroup

from pipeline.core import config
from pipeline.core.errors import UserError

T = TypeVar("T")


def hoist_params(args: Sequence[str]) -> list[str]:
    """Move `--params X` (or `--params=X`) written after a command to the front, where the app's
    option is parsed: dvc.yaml, scripts and habit put it after the command."""
    rest, front, i = list(args), [], 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--":
            break
        if arg == "--params" and i + 1 < len(rest):
            front += rest[i:i + 2]
            del rest[i:i + 2]
        elif arg.startswith("--params="):
            front.append(rest.pop(i))
        else:
            i += 1
    return front + rest


class TunelineGroup(TyperGroup):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_params(args))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            # Known, user-fixable problems: one clear line, no traceback.
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(exc.exit_code) from None


@dataclass(frozen=True)
class Params:
    """The params.yaml a command reads (the app's `--params`) and its `base` section."""

    path: Path

    def load(self, cls: type[T], section: str) -> T:
        return config.load(cls, section, self.path)

    @functools.cached_property
    def base(self) -> config.BaseConfig:
        return self.load(config.BaseConfig, "base")


def params_of(ctx: typer.Context) -> Params:
    return ctx.find_root().obj  # type: ignore[no-any-return]


@dataclass(frozen=True)
class HeldOutPrompts:
    """evaluate.prompts: curate keeps their near copies out of train, validate checks it."""

    prompts: tuple[str, ...]


@dataclass(frozen=True)
class NearDup:
    """curate.near_dup_threshold: the one near-duplicate threshold (questions draft, validate)."""

    near_dup_threshold: float


def evaluate_prompts(params: Params) -> tuple[str, ...]:
    return config.load_keys(HeldOutPrompts, "evaluate", params.path).prompts


def near_dup_threshold(params: Params) -> float:
    value = config.load_keys(NearDup, "curate", params.path).near_dup_threshold
    if not 0 < value <= 1:
        raise config.ConfigError(f"{params.path}:curate.near_dup_threshold: {value} must be in "
                                 "(0, 1]")
    return value


