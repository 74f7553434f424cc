"""Packed vs padded training on the CPU: `python bench/bench_pack_cpu.py [--epochs 1.0] [--rounds 1]`.

Needs `models/base` and `data/dataset` (`dvc repro validate`). Runs the real `tuneline train`
on the same rows and settings (params.yaml's train section) with `train.pack: false` (padded
batches of `train.batch_size` rows) and `train.pack: true` (`tokens_per_step` positions in
`pack_width` sequences), alternating round by round so load from other jobs hits both alike.
Reports trained (assistant) tokens/s from reports/train.json and trained tokens per CPU second
of the child (user + system: less sensitive than wall time on a shared machine), and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def train_once(pack: bool, epochs: float, work: Path) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"] |= {"pack": pack, "epochs": epochs, "steps_per_eval": 100000,
                        "val_batches": 1, "save_every": 100000}
    run = Path(tempfile.mkdtemp(dir=work))
    (run / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    cmd = [sys.executable, "-m", "pipeline", "--params", str(run / "params.yaml"), "train",
           "--model", str(ROOT / "models/base"), "--data", str(ROOT / "data/dataset"),
           "--adapters", str(run / "adapters"), "--metrics", str(run / "train.json"),
           "--curve", str(run / "curve.tsv")]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    # cwd = the run's folder: its resumable checkpoints (.tuneline/checkpoints) stay there
    subprocess.run(cmd, cwd=run, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    report = json.loads((run / "train.json").read_text())
    return {"tok_s": report["tokens_per_second"], "tokens": report["trained_tokens"],
            "steps": report["iters"], "cpu_s": cpu, "peak_gb": report["peak_memory_gb"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()))
    a = ap.parse_args()
    results: dict[str, list[dict]] = {"padded": [], "packed": []}
    for _ in range(a.rounds):
        for name in ("padded", "packed"):
            results[name].append(train_once(name == "packed", a.epochs, a.work))
            print(name, results[name][-1], flush=True)
    print("\n| layout | steps | trained tokens | trained tok/s | trained tokens per CPU s | peak GB |")
    print("|---|---|---|---|---|---|")
    best = {}
    for name, runs in results.items():
        r = max(runs, key=lambda x: x["tok_s"])
        best[name] = (r["tok_s"], r["tokens"] / r["cpu_s"])
        print(f"| {name} | {r['steps']} | {r['tokens']} | {r['tok_s']:.1f} | "
              f"{r['tokens'] / r['cpu_s']:.1f} | {r['peak_gb']:.2f} |")
    print(f"\npacked / padded: {best['packed'][0] / best['padded'][0]:.2f}x trained tok/s, "
          f"{best['packed'][1] / best['padded'][1]:.2f}x trained tokens per CPU second")


if __name__ == "__main__":
    main()
