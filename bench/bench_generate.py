"""Generation benchmarks: `python bench/bench_generate.py [engines] [throughput] [incremental]`
(no argument: all three). Results and the machine go in bench/README.md, "Generation".

- engines: tokens/s of the embedded model in-process, llama.cpp (GGUF) vs mlx-lm (mlx dir).
- throughput: tuneline's `generate` vs bench/baseline_sequential.py against the same server, same
  questions, same run: (a) the real embedded model behind the Ollama API (one generation at a
  time, like a CPU llama.cpp server), (b) a stand-in with fixed latency and 4 parallel slots (like
  a batching server), tuneline at concurrency 1 and 4. `--url/--model` measure an external Ollama.
- incremental: requests `dvc repro` sends after editing 1 question out of 200 (and after the same
  on a "fresh clone" that only has the pulled output, no local cache); `--incremental-questions
  10000` measures the same at 10,000 questions, with each step's wall seconds (the stand-in
  answers instantly, so the time is tuneline's and DVC's own).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import yaml
from ollama_standin import StandIn

PY = sys.executable
FOLLOWUP = ("Question: {question}\nAnswer: {answer}\n"
            "What is a likely follow-up question or request?")  # as bench/baseline_sequential.py
PROMPTS = ["How do I list all tables in a PostgreSQL database?",
           "What is the difference between VACUUM and VACUUM FULL?",
           "How do I create an index without locking the table?",
           "如何查看 PostgreSQL 当前的连接数？"]


def machine() -> str:
    cpu = platform.machine()
    info = Path("/proc/cpuinfo")
    if info.exists():
        names = [x.split(":", 1)[1].strip() for x in info.read_text().splitlines()
                 if x.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


# --- engines -------------------------------------------------------------------------------


def engines(mlx_dir: Path, max_tokens: int) -> dict[str, Any]:
    from pipeline.base_model import embedded_gguf
    from pipeline.llm import clients as llm

    results = {}
    sampling = llm.Sampling(temperature=0.0, seed=0, max_tokens=max_tokens)
    for name, make in (("llama.cpp (Q4_1 GGUF)", lambda: llm.LlamaCppClient(embedded_gguf())),
                       ("mlx-lm (float32)", lambda: llm.MlxClient(mlx_dir))):
        client = make()
        client.chat([{"role": "user", "content": "Hi"}], sampling)  # warm up
        tokens, start = 0, time.perf_counter()
        for prompt in PROMPTS:
            tokens += client.chat([{"role": "user", "content": prompt}], sampling).completion_tokens
        seconds = time.perf_counter() - start
        results[name] = {"tokens": tokens, "seconds": round(seconds, 2),
                         "tokens_per_s": round(tokens / seconds, 1)}
        print(f"  {name}: {results[name]}", flush=True)
        del client
    return results


# --- throughput ----------------------------------------------------------------------------


def llama_reply(max_tokens: int):
    """The embedded model behind the stand-in's Ollama API; `num_predict` absent = max_tokens."""
    from llama_cpp import Llama

    from pipeline.base_model import embedded_gguf

    model = Llama(model_path=str(embedded_gguf()), n_ctx=4096, verbose=False)

    def reply(messages, options):
        limit = int(options.get("num_predict") or -1)
        out = model.create_chat_completion(
            messages=messages, temperature=float(options.get("temperature") or 0.8),
            max_tokens=limit if limit > 0 else max_tokens, seed=options.get("seed"))
        usage = out["usage"]
        return (out["choices"][0]["message"]["content"] or "", usage["prompt_tokens"],
                usage["completion_tokens"], out["choices"][0]["finish_reason"] or "stop")

    return reply


def write_questions(path: Path, n: int, edit: dict[int, str] | None = None) -> None:
    source = [json.loads(x)["question"] for x in (REPO / "data" / "questions.jsonl")
              .read_text(encoding="utf-8").splitlines() if x.strip()]
    rows = [{"id": f"q-{i:04d}", "source": "expert",
             "question": (edit or {}).get(i, source[(i - 1) % len(source)]
                                          + ("" if i <= len(source) else f" (variant {i})"))}
            for i in range(1, n + 1)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")


def params_for(work: Path, url: str, model: str, concurrency: int, max_tokens: int) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    # The same work as the baseline: no system prompt, its follow-up prompt, its token cap.
    params["generate"].update(backend="ollama", url=url, model=model, concurrency=concurrency,
                              max_tokens=max_tokens, followup_max_tokens=max_tokens, system="",
                              followup_template=FOLLOWUP)
    path = work / f"params-{concurrency}.yaml"
    path.write_text(yaml.safe_dump(params, allow_unicode=True))
    return path


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    return time.perf_counter() - start


def served(server: StandIn, since: int) -> tuple[int, int]:
    done = server.requests[since:]
    return len(done), sum(int(r.get("completion_tokens", 0)) for r in done)


def compare(server: StandIn, model: str, n: int, concurrencies: list[int],
            max_tokens: int, repeats: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    write_questions(work / "questions.jsonl", n)
    rows: dict[str, dict[str, Any]] = {}

    def measure(name: str, cmd: list[str]) -> None:
        # Best of `repeats`: the machine is shared, the minimum is the least disturbed run.
        for i in range(repeats):
            shutil.rmtree(work / "cache", ignore_errors=True)  # every run starts cold: no
            (work / "answers.jsonl").unlink(missing_ok=True)  # cache, no output to reuse
            mark = len(server.requests)
            result = row(timed(cmd, work), n, *served(server, mark))
            if name not in rows or result["seconds"] < rows[name]["seconds"]:
                rows[name] = result

    measure("baseline (sequential script)",
            [PY, str(REPO / "bench" / "baseline_sequential.py"), "questions.jsonl",
             "baseline.jsonl", "--url", server.url, "--model", model])
    for c in concurrencies:
        params = params_for(work, server.url, model, c, max_tokens)
        measure(f"tuneline generate, concurrency {c}",
                [PY, "-m", "pipeline", "generate", "--questions", "questions.jsonl", "--out",
                 "answers.jsonl", "--metrics", "generate.json", "--cache", "cache",
                 "--base-model", "unused", "--params", str(params)])
    base = rows["baseline (sequential script)"]["seconds"]
    for r in rows.values():
        r["speedup_vs_baseline"] = round(base / r["seconds"], 2)
    for name, r in rows.items():
        print(f"  {name}: {r}", flush=True)
    shutil.rmtree(work)
    return rows


def row(seconds: float, questions: int, requests: int, tokens: int) -> dict[str, Any]:
    return {"seconds": round(seconds, 2), "requests": requests, "completion_tokens": tokens,
            "questions_per_s": round(questions / seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1)}


def throughput(n_real: int, n_synth: int, max_tokens: int) -> dict[str, Any]:
    out = {}
    print(f"(a) embedded model behind the Ollama API, 1 slot, {n_real} questions", flush=True)
    with StandIn(models=("smollm2",), reply=llama_reply(max_tokens), parallel=1) as server:
        out["real_1_slot"] = compare(server, "smollm2", n_real, [1], max_tokens, repeats=2)
    print(f"(b) stand-in, 0.2 s per request, 4 slots, {n_synth} questions", flush=True)
    with StandIn(models=("tiny",), delay=0.2, parallel=4) as server:
        out["synthetic_4_slots"] = compare(server, "tiny", n_synth, [1, 4], max_tokens,
                                           repeats=1)
    return out


# --- incremental ---------------------------------------------------------------------------


def incremental(n: int) -> dict[str, dict[str, float]]:
    work = Path(tempfile.mkdtemp(prefix="bench-inc-"))
    repo = work / "repo"
    for sub in ("pipeline", "data", "models/base"):
        (repo / sub).mkdir(parents=True)
    (repo / "models" / "base" / "stand-in").write_text("base model\n")
    for name in ("generate.py", "llm.py"):
        shutil.copy(REPO / "pipeline" / name, repo / "pipeline" / name)
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["generate"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"generate": stage}}))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(REPO),
           "PATH": f"{Path(PY).parent}:{os.environ['PATH']}"}

    def sh(*cmd: str) -> None:
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)

    counts = {}
    with StandIn(models=("tiny",)) as server:
        params = params_for(work, server.url, "tiny", 4, 200)
        shutil.copy(params, repo / "params.yaml")
        write_questions(repo / "data" / "questions.jsonl", n)
        sh("git", "init", "-q")
        sh("dvc", "init", "-q")
        steps = [("first dvc repro", None), ("dvc repro, nothing changed", None),
                 ("dvc repro after editing 1 question", {7: "How do I move a table to another "
                                                             "tablespace without downtime?"}),
                 ("same on a fresh clone (output pulled, no local cache)",
                  {7: "How do I move a table to another tablespace online?"})]
        for name, edit in steps:
            if edit:
                write_questions(repo / "data" / "questions.jsonl", n, edit)
            if name.startswith("same on a fresh clone"):
                shutil.rmtree(repo / ".tuneline")
            mark, start = len(server.requests), time.perf_counter()
            sh("dvc", "repro", "generate")
            counts[name] = {"requests": len(server.requests) - mark,
                            "seconds": round(time.perf_counter() - start, 2)}
            print(f"  {name}: {counts[name]}", flush=True)
    shutil.rmtree(work)
    return counts


def main() -> None:
    from pipeline.training import accel

    accel.prefer_fast_blas()  # mlx's CPU speed depends on it (pipeline/training/accel.py)
    ap = argparse.ArgumentParser()
    ap.add_argument("what", nargs="*", default=["engines", "throughput", "incremental"])
    ap.add_argument("--mlx-dir", type=Path, default=REPO / "models" / "base")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--questions-real", type=int, default=8)
    ap.add_argument("--questions-synthetic", type=int, default=100)
    ap.add_argument("--incremental-questions", type=int, default=200)
    args = ap.parse_args()
    results: dict[str, Any] = {"machine": machine()}
    print(f"machine: {results['machine']}", flush=True)
    if "engines" in args.what:
        results["engines"] = engines(args.mlx_dir, args.max_tokens * 2)
    if "throughput" in args.what:
        results["throughput"] = throughput(args.questions_real, args.questions_synthetic,
                                           args.max_tokens)
    if "incremental" in args.what:
        results["incremental"] = incremental(args.incremental_questions)
    print(json.dumps(results, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
