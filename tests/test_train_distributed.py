"""Data-parallel training with MLX's own launcher: 2 processes on 127.0.0.1 (ring backend)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

WORKER = textwrap.dedent("""
    import dataclasses, json, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import mlx.core as mx
    from pipeline import train
    from test_train import make_paths, params_train

    world = mx.distributed.init()
    root = Path({tmp!r}) / f"rank{{world.rank()}}"
    cfg = dataclasses.replace(params_train(), iters=4, batch_size=4, steps_per_eval=4,
                              **json.loads({extra!r}))
    paths = dataclasses.replace(make_paths(root, Path({model!r})), checkpoints=root / "ckpt")
    result = train.run(cfg, paths, seed=3)
    print("RESULT " + json.dumps({{"rank": world.rank(), "size": result.world_size,
                                   "sha": result.adapter_sha256}}), flush=True)
""")


def free_ports(n: int) -> int:
    """A first port of n consecutive free ones (mlx's ring backend takes starting-port + rank)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + n > 65535:
            continue
        socks = []
        try:
            for port in range(first, first + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no run of free ports on 127.0.0.1")


PACKED = {"pack": True, "pack_width": 128, "max_seq_length": 128, "tokens_per_step": 512}


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{}, PACKED], ids=["padded", "packed"])
def test_two_ranks_train_the_same_adapter(tiny_model_dir, tmp_path, extra):
    """Rank-sharded batches (padded rows, or each rank's share of a packed step) train the
    adapter one process trains on the same global batches."""
    script, alone = tmp_path / "worker.py", tmp_path / "alone.py"
    for path, tmp in ((script, tmp_path), (alone, tmp_path / "alone")):
        path.write_text(WORKER.format(tests=str(TESTS), tmp=str(tmp), model=str(tiny_model_dir),
                                      extra=json.dumps(extra)))
    one = subprocess.run([sys.executable, str(alone)], capture_output=True, text=True,
                         timeout=600, cwd=TESTS.parent, check=False)
    assert one.returncode == 0, one.stderr[-2000:]
    launcher = Path(sys.executable).parent / "mlx.launch"
    out = subprocess.run([str(launcher), "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2",
                          "--starting-port", str(free_ports(4)), "--", sys.executable, str(script)],
                         capture_output=True, text=True, timeout=600, cwd=TESTS.parent,
                         check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in out.stdout.splitlines()
               if "RESULT " in line]
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert {r["size"] for r in results} == {2}
    assert results[0]["sha"] == results[1]["sha"]
    # Only rank 0 writes the DVC outputs.
    assert (tmp_path / "rank0/adapters/adapters.safetensors").exists()
    assert not (tmp_path / "rank1/adapters").exists()
    # Each rank divides its loss by its share of the step's targets, so the averaged gradient is
    # the one-process gradient: equal up to float32 summation order (before that, packed steps
    # with unequal shares differed by ~3 Adam steps here), within 5% of one Adam step (lr).
    import mlx.core as mx

    lr = 1.0e-2  # params_train()
    two = mx.load(str(tmp_path / "rank0/adapters/adapters.safetensors"))
    single = mx.load(str(tmp_path / "alone/rank0/adapters/adapters.safetensors"))
    assert two.keys() == single.keys()
    worst = max(float(mx.abs(two[k] - single[k]).max()) for k in two)
    assert worst <= 0.05 * lr, f"max |2 ranks - 1 process| {worst:.2e}"


def _params(tmp_path: Path, port: int, **train_keys) -> Path:
    """The repository's params.yaml with a tiny train section and launch.processes: 2 (ring)."""
    import yaml

    params = yaml.safe_load((TESTS.parent / "params.yaml").read_text())
    params["train"] |= {"num_layers": 2, "iters": 4, "batch_size": 4, "steps_per_eval": 4,
                        "steps_per_report": 2, "save_every": 4, "val_batches": 1,
                        "warmup": 1, **train_keys}
    params["launch"] |= {"processes": 2, "backend": "ring", "hosts": ["127.0.0.1"], "port": port}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _train_cli(tmp_path: Path, model: Path, params: Path, data: Path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline", "train", "--model", str(model), "--data", str(data),
           "--adapters", str(out / "adapters"), "--metrics", str(out / "train.json"),
           "--curve", str(out / "train_loss.tsv"), "--params", str(params)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         check=False, env={**__import__("os").environ,
                                           "PYTHONPATH": str(TESTS.parent)})
    return run, out


@pytest.mark.slow
def test_launch_processes_runs_the_stage_command_on_two_ranks(tiny_model_dir, tmp_path):
    """params.yaml:launch.processes: 2 -> `tuneline train` re-runs itself under mlx.launch;
    rank 0 writes the one-process layout and the stage exits 0."""
    sys.path.insert(0, str(TESTS))
    from test_train import make_paths

    data = make_paths(tmp_path, tiny_model_dir).data
    run, out = _train_cli(tmp_path, tiny_model_dir, _params(tmp_path, free_ports(4)), data)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "launching: " in run.stdout and "--backend ring" in run.stdout
    assert json.loads((out / "train.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (out / "adapters").iterdir()) == [
        "adapter_config.json", "adapters.safetensors"]
    assert (out / "train_loss.tsv").read_text().startswith("step\ttrain_loss\tval_loss\n")


@pytest.mark.slow
def test_a_failing_rank_fails_the_stage_although_mlx_launch_exits_0(tiny_model_dir, tmp_path):
    """mlx.launch reports success whatever its ranks did; the stage must not."""
    sys.path.insert(0, str(TESTS))
    from test_train import make_paths

    data = make_paths(tmp_path, tiny_model_dir).data
    # 3 rows per step cannot be split over 2 ranks: every rank raises TrainError
    run, out = _train_cli(tmp_path, tiny_model_dir, _params(tmp_path, free_ports(4), batch_size=3), data)
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    assert "distributed training did not finish" in run.stderr
    assert "must be divisible by the 2 distributed processes" in run.stdout + run.stderr
    assert not (out / "adapters").exists()
