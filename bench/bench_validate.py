"""Benchmark `tuneline validate`: `python bench/bench_validate.py [--sizes 10000 100000 1000000]
[--tokenizer models/base] [--schema-rows 10000]`.

1. Wall and CPU seconds, rows per second and peak memory of the real command (a subprocess,
   GX import included; CPU time is the fairer number on a shared machine) on
   synthetic chat JSONL written here, with every check on, and with the token-length check off
   (the tokenizer dominates when rows are longer than train.max_seq_length bytes).
2. The custom compiled-schema expectation against GX's built-in ExpectColumnValuesToMatchJsonSchema
   on the same rows in the same process: seconds and the ratio.
Results go to stdout as Markdown rows for bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
_WORDS = ("the index table query planner vacuum autovacuum replication standby primary wal "
          "checkpoint buffer row column schema role grant lock transaction snapshot visibility "
          "statistics partition constraint trigger function extension backup restore")
WORDS = _WORDS.split()


def sentence(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    return " ".join(words).capitalize() + "."


def synth(path: Path, n: int, seed: int = 0) -> None:
    """Rows like the shipped dataset: 700-1600 bytes, a third with a follow-up turn."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for i in range(n):
            messages = [
                {"role": "user", "content": f"How do I tune setting {i} for {rng.choice(WORDS)}?"},
                {"role": "assistant", "content": " ".join(sentence(rng, rng.randint(8, 16))
                                                          for _ in range(rng.randint(6, 12)))}]
            if rng.random() < 0.33:
                messages += [{"role": "user", "content": f"And for case {i}?"},
                             {"role": "assistant", "content": sentence(rng, 20)}]
            row = {"id": f"q-{i:07d}", "source": "generated", "messages": messages,
                   "turn_sources": ["generated"] * (len(messages) // 2),
                   "finish_reasons": ["stop"] * (len(messages) // 2)}
            fh.write(json.dumps(row) + "\n")


def params_file(tmp: Path, token_length: str) -> Path:
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["validate"]["severity"]["token_length"] = token_length
    path = tmp / f"params-{token_length}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(data: Path, params: Path, tokenizer: Path) -> tuple[float, float, float, int]:
    """Wall seconds, CPU seconds (user + sys), peak RSS in MiB and exit code of one run."""
    cmd = ["/usr/bin/time", "-f", "%e %U %S %M", str(Path(sys.executable).parent / "tuneline"),
           "validate", str(data), "--params", str(params), "--tokenizer", str(tokenizer)]
    env = {**os.environ, "GX_ANALYTICS_ENABLED": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall, user, system, rss_kb = proc.stderr.strip().splitlines()[-1].split()
    return float(wall), float(user) + float(system), int(rss_kb) / 1024, proc.returncode


def schema_compare(n: int) -> tuple[float, float]:
    """Seconds for the custom and the built-in schema expectation on the same n rows."""
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    import great_expectations as gx
    import pandas as pd
    from great_expectations.data_context.types.base import ProgressBarsConfig

    sys.path.insert(0, str(REPO))
    from validation import expectations as custom
    from validation.suites import chat_schema

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        synth(path, n)
        raws = path.read_text().splitlines()
    frame = pd.DataFrame({"raw": raws})
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (context.data_sources.add_pandas("b").add_dataframe_asset("rows")
             .add_batch_definition_whole_dataframe("all").get_batch(
                 batch_parameters={"dataframe": frame}))
    schema = chat_schema(("id", "source"))
    timings = []
    for exp in (custom.ExpectColumnValuesToMatchCompiledJsonSchema(
                    column="raw", schema_text=json.dumps(schema)),
                gx.expectations.ExpectColumnValuesToMatchJsonSchema(column="raw",
                                                                    json_schema=schema)):
        start = time.perf_counter()
        result = batch.validate(exp)
        timings.append(time.perf_counter() - start)
        assert result.success, result
    return timings[0], timings[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--tokenizer", type=Path, default=REPO / "models/base")
    parser.add_argument("--schema-rows", type=int, default=10_000)
    parser.add_argument("--token-sizes", type=int, nargs="*", default=None,
                        help="sizes to also run with token_length on (default: all)")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        print("| rows | token_length | wall s | CPU s | rows/s (wall) | peak RSS MiB |")
        print("|---:|---|---:|---:|---:|---:|")
        for n in args.sizes:
            data = tmp / f"rows-{n}.jsonl"
            synth(data, n)
            for tokens in ("off", "warning"):
                if tokens == "warning" and args.token_sizes is not None and \
                        n not in args.token_sizes:
                    continue
                wall, cpu, rss, code = run_cli(data, params_file(tmp, tokens), args.tokenizer)
                assert code == 0, f"validate exited {code} on clean synthetic data"
                print(f"| {n:,} | {tokens} | {wall:.1f} | {cpu:.1f} | {n / wall:,.0f} | "
                      f"{rss:,.0f} |", flush=True)
            data.unlink()
    custom_s, builtin_s = schema_compare(args.schema_rows)
    print(f"\nschema check on {args.schema_rows:,} rows: custom compiled {custom_s:.2f} s, "
          f"GX built-in {builtin_s:.2f} s, ratio {builtin_s / custom_s:.0f}x")


if __name__ == "__main__":
    main()
