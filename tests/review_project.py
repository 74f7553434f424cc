"""A tiny project for `tuneline review serve` tests: sources, a curated dataset, reports.

    root = make_project(tmp_path, n=12)       # data/, params.yaml, reports/, dataset curated
    with served(root) as url: ...             # the real app under uvicorn on 127.0.0.1
    with served_cli(root) as url: ...         # `tuneline review serve` as a user starts it
    page_token(url)                           # the session token the served page carries
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline import curate
from pipeline.commands import review_server
from pipeline.core import config
from tests.servers import free_port

REPO = Path(__file__).resolve().parents[1]
HOSTILE = ('<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'
           "<b>not bold</b>")
CURATE_STAGE = {  # dvc.yaml's curate stage, minus the pipeline code deps (not in a tmp repo)
    "cmd": "tuneline curate --generated data/generated/answers.jsonl --questions "
           "data/questions.jsonl --corrections data/corrections.jsonl --imports data/imports "
           "--out data/dataset --report reports/curate.json",
    "deps": ["data/generated/answers.jsonl", "data/questions.jsonl", "data/corrections.jsonl",
             "data/imports"],
    "params": ["curate"],
    "outs": ["data/dataset"],
    "metrics": [{"reports/curate.json": {"cache": False}}],
}


def question(i: int) -> str:
    # Distinct topics, so curate's near-duplicate removal keeps them all.
    return f"How do I configure subsystem{i} number {i * 7919} for topic{i * 31}?"


def generated(qid: str, text: str, followup: tuple[str, str] | None = None) -> dict[str, Any]:
    return {"id": qid, "question": None, "answer": text,
            "followup": followup[0] if followup else None,
            "followup_answer": followup[1] if followup else None, "model": "tiny",
            "backend": "test", "sampling": {}, "finish_reason": "stop",
            "followup_finish_reason": "stop" if followup else None,
            "tokens": {"prompt": 1, "completion": 1}}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")


def make_project(root: Path, n: int = 12, corrections: list[dict[str, Any]] | None = None
                 ) -> Path:
    """n generated conversations (q-0000 carries hostile HTML), curated into data/dataset."""
    qs = [{"id": f"q-{i:04d}", "question": question(i), "source": "expert"} for i in range(n)]
    answers = []
    for i, q in enumerate(qs):
        text = f"Answer {i}: set option{i} = {i * 3} in the config file and reload."
        if i == 0:
            text = "Use this snippet: " + HOSTILE
        answers.append({**generated(q["id"], text, (f"And option{i} on replicas?",
                                                     f"Replicas read option{i} too."
                                                     ) if i % 3 == 0 else None),
                        "question": q["question"]})
    write_jsonl(root / "data/questions.jsonl", qs)
    write_jsonl(root / "data/generated/answers.jsonl", answers)
    write_jsonl(root / "data/corrections.jsonl", corrections or [])
    (root / "data/imports").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    curate_now(root)
    test_ids = [json.loads(x)["id"] for x in (root / "data/dataset/test.jsonl").read_text(
        ).splitlines()]
    reports = root / "reports"
    (reports / "validation.json").write_text(json.dumps({"ok": False, "rows": n, "findings": [
        {"file": "data/dataset/train.jsonl", "line": 1, "id": None, "check": "answer_length",
         "severity": "warning", "message": "answer is 60 characters; at least 80 expected"},
        {"file": "x", "line": None, "id": "q-0001", "check": "refusal", "severity": "error",
         "message": "answer <i>refuses</i>"}]}))
    (reports / "eval.json").write_text(json.dumps(_eval(test_ids)))
    return root


def _eval(test_ids: list[str]) -> dict[str, Any]:
    return {side: {"answers": [{"id": rid, "answer": f"{side} model says <u>{rid}</u>"}
                               for rid in test_ids]} for side in ("base", "tuned")}


def curate_now(root: Path) -> None:
    """What dvc.yaml's curate stage runs, from the project folder (origins read data/...)."""
    cfg = config.load(curate.CurateConfig, "curate", root / "params.yaml")
    d, here = Path("data"), Path.cwd()
    os.chdir(root)
    try:
        curate.run(cfg, curate.CuratePaths(d / "generated/answers.jsonl", d / "questions.jsonl",
                                           d / "corrections.jsonl", d / "imports", d / "dataset",
                                           Path("reports/curate.json")))
    finally:
        os.chdir(here)


def paths(root: Path) -> review_server.ServePaths:
    return review_server.ServePaths(root, root / "data/dataset", root / "data/corrections.jsonl",
                                    root / "data/questions.jsonl",
                                    root / "reports/validation.json", root / "reports/eval.json")


def page_token(url: str) -> str:
    """The session token of the page at url, read as the page's script reads it."""
    import re

    with urllib.request.urlopen(url + "/", timeout=30) as res:
        page = res.read().decode()
    found = re.search(r'<meta name="tuneline-token" content="([A-Za-z0-9_-]{20,})">', page)
    assert found, "the served page carries no session token"
    return found.group(1)


@contextmanager
def served(root: Path, started_for: str = "127.0.0.1") -> Iterator[str]:
    """The app under a real uvicorn in a thread, on a free port of 127.0.0.1; `started_for` is
    the --host the app is built for (its allow-list), e.g. "0.0.0.0"."""
    import uvicorn

    port = free_port()
    app = review_server.create_app(paths(root), started_for)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("review server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def served_cli(root: Path, *args: str) -> Iterator[str]:
    """`tuneline review serve` in the project folder, as a user starts it."""
    with served_cli_process(root, *args) as (url, _):
        yield url


@contextmanager
def served_cli_process(root: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """served_cli, with the server's process (to read the address it listens on)."""
    from pipeline.commands.review_guard import url_host

    host = args[args.index("--host") + 1] if "--host" in args else "127.0.0.1"
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "review", "serve", "--port",
                             str(port), *args], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://{url_host(host)}:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/", timeout=2).close()
                break
            except urllib.error.HTTPError as err:  # it answers: started (the test reads why)
                err.close()
                break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.terminate()  # read() would wait for a live server's output forever
                    raise RuntimeError("review serve did not start: "
                                       f"{proc.communicate(timeout=10)[0]}") from None
                time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)
