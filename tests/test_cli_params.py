"""`--params` belongs to the app (before or after the command), params.yaml is read through
config.py only, and a UserError's class decides the exit code."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core import config
from pipeline.core.cli_support import hoist_params
from pipeline.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def params_with(tmp_path: Path, **changes: dict) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in changes.items():
        params[section].update(values)
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(params, allow_unicode=True))
    return path


def test_params_is_hoisted_from_after_the_command_but_not_past_a_double_dash():
    assert hoist_params(["train", "--model", "m", "--params", "p.yaml"]) == [
        "--params", "p.yaml", "train", "--model", "m"]
    assert hoist_params(["questions", "draft", "--params=p.yaml"]) == [
        "--params=p.yaml", "questions", "draft"]
    assert hoist_params(["compare", "--", "--params", "x"]) == ["compare", "--", "--params", "x"]


@pytest.mark.parametrize("before", [True, False], ids=["before", "after"])
def test_params_before_or_after_the_command_is_the_file_read(tmp_path, before):
    path = params_with(tmp_path, base={"modle": "typo"})  # only this file has the typo
    args = ["base-model", "--out", str(tmp_path / "out")]
    args = ["--params", str(path), *args] if before else [*args, "--params", str(path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert f"{path}:base: unknown key(s) ['modle']" in result.output
    assert not (tmp_path / "out").exists()


def test_exit_code_comes_with_the_error_class(tmp_path, monkeypatch):
    assert UserError.exit_code == 1 and config.ConfigError.exit_code == 2
    monkeypatch.chdir(tmp_path)  # no params.yaml here: a usage error
    result = runner.invoke(app, ["train", "--model", "m", "--data", "d", "--adapters", "a",
                                 "--metrics", "x.json", "--curve", "c.tsv"])
    assert result.exit_code == 2 and "params.yaml: not found" in result.output
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    result = runner.invoke(app, ["curate", "--generated", "g.jsonl", "--questions", "q.jsonl",
                                 "--corrections", "c.jsonl", "--imports", "imports",
                                 "--out", "dataset", "--report", "r.json"])
    assert result.exit_code == 1 and "only 0 rows after curation" in result.output  # data error
    assert isinstance(result.exception, SystemExit)  # handled: no traceback


def test_load_keys_reads_a_subset_and_names_the_missing_key(tmp_path):
    from pipeline.evaluate import LossSpec

    spec = config.load_keys(LossSpec, "train", ROOT / "params.yaml")
    assert spec.max_seq_length >= 2 and isinstance(spec.mask_prompt, bool)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": {"mask_prompt": True, "rank": 8}}))
    with pytest.raises(config.ConfigError, match=r"params.yaml:train.max_seq_length missing"):
        config.load_keys(LossSpec, "train", path)
    assert config.section("train", path) == {"mask_prompt": True, "rank": 8}
    with pytest.raises(config.ConfigError, match="section missing"):
        config.section("base", path)


def test_no_module_reads_params_yaml_past_config():
    """config.py is the only door: nothing else parses YAML from a params file by hand."""
    offenders = [p.name for p in (ROOT / "pipeline").glob("*.py")
                 if p.name != "config.py" and ("read_params(" in p.read_text()
                                               or "params.yaml\").read" in p.read_text())]
    assert offenders == []
