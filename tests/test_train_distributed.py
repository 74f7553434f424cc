"""Data-parallel training with MLX's own launcher: 2 processes on 127.0.0.1 (ring backend)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import gradients
import pytest

TESTS = Path(__file__).resolve().parent

WORKER = textwrap.dedent("""
    import dataclasses, json, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import mlx.core as mx
    from pipeline import train
    from test_train import make_paths, params_train
    from test_train_distributed import probe_steps

    world = mx.distributed.init()
    root = Path({tmp!r}) / f"rank{{world.rank()}}"
    cfg = dataclasses.replace(params_train(), iters=4, batch_size=4, steps_per_eval=4,
                              steps_per_report=1, optimizer="sgd", **json.loads({extra!r}))
    paths = dataclasses.replace(make_paths(root, Path({model!r})), checkpoints=root / "ckpt")
    result = train.run(cfg, paths, seed=3)
    print("RESULT " + json.dumps({{"rank": world.rank(), "size": result.world_size,
                                   "sha": result.adapter_sha256,
                                   "steps": probe_steps(cfg, paths, world, root)}}), flush=True)
""")


def probe_steps(cfg, paths, world, out: Path, n_steps: int = 3) -> list[dict]:
    """This rank's first steps from the stage's own batch iterator (padded or packed), trained
    with SGD: the rows and targets it held, its loss, and the gradient after mlx-lm's
    averaging over the ranks (before the optimizer; saved as out/grads<step>.npz)."""
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx import nn
    from mlx.utils import tree_flatten

    from pipeline import train
    from pipeline.training import model as mlx_model
    from pipeline.training import packing

    model, tok = mlx_model.load(paths.model)
    mx.random.seed(3)
    train.apply_adapters(model, cfg)
    data = train.load_split(paths.data / "train.jsonl", tok, cfg.mask_prompt)
    pack = packing.wanted(cfg.pack)
    iterate = (packing.batch_iterator(3, cfg.pack_width, cfg.tokens_per_step) if pack
               else train.batch_iterator(3))
    grad_fn = nn.value_and_grad(model, packing.packed_loss if pack else mlx_model.masked_loss)
    opt = optim.SGD(learning_rate=cfg.learning_rate)
    batches = iterate(data, cfg.batch_size, cfg.max_seq_length, loop=True, comm_group=world)
    steps = []
    for i in range(n_steps):
        batch = next(batches)
        (loss, n), g = grad_fn(model, *batch)
        g = nn.average_gradients(g)  # what mlx-lm's step does before the optimizer
        opt.update(model, g)
        mx.eval(model.parameters(), opt.state, loss, n)
        np.savez(out / f"grads{i}.npz", **{k: np.array(v) for k, v in tree_flatten(g)})
        held = ([len(set(s.tolist()) - {0}) for s in np.array(batch[2])] if pack
                else [int(m.any()) for m in np.array(batch[1])])
        steps.append({"rows": sum(held), "targets": int(n.item()), "loss": loss.item()})
    return steps


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
    """Rank-sharded batches (padded rows, or each rank's share of a packed step) train what
    one process trains on the same global batches: each rank holds part of each step's rows
    and targets, their sum is the step; the averaged gradient before the optimizer, the loss
    curve and the SGD-trained adapter are the one process's.

    SGD and gradients, not Adam-trained weights: Adam divides a constant gradient-scale error
    out (a rank training on the whole batch, a denominator off by a constant); the gradient
    check is asserted to fail on a gradient scaled by 1.01."""
    import mlx.core as mx
    import numpy as np

    script, alone = tmp_path / "worker.py", tmp_path / "alone.py"
    for path, tmp in ((script, tmp_path), (alone, tmp_path / "alone")):
        path.write_text(WORKER.format(tests=str(TESTS), tmp=str(tmp), model=str(tiny_model_dir),
                                      extra=json.dumps(extra)))
    one = subprocess.run([sys.executable, str(alone)], capture_output=True, text=True,
                         timeout=600, cwd=TESTS.parent, check=False)
    assert one.returncode == 0, one.stderr[-2000:]
    [single] = [json.loads(line.split("RESULT ", 1)[1]) for line in one.stdout.splitlines()
                if "RESULT " in line]
    launcher = Path(sys.executable).parent / "mlx.launch"
    out = subprocess.run([str(launcher), "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2",
                          "--starting-port", str(free_ports(4)), "--", sys.executable, str(script)],
                         capture_output=True, text=True, timeout=600, cwd=TESTS.parent,
                         check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    results = sorted((json.loads(line.split("RESULT ", 1)[1]) for line in out.stdout.splitlines()
                      if "RESULT " in line), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1]
    assert {r["size"] for r in results} == {2} and single["size"] == 1
    assert results[0]["sha"] == results[1]["sha"]
    # Only rank 0 writes the DVC outputs.
    assert (tmp_path / "rank0/adapters/adapters.safetensors").exists()
    assert not (tmp_path / "rank1/adapters").exists()
    for i, whole in enumerate(single["steps"]):
        parts = [r["steps"][i] for r in results]
        assert all(p["rows"] > 0 and p["targets"] > 0 for p in parts), parts  # each a share
        assert sum(p["rows"] for p in parts) == whole["rows"]
        assert sum(p["targets"] for p in parts) == whole["targets"]
        # each rank's loss is its summed loss over half the step's targets: their mean is
        # the step's mean loss
        assert sum(p["loss"] for p in parts) / 2 == pytest.approx(whole["loss"], rel=1e-5)
        grads = [dict(np.load(tmp_path / f"{root}/grads{i}.npz"))
                 for root in ("rank0", "rank1", "alone/rank0")]
        assert gradients.worst(grads[0], grads[1]) <= gradients.REL
        assert gradients.worst(grads[0], grads[2]) <= gradients.REL
        assert gradients.worst(grads[0], gradients.scaled(grads[2], 1.01)) > gradients.REL
    curves = [(tmp_path / f"{root}/reports/train_loss.tsv").read_text().splitlines()[1:]
              for root in ("rank0", "alone/rank0")]
    losses = [[float(line.split("\t")[1]) for line in curve] for curve in curves]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    two = mx.load(str(tmp_path / "rank0/adapters/adapters.safetensors"))
    single_w = mx.load(str(tmp_path / "alone/rank0/adapters/adapters.safetensors"))
    assert gradients.worst({k: np.array(v) for k, v in two.items()},
                           {k: np.array(v) for k, v in single_w.items()}) <= gradients.REL


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
