"""params.yaml -> dataclasses: loud failures with the place and the allowed values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from pipeline.core import config
from pipeline.core.config import ConfigError


@dataclass(frozen=True)
class Knobs:
    rate: float
    kind: Literal["lora", "dora"]
    layers: int
    names: tuple[str, ...]
    epochs: float | None


GOOD = {"rate": 1.0e-4, "kind": "lora", "layers": 4, "names": ["a"], "epochs": None}


def test_reads_a_complete_section():
    knobs = config.from_mapping(Knobs, GOOD, "params.yaml:train")
    assert knobs == Knobs(rate=1.0e-4, kind="lora", layers=4, names=("a",), epochs=None)


def test_unknown_key_is_named_with_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"params.yaml:train: unknown key\(s\) \['rnak'\]"):
        config.from_mapping(Knobs, {**GOOD, "rnak": 8}, "params.yaml:train")


def test_missing_key_is_named():
    data = dict(GOOD)
    del data["layers"]
    with pytest.raises(ConfigError, match=r"missing key\(s\) \['layers'\]"):
        config.from_mapping(Knobs, data, "params.yaml:train")


def test_literal_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"train.kind: 'qlora' is not allowed.*\['lora', 'dora'\]"):
        config.from_mapping(Knobs, {**GOOD, "kind": "qlora"}, "params.yaml:train")


def test_float_written_as_1e_5_string_gets_a_hint():
    # PyYAML reads 1e-5 (no dot) as a string.
    import yaml

    value = yaml.safe_load("rate: 1e-5")["rate"]
    with pytest.raises(ConfigError, match="write floats as 1.0e-5"):
        config.from_mapping(Knobs, {**GOOD, "rate": value}, "params.yaml:train")


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="expected an integer"):
        config.from_mapping(Knobs, {**GOOD, "layers": True}, "params.yaml:train")


def test_missing_params_file_says_where_to_run(tmp_path):
    with pytest.raises(ConfigError, match="repository root"):
        config.read_params(tmp_path / "params.yaml")
