"""dvc.yaml agrees with the code: each stage lists its own module and real params keys, and every
params.yaml section loads into its stage's config class (no key the code does not read)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path

import pytest
import yaml

from pipeline import config

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
STAGES = DVC["stages"]
MODULE_OF_SECTION = {"base": "base_model"}  # sections named otherwise than their module


def test_pipeline_has_every_stage_of_the_design_in_order():
    expected = ["base_model", "generate", "curate", "validate", "train", "evaluate", "fuse",
                "export", "publish"]
    assert [s for s in STAGES if s in expected] == expected


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_depends_on_its_own_module(stage):
    assert f"pipeline/{stage}.py" in STAGES[stage].get("deps", [])


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_params_exist_in_params_yaml(stage):
    for key in STAGES[stage].get("params", []):
        node = PARAMS
        for part in str(key).split("."):
            assert isinstance(node, dict) and part in node, f"{stage}: params key {key} missing"
            node = node[part]


def _config_classes(module_name: str) -> list[type]:
    module = importlib.import_module(f"pipeline.{module_name}")
    return [c for _, c in inspect.getmembers(module, inspect.isclass)
            if dataclasses.is_dataclass(c) and c.__module__ == module.__name__
            and c.__name__.endswith("Config")]


@pytest.mark.parametrize("section", list(PARAMS))
def test_params_section_loads_into_its_config_class(section):
    module = MODULE_OF_SECTION.get(section, section)
    keys = set(PARAMS[section])
    matches = [c for c in _config_classes(module)
               if {f.name for f in dataclasses.fields(c)} == keys]
    assert matches, f"no *Config class in pipeline/{module}.py has exactly the keys {sorted(keys)}"
    config.load(matches[0], section, ROOT / "params.yaml")  # types check out too
