"""Held-out preference accuracy and margin of base, SFT, DPO and sft_then_dpo (DPO started from
the SFT adapter, reference still the base), trained by the train stage itself on the same pairs.

    python bench/bench_sft_then_dpo.py --model models/base --data data/imports/postgresql_expert.jsonl \
        --iters 16 --seeds 0 --max-chars 300 --max-seq 128

Pairs from the shipped expert conversations (bench_dpo.pairs_from: chosen = the expert answer to
question i, rejected = the answer to question i+1), both sides cut at --max-chars; the first
--train pairs train, the next 4 validate, the rest are held out. The SFT rows are the train and
valid questions with their chosen answers (as curate writes corrected conversations). The LoRA
and optimizer settings are params.yaml's train section with --iters, --lr and batch_size 4; the
SFT-only adapter is trained once per seed (the dpo run) and reused by sft_then_dpo from the SFT
cache, as `dvc exp run` does. Prints one JSON line per seed and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def write_data(folder: Path, data: Path, n_train: int, max_chars: int) -> None:
    from bench_dpo import pairs_from

    from pipeline.rows.jsonl import write_jsonl

    n = len([x for x in data.read_text().splitlines() if x.strip()])
    pairs = [replace(p, chosen=p.chosen[:max_chars], rejected=p.rejected[:max_chars])
             for p in pairs_from(data, n)]
    splits = {"train": pairs[:n_train], "valid": pairs[n_train:n_train + 4],
              "test": pairs[n_train + 4:]}
    for name, rows in splits.items():
        write_jsonl(folder / "preference" / f"{name}.jsonl", [p.row() for p in rows])
        write_jsonl(folder / f"{name}.jsonl", [
            {"id": p.id, "source": "expert",
             "messages": [*p.prompt, {"role": "assistant", "content": p.chosen}]} for p in rows])


def held_out(model_dir: Path, test: Path, adapters: Path | None, max_seq: int) -> dict:
    from pipeline.rows import pairs
    from pipeline.training import model as mlx_model
    from pipeline.training import preference

    model, tokenizer = mlx_model.load(model_dir)
    if adapters is not None:
        mlx_model.attach_adapters(model, adapters)
    rows = preference.encode_pairs(tokenizer, pairs.read(test))
    return preference.accuracy(model, rows, 4, max_seq)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models/base"))
    ap.add_argument("--data", default=str(ROOT / "data/imports/postgresql_expert.jsonl"))
    ap.add_argument("--iters", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2.0e-4)
    ap.add_argument("--train", type=int, default=32)
    ap.add_argument("--max-chars", type=int, default=300)
    ap.add_argument("--max-seq", type=int, default=128)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--num-layers", type=int, default=None, help="default: params.yaml's")
    args = ap.parse_args()
    from pipeline.training import accel

    accel.prefer_fast_blas()  # OpenBLAS preloaded, as the CLI does (re-executes this script once)

    from pipeline import train
    from pipeline.core import config

    base_cfg = config.load(train.TrainConfig, "train", ROOT / "params.yaml")
    cfg = replace(base_cfg, iters=args.iters, learning_rate=args.lr, batch_size=4,
                  max_seq_length=args.max_seq, warmup=min(base_cfg.warmup, args.iters - 1),
                  steps_per_eval=args.iters, steps_per_report=max(1, args.iters // 4),
                  save_every=args.iters, val_batches=1, pack=False,
                  num_layers=args.num_layers or base_cfg.num_layers)
    model = Path(args.model)
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_data(root / "data", Path(args.data), args.train, args.max_chars)
        test = root / "data/preference/test.jsonl"
        base = held_out(model, test, None, args.max_seq)
        for seed in map(int, args.seeds.split(",")):
            row = {"seed": seed, "base": base}
            for objective in ("dpo", "sft_then_dpo"):
                out = root / f"{objective}-{seed}"
                paths = train.TrainPaths(model, root / "data", out / "adapters", out / "train.json",
                                         out / "curve.tsv", checkpoints=root / "ckpt",
                                         reference=out / "ref.jsonl",
                                         reference_cache=root / "refcache",
                                         sft_cache=root / "sftcache")
                started = time.perf_counter()
                train.run(replace(cfg, objective=objective), paths, seed=seed)
                row[f"{objective}_train_s"] = round(time.perf_counter() - started, 1)
                row[objective] = held_out(model, test, paths.adapters, args.max_seq)
                row.setdefault("sft", held_out(model, test, paths.adapters / "sft", args.max_seq))
            print(json.dumps(row), flush=True)
            table.append(row)
    print(f"\n| {base['pairs']} held-out pairs | accuracy | mean margin (nats) |\n|---|---|---|")
    for row in table:
        for side in ("base", "sft", "dpo", "sft_then_dpo"):
            r = row[side]
            print(f"| seed {row['seed']} {side} | {r['accuracy']:.3f} | {r['mean_margin']:+.3f} |")


if __name__ == "__main__":
    main()
