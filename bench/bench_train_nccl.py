"""Data-parallel training over NCCL: one GPU vs two, in one run (issue 19).

    python3 bench/bench_train_nccl.py --tokenizer DIR --work DIR --out DIR [--quick]

The issue-13 setting of bench/bench_pack_gpu.py (7.38B llama shape, random bf16 weights, the 48
shipped rows of data/imports/postgresql_expert.jsonl, LoRA rank 8 on q/v of the top 16 blocks,
AdamW 2e-4), packed, trained by `pipeline.train.run`:

- throughput: 1 GPU with `per_gpu` packed positions per step, then 2 GPUs (`mlx.launch --backend
  nccl -n 2`) with the same positions per GPU (global tokens_per_step doubled); also 2 GPUs with
  the single GPU's global batch (the per-GPU batch halves). Rates over the windows after the first
  (traces and kernel compiles), trained tokens/s summed over ranks as mlx-lm reports them.
  Scaling efficiency = 2-GPU tokens/s / (2 x 1-GPU tokens/s).
- correctness: the 1-GPU run and the 2-GPU run with the same global batch train the same
  steps from the same seed; the largest difference between their adapters, in units of one Adam
  step (the learning rate), and their final train losses.

Each training is its own process (the 2-GPU ones one process per GPU, started by mlx.launch with
NCCL_NVLS_ENABLE=0). `--quick` runs a tiny shape for a few steps (a smoke test; on a CPU the
"2 GPUs" are 2 ring processes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_pack_gpu as pack

PORT = 12345
# `mlx.launch` of this interpreter's mlx (a pip install may put the script off PATH)
LAUNCHER = [sys.executable, "-c", ("import sys; from mlx._distributed_utils.launch import main; "
            "sys.argv[0] = 'mlx.launch'; main()")]


def child(spec_file: str) -> None:
    """One training (one rank of it under mlx.launch): windows, loss, adapter to spec['out']."""
    import mlx.core as mx

    from pipeline import train
    from pipeline.core import config as cfgmod

    spec = json.loads(Path(spec_file).read_text())
    rank = int(os.environ.get("MLX_RANK", "0"))
    windows: list[dict] = []
    original = train.MetricsLog.on_train_loss_report

    def record(self, info):
        windows.append({k: info[k] for k in ("iteration", "iterations_per_second",
                                             "tokens_per_second", "peak_memory", "train_loss")})
        original(self, info)

    train.MetricsLog.on_train_loss_report = record
    work = Path(spec["work"]) / spec["name"].replace(" ", "_")
    out: dict = {"name": spec["name"], "rank": rank}
    try:
        cfg = cfgmod.from_mapping(train.TrainConfig, spec["settings"], "bench")
        paths = train.TrainPaths(Path(spec["base"]), Path(spec["data"]), work / "ad",
                                 work / "train.json", work / "curve.tsv", work / f"ckpt{rank}")
        started = time.perf_counter()
        result = train.run(cfg, paths, seed=0)
        out |= {"windows": windows, "wall_s": time.perf_counter() - started,
                "world_size": result.world_size, "train_loss": result.train_loss,
                "adapter": str(paths.adapters / "adapters.safetensors"),
                "sha": result.adapter_sha256, "mlx": mx.__version__,
                "device": str(mx.default_device())}
    except Exception as exc:  # noqa: BLE001  reported as a failed row
        out["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"
    print("RESULT " + json.dumps(out), flush=True)


def launch(spec: dict, gpus: int, work: Path, timeout: float, quick: bool) -> list[dict]:
    path = work / f"{spec['name'].replace(' ', '_')}.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TUNELINE_NO_BLAS_PRELOAD": "1", "PYTHONUNBUFFERED": "1",
           "NCCL_NVLS_ENABLE": "0"}  # NVLink multicast stays off on the lent machines
    me = [sys.executable, __file__, "--child", str(path)]
    if gpus == 1:
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        cmd = me
    else:
        backend = ["--backend", "ring", "--starting-port", "45800"] if quick else [
            "--backend", "nccl", "--nccl-port", str(PORT)]
        cmd = [*LAUNCHER, *backend, "--hosts", "127.0.0.1", "-n", str(gpus), "--", *me]
    started = time.perf_counter()
    try:
        run = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True,
                             timeout=max(timeout, 30), check=False)
        text = run.stdout + run.stderr
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) \
            else (exc.stdout or "")
        text += "\n(killed at the deadline)"
    (work / f"{spec['name'].replace(' ', '_')}.log").write_text(text)
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in text.splitlines()
               if "RESULT " in line]
    print(f"  {spec['name']}: {len(results)} rank result(s), {time.perf_counter() - started:.0f}s"
          + "".join(f"; rank {r['rank']} ERROR {r['error'][:300]}" for r in results if "error" in r),
          flush=True)
    if not results:
        print(text[-3000:])
    return results


def rate(r: dict, report: int) -> dict:
    wins = r["windows"][1:] or r["windows"]
    secs = sum(report / w["iterations_per_second"] for w in wins)
    toks = sum(w["tokens_per_second"] * report / w["iterations_per_second"] for w in wins)
    return {"tok_s": toks / secs if secs else 0.0, "peak_gb": max(w["peak_memory"] for w in
                                                                  r["windows"])}


def adapter_diff(a: str, b: str) -> float:
    import mlx.core as mx

    x, y = mx.load(a), mx.load(b)
    return max(float(mx.abs(x[k].astype(mx.float32) - y[k].astype(mx.float32)).max()) for k in x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, help="folder with the embedded model's tokenizer")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ncclbench"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--per-gpu", type=int, default=8192, help="packed positions per GPU per step")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--budget", type=float, default=570.0, help="seconds for the whole run")
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        return child(a.child)
    started = time.perf_counter()
    a.work.mkdir(parents=True, exist_ok=True)
    base = a.work / "base"
    shape = pack.SHAPE_7B
    if a.quick:  # the tokenizer's own vocabulary: a 49k-wide head is minutes per step on a CPU
        from transformers import AutoTokenizer

        vocab = -(-len(AutoTokenizer.from_pretrained(str(a.tokenizer))) // 64) * 64
        shape = {**pack.SHAPE_QUICK, "vocab_size": vocab}
    if not (base / "model.safetensors").exists():
        c = pack.make_base(base, a.tokenizer, shape)
        print(f"random weights: {pack.n_params(c) / 1e9:.2f}B params, "
              f"{time.perf_counter() - started:.0f}s", flush=True)
    c = json.loads((base / "config.json").read_text())
    counts = pack.row_counts(base)
    data = pack.dataset(a.work)
    layers = c["num_hidden_layers"] // 2
    per_gpu, width = (2 * a.width, a.width) if a.quick else (a.per_gpu, a.width)
    epochs = 1 if a.quick else a.epochs
    common = {"base": str(base), "data": str(data), "work": str(a.work)}

    def job(name: str, tps: int) -> dict:
        return {**common, **pack.plan(name, None, width, tps, epochs, counts, layers)}

    runs = [("1 GPU", 1, job(f"1 GPU {per_gpu // width}x{width}", per_gpu)),
            ("2 GPUs, same per-GPU batch", 2, job(f"2 GPUs {per_gpu // width}x{width} each", 2 * per_gpu)),
            ("2 GPUs, same global batch", 2, job(f"2 GPUs {per_gpu // width // 2}x{width} each", per_gpu))]
    results: dict = {}
    for _, gpus, spec in runs:
        left = a.budget - (time.perf_counter() - started)
        results[spec["name"]] = launch(spec, gpus, a.work, left, a.quick)
    lines = [(f"date {time.strftime('%Y-%m-%d')}, gpus: {pack.gpu_name()}, "
             f"{pack.n_params(c) / 1e9:.2f}B params"), "",
             "| run | global positions/step | trained tok/s | peak GiB (rank 0) | scaling efficiency |",
             "|---|---|---|---|---|"]
    single = None
    for label, gpus, spec in runs:
        rank0 = next((r for r in results[spec["name"]] if r["rank"] == 0 and "windows" in r), None)
        if rank0 is None:
            lines.append(f"| {spec['name']} | {spec['settings']['tokens_per_step']} | failed | | |")
            continue
        s = rate(rank0, spec["settings"]["steps_per_report"])
        single = s["tok_s"] if gpus == 1 else single
        eff = f"{100 * s['tok_s'] / (2 * single):.1f}%" if gpus == 2 and single else ""
        lines.append(f"| {spec['name']} ({label}) | {spec['settings']['tokens_per_step']:,} | "
                     f"{s['tok_s']:,.0f} | {s['peak_gb'] / 1.073741824:.1f} | {eff} |")
    same = results[runs[2][2]["name"]]
    one = next((r for r in results[runs[0][2]["name"]] if "adapter" in r), None)
    two = next((r for r in same if r["rank"] == 0 and "adapter" in r), None)
    if one and two:
        lr = runs[0][2]["settings"]["learning_rate"]
        diff = adapter_diff(one["adapter"], two["adapter"])
        ranks = {r["sha"] for r in same if "sha" in r}
        steps = runs[0][2]["settings"]["iters"]
        lines += ["", (f"correctness, {steps} steps, global batch {per_gpu:,} positions: "
                  f"max |adapter 1 GPU - adapter 2 GPUs| = {diff:.3g} ({diff / lr:.3f} Adam steps "
                  f"of lr {lr:g}); train loss {one['train_loss']:.5f} vs {two['train_loss']:.5f}; "
                  f"ranks agree: {len(ranks) == 1}; mlx {two.get('mlx')}, {two.get('device')}")]
    else:
        lines += ["", "correctness: failed (see the logs)"]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "table.md").write_text(text)
        (a.out / "results.json").write_text(json.dumps(results, indent=1))
        for log in a.work.glob("*.log"):
            (a.out / log.name).write_text(log.read_text()[-20000:])
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
