"""Benchmark `tuneline review serve`: `python bench/bench_review_serve.py [--sizes 10000 100000]`.

The real app under uvicorn on 127.0.0.1, over synthetic dataset rows (~0.5 KB each, a third with
a follow-up) written here: seconds for the first page (every file parsed), a filtered page, a text
search, the last page, a save, and the first page after the save. Baseline in the same run: the
page after a save if the whole view were rebuilt (`build_view` without the parsed sources), which
is what the server did before it kept them. Markdown rows for bench/README.md on stdout.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import uvicorn

from pipeline.commands import review_server

SPLITS = ["train"] * 8 + ["valid", "test"]


def synth(root: Path, n: int) -> None:
    rows: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for i in range(n):
        msgs = [{"role": "user", "content": f"How do I tune setting{i} for workload {i % 97}?"},
                {"role": "assistant", "content": f"Set setting{i} to {i % 13} MB. " * 12}]
        if i % 3 == 0:
            msgs += [{"role": "user", "content": "And on a replica?"},
                     {"role": "assistant", "content": "The same value applies there. " * 4}]
        row = {"id": f"q-{i:06d}", "source": "generated", "messages": msgs,
               "turn_sources": ["generated"] * (len(msgs) // 2), "finish_reasons": [None],
               "origin": [f"data/generated/answers.jsonl:{i + 1}"]}
        rows[SPLITS[i % 10]].append(json.dumps(row))
    (root / "data/dataset").mkdir(parents=True)
    for split, lines in rows.items():
        (root / f"data/dataset/{split}.jsonl").write_text("\n".join(lines) + "\n")
    (root / "data/corrections.jsonl").write_text("")


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def get(url: str, query: str = "") -> dict:
    with urllib.request.urlopen(f"{url}/api/rows?{query}", timeout=600) as res:
        return json.load(res)


def save(url: str, version: str, row: dict) -> None:
    edit = {k: row[k] for k in ("id", "question", "answer", "followup", "followup_answer")}
    body = json.dumps({"version": version, "edits": [{**edit, "answer": "Edited.",
                                                      "base": row["base"]}]}).encode()
    req = urllib.request.Request(f"{url}/api/save", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=600).close()


def run(n: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synth(root, n)
        paths = review_server.ServePaths(root, root / "data/dataset",
                                         root / "data/corrections.jsonl",
                                         root / "data/questions.jsonl",
                                         root / "reports/validation.json",
                                         root / "reports/eval.json")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(review_server.create_app(paths), port=port,
                                               log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        first, page = timed(lambda: get(url))
        split, _ = timed(lambda: get(url, "split=test&unreviewed=1"))
        search, _ = timed(lambda: get(url, f"q=setting{n // 2}%20to"))
        last, _ = timed(lambda: get(url, f"offset={n - 50}"))
        saved, _ = timed(lambda: save(url, page["version"], page["rows"][0]))
        after, _ = timed(lambda: get(url))
        full, _ = timed(lambda: review_server.build_view(paths))
        server.should_exit = True
    return (f"| {n:,} | {first:.2f} | {split:.3f} | {search:.3f} | {last:.3f} | {saved:.3f} | "
            f"{after:.3f} | {full:.2f} | {full / after:.0f}x |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    args = ap.parse_args()
    print("| rows | first page s | split+unreviewed s | search s | last page s | save s | "
          "page after save s | full rebuild s (baseline) | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        print(run(n), flush=True)


if __name__ == "__main__":
    main()
