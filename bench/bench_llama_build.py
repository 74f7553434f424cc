"""Portable vs native llama.cpp: `python bench/bench_llama_build.py NAME=WHEEL NAME=WHEEL ...
[--rounds 3] [--tokens 64]`.

Installs each llama-cpp-python wheel into its own folder (pip --target, no deps), then runs the
embedded model's chat completions (the generate stage's call: greedy, 5 questions) in a child
process per wheel, alternating wheels round by round so load from other jobs hits all alike.
Prints each build's compiled CPU features and its generation tokens/s (best and median round).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, time
from llama_cpp import Llama, llama_print_system_info
from pipeline.base_model import embedded_gguf
llm = Llama(model_path=str(embedded_gguf()), n_ctx=2048, verbose=False)
qs = ["What is a primary key?", "What does VACUUM do?", "How do I rename a table?",
      "How do I create an index?", "What is a foreign key?"]
tokens, start = 0, time.perf_counter()
for q in qs:
    out = llm.create_chat_completion(messages=[{"role": "user", "content": q}],
                                     temperature=0.0, max_tokens=int(sys.argv[1]), seed=0)
    tokens += out["usage"]["completion_tokens"]
print(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - start,
                  "features": llama_print_system_info().decode()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("wheels", nargs="+", help="NAME=path/to/llama_cpp_python-*.whl")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    work = Path(tempfile.mkdtemp(prefix="llama-builds-"))
    sites = {}
    for spec in args.wheels:
        name, wheel = spec.split("=", 1)
        sites[name] = work / name
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(sites[name]), wheel], check=True)
    rates: dict[str, list[float]] = {name: [] for name in sites}
    features = {}
    for _ in range(args.rounds):
        for name, site in sites.items():
            out = subprocess.run([sys.executable, "-c", CHILD, str(args.tokens)], check=True,
                                 capture_output=True, text=True, cwd=root,
                                 env={"PYTHONPATH": f"{site}:{root}", "PATH": "/usr/bin:/bin"})
            run = json.loads(out.stdout.splitlines()[-1])
            rates[name].append(run["tokens"] / run["seconds"])
            features[name] = run["features"]
    print("| build | CPU features compiled in | tokens/s best | median |\n|---|---|---|---|")
    for name, r in rates.items():
        on = [f.split(" = ")[0] for f in features[name].split(" | ") if f.endswith(" = 1")]
        print(f"| {name} | {' '.join(x.replace('CPU : ', '') for x in on)} | {max(r):.1f} | "
              f"{statistics.median(r):.1f} |")


if __name__ == "__main__":
    main()
