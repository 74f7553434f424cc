"""7B-class mistral and qwen2 through packed training, fuse, F16 export and the llama.cpp proof.

    python3 bench/bench_arch_gpu.py --work /tmp/ab --out $OUT [--quick] [--kinds mistral,qwen2]

Issue 24's GPU evidence. Each architecture runs in its own process, side by side: random bf16
weights of the real shape (Mistral-7B: hidden 4096, 32 blocks, 32/8 heads, MLP 14336; Qwen2-7B:
hidden 3584, 28 blocks, 28/4 heads, MLP 18944, q/k/v biases) with the tokenizer kinds and chat
templates of tests/tiny_archs.py (SentencePiece + [INST] without a system role; byte-level BPE
+ ChatML), `teach_stop` so greedy decoding stops, then the stages' own code: `train.run` packed
(3 steps), `fuse.run`, `export.run` (F16 through llama.cpp's converter, the proof on CPU
llama.cpp against the MLX answer). Prints and writes one JSON line per architecture with the
seconds of each step and the proof's numbers. `--quick`: tiny shapes (a CPU smoke test).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

SHAPES = {
    "mistral": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8, "intermediate_size": 14336, "head_dim": 128},
    "qwen2": {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
              "num_key_value_heads": 4, "intermediate_size": 18944, "head_dim": 128},
}
QUICK = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 128, "head_dim": 16}


def make_base(kind: str, base: Path, shape: dict) -> dict:
    """Tokenizer + config of tests/tiny_archs.py at `shape`; random bf16 weights (std 0.02)."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from mlx_lm.utils import _get_classes
    from tiny_archs import ARCHS, arch_config, teach_stop, write_tokenizer

    from pipeline.training import model as mlx_model

    base.mkdir(parents=True, exist_ok=True)
    tok = write_tokenizer(base, ARCHS[kind])
    config = {**arch_config(kind, tok.get_vocab_size(), tok), **shape, "torch_dtype": "bfloat16",
              "tie_word_embeddings": False}
    (base / "config.json").write_text(json.dumps(config, indent=2))
    model_class, args_class = _get_classes(config)
    lazy = model_class(args_class.from_dict(config))  # shapes only: never evaluated
    mx.random.seed(0)
    weights = {}
    for name, arr in tree_flatten(lazy.parameters()):
        if arr.ndim == 2:
            weights[name] = (mx.random.normal(arr.shape) * 0.02).astype(mx.bfloat16)
        else:
            weights[name] = mx.ones(arr.shape, mx.bfloat16) if name.endswith("norm.weight") \
                else mx.zeros(arr.shape, mx.bfloat16)
        mx.eval(weights[name])
    small = {k: np.array(weights[k].astype(mx.float32))
             for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")}
    prompt = mlx_model.prompt_ids(load_tokenizer(base), [{"role": "user", "content": "Hi"}])
    answer = [i for i in dict.fromkeys(tok.encode("Use CREATE INDEX now").ids)
              if i not in (prompt[-1], config["eos_token_id"])
              and not tok.id_to_token(i).startswith("<")][:4]
    # teach_stop also damps o_proj/down_proj in place: done on the GPU below instead
    taught = {**small, "o_proj.weight": np.ones(1), "down_proj.weight": np.ones(1)}
    teach_stop(taught, config, [prompt[-1], *answer, config["eos_token_id"]], 0)
    scaled = {name: mx.array(taught[name]).astype(mx.bfloat16) for name in small}
    for name, value in list(weights.items()):
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = value * 0.05
    weights.update(scaled)
    mx.save_safetensors(str(base / "model.safetensors"), weights, metadata={"format": "mlx"})
    (base / "tuneline.json").write_text(json.dumps({"base.model": f"example/{kind}-7b-shape"}))
    return {"params": sum(int(np.prod(w.shape)) for w in weights.values())}


def one(kind: str, work: Path, quick: bool, wait_for: Path | None) -> dict:
    import dataclasses

    import mlx.core as mx
    from test_export import make_cfg
    from test_train import ROWS

    from pipeline import export, fuse, train
    from pipeline.core import config as cfgmod

    out: dict = {"kind": kind, "device": str(mx.default_device())}
    if mx.cuda.is_available():
        mx.set_cache_limit(8 * 1024**3)  # freed buffers otherwise pile up (DESIGN pitfalls)
    t0 = time.perf_counter()
    out.update(make_base(kind, work / "base", QUICK if quick else SHAPES[kind]))
    out["weights_seconds"] = round(time.perf_counter() - t0, 1)
    print("PHASE " + json.dumps(out), flush=True)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    rows = [{**r, "messages": [{"role": "system", "content": "Answer briefly."}, *r["messages"]]}
            for r in ROWS]
    for name, part in (("train", rows[:8]), ("valid", rows[8:])):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    settings = cfgmod.load(train.TrainConfig, "train", ROOT / "params.yaml")
    settings = dataclasses.replace(settings, iters=3, num_layers=2 if quick else 8, pack=True,
                                   pack_width=512,
                                   tokens_per_step=1024, steps_per_report=1, steps_per_eval=3,
                                   save_every=3, val_batches=1, warmup=0,
                                   learning_rate=1.0e-5, lr_schedule="constant")
    paths = train.TrainPaths(work / "base", data, work / "adapters", work / "train.json",
                             work / "curve.tsv", work / "ckpt")
    t0 = time.perf_counter()
    result = train.run(settings, paths, seed=0)
    out.update(train_seconds=round(time.perf_counter() - t0, 1), iters=result.iters,
               train_loss=result.train_loss, peak_memory_gb=result.peak_memory_gb,
               trained_tokens=result.trained_tokens,
               tokens_per_second=result.tokens_per_second)
    print("PHASE " + json.dumps(out), flush=True)
    while wait_for is not None and not wait_for.exists():  # disk: the previous one's files
        time.sleep(1)
    t0 = time.perf_counter()
    fused = fuse.run(fuse.FusePaths(work / "base", work / "adapters", work / "fused"))
    out["fuse_seconds"] = round(time.perf_counter() - t0, 1)
    (work / "base" / "model.safetensors").unlink()  # disk: export needs the base's files only
    (work / "fused.done").touch()  # the parent starts the next architecture now
    print("PHASE " + json.dumps(out), flush=True)
    cfg = make_cfg(quantizations=(), modelfile_quantization="f16", adapter=False,
                   prompts=("How do I create an index?",), max_tokens=8,
                   min_agreement={"f16": 0.99})
    t0 = time.perf_counter()
    exported = export.run(cfg, export.ExportPaths(fused, work / "base", data, work / "gguf",
                                                  work / "gguf.json"), seed=0)
    f16 = exported.report["files"]["f16"]
    out.update(export_seconds=round(time.perf_counter() - t0, 1),
               writer=exported.report["writer"], f16_bytes=f16["size_bytes"],
               f16_write_seconds=f16["export_seconds"], load_seconds=f16["load_seconds"],
               agreement=f16["agreement"], failures=f16["failures"],
               finish=[a["finish_reason"] for a in f16["answers"]],
               llama_tokens_per_second=f16["tokens_per_second"],
               mlx_seconds=exported.report["mlx_seconds"],
               template=exported.report["modelfile"]["template"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/archbench"))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--kinds", default="mistral,qwen2")
    ap.add_argument("--child")
    ap.add_argument("--wait-for", type=Path)
    args = ap.parse_args()
    if args.child:
        work = args.work / args.child
        try:
            print("RESULT " + json.dumps(one(args.child, work, args.quick, args.wait_for)))
        except Exception as exc:  # noqa: BLE001 (reported beside the other architecture)
            print("RESULT " + json.dumps({"kind": args.child, "error": repr(exc)[-2000:]}))
        finally:
            work.mkdir(parents=True, exist_ok=True)
            (work / "fused.done").touch()
            shutil.rmtree(work / "fused", ignore_errors=True)  # 7B files: free the disk
            shutil.rmtree(work / "gguf", ignore_errors=True)
            (work / "finished").touch()
        return
    # One architecture at a time on the GPU, but the next one starts training while the
    # previous one exports on the CPU (disk: a 7B shape is ~15 GB per copy, 64 GB in all).
    procs = {}
    t0 = time.perf_counter()
    previous = None
    for kind in args.kinds.split(","):
        log = (args.out or args.work) / f"{kind}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, "--child", kind, "--work", str(args.work)]
        cmd += ["--quick"] * args.quick
        cmd += ["--wait-for", str(args.work / previous / "finished")] if previous else []
        previous = kind
        proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
        procs[kind] = (proc, log)
        print(f"{time.perf_counter() - t0:.0f}s: started {kind}", flush=True)
        while proc.poll() is None and not (args.work / kind / "fused.done").exists():
            time.sleep(1)
    results = []
    for kind, (proc, log) in procs.items():
        proc.wait()
        lines = [ln for ln in log.read_text().splitlines() if ln.startswith("RESULT ")]
        results.append(json.loads(lines[-1][7:]) if lines else {"kind": kind, "error": "no result"})
        print(json.dumps(results[-1]))
    if args.out:
        (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
