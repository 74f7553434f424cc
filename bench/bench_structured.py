"""Structured output on the embedded model: `python bench/bench_structured.py [drafts] [followups]
[--seeds 5] [--questions 20]` (no argument: both). Results go in bench/README.md, "Structured output".

- drafts: `questions draft --topic PostgreSQL --count 10` per seed, three ways: before (the old
  prompt, free text parsed), the new prompt without a schema, and the new prompt with the schema
  (what params.yaml ships). Per run: questions appended, how many of them `questions.well_formed`
  accepts, how many name a PostgreSQL subject (ON_TOPIC), and runs that appended nothing.
- followups: the generate stage on QUESTIONS with `structured_followup` false, then true (same
  answers: they come from the reply cache); the share of follow-ups `generate.usable_followup`
  accepts.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from pipeline import generate
from pipeline.base_model import EMBEDDED, embedded_gguf
from pipeline.commands import questions
from pipeline.core import config
from pipeline.llm import clients as llm

PARAMS = REPO / "params.yaml"
OLD_FAQ_EN = ("Please list in JSON format {count} frequently asked questions about {topic}.\n"
              "The questions should start with any of the following: {starters}.\n"
              "Reply with a JSON array of strings and nothing else.")  # the prompt before
ON_TOPIC = ("postgres", "database", "table", "index", "backup", "sql", "query", "quer", "user",
            "install", "schema", "server", "password", "connect", "data", "column", "role")
QUESTIONS = [
    "How do I list all tables in a PostgreSQL database?",
    "What is the difference between VACUUM and VACUUM FULL?",
    "How do I create an index without locking the table?",
    "How do I change a user's password in PostgreSQL?",
    "Can I rename a database while people are connected?",
    "How do I back up one database with pg_dump?",
    "What does EXPLAIN ANALYZE show?",
    "How do I see which queries are running right now?",
    "Is it okay to store JSON in PostgreSQL?",
    "How do I restore a dump into a new database?",
    "What is a primary key?",
    "How do I add a column with a default value?",
    "Where is the PostgreSQL configuration file?",
    "How do I allow remote connections?",
    "What is the difference between a schema and a database?",
    "How do I upgrade PostgreSQL to a new major version?",
    "Can users see each other's tables?",
    "How do I find slow queries?",
    "What is WAL?",
    "How do I delete duplicate rows?",
]


def machine() -> str:
    info = Path("/proc/cpuinfo")
    names = [x.split(":", 1)[1].strip() for x in info.read_text().splitlines()
             if x.startswith("model name")] if info.exists() else []
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{names[0] if names else platform.machine()}, {os.cpu_count()} cores "
            f"(shared, load average {load:.1f} at the start)")


def on_topic(text: str) -> bool:
    return any(w in text.casefold() for w in ON_TOPIC)


# --- drafts --------------------------------------------------------------------------------


def draft_variants(cfg: questions.DraftConfig) -> dict[str, questions.DraftConfig]:
    old = replace(cfg, prompts={**cfg.prompts, "faq_en": OLD_FAQ_EN})
    return {"before: old prompt, free text": replace(old, structured=False),
            "new prompt, free text": replace(cfg, structured=False),
            "after: new prompt + schema": cfg}


def drafts(seeds: int) -> list[dict[str, Any]]:
    cfg = replace(config.load(questions.DraftConfig, "questions", PARAMS), topic="PostgreSQL",
                  count=10, prompt="faq_en", retries=0)
    client = llm.LlamaCppClient(embedded_gguf())
    threshold = config.read_params(PARAMS)["curate"]["near_dup_threshold"]
    rows = []
    for name, variant in draft_variants(cfg).items():
        added = good = topical = failed = 0
        start = time.perf_counter()
        for seed in range(seeds):
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    result = questions.run(variant, seed, Path(tmp) / "q.jsonl", client=client,
                                           near_dup_threshold=threshold)
                except (questions.DraftFormatError, llm.LLMError):
                    failed += 1
                    continue
            texts = [r["question"] for r in result.added]
            added += len(texts)
            good += sum(questions.well_formed(t) for t in texts)
            topical += sum(questions.well_formed(t) and on_topic(t) for t in texts)
        row = {"variant": name, "runs": seeds, "failed_runs": failed,
               "appended_per_run": added / seeds, "well_formed_per_run": good / seeds,
               "well_formed_on_topic_per_run": topical / seeds,
               "seconds_per_run": round((time.perf_counter() - start) / seeds, 1)}
        print(f"  {row}", flush=True)
        rows.append(row)
    return rows


# --- follow-ups ----------------------------------------------------------------------------


def followups(n: int) -> list[dict[str, Any]]:
    cfg = replace(config.load(generate.GenerateConfig, "generate", PARAMS), retries=0,
                  allow_failed=n)
    base = llm.BaseModel(EMBEDDED, REPO / "models" / "base")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        qfile = root / "questions.jsonl"
        qfile.write_text("".join(json.dumps({"id": f"b-{i:03d}", "question": q}) + "\n"
                                 for i, q in enumerate(QUESTIONS[:n])), encoding="utf-8")
        client = llm.connect(cfg, base)
        for name, structured in (("before: free text", False), ("after: schema", True)):
            paths = generate.GeneratePaths(qfile, root / f"out-{structured}.jsonl",
                                           root / "metrics.json", root / "cache")
            start = time.perf_counter()
            generate.run(replace(cfg, structured_followup=structured), 0, paths, client=client,
                         progress=io.StringIO())
            out = [json.loads(x) for x in paths.out.read_text().splitlines()]
            usable = [r for r in out if generate.usable_followup(r["followup"], r["question"])]
            row = {"variant": name, "questions": len(out), "usable": len(usable),
                   "share": round(len(usable) / len(out), 2),
                   "seconds": round(time.perf_counter() - start, 1),
                   "examples": [r["followup"] for r in out[:3]]}
            print(f"  {row}", flush=True)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", nargs="*", default=["drafts", "followups"])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--questions", type=int, default=len(QUESTIONS))
    args = ap.parse_args()
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}", flush=True)
    if "drafts" in args.what:
        print("drafts (embedded SmolLM2-135M, llama.cpp, --count 10, seeds 0..n-1):")
        rows = drafts(args.seeds)
        print("| variant | appended / run | well-formed / run | + on topic / run | runs failed "
              "| s / run |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['variant']} | {r['appended_per_run']:.1f} | "
                  f"{r['well_formed_per_run']:.1f} | {r['well_formed_on_topic_per_run']:.1f} | "
                  f"{r['failed_runs']}/{r['runs']} | {r['seconds_per_run']} |")
    if "followups" in args.what:
        print(f"follow-ups (embedded, {args.questions} questions, seed 0):")
        rows = followups(args.questions)
        print("| variant | usable | share | s |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['variant']} | {r['usable']}/{r['questions']} | {r['share']:.0%} | "
                  f"{r['seconds']} |")


if __name__ == "__main__":
    main()
