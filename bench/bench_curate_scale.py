"""Benchmark `curate` + `validate` at scale against today's code in the same run:
`python bench/bench_curate_scale.py [--sizes 100000 1000000] [--baseline-sizes 2000 4000 8000]
[--baseline-validate-sizes 100000] [--baseline-ref 5e46672]`.

Inputs (written here, bench/synth_rows.py): generated answers (data/generated/answers.jsonl
rows) for 89% of the questions, a chat import of 10% (source imported), an expert import of 1%,
data/questions.jsonl, and expert corrections replacing 0.5% of the generated answers; 10% of
all questions are planted near-duplicates of an earlier one (another filler starter, case, a
plural, a swap, an extra filler word; 5% of questions are Chinese), and the evaluate.prompts
include 5 planted questions' near copies.

Each measurement is its own process (`--child`): wall seconds, CPU seconds and peak RSS of the
command as the dvc stage runs it (`tuneline curate ...`, `tuneline validate data/dataset
--report --docs`, no tokenizer: the token-length check is skipped and said so, see the
Validation section for its cost). The baseline is the code at `--baseline-ref` (git archive into
a temporary folder, run with that folder first on PYTHONPATH). Its curate is quadratic, so it
runs only at `--baseline-sizes` and its time at the big sizes is extrapolated with the growth
exponent measured between its two largest sizes (printed as such).
A planted family is an original and its copies; ideal curation removes every copy. Recall =
removals naming a row of their own planted family / planted copies; precision = those removals /
all removals (exact and near).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from synth_rows import synth


def write_inputs(root: Path, n: int) -> dict[str, object]:
    """The curate inputs for n questions; returns the planted pairs as row ids."""
    data = synth(n, dup_share=0.1, seed=0)
    ids = [f"q-{i:07d}" if i % 100 < 89 else f"imp-{i:07d}" if i % 100 < 99 else f"exp-{i:07d}"
           for i in range(n)]
    (root / "generated").mkdir(parents=True)
    (root / "imports").mkdir()
    answer = "Set it in postgresql.conf, reload the server and check pg_settings afterwards. " * 3
    with (root / "generated/answers.jsonl").open("w") as gen, \
            (root / "questions.jsonl").open("w") as qs, \
            (root / "imports/bulk.jsonl").open("w") as imp, \
            (root / "imports/expert.jsonl").open("w") as exp:
        for rid, question in zip(ids, data.questions):
            if rid.startswith("q-"):
                qs.write(json.dumps({"id": rid, "question": question}, ensure_ascii=False) + "\n")
                gen.write(json.dumps({
                    "id": rid, "question": question, "answer": answer, "followup": None,
                    "followup_answer": None, "model": "synth", "backend": "bench",
                    "sampling": {}, "finish_reason": "stop", "followup_finish_reason": None,
                    "tokens": {"prompt": 20, "completion": 60}}, ensure_ascii=False) + "\n")
            else:
                out = imp if rid.startswith("imp-") else exp
                out.write(json.dumps({
                    "id": rid, "source": "imported" if out is imp else "expert",
                    "messages": [{"role": "user", "content": question},
                                 {"role": "assistant", "content": answer}]},
                    ensure_ascii=False) + "\n")
    with (root / "corrections.jsonl").open("w") as corr:
        for rid in ids[::200]:
            if rid.startswith("q-"):
                corr.write(json.dumps({"id": rid, "action": "replace_answer",
                                       "answer": "Expert: " + answer}) + "\n")
    planted = [(ids[j], ids[i]) for j, i in data.planted.items()]
    prompts = [data.questions[j] for j in list(data.planted)[:5]]
    return {"planted": planted, "prompts": prompts}


def params_file(root: Path, prompts: list[str], code: Path, name: str) -> Path:
    """That code's own params.yaml (the baseline's has other keys), with the bench's prompts."""
    params = yaml.safe_load((code / "params.yaml").read_text())
    params["evaluate"]["prompts"] = prompts
    path = root / f"params-{name}.yaml"
    path.write_text(yaml.safe_dump(params, allow_unicode=True))
    return path


def child(argv: list[str]) -> None:
    """Run one CLI command in this process; print its wall/CPU seconds and peak RSS."""
    from typer.main import get_command

    from pipeline.cli import app

    start, cpu = time.perf_counter(), time.process_time()
    try:
        get_command(app).main(argv, standalone_mode=False)
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        code = f"{type(exc).__name__}: {exc}"
    print("RESULT " + json.dumps({
        "wall": time.perf_counter() - start, "cpu": time.process_time() - cpu,
        "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "exit": code}))


def measure(code_root: Path, argv: list[str], cwd: Path) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": f"{code_root}{os.pathsep}{REPO / 'bench'}",
           "GX_ANALYTICS_ENABLED": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "bench/bench_curate_scale.py"), "--child",
                           json.dumps(argv)], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"child failed: {proc.stderr[-2000:]}")
    result = json.loads(line[7:])
    result["process_wall"] = wall  # with interpreter start and imports
    return result


def curate_argv(root: Path, params: Path) -> list[str]:
    return ["curate", "--generated", str(root / "generated/answers.jsonl"),
            "--questions", str(root / "questions.jsonl"),
            "--corrections", str(root / "corrections.jsonl"), "--imports", str(root / "imports"),
            "--out", str(root / "dataset"), "--report", str(root / "curate.json"),
            "--params", str(params)]


def validate_argv(root: Path, params: Path) -> list[str]:
    return ["validate", str(root / "dataset"), "--tokenizer", str(root / "no-tokenizer"),
            "--report", str(root / "validation.json"), "--docs", str(root / "docs"),
            "--params", str(params)]


def scores(root: Path, planted: list[tuple[str, str]]) -> dict[str, float]:
    """A planted family is an original and its copies: ideal curation removes all but one.
    A removal is right when it names a row of its own planted family."""
    report = json.loads((root / "curate.json").read_text())
    family = {}
    for copy, original in planted:
        family[copy] = family[original] = original
    removals = report["details"]["duplicates"]
    right = sum(family.get(d["id"], d["id"]) == family.get(d["duplicate_of"], d["duplicate_of"])
                for d in removals)
    return {"recall": right / len(planted) if planted else 1.0,
            "precision": right / len(removals) if removals else 1.0,
            "removed": len(removals), "planted": len(planted),
            "rows": report["rows"]["total"]}


def leaks(root: Path) -> int:
    report = json.loads((root / "validation.json").read_text())
    return int(report["checks"].get("leakage", {}).get("failed", -1))


def run_size(n: int, code: dict[str, Path], which: list[str], work: Path) -> list[dict]:
    root = work / f"n{n}"
    t0 = time.perf_counter()
    info = write_inputs(root, n)
    params = {v: params_file(root, info["prompts"], c, v)  # type: ignore[arg-type]
              for v, c in code.items()}
    print(f"# {n:,} rows: inputs written in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for name in which:
        kind, version = name.split(":")
        p = params[version]
        argv = curate_argv(root, p) if kind == "curate" else validate_argv(root, p)
        result = measure(code[version], argv, REPO)
        row = {"n": n, "step": kind, "code": version, **result}
        if kind == "curate":
            row.update(scores(root, info["planted"]))  # type: ignore[arg-type]
        elif version == "new":
            row["leaks"] = leaks(root)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--baseline-sizes", type=int, nargs="*", default=[2000, 4000, 8000])
    ap.add_argument("--baseline-validate-sizes", type=int, nargs="*", default=[100_000])
    ap.add_argument("--baseline-ref", default="5e46672")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-curate-"))
    base = work / "baseline-code"
    base.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", args.baseline_ref], cwd=REPO, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
    code = {"new": REPO, "baseline": base}
    print(f"# {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"load {os.getloadavg()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    results = []
    for n in sorted(set(args.baseline_sizes) | set(args.sizes)):
        which = ["curate:new", "validate:new"]
        if n in args.baseline_validate_sizes:
            which.append("validate:baseline")
        if n in args.baseline_sizes:
            which = ["curate:baseline", *which]
        results += run_size(n, code, which, work)
    base_rows = sorted((r for r in results if r["step"] == "curate" and r["code"] == "baseline"),
                       key=lambda r: r["n"])
    if len(base_rows) >= 2:
        a, b = base_rows[-2], base_rows[-1]
        k = math.log(b["wall"] / a["wall"]) / math.log(b["n"] / a["n"])
        for n in args.sizes:
            est = b["wall"] * (n / b["n"]) ** k
            print(f"# baseline curate at {n:,}: extrapolated {est:,.0f} s (n^{k:.2f} from "
                  f"{a['n']:,} and {b['n']:,} rows)")
    print("# load at the end", os.getloadavg())


if __name__ == "__main__":
    main()
