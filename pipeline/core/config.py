"""params.yaml -> frozen dataclasses, one per section: the only reader of params.yaml.

Defaults live in params.yaml only: a config class declares fields without defaults, and loading
fails loudly on a missing or unknown key, or a value of the wrong type, naming file, section, key.

    config.load(TrainConfig, "train", path)        # a whole section, strict both ways
    config.load_keys(LossSpec, "train", path)      # the few keys of another stage's section
    config.section("train", path)                  # the checked mapping, for records (model card)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from pipeline.core.errors import UserError

PARAMS_FILE = Path("params.yaml")
T = TypeVar("T")


@dataclass(frozen=True)
class BaseConfig:
    """The `base` section every stage shares (so it lives here, not in the base_model stage)."""

    seed: int  # the one seed every stage derives its randomness from
    model: str  # "embedded", a .gguf path, a local HF-layout directory, or a Hugging Face id
    revision: str | None  # Hub ids: branch, tag or commit; pinned to a commit sha in models/base
    quantize: Literal[4, 8] | None  # bits of the MLX base trained on (QLoRA); null = as it comes
    quantize_group_size: Literal[32, 64, 128]  # weights per quantization scale and bias


class ConfigError(UserError):
    """A params.yaml problem, with the place and what to do in the message."""

    exit_code = 2  # a usage error: the data was never looked at


def read_params(path: Path | str = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: not found; run from the repository root (where dvc.yaml is)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 (byte 0x{exc.object[exc.start]:02x}); re-save the "
                          "file as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error(path, exc)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


def _yaml_error(path: Path, exc: yaml.YAMLError) -> str:
    """PyYAML's messages span lines: one line with the place, as every other error here."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return (f"{where}: not valid YAML ({problem}); indent with spaces and keep the layout of "
            "the shipped params.yaml")


def load(cls: type[T], section: str, path: Path | str = PARAMS_FILE) -> T:
    """Read one section of params.yaml into `cls`."""
    return from_mapping(cls, read_params(path).get(section), f"{path}:{section}")


def load_keys(cls: type[T], section: str, path: Path | str = PARAMS_FILE) -> T:
    """Read the keys `cls` declares from a section another stage owns (e.g. evaluate scores tokens
    with train.max_seq_length): each must be there with the right type; the rest is not ours."""
    return from_mapping(cls, read_params(path).get(section), f"{path}:{section}", subset=True)


def section(name: str, path: Path | str = PARAMS_FILE) -> dict[str, Any]:
    """One section as a plain mapping, for records that copy it whole (the model card)."""
    data = read_params(path).get(name)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}:{name}: section missing or not a mapping")
    return dict(data)


def from_mapping(cls: type[T], data: Mapping[str, Any] | None, where: str,
                 subset: bool = False) -> T:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: section missing or not a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown and not subset:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    missing = sorted(set(fields) - set(data))
    if missing and subset:
        raise ConfigError(f"{where}.{missing[0]} missing; add it to params.yaml")
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing}; add them to params.yaml")
    hints = typing.get_type_hints(cls)
    values = {name: _check(data[name], hints[name], f"{where}.{name}") for name in fields}
    return cls(**values)


def _check(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {list(args)}")
        return value
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                return _check(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not match {hint}")
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return None
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_check(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, where)  # type: ignore[return-value]
    return _check_scalar(value, hint, where)


def _check_scalar(value: Any, hint: Any, where: str) -> Any:
    if hint is Any:
        return value
    if hint is float:
        # YAML reads 1e-5 as a string: write floats as 1.0e-5.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r} (write floats as 1.0e-5)")
        return float(value)
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint in (str, bool) and not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value
