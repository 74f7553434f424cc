"""Export benchmark: `python bench/bench_export.py [--model DIR] [--types q8_0 q6_k ...] [--tokens N]`

For the embedded model (converted with the base_model stage unless --model names an mlx-lm dir),
per GGUF type, all in one run so the F16 baseline shares the machine's state:
- export time (F16: MLX weights -> GGUF; others: llama.cpp's quantizer from the F16 file),
- file size,
- agreement with MLX: teacher-forced greedy agreement on the `export.prompts` of params.yaml
  (the stage's own check), whether every prompt stopped, and the first free-running divergence,
- llama.cpp generation speed: greedy tokens/s over N tokens (EOS ignored), best of 2, vs F16.
Results and the machine go in bench/README.md, "Export".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import base_model, export
from pipeline.core import config
from pipeline.training import accel

SPEED_PROMPT = "Explain what a PostgreSQL index is and when to use one."


def machine() -> str:
    import llama_cpp

    return (f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}, "
            f"llama-cpp-python {llama_cpp.__version__}, load average "
            f"{os.getloadavg()[0]:.1f} at start")


def tokens_per_second(path: Path, n_tokens: int) -> float:
    """Best of 2 greedy runs of exactly n_tokens (EOS ignored), after a warm-up."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, verbose=False)
    ids = llm.tokenize(f"<|im_start|>user\n{SPEED_PROMPT}<|im_end|>\n<|im_start|>assistant\n"
                       .encode(), add_bos=False, special=True)
    best = 0.0
    for attempt in range(3):  # the first run warms caches and is not counted
        t0, n = time.perf_counter(), 0
        for _token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            n += 1
            if n >= n_tokens:
                break
        if attempt > 0:
            best = max(best, n / (time.perf_counter() - t0))
    llm.close()
    return best


def run(model: Path, types: list[str], n_tokens: int, work: Path) -> dict[str, Any]:
    cfg = config.load(export.ExportConfig, "export", REPO / "params.yaml")
    cfg = dataclasses.replace(cfg, quantizations=tuple(types),
                              min_agreement={t: 0.0 for t in ["f16", *types]})
    files, seconds, notes = {}, {}, {"f16": None}
    t0 = time.perf_counter()
    paths = export.ExportPaths(model, model, work / "no-dataset", work, work / "gguf.json")
    export.write_gguf(paths, work / "model-f16.gguf", cfg)
    files["f16"], seconds["f16"] = work / "model-f16.gguf", time.perf_counter() - t0
    for qtype in types:
        t0 = time.perf_counter()
        files[qtype], notes[qtype] = export.quantize(files["f16"], work / f"model-{qtype}.gguf",
                                                     qtype)
        seconds[qtype] = time.perf_counter() - t0
    report = export.prove(model, files, cfg, seed=0)
    rows = {}
    for qtype, path in files.items():
        info = report["files"][qtype]
        divergences = [a["first_divergence"]["index"] for a in info["answers"]
                       if a["first_divergence"] is not None]
        rows[qtype] = {
            "export_s": round(seconds[qtype], 2),
            "size_mib": round(path.stat().st_size / 2**20, 1),
            "agreement": info["agreement"],
            "all_stopped": all(a["finish_reason"] == "stop" for a in info["answers"]),
            "first_divergence": min(divergences) if divergences else None,
            "tokens_per_s": round(tokens_per_second(path, n_tokens), 1),
            "quantizer_note": notes[qtype],
        }
    return {"mlx_seconds": report["mlx_seconds"], "prompts": list(cfg.prompts), "rows": rows}


def table(result: dict[str, Any]) -> str:
    base = result["rows"]["f16"]["tokens_per_s"]
    header = ("| type | export s | size MiB | agreement with MLX | all stopped | first divergence "
              "| llama.cpp tokens/s | vs F16 |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for qtype, r in result["rows"].items():
        lines.append(f"| {qtype} | {r['export_s']} | {r['size_mib']} | {r['agreement']:.3f} | "
                     f"{'yes' if r['all_stopped'] else 'NO'} | {r['first_divergence']} | "
                     f"{r['tokens_per_s']} | {r['tokens_per_s'] / base:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="mlx-lm model dir (default: embedded, converted)")
    parser.add_argument("--types", nargs="+", default=["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"])
    parser.add_argument("--tokens", type=int, default=128, help="tokens per speed run")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    accel.prefer_fast_blas()
    print(machine())
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        model = args.model
        if model is None:
            model = Path(tmp) / "base"
            base_model.run(base_model.SourceConfig(model=base_model.EMBEDDED),
                           base_model.BasePaths(model))
        work = Path(tmp) / "gguf"
        work.mkdir()
        result = run(model, args.types, args.tokens, work)
    print(f"MLX reference answers: {result['mlx_seconds']:.1f} s for {len(result['prompts'])} prompts")
    print(table(result))
    for qtype, row in result["rows"].items():
        if row["quantizer_note"]:
            print(f"{qtype}: {row['quantizer_note']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
