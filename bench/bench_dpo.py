"""DPO step time and peak memory: tuneline's DPO (cached reference, both sides in one forward) vs
SFT on the same rows vs ORPO vs mlx-lm-lora's DPO (a second model copy as the reference, its
log-probs recomputed every step), on the same pairs, one process per mode, in one run.

    python bench/bench_dpo.py --model models/base --data data/imports/postgresql_expert.jsonl
    # mlx-lm-lora in its own folder (not the project venv): pip install --target DIR mlx-lm-lora
    python bench/bench_dpo.py ... --lora-path DIR --modes sft,dpo,orpo,lora-dpo --rounds 2
    # GPU, the 7B shape of bench_pack_gpu.py (random weights written on first use)
    python3 bench/bench_dpo.py --device gpu --model /tmp/pb/base --tokenizer TOKDIR --layers 16 \
        --lora-path DIR --modes sft,dpo,lora-dpo --iters 10 --pairs 40

Pairs from the shipped expert conversations (`pairs_from`), truncated at --max-seq. The LoRA settings are params.yaml's train section (rank 8, 8
layers, all linears, adamw). A mode runs `--iters` steps; the step time is the median of the
report windows after the first (compilation), the peak is MLX's peak memory and the process's
max RSS. Prints one JSON line per mode and round.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pairs_from(data: Path, n: int) -> list:
    """Chat rows (the shipped expert import): chosen = the expert answer to question i,
    rejected = the first 300 characters of the answer to question i+1 (a generated answer's
    length on the embedded model: max_tokens 128)."""
    from pipeline.rows.pairs import Pair

    rows = [json.loads(x) for x in data.read_text().splitlines() if x.strip()]
    turns = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows]
    return [Pair(f"b{i}", ({"role": "user", "content": turns[i % len(turns)][0]},),
                 turns[i % len(turns)][1], turns[(i + 1) % len(turns)][1][:300], "bench")
            for i in range(n)]


def child(args: argparse.Namespace) -> None:
    import mlx.core as mx
    import numpy as np

    from pipeline import train
    from pipeline.core import config
    from pipeline.training import model as mlx_model
    from pipeline.training import preference

    if args.device == "gpu":
        mx.set_default_device(mx.gpu)
    cfg = config.load(train.TrainConfig, "train", ROOT / "params.yaml")
    if args.layers:  # the GPU 7B setting of bench_pack_gpu.py: q/v of the top half
        cfg = replace(cfg, num_layers=args.layers, keys=tuple(args.keys.split(",")))
    if not (Path(args.model) / "model.safetensors").exists():  # a shape only: random weights
        sys.path.insert(0, str(ROOT / "bench"))
        from bench_pack_gpu import SHAPE_7B, make_base

        make_base(Path(args.model), Path(args.tokenizer), SHAPE_7B)
    model, tokenizer = mlx_model.load(Path(args.model))
    pairs = pairs_from(Path(args.data), args.pairs)
    rows = preference.encode_pairs(tokenizer, pairs)
    if args.mode in ("dpo", "dpo-packed"):
        refs = preference.score(model, rows, args.batch, args.max_seq)
        rows = [preference.PairRow(r.id, r.chosen, r.rejected, ref) for r, ref in zip(rows, refs)]
    mx.reset_peak_memory()
    train.apply_adapters(model, cfg)
    times: list[float] = []
    if args.mode == "lora-dpo":
        sys.path.insert(0, args.lora_path)
        times = lora_dpo(model, rows, args, cfg)
    else:
        from mlx_lm.tuner.trainer import TrainingArgs
        from mlx_lm.tuner.trainer import train as mlx_train

        if args.mode == "sft":
            data = [r.chosen for r in rows]  # the same conversations, chosen side only
            batches, loss = train.batch_iterator, mlx_model.masked_loss
        elif args.mode == "dpo-packed":  # both sides of each pair in one 1024-wide sequence
            from pipeline.training import preference_packing

            data = rows
            pcfg = replace(cfg, objective="dpo", beta=0.1, pack=True, pack_width=1024,
                           tokens_per_step=1024 * args.batch // 2, max_seq_length=args.max_seq)
            batches, loss, _ = preference_packing.batching(pcfg, model, rows, 1)
        else:
            data = rows
            batches, loss = preference.batch_iterator, preference.make_loss(args.mode, 0.1)
        targs = TrainingArgs(batch_size=args.batch, iters=args.iters, steps_per_report=2,
                             steps_per_eval=10**6, steps_per_save=10**6,
                             max_seq_length=args.max_seq, adapter_file=str(args.tmp / "a.safetensors"))
        mlx_train(model=model, optimizer=train.build_optimizer(cfg, args.iters, 0),
                  train_dataset=data, val_dataset=None, args=targs, loss=loss,
                  iterate_batches=batches(0), training_callback=Timer(times))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB -> GB
    rate = float(np.median(RATES[-1][1:])) if RATES and len(RATES[-1]) > 1 else 0.0
    print(json.dumps({"mode": args.mode, "step_s": round(float(np.median(times[1:])), 4),
                      "rate_per_s": round(rate, 2),  # dpo modes: pairs/s; sft, lora-dpo: tokens/s
                      "mlx_peak_gb": round(mx.get_peak_memory() / 1e9, 3),
                      "rss_gb": round(rss, 3), "pairs_per_step": args.batch}), flush=True)


RATES: list[list[float]] = []  # the Timer's tokens/s windows (pairs/s for tuneline's DPO)


class Timer:
    def __init__(self, times: list[float]):
        self.times, self.rates = times, []
        RATES.append(self.rates)

    def on_train_loss_report(self, info: dict) -> None:
        self.times.append(1.0 / info["iterations_per_second"])
        self.rates.append(info.get("tokens_per_second", 0.0))  # preference losses: pairs/s

    def on_val_loss_report(self, info: dict) -> None:
        pass


def lora_dpo(model, rows, args, cfg) -> list[float]:
    import mlx.core as mx
    from mlx_lm_lora.trainer import dpo_trainer

    from pipeline import train
    from pipeline.training import model as mlx_model

    ref_model, _ = mlx_model.load(Path(args.model))  # what mlx-lm-lora does: a second copy
    ref_model.freeze()
    data = [{"chosen": r.chosen[0], "rejected": r.rejected[0],
             "chosen_prompt_length": r.chosen[1].index(1),
             "rejected_prompt_length": r.rejected[1].index(1)} for r in rows]
    info = mx.device_info()
    if "max_recommended_working_set_size" not in info:  # CPU: no wired memory to set
        mx.device_info = lambda: {**info, "max_recommended_working_set_size": 0}
        mx.set_wired_limit = lambda *_: None
    targs = dpo_trainer.DPOTrainingArgs(
        batch_size=args.batch, iters=args.iters, steps_per_report=2, steps_per_eval=10**6,
        steps_per_save=10**6, max_seq_length=args.max_seq, beta=0.1,
        adapter_file=str(args.tmp / "b.safetensors"))
    times: list[float] = []
    dpo_trainer.train_dpo(model, ref_model, train.build_optimizer(cfg, args.iters, 0), data,
                          None, args=targs, training_callback=Timer(times))
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/base")
    ap.add_argument("--data", default="data/imports/postgresql_expert.jsonl")
    ap.add_argument("--modes", default="sft,dpo,orpo,lora-dpo")
    ap.add_argument("--lora-path", default="")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--max-seq", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mode", default=None)
    ap.add_argument("--layers", type=int, default=0, help="LoRA blocks (0: params.yaml's)")
    ap.add_argument("--keys", default="self_attn.q_proj,self_attn.v_proj", help="with --layers")
    ap.add_argument("--tokenizer", default="models/base", help="for a --model with no weights")
    ap.add_argument("--tmp", type=Path, default=Path("/tmp"))
    args = ap.parse_args()
    if args.mode:
        return child(args)
    from pipeline.training import accel

    accel.prefer_fast_blas()  # OpenBLAS preloaded (the CLI does the same): 40x the wheel's BLAS
    print(f"# BLAS: {accel.blas_in_use()}", flush=True)
    for _ in range(args.rounds):
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--mode", mode, *sys.argv[1:]]
            started = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                                 env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                     filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))})
            line = [x for x in out.stdout.splitlines() if x.startswith("{")]
            print(line[-1] if line else json.dumps({"mode": mode, "error": out.stderr[-800:]}),
                  f"# {time.perf_counter() - started:.0f} s", flush=True)
    return None


if __name__ == "__main__":
    main()
