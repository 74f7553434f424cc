"""Where a packed 7B LoRA step spends its time (issue 26): ablations, a kernel profile, memory.

    python3 bench/profile_pack_gpu.py --tokenizer DIR --work DIR --out DIR [--parts ...]

The setting of bench/bench_pack_gpu.py (7.38B llama shape, random bf16 weights, the 48 shipped
rows, LoRA r8 on q/v of the top 16 blocks, AdamW 2e-4, packed 2x1024 with the boolean row mask).
Parts, each in its own process (`--parts`, default all):

- `ablate`: the step mlx-lm's trainer compiles (value_and_grad + AdamW update under mx.compile,
  mx.eval every step) against the same step with one piece left out or alone: gradients without
  the update, the forward loss alone, the blocks alone (no lm_head, no loss), lm_head + cross
  entropy alone (forward and its input gradient), the step with a plain causal mask, and one
  layer's fused attention forward + backward at this shape. Differences of medians place the time.
- `ncu`: Nsight Compute's per-kernel GPU time (gpu__time_duration, clocks and caches left alone)
  over two steps after three warm-up steps (cuProfilerStart/Stop), grouped by kind; the sum
  against the step's wall time is the GPU's idle share (host gaps).
- `memory`: 8x1024 and 16x1024 steps with MLX's CUDA graphs on (default) and off
  (MLX_USE_CUDA_GRAPHS=0): MLX's active, cache and peak memory against `nvidia-smi`'s.

`--quick`: a tiny shape on the CPU (smoke test; ncu and nvidia-smi parts are skipped).
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_pack_gpu as pack  # the shape, weights, rows and LoRA of issues 13/26

KINDS = [("attention", r"sdpa|fmha|flash|attention"),
         ("matmul", r"gemm|xmma|cutlass|nvjet|cublas|matmul|sm90_|sm100_|wgmma"),
         ("norm / reduce / softmax", r"rms|norm|reduce|softmax|logsumexp|arg_|sum"),
         ("rope", r"rope"),
         ("copy / gather / scatter", r"copy|gather|scatter|slice|concat|transpose|cast"),
         ("fused elementwise", r"compiled|fused|binary|unary|ternary|where|select")]


# --- model and steps -------------------------------------------------------------------------


def setup(work: Path, tokenizer: Path, quick: bool, tokens_per_step: int):
    """(model, optimizer, batches, positions per step): the benchmark's model with LoRA on."""
    import mlx.optimizers as optim

    from pipeline import train
    from pipeline.core import config as cfgmod
    from pipeline.training import model as mlx_model
    from pipeline.training import packing

    base = work / "base"
    if not (base / "model.safetensors").exists():
        pack.make_base(base, tokenizer, pack.SHAPE_QUICK if quick else pack.SHAPE_7B)
    model, tok = mlx_model.load(base)
    layers = len(model.layers) // 2
    settings = pack.train_settings(None, 1024, tokens_per_step, 10, 10, layers)
    train.apply_adapters(model, cfgmod.from_mapping(train.TrainConfig, settings, "bench"))
    rows = [json.loads(x) for x in pack.rows_file().read_text().splitlines() if x.strip()]
    encoded = [train.encode_chat(tok, r["messages"], True) for r in rows]
    it = packing.batch_iterator(0, 1024, tokens_per_step)(encoded, 4, 512, loop=True)
    batches = [next(it) for _ in range(6)]
    positions = statistics.mean(int((b[2][:, :-1] > 0).sum().item()) for b in batches)
    return model, optim.AdamW(learning_rate=2e-4, weight_decay=0.0), batches, positions


def steps(model, optimizer):
    """name -> callable(batch) returning arrays to evaluate; each compiled as mlx-lm compiles."""
    from functools import partial

    import mlx.core as mx
    from mlx import nn

    from pipeline.training import packing

    loss = packing.packed_loss
    grad_fn = nn.value_and_grad(model, loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def train_step(tokens, mask, segs):
        (lvalue, toks), grad = grad_fn(model, tokens, mask, segs)
        optimizer.update(model, grad)
        return lvalue, toks

    @partial(mx.compile, inputs=state, outputs=state)
    def grad_step(tokens, mask, segs):
        (lvalue, _), grad = grad_fn(model, tokens, mask, segs)
        return lvalue, grad

    @partial(mx.compile, inputs=state, outputs=state)
    def forward(tokens, mask, segs):
        return loss(model, tokens, mask, segs)[0]

    @partial(mx.compile, inputs=state, outputs=state)
    def blocks(tokens, mask, segs):
        caches = [packing.SegmentMask(segs[:, :-1]) for _ in model.layers]
        return model.model(tokens[:, :-1], cache=caches).sum()

    def head_loss(h, targets):
        logits = model.lm_head(model.model.norm(h))
        return nn.losses.cross_entropy(logits, targets).astype(mx.float32).mean()

    head_grad = mx.compile(mx.value_and_grad(head_loss))

    def head(tokens, mask, segs):
        h = mx.random.normal((*tokens[:, :-1].shape, model.args.hidden_size)).astype(mx.bfloat16)
        return head_grad(h, tokens[:, 1:])

    return {"train step (the trainer's)": train_step, "gradients, no update": grad_step,
            "forward loss": forward, "blocks forward (no lm_head, no loss)": blocks,
            "lm_head + loss, forward and input gradient": head}


def lora_in_bf16(model, optimizer, time_step) -> float:
    """The train step with mlx-lm's LoRA products run in the input's dtype (the adapter weights
    stay float32 and get float32 gradients): what float32 adapters cost on a bf16 model."""
    from mlx_lm.tuner.lora import LoRALinear

    original = LoRALinear.__call__

    def call(self, x):
        y = self.linear(x)
        z = (self.dropout(x) @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        return y + (self.scale * z).astype(x.dtype)

    LoRALinear.__call__ = call
    try:
        return time_step(steps(model, optimizer)["train step (the trainer's)"])
    finally:
        LoRALinear.__call__ = original


def attention_alone(model, batch) -> dict:
    """One layer's fused attention forward, and forward + backward, row mask vs causal."""
    import mlx.core as mx

    from pipeline.training import packing

    a = model.args
    n_seq, length = batch[0].shape[0], batch[0].shape[1] - 1
    hd = a.hidden_size // a.num_attention_heads
    q = mx.random.normal((n_seq, a.num_attention_heads, length, hd)).astype(mx.bfloat16)
    k = mx.random.normal((n_seq, a.num_key_value_heads, length, hd)).astype(mx.bfloat16)
    v = mx.random.normal(k.shape).astype(mx.bfloat16)
    row_mask = packing.SegmentMask(batch[2][:, :-1]).make_mask(length)
    out = {}
    for name, mask in (("row mask", row_mask), ("causal", "causal")):
        def f(q, k, v, mask=mask):
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=hd**-0.5,
                                                        mask=mask).astype(mx.float32).sum()
        fwd, both = mx.compile(f), mx.compile(mx.grad(f, argnums=(0, 1, 2)))
        out[f"attention forward, one layer, {name}"] = timed(lambda fwd=fwd: fwd(q, k, v))
        out[f"attention forward + backward, one layer, {name}"] = timed(
            lambda both=both: both(q, k, v))
    return out


REPEATS = [3, 10]  # warm-up calls, timed calls (--quick: 1, 1)


def timed(fn, warm: int | None = None, n: int | None = None) -> float:
    """Median milliseconds of `fn` evaluated, after `warm` calls (compilation, graphs)."""
    import mlx.core as mx

    warm, n = min(warm or REPEATS[0], REPEATS[0]), min(n or REPEATS[1], REPEATS[1])
    for _ in range(warm):
        mx.eval(fn())
    times = []
    for _ in range(n):
        started = time.perf_counter()
        mx.eval(fn())
        times.append((time.perf_counter() - started) * 1e3)
    return round(statistics.median(times), 3)


# --- parts -----------------------------------------------------------------------------------


def part_ablate(a) -> dict:
    import mlx.core as mx

    from pipeline.training import packing

    model, optimizer, batches, positions = setup(a.work, a.tokenizer, a.quick, 2048)
    cycle = iter(range(10**9))
    out = {}
    for name, fn in steps(model, optimizer).items():
        out[name] = timed(lambda fn=fn: fn(*batches[next(cycle) % len(batches)]))
        print(f"{name}: {out[name]} ms", flush=True)
    original = packing.SegmentMask.make_mask
    packing.SegmentMask.make_mask = pack.causal_across_rows  # the speed bound of any row mask
    try:
        causal = steps(model, optimizer)["train step (the trainer's)"]
        out["train step, one causal mask (no row boundaries)"] = timed(
            lambda: causal(*batches[next(cycle) % len(batches)]))
    finally:
        packing.SegmentMask.make_mask = original
    out["train step, LoRA products in bf16 (float32 weights cast per step)"] = lora_in_bf16(
        model, optimizer, lambda fn: timed(lambda: fn(*batches[next(cycle) % len(batches)])))
    out |= attention_alone(model, batches[0])
    facts = {"positions_per_step": positions, "mlx": mx.__version__,
             "device": str(mx.default_device())}
    if not a.quick:
        facts["mlx_matmul_tflops"] = round(pack.matmul_rate(), 1)
    return {"ms": out, "facts": facts}


def part_ncu_child(a) -> dict:
    """Three warm-up steps, then two steps between cuProfilerStart and cuProfilerStop."""
    import mlx.core as mx

    model, optimizer, batches, positions = setup(a.work, a.tokenizer, a.quick, 2048)
    step = steps(model, optimizer)["train step (the trainer's)"]
    for i in range(3):
        mx.eval(step(*batches[i]))
    cuda = ctypes.CDLL("libcuda.so.1")
    started = time.perf_counter()
    cuda.cuProfilerStart()
    for i in range(2):
        mx.eval(step(*batches[3 + i]))
    cuda.cuProfilerStop()
    return {"profiled_steps": 2, "wall_ms_under_ncu": (time.perf_counter() - started) * 1e3,
            "positions_per_step": positions}


def part_ncu(a) -> dict:
    exe = shutil.which("ncu") or next(iter(sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu")
                                                  + glob.glob("/usr/local/cuda*/bin/ncu"))), None)
    if exe is None:
        return {"error": "no ncu on this machine"}
    log = a.work / "ncu.csv"
    cmd = [exe, "--profile-from-start", "off", "--clock-control", "none", "--cache-control",
           "none", "--metrics", "gpu__time_duration.sum", "--csv", "--page", "raw",
           "--log-file", str(log), sys.executable, __file__, "--child", "ncu_child",
           "--work", str(a.work), "--tokenizer", str(a.tokenizer)]
    child = child_run(cmd, a.timeout)
    kernels = read_ncu(log) if log.exists() else []
    if not kernels:
        tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
        return {"error": f"ncu gave no kernels: {child} {tail}"}
    return {"child": child, **summarise_kernels(kernels, 2)}


def read_ncu(log: Path) -> list[tuple[str, float]]:
    """(kernel name, nanoseconds) per profiled launch from ncu's raw CSV page."""
    lines = log.read_text(errors="replace").splitlines()
    start = next((i for i, x in enumerate(lines) if '"Kernel Name"' in x), None)
    if start is None:
        return []
    table = list(csv.reader(lines[start:]))
    head = table[0]
    name, value = head.index("Kernel Name"), head.index("gpu__time_duration.sum")
    unit = table[1][value] if len(table) > 1 else "nsecond"
    scale = {"nsecond": 1.0, "ns": 1.0, "usecond": 1e3, "us": 1e3, "msecond": 1e6}.get(unit, 1.0)
    out = []
    for row in table[1:]:
        try:
            out.append((row[name], float(row[value].replace(",", "")) * scale))
        except (ValueError, IndexError):
            continue  # the units row
    return out


def summarise_kernels(kernels: list[tuple[str, float]], n_steps: int) -> dict:
    groups: dict[str, float] = {}
    per_name: dict[str, list[float]] = {}
    for name, ns in kernels:
        kind = next((k for k, pat in KINDS if re.search(pat, name, re.IGNORECASE)), "other")
        groups[kind] = groups.get(kind, 0.0) + ns
        per_name.setdefault(name[:120], []).append(ns)
    total = sum(groups.values())
    top = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:30]
    return {"launches_per_step": len(kernels) / n_steps,
            "gpu_ms_per_step": round(total / n_steps / 1e6, 3),
            "by_kind_ms_per_step": {k: round(v / n_steps / 1e6, 3) for k, v in
                                    sorted(groups.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": n, "launches_per_step": len(v) / n_steps,
                             "ms_per_step": round(sum(v) / n_steps / 1e6, 3)} for n, v in top]}


def part_memory_child(a) -> dict:
    import mlx.core as mx

    model, optimizer, batches, positions = setup(a.work, a.tokenizer, a.quick, a.tps)
    step = steps(model, optimizer)["train step (the trainer's)"]
    mx.reset_peak_memory()
    ms = timed(lambda: step(*batches[0]), warm=2, n=4)
    return {"tokens_per_step": a.tps, "step_ms": ms, "positions_per_step": positions,
            "mlx_active_gb": mx.get_active_memory() / 1e9,
            "mlx_cache_gb": mx.get_cache_memory() / 1e9, "mlx_peak_gb": mx.get_peak_memory() / 1e9}


def part_memory(a) -> dict:
    out = {}
    for tps in (8192, 16384):
        for graphs in ("on", "off"):
            env = {**os.environ, **({"MLX_USE_CUDA_GRAPHS": "0"} if graphs == "off" else {})}
            name = f"{tps // 1024}x1024, CUDA graphs {graphs}"
            device = pack.DeviceMemory()
            device.job = name
            result = child_run([sys.executable, __file__, "--child", "memory_child", "--tps",
                                str(tps), "--work", str(a.work), "--tokenizer", str(a.tokenizer)]
                               + (["--quick"] if a.quick else []), a.timeout, env)
            device.stop.set()
            out[name] = {**result, "nvidia_smi_peak_gb": device.peaks.get(name, 0.0)}
            print(json.dumps({f"{tps // 1024}x1024, graphs {graphs}": out[
                f"{tps // 1024}x1024, CUDA graphs {graphs}"]}), flush=True)
    return out


def child_run(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """A child's RESULT line, or its error (a timeout included) as the result."""
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        return {"error": f"timed out after {timeout:.0f} s: {_text(exc.stdout)[-1500:]}"}
    return _result_line(done.stdout) or {"error": (done.stderr + done.stdout)[-3000:]}


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _result_line(stdout: str) -> dict | None:
    lines = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(lines[-1][7:]) if lines else None


PARTS = {"ablate": part_ablate, "ncu": part_ncu, "memory": part_memory}
CHILDREN = {"ncu_child": part_ncu_child, "memory_child": part_memory_child}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/packbench"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--parts", default="ablate,memory,ncu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--timeout", type=float, default=420.0)
    ap.add_argument("--tps", type=int, default=2048)
    ap.add_argument("--child", choices=sorted(CHILDREN) + sorted(PARTS))
    a = ap.parse_args()
    if a.child:
        if a.quick:
            import mlx.core as mx

            mx.set_default_device(mx.cpu)
            REPEATS[:] = [1, 1]
        print("RESULT " + json.dumps((CHILDREN | PARTS)[a.child](a)), flush=True)
        return
    a.work.mkdir(parents=True, exist_ok=True)
    results = {}
    for part in a.parts.split(","):
        started = time.perf_counter()
        if part in ("ncu", "memory"):  # they start their own children
            results[part] = PARTS[part](a)
        else:
            results[part] = child_run([sys.executable, __file__, "--child", part, "--work",
                                       str(a.work), "--tokenizer", str(a.tokenizer)]
                                      + (["--quick"] if a.quick else []), a.timeout)
        results[part]["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps({part: results[part]}, indent=1), flush=True)
        if a.out:
            a.out.mkdir(parents=True, exist_ok=True)
            (a.out / "profile.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
