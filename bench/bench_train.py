"""Training speed on this machine: `python bench/bench_train.py [--iters 10]` (after setup, with
models/base converted: `dvc repro base_model`).

Measures, in one run, on the same data (the shipped expert seed) and settings:
  1. a float32 1024x1024 matmul with the mlx wheel's own BLAS vs OpenBLAS preloaded;
  2. a 256-token forward pass of the base model in float32 vs bfloat16 (why CPUs use float32);
  3. a whole training run (load, train `--iters` steps, validation) of `tuneline train` vs stock
     `mlx_lm lora` with the same settings, both with OpenBLAS preloaded (isolates tuneline's own
     overhead: target under 3%); `--slow-baseline` adds stock mlx_lm lora as installed.
Prints a markdown table for bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
sys.path.insert(0, str(ROOT))
from pipeline.training import accel

MATMUL = """
import time, mlx.core as mx
a = mx.random.normal((1024, 1024)); b = mx.random.normal((1024, 1024)); mx.eval(a @ b)
t = time.perf_counter(); n = 20
for _ in range(n): mx.eval(a @ b)
print(2 * 1024**3 * n / (time.perf_counter() - t) / 1e9)
"""
FORWARD = """
import sys, time, mlx.core as mx
from mlx_lm import load
model, _ = load(sys.argv[1]); model.set_dtype(getattr(mx, sys.argv[2]))
x = mx.array([[i % 1000 + 100 for i in range(256)]]); mx.eval(model(x))
t = time.perf_counter(); mx.eval(model(x)); print(time.perf_counter() - t)
"""


def env(preload: bool) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", accel.MARKER)}
    e["HF_HUB_OFFLINE"] = "1"
    if preload and accel.find_openblas():
        e["LD_PRELOAD"] = accel.find_openblas()
    else:
        e[accel.OPT_OUT] = "1"
    return e


def py(code: str, *args: str, preload: bool) -> float:
    out = subprocess.run([PY, "-c", code, *args], env=env(preload), capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def dataset(tmp: Path) -> Path:
    rows = (ROOT / "data/imports/postgresql_expert.jsonl").read_text().splitlines()
    data = tmp / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(rows[:40]) + "\n")
    (data / "valid.jsonl").write_text("\n".join(rows[40:48]) + "\n")
    return data


def timed(cmd: list[str], tmp: Path, preload: bool) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, env=env(preload), cwd=tmp, check=True, capture_output=True)
    return time.perf_counter() - started


def tuneline_train(base: Path, data: Path, tmp: Path, iters: int, preload: bool) -> float:
    params = (ROOT / "params.yaml").read_text()
    params = re.sub(r"(\n  iters:) \d+", rf"\1 {iters}", params)
    params = re.sub(r"(\n  steps_per_eval:) \d+", rf"\1 {iters}", params)
    params = re.sub(r"(\n  val_batches:) \d+", r"\1 1", params)
    (tmp / "params.yaml").write_text(params)
    cmd = [str(Path(PY).parent / "tuneline"), "train", "--model", str(base), "--data", str(data),
           "--adapters", str(tmp / "ad"), "--metrics", str(tmp / "m.json"), "--curve",
           str(tmp / "c.tsv"), "--params", str(tmp / "params.yaml")]
    return timed(cmd, tmp, preload)


def stock_lora(base: Path, data: Path, tmp: Path, iters: int, preload: bool) -> float:
    """Stock mlx_lm lora with the same settings as params.yaml's train section."""
    import yaml

    t = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    cmd = [PY, "-m", "mlx_lm", "lora", "--train", "--model", str(base), "--data", str(data),
           "--iters", str(iters), "--batch-size", str(t["batch_size"]), "--num-layers",
           str(t["num_layers"]), "--learning-rate", str(t["learning_rate"]), "--mask-prompt",
           "--steps-per-report", str(t["steps_per_report"]), "--steps-per-eval", str(iters),
           "--val-batches", "1",
           "--adapter-path", str(tmp / "stock"), "--save-every", str(t["save_every"])]
    return timed(cmd, tmp, preload)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--base", type=Path, default=ROOT / "models/base")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--slow-baseline", action="store_true",
                    help="also train with the mlx wheel's own BLAS (very slow on CPUs)")
    a = ap.parse_args()
    rows = []
    blas_off, blas_on = py(MATMUL, preload=False), py(MATMUL, preload=True)
    rows.append(("matmul 1024 f32, GFLOP/s", blas_off, blas_on, "wheel BLAS", "OpenBLAS"))
    f32, bf16 = py(FORWARD, str(a.base), "float32", preload=True), py(
        FORWARD, str(a.base), "bfloat16", preload=True)
    rows.append(("forward 256 tok, seconds", bf16, f32, "bfloat16", "float32"))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        data = dataset(tmp)
        # Alternate the two tools so drifting machine load hits both alike.
        stock_blas, ours = [], []
        for _ in range(a.repeats):
            stock_blas.append(stock_lora(a.base, data, tmp, a.iters, preload=True))
            ours.append(tuneline_train(a.base, data, tmp, a.iters, preload=True))
        rows.append(("train run, seconds (median), both on OpenBLAS", median(stock_blas),
                     median(ours), "mlx_lm lora + OpenBLAS", "tuneline train"))
        if a.slow_baseline:  # the wheel's own BLAS: many minutes per step on 2 cores
            stock = stock_lora(a.base, data, tmp, a.iters, preload=False)
            rows.append(("train run, seconds", stock, median(ours), "stock mlx_lm lora",
                         "tuneline train"))
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores; iters={a.iters}\n")
    print("| measure | baseline | value | tuneline's path | value | ratio |")
    print("|---|---|---|---|---|---|")
    for name, base, ours, base_name, our_name in rows:
        ratio = base / ours if "seconds" in name else ours / base
        print(f"| {name} | {base_name} | {base:.2f} | {our_name} | {ours:.2f} | {ratio:.1f}x |")


if __name__ == "__main__":
    main()
