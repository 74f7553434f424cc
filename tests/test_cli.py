"""The `tuneline` CLI: thin commands, clear errors with exit codes, doctor's report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from pipeline.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed entry point in a subprocess: exercises main()'s error handling and re-exec."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, text=True,
                          capture_output=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_help_lists_the_stage_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("base-model", "train", "fuse", "doctor"):
        assert command in result.output


def test_unknown_params_key_is_one_clear_line_and_exit_2(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["base"]["modle"] = "typo"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_cli("base-model", "--out", "models/base", cwd=tmp_path)
    assert result.returncode == 2
    assert "params.yaml:base: unknown key(s) ['modle']" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "models").exists()


def test_train_on_missing_dataset_names_the_file(tmp_path, tiny_model_dir):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    result = run_cli("train", "--model", str(tiny_model_dir), "--data", "data/dataset",
                     "--adapters", "a", "--metrics", "m.json", "--curve", "c.tsv", cwd=tmp_path)
    assert result.returncode == 1
    assert "data/dataset/train.jsonl: file not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_doctor_reports_device_blas_and_the_embedded_model(tmp_path):
    from pipeline.training import accel

    # A project with no DVC remote (not even a .dvc/): whatever this machine has, the remote
    # check must fail, and with it the command: exit code 1, exactly.
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    result = run_cli("doctor", cwd=tmp_path)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "[FIX] DVC remote" in out and "Traceback" not in result.stderr
    assert "mlx device" in out and "compute dtype" in out and "BLAS" in out
    assert "embedded model" in out and "SmolLM2-135M-Instruct.Q4_1.gguf" in out
    if sys.platform == "linux":
        assert "float32" in out
        if accel.find_openblas():  # the CLI re-executes itself with OpenBLAS preloaded
            assert "[ok ] BLAS: OpenBLAS (preloaded)" in out
        else:
            assert "[FIX] BLAS: OpenBLAS not installed" in out


def test_pytest_has_a_per_test_timeout(pytestconfig):
    import tomllib

    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert 0 < options["timeout"] <= 600 and options["timeout_method"] in ("signal", "thread")
    # The setting is only a wish unless pytest-timeout is installed and loaded in this run.
    assert pytestconfig.pluginmanager.hasplugin("timeout"), "pytest-timeout is not active"
    assert float(pytestconfig.getini("timeout")) == options["timeout"]


def test_readme_warns_before_every_dvc_exp_apply():
    readme = (ROOT / "README.md").read_text()
    blocks = readme.split("```")
    for i, block in enumerate(blocks):
        if "dvc exp apply" in block and i % 2 == 1:  # a code block that runs it
            near = blocks[i - 1][-600:] + blocks[i + 1][:600]
            assert "overwrites" in near and "commit" in near, block
