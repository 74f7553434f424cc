"""Packed vs unpacked training vs HF transformers + PEFT on one GPU, in one run.

    python3 bench/bench_pack_gpu.py --tokenizer DIR --work DIR --out DIR [--only hf|tuneline]

The issue-13/26 setting: a 7.38B llama shape (hidden 4096, 32 blocks, 32 heads / 8 KV heads, MLP
14336, vocab 49152 for the embedded SmolLM2 tokenizer in DIR) with random bf16 weights; the 48
rows of data/imports/postgresql_expert.jsonl tokenized by `pipeline.train.encode_chat` (mask on
every assistant turn); LoRA rank 8, scale 20 on q/v of the top 16 blocks, AdamW 2e-4, no weight
decay. `pipeline.train.run` trains unpacked (length-sorted batches padded to the longest row) and
packed (`train.pack`; packed attention `segments`, `bias` or the boolean `mask`,
pipeline/training/attention.py), also on a 4-bit copy of the base (`mlx_lm.convert -q`).
HF + PEFT trains the same padded batches in a plain PyTorch loop (sdpa attention, labels -100 on
everything but assistant tokens) without an attention mask (right padding + causal: the mask
changes nothing for real tokens, and the loop ran 1.36x faster without it on an H100), and once
with the mask for the diagnosis (which attention kernels ran and for how long, torch's profiler).

Rates are over whole epochs after the first (every width traced and every kernel compiled), in
trained tokens/s (assistant tokens scored) and processed positions/s (row tokens the model
reads; padding excluded), both counted over the same rows. Memory: the framework's own peak
(mx.get_peak_memory / torch.cuda.max_memory_allocated) and the process's device memory, the most
`nvidia-smi` showed in use on the GPU while that run trained (one process on the GPU at a time).
The tuneline configurations run one after another in one process, HF + PEFT in another; with
`--only` the two halves run in separate calls (HF's results kept in WORK/hf.results.json).
`--quick` runs a tiny shape for a few steps (CPU smoke test of this script).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE_7B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 49152}
SHAPE_QUICK = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 2, "intermediate_size": 256, "vocab_size": 49152}
LORA = {"rank": 8, "scale": 20.0, "keys": ["self_attn.q_proj", "self_attn.v_proj"]}
FLOP_RATE = 790e12  # bf16 matrix rate measured on this workplace's H200s (device KINDS.md)
# name, batch rows (unpacked) or None, pack_width, tokens_per_step, epochs
QUICK = ("unpacked 4 rows", "packed 2x1024", "packed 2x1024, bias mask", "4-bit base, packed 2x1024")
UPPER = "packed 2x1024, causal across rows (wrong mathematics: speed bound)"
# name, batch rows (unpacked) or None, pack_width, tokens_per_step, epochs, attention mode, base
TUNELINE = [("packed 2x1024", None, 1024, 2048, 8, "segments", "bf16"),
            ("packed 2x1024, boolean mask (before)", None, 1024, 2048, 6, "mask", "bf16"),
            ("packed 8x1024", None, 1024, 8192, 8, "segments", "bf16"),
            ("unpacked 4 rows", 4, None, None, 3, "mask", "bf16"),
            ("unpacked 16 rows", 16, None, None, 4, "mask", "bf16"),
            ("4-bit base, packed 2x1024", None, 1024, 2048, 3, "segments", "q4"),
            ("packed 2x1024, bias mask", None, 1024, 2048, 6, "bias", "bf16"),
            ("packed 16x1024", None, 1024, 16384, 8, "segments", "bf16"),
            ("packed 4x1024", None, 1024, 4096, 6, "segments", "bf16"),
            (UPPER, None, 1024, 2048, 6, "causal", "bf16"),
            ("packed 8x1024, boolean mask", None, 1024, 8192, 6, "mask", "bf16"),
            ("packed 16x1024, boolean mask", None, 1024, 16384, 6, "mask", "bf16")]
HF = [("HF+PEFT 4 rows", 4, 3, False), ("HF+PEFT 16 rows", 16, 4, False),
      ("HF+PEFT 4 rows, with attention_mask (before)", 4, 3, True)]


# --- model and data --------------------------------------------------------------------------


def config(shape: dict) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **shape,
            "head_dim": shape["hidden_size"] // shape["num_attention_heads"],
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
            "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
            "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}


def n_params(c: dict) -> int:
    h, i, v, hd = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    block = h * q * 2 + h * kv * 2 + 3 * h * i + 2 * h
    return c["num_hidden_layers"] * block + 2 * v * h + h


def make_base(base: Path, tokenizer: Path, shape: dict, only_config: bool = False) -> dict:
    """config.json + tokenizer + random bf16 weights (std 0.02, norms 1) in Hugging Face names."""
    base.mkdir(parents=True, exist_ok=True)
    c = config(shape)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, base / name)
    (base / "config.json").write_text(json.dumps(c, indent=1))
    if only_config:
        return c
    import mlx.core as mx

    h, i, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    mx.random.seed(0)

    def normal(*s):
        return (mx.random.normal(s, dtype=mx.float32) * 0.02).astype(mx.bfloat16)

    w = {"model.embed_tokens.weight": normal(c["vocab_size"], h), "lm_head.weight":
         normal(c["vocab_size"], h), "model.norm.weight": mx.ones((h,), mx.bfloat16)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        w |= {p + "self_attn.q_proj.weight": normal(q, h), p + "self_attn.k_proj.weight":
              normal(kv, h), p + "self_attn.v_proj.weight": normal(kv, h),
              p + "self_attn.o_proj.weight": normal(h, q), p + "mlp.gate_proj.weight":
              normal(i, h), p + "mlp.up_proj.weight": normal(i, h),
              p + "mlp.down_proj.weight": normal(h, i),
              p + "input_layernorm.weight": mx.ones((h,), mx.bfloat16),
              p + "post_attention_layernorm.weight": mx.ones((h,), mx.bfloat16)}
        mx.eval(w)
    mx.save_safetensors(str(base / "model.safetensors"), w, metadata={"format": "mlx"})
    return c


def rows_file() -> Path:
    return ROOT / "data/imports/postgresql_expert.jsonl"


def dataset(work: Path) -> Path:
    """All 48 rows train; the same rows as the (one-batch) validation split."""
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name in ("train", "valid"):
        shutil.copy(rows_file(), data / f"{name}.jsonl")
    return data


def row_counts(base: Path) -> dict:
    """Positions (row tokens) and trained tokens (assistant targets) of one pass over the rows."""
    from transformers import AutoTokenizer

    from pipeline import train

    tok = AutoTokenizer.from_pretrained(str(base))
    rows = [json.loads(line) for line in rows_file().read_text().splitlines() if line.strip()]
    enc = [train.encode_chat(tok, r["messages"], True) for r in rows]
    return {"rows": len(enc), "positions": sum(len(t) for t, _ in enc),
            "trained": sum(sum(m[1:]) for _, m in enc), "encoded": enc}


# --- tuneline child --------------------------------------------------------------------------


def train_settings(batch: int | None, width: int | None, tps: int | None, iters: int,
                   report: int, layers: int) -> dict:
    return {"fine_tune_type": "lora", "num_layers": layers, "rank": LORA["rank"],
            "scale": LORA["scale"], "dropout": 0.0, "keys": LORA["keys"],
            "learning_rate": 2.0e-4, "lr_schedule": "constant", "warmup": 0,
            "optimizer": "adamw", "weight_decay": 0.0, "batch_size": batch or 4, "iters": iters,
            "epochs": None, "grad_accumulation_steps": 1, "grad_checkpoint": False,
            "max_seq_length": 512, "mask_prompt": True, "steps_per_report": report,
            "steps_per_eval": iters, "val_batches": 1, "save_every": iters,
            "pack": width is not None, "pack_width": width or 1024,
            "tokens_per_step": tps or 2048, "force": True, "objective": "sft", "beta": 0.1,
            "keep": "last", "early_stop_patience": None}


def plan(name: str, batch, width, tps, epochs: int, mode: str, base: str, counts: dict,
         layers: int) -> dict:
    """iters and report windows so that each window is whole epochs (same rows in every tool)."""
    from pipeline.training import packing

    if width is None:
        per_epoch = counts["rows"] // batch
    else:
        per_epoch = packing.steps_per_epoch(counts["encoded"], width, tps // width, 512)
    # packed steps may straddle epochs (bins carry over), so a window is a whole number of steps
    # covering a whole number of epochs when per_epoch is fractional (rows / seqs per step)
    report = math.ceil(per_epoch) if epochs > 1 else 1  # --quick: two one-step windows
    epochs = max(epochs, 2)
    return {"name": name, "settings": train_settings(batch, width, tps, report * epochs, report,
                                                     layers),
            "epochs": epochs, "steps_per_epoch": per_epoch, "mode": mode, "base": base}


def quantized_base(base: Path, out: Path) -> Path:
    """`mlx_lm.convert -q` of the base: 4 bits, group 64 (mlx-lm's defaults)."""
    from mlx_lm import convert

    if not (out / "config.json").exists():
        started = time.perf_counter()
        convert(str(base), str(out), quantize=True, q_bits=4, q_group_size=64)
        print(f"4-bit base written in {time.perf_counter() - started:.0f}s", flush=True)
    return out


def matmul_rate() -> float:
    """bf16 TFLOP/s of an 8192^3 MLX matmul on this device (mean of 10 after 3 warm-ups)."""
    import mlx.core as mx

    a = mx.random.normal((8192, 8192)).astype(mx.bfloat16)
    b = mx.random.normal((8192, 8192)).astype(mx.bfloat16)
    for _ in range(3):
        mx.eval(a @ b)
    started = time.perf_counter()
    for _ in range(10):
        mx.eval(a @ b)
    return 10 * 2 * 8192**3 / (time.perf_counter() - started) / 1e12


def causal_across_rows(self, n, return_array=False, window_size=None):
    """The speed bound's attention: one causal mask over the whole packed sequence (rows see
    the rows before them: NOT tuneline's mathematics, only how fast no row mask could be)."""
    self.asked = True
    return "causal"


def child_tuneline(spec: dict) -> None:
    import mlx.core as mx
    from mlx_lm.tuner import trainer

    from pipeline import train
    from pipeline.core import config as cfgmod
    from pipeline.training import attention, memory, packing

    facts = {"mlx": mx.__version__, "device": str(mx.default_device())}
    if mx.default_device().type == mx.DeviceType.gpu:
        facts["mlx_matmul_tflops"] = round(matmul_rate(), 1)
        print("FACTS " + json.dumps(facts), flush=True)
    mask_method = packing.SegmentMask.make_mask
    for job in spec["jobs"]:
        windows: list[dict] = []
        original = train.MetricsLog.on_train_loss_report

        def record(self, info, windows=windows, original=original):
            windows.append({**{k: info[k] for k in ("iteration", "iterations_per_second",
                                                    "tokens_per_second", "peak_memory",
                                                    "train_loss")},
                            "active_gb": mx.get_active_memory() / 1e9,
                            "cache_gb": mx.get_cache_memory() / 1e9})
            original(self, info)

        train.MetricsLog.on_train_loss_report = record
        trainer._clear_cache = lambda t: t > 0 and mx.get_cache_memory() > t and mx.clear_cache()
        out = {"name": job["name"], "kind": "tuneline", "mode": job["mode"]}
        try:
            gc.collect()  # the previous configuration's model and compiled step
            mx.clear_cache()
            mx.reset_peak_memory()
            base = Path(spec["base"])
            if job["base"] == "q4":
                base = quantized_base(base, Path(spec["work"]) / "base-4bit")
                gc.collect()
                mx.clear_cache()
                mx.reset_peak_memory()
            attention.DEFAULT_MODE = "mask" if job["mode"] == "causal" else job["mode"]
            packing.SegmentMask.make_mask = (causal_across_rows if job["mode"] == "causal"
                                             else mask_method)
            cfg = cfgmod.from_mapping(train.TrainConfig, job["settings"], "bench")
            work = Path(spec["work"]) / job["name"].replace(" ", "_").replace(",", "")[:40]
            paths = train.TrainPaths(base, Path(spec["data"]), work / "ad",
                                     work / "train.json", work / "curve.tsv", work / "ckpt")
            print("JOBSTART " + job["name"], flush=True)
            started = time.perf_counter()
            result = train.run(cfg, paths, seed=0)
            out |= {"windows": windows, "wall_s": time.perf_counter() - started,
                    "val_loss": result.val_loss, "train_loss": result.train_loss,
                    "mlx_held_peak_gb": result.mlx_held_peak_gb,
                    "rss_peak_gb": result.process_peak_memory_gb,
                    "cache_limit_gb": memory.cache_limit(memory.device_memory(),
                                                         sum(f.stat().st_size for f in base.glob(
                                                             "*.safetensors"))) / 1e9}
        except Exception as exc:  # noqa: BLE001  one failing configuration hides no other
            out["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"
        finally:
            train.MetricsLog.on_train_loss_report = original
            packing.SegmentMask.make_mask = mask_method
        print("JOBEND", flush=True)
        print("RESULT " + json.dumps(out), flush=True)
    print("FACTS " + json.dumps(facts))


# --- HF + PEFT child -------------------------------------------------------------------------


def child_hf(spec: dict) -> None:
    import peft
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    cfg = LlamaConfig(**{k: v for k, v in json.loads(
        (Path(spec["base"]) / "config.json").read_text()).items() if k != "torch_dtype"})
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    model.config.use_cache = False
    n = cfg.num_hidden_layers
    lcfg = peft.LoraConfig(r=LORA["rank"], lora_alpha=LORA["rank"] * LORA["scale"],
                           lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                           layers_to_transform=list(range(n - n // 2, n)), bias="none",
                           task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lcfg)
    model.train()
    enc = spec["encoded"]
    for name, batch, epochs, with_mask in spec["jobs"]:
        out = {"name": name, "kind": "hf"}
        print("JOBSTART " + name, flush=True)
        try:
            out |= hf_train(model, enc, batch, epochs, with_mask, dev, torch)
        except Exception as exc:  # noqa: BLE001  reported in the table as failed
            out["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"
        print("JOBEND", flush=True)
        print("RESULT " + json.dumps(out), flush=True)
    print("FACTS " + json.dumps({"torch": torch.__version__, "transformers":
                                 transformers.__version__, "peft": peft.__version__}))


def hf_batches(enc, batch: int, dev: str, torch) -> list:
    """Length-sorted batches padded on the right: (ids, attention mask, labels)."""
    order = sorted(range(len(enc)), key=lambda i: len(enc[i][0]))
    batches = []
    for s in range(0, len(order) - batch + 1, batch):
        rows = [enc[i] for i in order[s : s + batch]]
        width = max(len(t) for t, _ in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        lab = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, (t, m) in enumerate(rows):
            ids[r, : len(t)] = torch.tensor(t)
            att[r, : len(t)] = 1
            lab[r, : len(t)] = torch.tensor([x if k else -100 for x, k in zip(t, m)])
        batches.append((ids.to(dev), att.to(dev), lab.to(dev),
                        int((lab[:, 1:] != -100).sum())))  # trained tokens, counted on the host
    return batches


def attention_kernels(model, batch, with_mask: bool, dev: str, torch) -> dict:
    """CUDA time (ms) per attention kernel of one training step, from torch's profiler."""
    if dev != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    ids, att, lab, _ = batch
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        loss = model(input_ids=ids, attention_mask=att if with_mask else None, labels=lab).loss
        loss.backward()
        sync(torch, dev)
    model.zero_grad(set_to_none=True)
    out = {}
    for e in prof.key_averages():
        name = e.key.lower()
        if any(k in name for k in ("flash", "fmha", "attention", "efficient", "softmax")):
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            out[e.key[:90]] = round(t / 1000, 2)
    return out


def hf_train(model, enc, batch: int, epochs: int, with_mask: bool, dev: str, torch) -> dict:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4,
                            weight_decay=0.0)
    batches = hf_batches(enc, batch, dev, torch)
    g = torch.Generator().manual_seed(0)
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    windows = []
    for epoch in range(epochs):
        sync(torch, dev)
        tic, trained, loss_sum = time.perf_counter(), 0, torch.zeros((), device=dev)
        # No host sync inside the epoch (the loss stays on the GPU until its end), so Python
        # queues the next step while the GPU runs this one: the fastest plain loop.
        for b in torch.randperm(len(batches), generator=g).tolist():
            ids, att, lab, n_trained = batches[b]
            # labels -100 outside the assistant tokens: HF's loss is the mean over those tokens
            loss = model(input_ids=ids, attention_mask=att if with_mask else None,
                         labels=lab).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            trained += n_trained
            loss_sum += loss.detach()
        sync(torch, dev)
        windows.append({"epoch": epoch + 1, "seconds": time.perf_counter() - tic,
                        "trained": trained, "loss": float(loss_sum) / len(batches)})
    peak = torch.cuda.max_memory_allocated() / 1e9 if dev == "cuda" else 0.0
    reserved = torch.cuda.max_memory_reserved() / 1e9 if dev == "cuda" else 0.0
    try:
        kernels = attention_kernels(model, batches[len(batches) // 2], with_mask, dev, torch)
    except Exception as exc:  # noqa: BLE001  the diagnosis must not lose the timing
        kernels = {"profiler error": f"{type(exc).__name__}: {exc}"[:200]}
    return {"windows": windows, "peak_gb": peak, "reserved_gb": reserved, "kernels": kernels}


def sync(torch, dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


# --- the parent ------------------------------------------------------------------------------


class DeviceMemory:
    """The most device memory in use while each run trained (`nvidia-smi`, every 0.5 s)."""

    def __init__(self):
        import threading

        self.job, self.peaks, self.stop = None, {}, threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def poll(self) -> None:
        while not self.stop.wait(0.5):
            try:
                used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                                       "--format=csv,noheader,nounits"], capture_output=True,
                                      text=True, timeout=10, check=False).stdout.split()
            except (OSError, subprocess.SubprocessError):
                return
            if used and self.job is not None:
                gb = float(used[0]) * 1024**2 / 1e9
                self.peaks[self.job] = max(self.peaks.get(self.job, 0.0), gb)


def run_child(kind: str, spec: dict, work: Path, timeout: float, device: DeviceMemory
              ) -> tuple[list[dict], dict]:
    (work / f"{kind}.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]), "HF_HUB_OFFLINE": "1",
        "TUNELINE_NO_BLAS_PRELOAD": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, __file__, "--child", kind, str(work / f"{kind}.json")]
    results, facts = [], {}
    with subprocess.Popen(cmd, env=env, cwd=work, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as proc:
        deadline = time.perf_counter() + timeout
        log = (work / f"{kind}.log").open("w")
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if line.startswith("JOBSTART "):
                device.job = line[9:].strip()
            elif line.startswith("JOBEND"):
                device.job = None
            elif line.startswith("RESULT "):
                results.append(json.loads(line[7:]))
                r = results[-1]
                r["device_peak_gb"] = device.peaks.get(r["name"])
                print(f"  {r['name']}: {'ERROR ' + r['error'][:300] if 'error' in r else 'ok'}",
                      flush=True)
            elif line.startswith("FACTS "):
                facts |= json.loads(line[6:])
            if time.perf_counter() > deadline:
                proc.kill()
                print(f"  {kind}: killed at the deadline")
                break
        proc.wait()
        if proc.returncode:
            print(f"  {kind} exited {proc.returncode}; log tail:\n"
                  + (work / f"{kind}.log").read_text()[-3000:])
    return results, facts


def summarize(r: dict, counts: dict) -> dict:
    """Steady rates (windows after the first epoch), scaled to positions with the rows' ratio."""
    ratio = counts["positions"] / counts["trained"]
    if r["kind"] == "hf":
        late = r["windows"][1:]
        secs, toks = sum(w["seconds"] for w in late), sum(w["trained"] for w in late)
        peak = r["peak_gb"]
    else:
        wins = r["windows"][1:]  # window 1 holds the traces and kernel compiles
        secs = sum(r["report"] / w["iterations_per_second"] for w in wins)
        toks = sum(w["tokens_per_second"] * r["report"] / w["iterations_per_second"]
                   for w in wins)
        peak = max(w["peak_memory"] for w in r["windows"])
    rate = toks / secs if secs else 0.0
    return {"trained_tok_s": rate, "positions_s": rate * ratio, "peak_gb": peak,
            "steady_s": secs, "steady_trained": toks}


def table(rows: list[dict], facts: dict, flop_bound: float) -> str:
    hf4 = next((r for r in rows if r["name"] == "HF+PEFT 4 rows" and "s" in r), None)
    hf16 = next((r for r in rows if r["name"] == "HF+PEFT 16 rows" and "s" in r), None)
    lines = [f"facts: {json.dumps(facts)}", f"FLOP bound: {flop_bound:,.0f} positions/s", "",
             ("| run | trained tok/s | positions/s | % of FLOP bound | peak GiB (framework) "
              "| device GB in use (nvidia-smi) | vs HF+PEFT 4 rows | vs HF+PEFT 16 rows |"),
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "s" not in r:
            lines.append(f"| {r['name']} | failed | | | | | | |")
            continue
        s = r["s"]
        v4 = f"{s['trained_tok_s'] / hf4['s']['trained_tok_s']:.2f}x" if hf4 else ""
        v16 = f"{s['trained_tok_s'] / hf16['s']['trained_tok_s']:.2f}x" if hf16 else ""
        dev = f"{r['device_peak_gb']:.1f}" if r.get("device_peak_gb") else ""
        lines.append(f"| {r['name']} | {s['trained_tok_s']:,.0f} | {s['positions_s']:,.0f} | "
                     f"{100 * s['positions_s'] / flop_bound:.0f}% | {s['peak_gb'] / 1.073741824:.1f}"
                     f" | {dev} | {v4} | {v16} |")
    for r in rows:
        if r.get("kernels"):
            lines.append(f"\n{r['name']}: attention kernels (CUDA ms, one step): "
                         + json.dumps(r["kernels"]))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, help="folder with the embedded model's tokenizer")
    ap.add_argument("--work", type=Path, default=Path("/tmp/packbench"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip", default="", help="run names to leave out, separated by ';'")
    ap.add_argument("--only", choices=("hf", "tuneline"))
    ap.add_argument("--runs", default="", help="tuneline runs separated by ';' (default: all)")
    ap.add_argument("--epochs", type=int, help="epochs per tuneline run (default: per run)")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for the whole run")
    ap.add_argument("--child", nargs=2)
    a = ap.parse_args()
    if a.child:
        spec = json.loads(Path(a.child[1]).read_text())
        return child_tuneline(spec) if a.child[0] == "tuneline" else child_hf(spec)
    started = time.perf_counter()
    a.work.mkdir(parents=True, exist_ok=True)
    base = a.work / "base"
    shape = SHAPE_QUICK if a.quick else SHAPE_7B
    if a.only == "hf" and not (base / "config.json").exists():
        make_base(base, a.tokenizer, shape, only_config=True)  # HF initialises its own weights
    elif a.only != "hf" and not (base / "model.safetensors").exists():
        c = make_base(base, a.tokenizer, shape)
        print(f"random weights written: {n_params(c) / 1e9:.2f}B params, "
              f"{time.perf_counter() - started:.0f}s", flush=True)
    c = json.loads((base / "config.json").read_text())
    flop_bound = FLOP_RATE / (4 * n_params(c))
    counts = row_counts(base)
    print(f"rows {counts['rows']}, positions {counts['positions']}, trained {counts['trained']}")
    skip = set(filter(None, a.skip.split(";")))
    layers = c["num_hidden_layers"] // 2  # the top half: 16 of 32 blocks
    jobs = [plan(n, b, w, t, 1 if a.quick else (a.epochs or e), m, q, counts, layers)
            for n, b, w, t, e, m, q in TUNELINE
            if n not in skip and (n in QUICK or not a.quick)
            and (not a.runs or n in a.runs.split(";"))]
    data = dataset(a.work)
    facts: dict = {"date": time.strftime("%Y-%m-%d"), "gpu": gpu_name(),
                   "params_B": round(n_params(c) / 1e9, 3)}
    device = DeviceMemory()
    results: list[dict] = []
    hf_file = a.work / "hf.results.json"
    hf_jobs = [(n, b, 2 if a.quick else e, m) for n, b, e, m in HF
               if n not in skip and a.only != "tuneline"]
    if hf_jobs:
        print("HF + PEFT:", flush=True)
        got, f = run_child("hf", {"base": str(base), "encoded": counts["encoded"],
                                  "jobs": hf_jobs}, a.work, min(300.0, a.budget / 2), device)
        hf_file.write_text(json.dumps({"runs": got, "facts": f}))
    if hf_file.exists():  # this run's, or an earlier call's on the same machine (--only)
        kept = json.loads(hf_file.read_text())
        results += kept["runs"]
        facts |= kept["facts"]
    if a.only != "hf":
        print("tuneline:", flush=True)
        got, f = run_child("tuneline", {"base": str(base), "data": str(data),
                                        "work": str(a.work), "jobs": jobs}, a.work,
                           a.budget - (time.perf_counter() - started), device)
        facts |= f
        reports = {j["name"]: j["settings"]["steps_per_report"] for j in jobs}
        for r in got:
            r["report"] = reports[r["name"]]
        results += got
    device.stop.set()
    for r in results:
        try:
            if "error" not in r and r.get("windows"):
                r["s"] = summarize(r, counts)
        except Exception as exc:  # noqa: BLE001  keep the other rows
            print(f"summary of {r['name']} failed: {exc!r}")
    order = [n for n, *_ in HF] + [n for n, *_ in TUNELINE]
    results.sort(key=lambda r: order.index(r["name"]))
    text = table(results, facts, flop_bound)
    print(text)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "table.md").write_text(text)
        (a.out / "results.json").write_text(json.dumps({"facts": facts, "counts": {
            k: v for k, v in counts.items() if k != "encoded"}, "jobs": jobs, "runs": results},
            indent=1))
        for log in a.work.glob("*.log"):
            shutil.copy(log, a.out / log.name)
    print(f"total {time.perf_counter() - started:.0f}s")


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=30, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "no nvidia-smi"


if __name__ == "__main__":
    main()
