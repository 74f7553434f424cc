"""A dpo/orpo run writes the SFT-only adapter of its own settings as <adapters>/sft/ (evaluate's
baseline), reused from the SFT cache that every SFT run fills; on a tiny llama built in code."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from test_train_preference import make_paths, params

from pipeline import train


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def timings(paths: train.TrainPaths) -> dict:
    return json.loads(paths.metrics.with_name("train.timings.json").read_text())


def test_dpo_run_writes_the_sft_only_adapter_beside_it(tiny_model_dir, tmp_path):
    dpo = make_paths(tmp_path / "dpo", tiny_model_dir)
    train.run(params(iters=6, steps_per_eval=3), dpo, seed=0)
    written = files(dpo.adapters)
    assert sorted(written) == ["adapter_config.json", "adapters.safetensors",
                               "sft/adapter_config.json", "sft/adapters.safetensors",
                               "sft/sft.json"]
    assert json.loads(written["adapter_config.json"])["tuneline"]["objective"] == "dpo"
    sft_config = json.loads(written["sft/adapter_config.json"])
    assert sft_config["tuneline"]["objective"] == "sft"
    assert {k: v for k, v in sft_config.items() if k != "tuneline"} == {
        k: v for k, v in json.loads(written["adapter_config.json"]).items() if k != "tuneline"}
    # the same weights as an SFT run of these settings, trained on its own
    alone = make_paths(tmp_path / "sft", tiny_model_dir)
    result = train.run(params(objective="sft", iters=6, steps_per_eval=3), alone, seed=0)
    assert sorted(files(alone.adapters)) == ["adapter_config.json", "adapters.safetensors"]
    assert written["sft/adapters.safetensors"] == (alone.adapters / "adapters.safetensors"
                                                   ).read_bytes()
    facts = json.loads(written["sft/sft.json"])
    assert facts["kept_iteration"] == result.kept_iteration == 6
    assert facts["val_loss"] == round(result.val_loss, 5)
    # whether it was trained or reused depends on the machine's cache: a timing, not a metric
    assert timings(dpo)["sft_baseline"] == "trained"
    assert "sft_baseline" not in json.loads(dpo.metrics.read_text())
    assert "sft_baseline" not in timings(alone)
    assert not [p for p in dpo.checkpoints.rglob("*") if p.is_file()]  # no scratch left


def test_sft_baseline_is_reused_from_cache_byte_identical(tiny_model_dir, tmp_path):
    fresh = make_paths(tmp_path / "fresh", tiny_model_dir)
    train.run(params(iters=6, steps_per_eval=3), fresh, seed=0)
    assert timings(fresh)["sft_baseline"] == "trained"

    # the default pipeline's SFT run fills a cache; a DPO experiment (another beta) reuses it
    shared = tmp_path / "shared-cache"
    default = replace(make_paths(tmp_path / "default", tiny_model_dir), sft_cache=shared)
    train.run(params(objective="sft", iters=6, steps_per_eval=3), default, seed=0)
    assert sorted(files(default.adapters)) == ["adapter_config.json", "adapters.safetensors"]
    assert len(list(shared.iterdir())) == 1
    exp = replace(make_paths(tmp_path / "exp", tiny_model_dir), sft_cache=shared)
    train.run(params(iters=6, steps_per_eval=3, beta=0.5), exp, seed=0)
    assert timings(exp)["sft_baseline"] == "cached"
    assert not (exp.checkpoints / "sft").exists() and len(list(shared.iterdir())) == 1
    reused = files(exp.adapters / "sft")
    assert reused == files(fresh.adapters / "sft")  # byte for byte the freshly trained one

    # another seed is another baseline: trained, not taken from the cache
    other = replace(make_paths(tmp_path / "seed1", tiny_model_dir), sft_cache=shared)
    train.run(params(iters=6, steps_per_eval=3), other, seed=1)
    assert timings(other)["sft_baseline"] == "trained" and len(list(shared.iterdir())) == 2
    assert files(other.adapters / "sft") != reused


def first_val_loss(paths: train.TrainPaths) -> float:
    return next(float(line.split("\t")[2]) for line in paths.curve.read_text().splitlines()[1:]
                if line.split("\t")[2])


def test_sft_then_dpo_starts_dpo_from_the_sft_adapter(tiny_model_dir, tmp_path):
    shared = tmp_path / "cache"
    dpo = replace(make_paths(tmp_path / "dpo", tiny_model_dir), sft_cache=shared)
    train.run(params(iters=4, steps_per_eval=2, steps_per_report=2), dpo, seed=0)
    warm = replace(make_paths(tmp_path / "warm", tiny_model_dir), sft_cache=shared)
    result = train.run(params(objective="sft_then_dpo", iters=4, steps_per_eval=2,
                              steps_per_report=2), warm, seed=0)
    # plain DPO starts at the reference (loss log 2); from the SFT weights it does not
    assert first_val_loss(dpo) == pytest.approx(math.log(2), abs=1e-4)
    assert abs(first_val_loss(warm) - math.log(2)) > 1e-3
    assert timings(warm)["sft_baseline"] == "cached"  # the same baseline as the dpo run's
    assert files(warm.adapters / "sft") == files(dpo.adapters / "sft")
    config = json.loads((warm.adapters / "adapter_config.json").read_text())
    assert config["tuneline"]["objective"] == "sft_then_dpo"
    refs = [json.loads(line) for line in warm.reference.read_text().splitlines()]
    assert refs == [json.loads(line) for line in dpo.reference.read_text().splitlines()]
    assert result.adapter_sha256 != json.loads(dpo.metrics.read_text())["adapter_sha256"]
