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
    """Rank-sharded batches (padded rows, or each rank's share of a packed step)."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(TESTS), tmp=str(tmp_path), model=str(tiny_model_dir),
                                    extra=json.dumps(extra)))
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
