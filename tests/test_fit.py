"""What fits: the memory formula against measured peaks (bench/README.md), the train stage's
refusals (memory, quantized base on a CPU) and `tuneline plan`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from test_train import make_paths, params_train
from tiny import base_source
from typer.testing import CliRunner

from pipeline import base_model, train
from pipeline.cli import app
from pipeline.commands import plan
from pipeline.training import fit

ROOT = Path(__file__).resolve().parents[1]
LLAMA_7B = fit.Shape(4096, 32, 32, 8, 128, 14336, 49152, False)  # bench_pack_gpu.py's shape
SMOLLM_135M = fit.Shape(576, 30, 9, 3, 64, 1536, 49152, True)
BENCH_GPU = fit.Run(dtype_bytes=2, bits=None, group_size=64, fine_tune_type="lora", num_layers=16,
                    rank=8, keys=("self_attn.q_proj", "self_attn.v_proj"), optimizer="adamw",
                    sequences=2, seq_len=1024, grad_checkpoint=False)
EMBEDDED_CPU = fit.Run(dtype_bytes=4, bits=None, group_size=64, fine_tune_type="lora",
                       num_layers=8, rank=8, keys=(), optimizer="adamw", sequences=4, seq_len=480,
                       grad_checkpoint=False)
GIB = 2**30
# Measured peaks, bench/README.md: H200 packed NxW (mx.get_peak_memory, GiB), and the embedded
# model's padded 4-row batches on this CPU (2.97 GB; its widest batch ~480 positions).
MEASURED = [
    (LLAMA_7B, {"sequences": 2, "seq_len": 1024}, 25.9 * GIB),
    (LLAMA_7B, {"sequences": 4, "seq_len": 1024}, 28.7 * GIB),
    (LLAMA_7B, {"sequences": 12, "seq_len": 512}, 34.8 * GIB),
    (LLAMA_7B, {"sequences": 8, "seq_len": 1024}, 40.6 * GIB),
    (LLAMA_7B, {"sequences": 4, "seq_len": 2048}, 42.6 * GIB),
    (LLAMA_7B, {"sequences": 16, "seq_len": 1024}, 65.1 * GIB),
    # H100, the 4-bit base (issue 26's run, mx.get_peak_memory with the segments layout)
    (LLAMA_7B, {"bits": 4}, 19.8 * GIB),
]


@pytest.mark.parametrize(("shape", "change", "peak"), MEASURED)
def test_predicted_peak_is_within_15_percent_of_the_measured_7b_peaks(shape, change, peak):
    predicted = fit.estimate(shape, dataclasses.replace(BENCH_GPU, **change)).total
    assert abs(predicted / peak - 1) < 0.15, (predicted / GIB, peak / GIB)


def test_embedded_cpu_run_and_4_bit_weights_match_what_was_measured():
    cpu = fit.estimate(SMOLLM_135M, EMBEDDED_CPU).total
    assert abs(cpu / 2.97e9 - 1) < 0.15, cpu / 1e9
    q4 = fit.estimate(LLAMA_7B, dataclasses.replace(BENCH_GPU, bits=4)).weights
    assert abs(q4 / 4.2e9 - 1) < 0.15, q4 / 1e9  # the 4-bit 7B run's live memory on an H100


def test_parameter_count_is_the_models_own(tiny_model_dir):
    from mlx.utils import tree_flatten
    from mlx_lm import load

    model, _ = load(str(tiny_model_dir))
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert fit.Shape.from_config(config).parameters() == sum(
        v.size for _, v in tree_flatten(model.parameters()))
    assert round(LLAMA_7B.parameters() / 1e9, 2) == 7.38


def test_quantize_checkpointing_and_fewer_positions_each_lower_the_estimate():
    base = fit.estimate(LLAMA_7B, BENCH_GPU).total
    for change in ({"bits": 4}, {"grad_checkpoint": True}, {"sequences": 1},
                   {"num_layers": 4}):
        assert fit.estimate(LLAMA_7B, dataclasses.replace(BENCH_GPU, **change)).total < base


def test_suggestions_name_the_knobs_that_make_an_8b_fit_16_gib():
    run = dataclasses.replace(BENCH_GPU, num_layers=8, keys=())
    assert fit.estimate(LLAMA_7B, run).total > 16 * GIB
    helps = fit.suggestions(LLAMA_7B, run, 16 * GIB)
    assert any(h.startswith("base.quantize: 4") for h in helps), helps
    with pytest.raises(fit.FitError, match=r"predicted peak .* GiB .*base\.quantize: 4.*"
                                           r"train\.force: true"):
        fit.check_memory(LLAMA_7B, run, 16 * GIB, "params.yaml:train", force=False)


def test_train_refuses_a_run_predicted_not_to_fit_unless_forced(tiny_model_dir, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setattr(fit, "device_memory", lambda: (1_000_000, "a 1 MB machine"))
    paths = make_paths(tmp_path, tiny_model_dir)
    cfg = dataclasses.replace(params_train(), iters=2, warmup=1, steps_per_eval=2)
    with pytest.raises(fit.FitError, match="does not fit the 0.0 GiB here; would fit with"):
        train.run(cfg, dataclasses.replace(paths, checkpoints=tmp_path / "ckpt"), seed=0)
    assert not paths.adapters.exists()
    forced = train.run(dataclasses.replace(cfg, force=True),
                       dataclasses.replace(paths, checkpoints=tmp_path / "ckpt"), seed=0)
    assert forced.iters == 2


def test_quantized_base_on_a_cpu_is_refused_up_front_with_the_measured_rate(tiny_model_dir,
                                                                            tmp_path):
    base = tmp_path / "q4"
    base_model.run(base_source(str(tiny_model_dir), quantize=4, group_size=32),
                   base_model.BasePaths(base))
    paths = make_paths(tmp_path, base)
    cfg = dataclasses.replace(params_train(), iters=10**8, warmup=1)
    with pytest.raises(fit.FitError, match=r"quantized to 4 bits on a CPU: .* GFLOP/s here, so "
                                           r"100000000 steps .* h .*base\.quantize: null"):
        train.run(cfg, dataclasses.replace(paths, checkpoints=tmp_path / "ckpt"), seed=0)
    assert not paths.adapters.exists()


def test_plan_prints_parameters_peak_and_verdict_and_fails_when_it_does_not_fit(tiny_model_dir):
    runner = CliRunner()
    args = ["--params", str(ROOT / "params.yaml"), "plan", "--model", str(tiny_model_dir),
            "--device", "gpu"]
    fits = runner.invoke(app, [*args, "--memory", "64"])
    assert fits.exit_code == 0, fits.output
    assert "predicted peak memory:" in fits.output and ": fits" in fits.output
    assert "2 blocks, hidden 64" in fits.output
    too_small = runner.invoke(app, [*args, "--memory", "0.0001"])
    assert too_small.exit_code == 1
    assert "does NOT fit" in too_small.output and "would fit with:" in too_small.output


def test_readme_what_fits_table_is_what_the_formula_says():
    default = dataclasses.replace(BENCH_GPU, num_layers=8, keys=())  # params.yaml on a GPU
    assert plan.table(default) in (ROOT / "README.md").read_text()
