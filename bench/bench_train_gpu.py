"""Train-stage speed on a GPU: `python bench/bench_train_gpu.py --base DIR [--out DIR] [--quick]`
(`--table results.json` reprints the table of a saved run).

Compares, in one run on one machine, `pipeline.train.run` (what `tuneline train` calls) with bare
`python -m mlx_lm lora --train` on the same data (the shipped expert seed split 40/8) and the same
settings: params.yaml's `train` section, and a bigger GPU setting (batch 8, 50 iters, 16 layers).

DIR holds config.json and the tokenizer files of the base model; if it has no model.safetensors,
random weights of the config's shapes are written there in bfloat16 (Hugging Face llama names),
so the benchmark needs no real weights (SmolLM2-135M's are 538 MB; shapes set the speed).

Each training runs in its own process (peak memory is per process), in the order stock, tuneline,
tuneline, stock, ... The bare run is mlx-lm's own CLI entry (`mlx_lm.lora.main`) with one change:
its reporting hook returns a callback that records mlx-lm's per-window numbers (it/s, tokens/s,
peak memory), since the CLI prints tokens/s rounded and no it/s. Both runs visit the same batches
(length-sorted, chunked, each batch iters/n_batches times), so training time compares equal work.
mlx-lm counts only the last assistant turn as trained tokens; tuneline counts every assistant turn,
so its own tokens/s is higher on multi-turn rows for the same work: see "equal-work tokens/s".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_train import dataset  # the same 40/8 split as the CPU benchmark

GPU_SETTING = {"batch_size": 8, "iters": 50, "num_layers": 16, "max_seq_length": 512}
QUICK = {"iters": 4, "steps_per_report": 2, "steps_per_eval": 4, "val_batches": 1,
         "num_layers": 2, "save_every": 2, "warmup": 1, "max_seq_length": 64}
CHILD_TIMEOUT_S = 240
STEADY_FROM = 10  # steps; see summarize()


# --- the model and data ----------------------------------------------------------------------


def random_weights(config: dict) -> dict:
    """Llama tensors named as in Hugging Face checkpoints, std 0.02, norms at 1."""
    import numpy as np

    rng = np.random.default_rng(0)
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd

    def normal(*shape):
        return rng.standard_normal(shape, dtype=np.float32) * 0.02

    w = {"model.embed_tokens.weight": normal(vocab, h), "model.norm.weight": np.ones(h, np.float32)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w |= {p + "self_attn.q_proj.weight": normal(q, h),
              p + "self_attn.k_proj.weight": normal(kv, h),
              p + "self_attn.v_proj.weight": normal(kv, h),
              p + "self_attn.o_proj.weight": normal(h, q),
              p + "mlp.gate_proj.weight": normal(inter, h),
              p + "mlp.up_proj.weight": normal(inter, h),
              p + "mlp.down_proj.weight": normal(h, inter),
              p + "input_layernorm.weight": np.ones(h, np.float32),
              p + "post_attention_layernorm.weight": np.ones(h, np.float32)}
    if not config.get("tie_word_embeddings", False):
        w["lm_head.weight"] = normal(vocab, h)
    return w


def ensure_weights(base: Path) -> None:
    target = base / "model.safetensors"
    if target.exists():
        return
    import mlx.core as mx

    weights = random_weights(json.loads((base / "config.json").read_text()))
    bf16 = {k: mx.array(v).astype(mx.bfloat16) for k, v in weights.items()}
    mx.save_safetensors(str(target), bf16, metadata={"format": "mlx"})
    print(f"wrote random bf16 weights: {sum(v.size for v in weights.values()) / 1e6:.1f}M params")


def settings(extra: dict) -> dict:
    from pipeline.core import config

    return {**config.read_params(ROOT / "params.yaml")["train"], **extra}


# --- the two children ------------------------------------------------------------------------


class Capture:
    """mlx-lm training callback that keeps each report window's numbers."""

    def __init__(self):
        self.windows: list[dict] = []

    def on_train_loss_report(self, info: dict) -> None:
        self.windows.append({k: info[k] for k in ("iteration", "iterations_per_second",
                                                  "tokens_per_second", "trained_tokens",
                                                  "peak_memory", "train_loss")})

    def on_val_loss_report(self, info: dict) -> None:
        pass


def backend_facts() -> dict:
    import mlx.core as mx

    from pipeline.training import accel

    return {"mlx": mx.__version__, "default_device": str(mx.default_device()),
            "cuda_available": bool(getattr(mx, "cuda", None) and mx.cuda.is_available()),
            "compute_dtype": accel.compute_dtype()}


def child_tuneline(spec: dict) -> dict:
    from pipeline import train
    from pipeline.core import config

    capture = Capture()
    original = train.MetricsLog.on_train_loss_report

    def record(self, info):  # tuneline's log keeps tokens/s only; it/s comes from the same info
        capture.on_train_loss_report(info)
        original(self, info)

    train.MetricsLog.on_train_loss_report = record
    cfg = config.from_mapping(train.TrainConfig, spec["train"], "bench settings")
    out = Path(spec["work"])
    paths = train.TrainPaths(Path(spec["base"]), Path(spec["data"]), out / "adapters",
                             out / "train.json", out / "train_loss.tsv")
    paths = dataclasses.replace(paths, checkpoints=out / "ckpt")
    result = train.run(cfg, paths, seed=spec["seed"])
    return {"windows": capture.windows, "result": result.__dict__, **backend_facts()}


def stock_config(spec: dict) -> dict:
    t = spec["train"]
    lr, warmup, iters = t["learning_rate"], t["warmup"], t["iters"]
    decay = ({"name": "cosine_decay", "arguments": [lr, iters - warmup, lr * 0.1]}
             if t["lr_schedule"] == "cosine" else {"name": "linear_schedule",
                                                  "arguments": [lr, lr, iters]})
    lora = {"rank": t["rank"], "scale": t["scale"], "dropout": t["dropout"]}
    if t["keys"]:
        lora["keys"] = list(t["keys"])
    cfg = {"model": spec["base"], "data": spec["data"], "train": True, "seed": spec["seed"],
           "fine_tune_type": t["fine_tune_type"], "num_layers": t["num_layers"],
           "batch_size": t["batch_size"], "iters": iters, "val_batches": t["val_batches"],
           "learning_rate": lr, "steps_per_report": t["steps_per_report"],
           "steps_per_eval": t["steps_per_eval"], "save_every": t["save_every"],
           "max_seq_length": t["max_seq_length"], "mask_prompt": t["mask_prompt"],
           "grad_checkpoint": t["grad_checkpoint"],
           "grad_accumulation_steps": t["grad_accumulation_steps"],
           "optimizer": t["optimizer"],
           "optimizer_config": {t["optimizer"]: ({"weight_decay": t["weight_decay"]}
                                                 if t["optimizer"] == "adamw" else {})},
           "lr_schedule": {**decay, "warmup": warmup, "warmup_init": 0.0} if warmup else decay,
           "lora_parameters": lora, "adapter_path": str(Path(spec["work"]) / "adapters")}
    return cfg


def child_stock(spec: dict) -> dict:
    import yaml
    from mlx_lm import lora

    cfg_file = Path(spec["work"]) / "lora.yaml"
    cfg_file.write_text(yaml.safe_dump(stock_config(spec)))
    capture = Capture()
    lora.get_reporting_callbacks = lambda *a, **k: capture  # the one change: see module doc
    sys.argv = ["mlx_lm.lora", "--train", "--mask-prompt", "-c", str(cfg_file)]
    lora.main()
    return {"windows": capture.windows, **backend_facts()}


def child(kind: str, spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    started = time.perf_counter()
    out = child_tuneline(spec) if kind == "tuneline" else child_stock(spec)
    out["process_seconds"] = time.perf_counter() - started
    print("RESULT " + json.dumps(out))


# --- the parent ------------------------------------------------------------------------------


def summarize(out: dict, steps_per_report: int) -> dict:
    """Training time and rates from mlx-lm's windows (evaluation time is not in them).

    "steady" counts the windows after step STEADY_FROM: the first steps hold the kernel JIT and
    one `mx.compile` trace per new batch width. With 10 (or 5) batches per epoch those windows
    cover whole epochs, so both tools do the same work in them.
    """
    wins = out["windows"]
    secs = [steps_per_report / w["iterations_per_second"] for w in wins]  # mlx-lm's it/s basis
    toks = [w["tokens_per_second"] * s for w, s in zip(wins, secs)]
    start = min(STEADY_FROM, wins[-1]["iteration"] // 2)  # short (--quick) runs: second half
    late = [i for i, w in enumerate(wins) if w["iteration"] - steps_per_report >= start]
    return {"train_seconds": sum(secs), "steady_seconds": sum(secs[i] for i in late),
            "tokens": sum(toks), "steady_tokens": sum(toks[i] for i in late),
            "peak_memory_gb": max(w["peak_memory"] for w in wins),
            "final_train_loss": wins[-1]["train_loss"]}


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def run_child(kind: str, spec: dict, tmp: Path, n: int) -> dict | None:
    work = tmp / f"{kind}{n}"
    work.mkdir()
    spec = {**spec, "work": str(work)}
    (work / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "TUNELINE_NO_BLAS_PRELOAD": "1", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", kind, str(work / "spec.json")],
                              env=env, cwd=work, capture_output=True, text=True,
                              timeout=CHILD_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as e:
        print(f"--- {kind} #{n} timed out after {CHILD_TIMEOUT_S}s\n{_text(e.stdout)[-4000:]}\n"
              f"{_text(e.stderr)[-4000:]}")
        return None
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(f"--- {kind} #{n} failed (rc {proc.returncode})\n{proc.stdout[-4000:]}\n"
              f"{proc.stderr[-6000:]}")
        return None
    out = json.loads(lines[-1][len("RESULT "):])
    out["wall_seconds"] = wall
    out["summary"] = summarize(out, spec["train"]["steps_per_report"])
    return out


def compare(name: str, runs: dict[str, list[dict]]) -> dict:
    """Medians over repeats. Equal-work rate: mlx-lm's token count over each tool's time."""
    per = {k: [r["summary"] for r in v] for k, v in runs.items() if v}
    if len(per) < 2:
        return {"setting": name, "incomplete": True, "runs": per}
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in per.items()}
    s, t = med["stock"], med["tuneline"]
    return {
        "setting": name, "runs": per, "medians": med,
        "n_runs": {k: len(v) for k, v in per.items()},
        "stock_steady_tokens_per_second": s["steady_tokens"] / s["steady_seconds"],
        "tuneline_steady_tokens_per_second_equal_work": s["steady_tokens"] / t["steady_seconds"],
        "tuneline_steady_tokens_per_second_own_count": t["steady_tokens"] / t["steady_seconds"],
        "ratio_steady": s["steady_seconds"] / t["steady_seconds"],  # >1: tuneline faster
        "ratio_whole_run": s["train_seconds"] / t["train_seconds"],
        "steady_seconds_per_run": {k: [round(x["steady_seconds"], 3) for x in v]
                                   for k, v in per.items()},
        "peak_memory_gb": {k: max(x["peak_memory_gb"] for x in v) for k, v in per.items()},
    }


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=30, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "no nvidia-smi"


def table(rows: list[dict], facts: dict) -> str:
    device = (f"device: {facts['gpu']}; mlx {facts.get('mlx')}, default_device "
              f"{facts.get('default_device')}, compute dtype {facts.get('compute_dtype')}; "
              f"{facts.get('date')}")
    header = ("| setting | runs stock/tuneline | bare mlx_lm lora tok/s | tuneline tok/s (equal "
              "work) | ratio (steady) | ratio (whole run) | tuneline tok/s (own count) | steady s "
              "per run stock; tuneline | peak GB stock / tuneline |")
    lines = [device, "", header, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("incomplete"):
            lines.append(f"| {r['setting']} | incomplete | | | | | | | |")
            continue
        runs, secs, peak = r["n_runs"], r["steady_seconds_per_run"], r["peak_memory_gb"]
        lines.append(
            f"| {r['setting']} | {runs['stock']}/{runs['tuneline']} "
            f"| {r['stock_steady_tokens_per_second']:,.0f} "
            f"| {r['tuneline_steady_tokens_per_second_equal_work']:,.0f} | {r['ratio_steady']:.2f} "
            f"| {r['ratio_whole_run']:.2f} "
            f"| {r['tuneline_steady_tokens_per_second_own_count']:,.0f} "
            f"| {', '.join(map(str, secs['stock']))}; {', '.join(map(str, secs['tuneline']))} "
            f"| {peak['stock']:.2f} / {peak['tuneline']:.2f} |")
    return "\n".join(lines) + "\n"


def retable(results: Path) -> None:
    """Recompute the table from a saved results.json (e.g. after changing the summary)."""
    saved = json.loads(results.read_text())
    rows = []
    for name in dict.fromkeys(r["setting"] for r in saved["runs"]):
        runs: dict[str, list[dict]] = {"stock": [], "tuneline": []}
        for r in (r for r in saved["runs"] if r["setting"] == name):
            r["summary"] = summarize(r, r["steps_per_report"])
            runs[r["kind"]].append(r)
        rows.append(compare(name, runs))
    print(table(rows, saved["facts"]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=Path, default=ROOT / ".gpubench/base")
    ap.add_argument("--out", type=Path, default=None, help="folder for results.json, table.md")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--deadline", type=float, default=450.0, help="seconds; skip runs after")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (CPU)")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"))
    ap.add_argument("--table", type=Path, help="only print the table of a saved results.json")
    a = ap.parse_args()
    if a.child:
        return child(*a.child)
    if a.table:
        return retable(a.table)
    started = time.perf_counter()
    ensure_weights(a.base)
    from pipeline.core import config

    seed = config.read_params(ROOT / "params.yaml")["base"]["seed"]
    quick = QUICK if a.quick else {}
    plans = [("params.yaml train", settings(quick)),
             ("GPU: batch 8, 50 iters, 16 layers", settings({**GPU_SETTING, **quick}))]
    facts: dict = {"gpu": gpu_name(), "date": time.strftime("%Y-%m-%d")}
    rows, raw = [], []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        data = dataset(tmp)
        for name, train_cfg in plans:
            spec = {"base": str(a.base.resolve()), "data": str(data), "seed": seed,
                    "train": train_cfg}
            runs: dict[str, list[dict]] = {"stock": [], "tuneline": []}
            order = ["stock", "tuneline", "tuneline", "stock"] * a.repeats
            for n, kind in enumerate(order[: 2 * a.repeats]):
                if time.perf_counter() - started > a.deadline:
                    print(f"deadline reached; skipping {kind} #{n} of {name}")
                    continue
                out = run_child(kind, spec, tmp, len(raw))
                if out is None:
                    continue
                facts.update({k: out[k] for k in ("mlx", "default_device", "compute_dtype",
                                                  "cuda_available")})
                print(f"{name}: {kind} train {out['summary']['train_seconds']:.3f}s "
                      f"steady {out['summary']['steady_seconds']:.3f}s "
                      f"wall {out['wall_seconds']:.1f}s "
                      f"peak {out['summary']['peak_memory_gb']:.2f} GB")
                runs[kind].append(out)
                raw.append({"setting": name, "kind": kind,
                            "steps_per_report": train_cfg["steps_per_report"], **out})
            row = compare(name, runs)
            row["settings"] = train_cfg
            row["wall_seconds_per_run"] = {k: [round(r["wall_seconds"], 1) for r in v]
                                           for k, v in runs.items()}
            rows.append(row)
            if a.out:
                a.out.mkdir(parents=True, exist_ok=True)
                (a.out / "results.json").write_text(json.dumps(
                    {"facts": facts, "rows": rows, "runs": raw}, indent=1))
    text = table(rows, facts)
    print(text)
    if a.out:
        (a.out / "table.md").write_text(text)


if __name__ == "__main__":
    main()
