"""MLX memory settings (pipeline/training/memory.py) and the peaks the train stage reports;
packed training through the real mlx-lm trainer on the fused-attention path (tiny llama, CPU)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from test_train import make_paths, params_train

from pipeline import train
from pipeline.rows.jsonl import timings_path
from pipeline.training import attention, memory


def test_cache_limit_is_a_tenth_of_the_device_and_leaves_room_for_twice_the_weights():
    assert memory.cache_limit(80_000_000_000, 14_800_000_000) == 8_000_000_000  # 7B bf16, H100
    assert memory.cache_limit(16_000_000_000, 7_000_000_000) == 1_600_000_000
    assert memory.cache_limit(16_000_000_000, 7_500_000_000) == 1_000_000_000  # room left: 1 GB
    assert memory.cache_limit(16_000_000_000, 9_000_000_000) == 0  # no room: no cache


def test_a_cpu_keeps_mlx_defaults(tiny_model_dir):
    from mlx_lm import load

    model, _ = load(str(tiny_model_dir))
    assert memory.configure(model) == {}
    assert memory.weights_bytes(model) > 0


def test_process_peak_counts_host_memory_the_process_touched():
    before = memory.process_peak_gb()
    block = np.ones(300_000_000 // 8)  # 0.3 GB, written
    assert memory.process_peak_gb() >= min(before, 0.0) + 0.29
    assert block.sum() > 0


def test_packed_training_reports_peaks_in_timings_and_starts_from_the_same_loss(
        tiny_model_dir, tmp_path, monkeypatch):
    """The real trainer (mx.compile, evaluation) on both attention paths: same first loss."""
    first = {}
    for mode in ("mask", "segments"):
        monkeypatch.setattr(attention, "DEFAULT_MODE", mode)
        paths = make_paths(tmp_path / mode, tiny_model_dir)
        cfg = dataclasses.replace(params_train(), pack=True, pack_width=128, tokens_per_step=256,
                                  max_seq_length=128, iters=4, warmup=0, steps_per_report=1,
                                  steps_per_eval=4, save_every=4)
        train.run(cfg, dataclasses.replace(paths, checkpoints=tmp_path / mode / "ckpt"), seed=0)
        tracked = json.loads(paths.metrics.read_text())
        volatile = json.loads(timings_path(paths.metrics).read_text())
        assert "process_peak_memory_gb" not in tracked and "mlx_held_peak_gb" not in tracked
        assert volatile["process_peak_memory_gb"] > 0 and volatile["mlx_held_peak_gb"] > 0
        first[mode] = float(paths.curve.read_text().splitlines()[1].split("\t")[1])
    assert first["segments"] == pytest.approx(first["mask"], rel=1e-5)
