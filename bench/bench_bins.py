"""Packing layout speed and fill: `python bench/bench_bins.py [--old REV] [--sizes 8000 100000]`.

Bins synthetic row lengths (two fixed distributions, seed 0) into 1025-position sequences with
`pipeline.training.packing.bins`, and with the `bins` of git revision REV when given (the
quadratic one before issue 23: 86c59f0), and prints seconds, sequences and fill (tokens /
positions) for each; the two must give the same groups.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.training import packing

CAPACITY = 1025  # pack_width 1024 + 1


def lengths(kind: str, n: int) -> list[int]:
    rng = random.Random(0)
    if kind == "uniform":  # the shipped rows' range, 158-484 tokens
        return [rng.randint(158, 484) for _ in range(n)]
    return [min(1024, int(rng.lognormvariate(5.3, 0.6))) for _ in range(n)]  # skewed, long tail


def old_bins(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:pipeline/training/packing.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_packing.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_packing", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.bins


def measure(bins, rows: list[int]) -> tuple[float, list[list[int]]]:
    started = time.perf_counter()
    groups = bins(rows, CAPACITY)
    return time.perf_counter() - started, groups


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", help="git revision whose bins() to compare")
    ap.add_argument("--sizes", type=int, nargs="+", default=[8000, 100000])
    args = ap.parse_args()
    variants = [("now", packing.bins)] + ([(args.old, old_bins(args.old))] if args.old else [])
    for kind in ("uniform", "lognormal"):
        for n in args.sizes:
            rows = lengths(kind, n)
            results = []
            for name, bins in variants:
                seconds, groups = measure(bins, rows)
                fill = sum(rows) / (len(groups) * CAPACITY)
                results.append(groups)
                print(f"{kind:9} {n:>7} rows  {name:8} {seconds:8.2f} s  {len(groups):>6} seqs  "
                      f"fill {fill:.4f}", flush=True)
            if len(results) == 2:
                print(f"{'':9} {'':>7}       same groups: {results[0] == results[1]}", flush=True)


if __name__ == "__main__":
    main()
