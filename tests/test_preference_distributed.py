"""DPO under MLX's own launcher: 2 ring processes on 127.0.0.1 train the adapter one process does."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_train_distributed import free_ports

TESTS = Path(__file__).resolve().parent

WORKER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import mlx.core as mx
    from pipeline import train
    import test_train_preference as t

    world = mx.distributed.init()
    root = Path({tmp!r}) / f"rank{{world.rank()}}"
    cfg = t.params(objective={objective!r}, iters=4, batch_size=4, steps_per_eval=4)
    result = train.run(cfg, t.make_paths(root, Path({model!r})), seed=3)
    print("RESULT " + json.dumps({{"rank": world.rank(), "size": result.world_size,
                                   "sha": result.adapter_sha256, "val": result.val_loss}}),
          flush=True)
""")


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_two_ranks_train_the_one_process_preference_adapter(tiny_model_dir, tmp_path, objective):
    import mlx.core as mx

    script, alone = tmp_path / "worker.py", tmp_path / "alone.py"
    for path, tmp in ((script, tmp_path), (alone, tmp_path / "alone")):
        path.write_text(WORKER.format(tests=str(TESTS), tmp=str(tmp), model=str(tiny_model_dir),
                                      objective=objective))
    one = subprocess.run([sys.executable, str(alone)], capture_output=True, text=True,
                         timeout=600, cwd=TESTS.parent, check=False)
    assert one.returncode == 0, one.stderr[-2000:]
    launcher = Path(sys.executable).parent / "mlx.launch"

    def launch(timeout: int) -> subprocess.CompletedProcess:
        return subprocess.run([str(launcher), "--backend", "ring", "--hosts", "127.0.0.1", "-n",
                               "2", "--starting-port", str(free_ports(4)), "--", sys.executable,
                               str(script)], capture_output=True, text=True, timeout=timeout,
                              cwd=TESTS.parent, check=False)

    out = launch(600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in out.stdout.splitlines()
               if "RESULT " in line]
    single = json.loads(one.stdout.split("RESULT ", 1)[1])
    assert sorted(r["rank"] for r in results) == [0, 1] and results[0]["sha"] == results[1]["sha"]
    # the same validation loss (each rank scores its pairs; the sums are all-reduced)
    assert results[0]["val"] == pytest.approx(single["val"], rel=1e-4)
    two = mx.load(str(tmp_path / "rank0/adapters/adapters.safetensors"))
    one_w = mx.load(str(tmp_path / "alone/rank0/adapters/adapters.safetensors"))
    worst = max(float(mx.abs(two[k] - one_w[k]).max()) for k in two)
    assert worst <= 0.05 * 5.0e-3, f"max |2 ranks - 1 process| {worst:.2e}"  # 5% of one step
    assert (tmp_path / "rank0/reference_logps.jsonl").exists()
    assert not (tmp_path / "rank1/reference_logps.jsonl").exists()  # rank 0 writes outputs
    # the SFT-only baseline, trained by both ranks first; rank 0 writes it and keeps it cached
    sft = tmp_path / "rank0/adapters/sft"
    assert sorted(p.name for p in sft.iterdir()) == ["adapter_config.json",
                                                     "adapters.safetensors", "sft.json"]
    assert (tmp_path / "rank0/sftcache").is_dir() and not (tmp_path / "rank1/sftcache").exists()
    if objective == "dpo":  # rank 1 (another host, say) has no cached copy: both train it again
        first = (sft / "adapters.safetensors").read_bytes()
        again = launch(300)  # a rank that skipped it would leave the other waiting: a timeout
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
        timings = json.loads((tmp_path / "rank0/reports/train.timings.json").read_text())
        assert timings["sft_baseline"] == "trained"
        assert (sft / "adapters.safetensors").read_bytes() == first
