"""The generate stage: rows, cache, incremental reruns, failures, concurrency, kill -9 and resume.

Unit tests pass a tiny fake client; the fault and kill tests use the Ollama stand-in as a real
server process on 127.0.0.1; two slow tests use the embedded model and real `dvc repro`."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from ollama_standin import DIGEST

from pipeline.core import config
from pipeline.core.errors import UserError
from pipeline.core.progress import Progress
from pipeline.generate import (
    CACHE_FILE,
    GenerateConfig,
    GenerateError,
    GeneratePaths,
    clean_followup,
    run,
    usable_followup,
)
from pipeline.llm import clients as llm
from pipeline.llm import schemas
from pipeline.rows.jsonl import timings_path

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
STANDIN = REPO / "tests" / "ollama_standin.py"
BASE_SEED = 5


class FakeClient:
    """Deterministic replies; records calls and the most calls ever in flight at once."""

    backend, server = "fake", "fake://local"

    def __init__(self, model: str = "fake-1", empty_for: tuple[str, ...] = (), delay: float = 0):
        self.model, self.empty_for, self.delay = model, empty_for, delay
        self.calls: list[list[dict[str, str]]] = []
        self.schemas: list[dict[str, Any] | None] = []
        self.active = self.max_active = 0
        self.lock = threading.Lock()

    def identity(self) -> str:
        return f"fake:{self.model}"

    def chat(self, messages, sampling, schema=None):
        with self.lock:
            self.calls.append(list(messages))
            self.schemas.append(schema)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        time.sleep(self.delay)
        with self.lock:
            self.active -= 1
        last = messages[-1]["content"]
        if any(e in last for e in self.empty_for):
            text = ""
        elif "follow-up question or request" in last:
            text = 'Follow-up question: "And how do I undo that?"\nExtra chatter.'
        else:
            text = f"{self.model} answers: {last}"
        return llm.Reply(text, "stop", len(last.split()), len(text.split()))


def base_cfg(**changes: Any) -> GenerateConfig:
    cfg = config.load(GenerateConfig, "generate", PARAMS)
    return replace(cfg, **{"retries": 1, "backoff": 0.0, **changes})


def write_questions(path: Path, n: int, edit: dict[int, str] | None = None) -> None:
    rows = [{"id": f"q-{i:04d}", "question": (edit or {}).get(i, f"How do I do thing {i}?"),
             "source": "expert"} for i in range(1, n + 1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def paths(tmp_path: Path) -> GeneratePaths:
    return GeneratePaths(tmp_path / "questions.jsonl", tmp_path / "out" / "answers.jsonl",
                         tmp_path / "reports" / "generate.json", tmp_path / "cache")


def go(cfg: GenerateConfig, paths: GeneratePaths, client: Any, seed: int = BASE_SEED):
    return run(cfg, paths, seed=seed, client=client, progress=io.StringIO(), sleep=lambda s: None)


def rows_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


class StructuredFake(FakeClient):
    """A backend that honours the schema: JSON when one is sent."""

    def chat(self, messages, sampling, schema=None):
        reply = super().chat(messages, sampling, schema)
        if schema is None:
            return reply
        return replace(reply, text='{"followup": "Can I undo that later?"}', structured=True)


def test_followup_is_asked_under_its_schema_and_read_from_the_json(paths):
    write_questions(paths.questions, 2)
    fake = StructuredFake()
    go(base_cfg(structured_followup=True), paths, fake)
    assert fake.schemas == [None, schemas.FOLLOWUP] * 2
    assert [r["followup"] for r in rows_of(paths.out)] == ["Can I undo that later?"] * 2
    plain = StructuredFake()
    go(base_cfg(structured_followup=False), paths, plain)  # another request: asked again
    assert plain.schemas == [None, None] and len(plain.calls) == 2  # answers came from the cache
    assert [r["followup"] for r in rows_of(paths.out)] == ["And how do I undo that?"] * 2


def test_usable_followup_is_one_clean_line_that_is_not_the_question():
    q = "How do I list tables?"
    assert usable_followup("And how do I list views?", q)
    assert usable_followup("Show me how to list views as well.", q)
    for bad in ("", "Follow-up question: what next?", "Sure! Here is a follow-up question.",
                '{"followup": "x?"}', "How do I list tables?", "What about views",
                "One?\nTwo?", "<|im_start|>assistant What next?",
                "To list tables, use the \\dt command.", "A user asked how to list tables?"):
        assert not usable_followup(bad, q), bad


def test_writes_one_row_per_question_with_the_contract_fields(paths):
    write_questions(paths.questions, 3)
    cfg = base_cfg(temperature=0.7, seed=None, max_tokens=200, followup_max_tokens=64)
    result = go(cfg, paths, FakeClient())  # sampling set here: params.yaml is the user's to tune
    rows = rows_of(paths.out)
    assert [r["id"] for r in rows] == ["q-0001", "q-0002", "q-0003"]
    row = rows[0]
    sent = cfg.answer_template.format(question="How do I do thing 1?")  # the user turn as sent
    assert row["answer"] == f"fake-1 answers: {sent}"
    assert row["followup"] == "And how do I undo that?"  # label, quotes and chatter removed
    assert row["followup_answer"] is None and row["followup_finish_reason"] is None
    assert (row["model"], row["backend"], row["finish_reason"]) == ("fake-1", "fake", "stop")
    assert row["sampling"] == {"temperature": 0.7, "seed": BASE_SEED, "max_tokens": 200,
                               "followup_max_tokens": 64}
    assert row["tokens"]["prompt"] > 0 and row["tokens"]["completion"] > 0
    assert [c["role"] for c in row["calls"]] == ["answer", "followup"]
    report = json.loads(paths.metrics.read_text())
    assert {k: report[k] for k in ("questions", "failed", "failed_ids")} == {
        "questions": 3, "failed": 0, "failed_ids": []}
    run = json.loads(timings_path(paths.metrics).read_text())  # this run's facts, untracked
    assert {k: run[k] for k in ("generated", "reused", "requests")} == {
        "generated": 3, "reused": 0, "requests": 6}
    assert run["tokens"]["completion"] > 0
    assert isinstance(run["wall_s"], float) and run["wall_s"] > 0
    assert not {"wall_s", "requests", "reused", "tokens"} & set(report)  # not tracked
    assert result.requests == 6


def test_cut_off_answer_gets_no_followup_request(paths):
    # curate drops an answer that hit max_tokens: a follow-up on it would be thrown away.
    class CutOff(FakeClient):
        def chat(self, messages, sampling, schema=None):
            reply = super().chat(messages, sampling, schema)
            cut = "thing 2" in messages[-1]["content"]
            return llm.Reply(reply.text, "length" if cut else "stop", reply.prompt_tokens,
                             reply.completion_tokens)

    write_questions(paths.questions, 3)
    client = CutOff()
    result = go(base_cfg(answer_followups=True), paths, client)
    assert result.requests == 7 and len(client.calls) == 7  # 3 x 3, less 2 for the cut-off one
    row = rows_of(paths.out)[1]
    assert (row["finish_reason"], row["followup"], row["followup_answer"]) == ("length", None, None)
    assert [c["role"] for c in row["calls"]] == ["answer"]


def test_rerun_sends_no_requests(paths):
    write_questions(paths.questions, 4)
    go(base_cfg(), paths, FakeClient())
    first = paths.out.read_bytes()
    client = FakeClient()
    result = go(base_cfg(), paths, client)
    assert client.calls == [] and (result.reused, result.generated, result.requests) == (4, 0, 0)
    assert paths.out.read_bytes() == first


def test_editing_one_question_of_200_sends_only_its_two_requests(paths):
    write_questions(paths.questions, 200)
    go(base_cfg(concurrency=4), paths, FakeClient())
    write_questions(paths.questions, 200, edit={57: "How do I do thing 57 faster?"})
    client = FakeClient()
    result = go(base_cfg(concurrency=4), paths, client)
    assert len(client.calls) == 2 and (result.generated, result.reused) == (1, 199)
    assert "thing 57 faster" in client.calls[0][-1]["content"]


def test_turning_on_answer_followups_asks_only_the_followup_answers(paths):
    write_questions(paths.questions, 3)
    go(base_cfg(), paths, FakeClient())
    client = FakeClient()
    go(base_cfg(answer_followups=True), paths, client)
    assert len(client.calls) == 3
    turns = client.calls[0]
    assert [m["role"] for m in turns] == ["system", "user", "assistant", "user"]
    assert turns[-1]["content"] == "And how do I undo that?"
    row = rows_of(paths.out)[0]
    assert row["followup_answer"] and row["followup_finish_reason"] == "stop"


@pytest.mark.parametrize("change, expected", [
    ({"temperature": 0.2}, 4), ({"seed": 1}, 4),
    ({"max_tokens": 100}, 2),  # answers only: the fake's answers, hence follow-up prompts, stay
    ({"followup_max_tokens": 10}, 2),
    ({"system": "Be brief."}, 4), ({"answer_template": "Q: {question}"}, 4),
    ({"followup_template": "Next question after {question} / {answer}? "
                           "follow-up question or request"}, 2),
])
def test_anything_that_affects_a_reply_is_in_its_cache_key(paths, change, expected):
    write_questions(paths.questions, 2)
    go(base_cfg(), paths, FakeClient())
    client = FakeClient()
    go(base_cfg(**change), paths, client)
    assert len(client.calls) == expected


def test_another_model_is_asked_again(paths):
    write_questions(paths.questions, 2)
    go(base_cfg(), paths, FakeClient())
    client = FakeClient(model="fake-2")
    go(base_cfg(), paths, client)
    assert len(client.calls) == 4


def test_seed_zero_is_a_seed_and_null_means_base_seed(paths):
    write_questions(paths.questions, 1)
    go(base_cfg(seed=0), paths, FakeClient())
    assert rows_of(paths.out)[0]["sampling"]["seed"] == 0
    go(base_cfg(seed=None), paths, FakeClient())
    assert rows_of(paths.out)[0]["sampling"]["seed"] == BASE_SEED


def test_a_fresh_clone_with_the_pulled_output_reasks_nothing(paths):
    write_questions(paths.questions, 3)
    go(base_cfg(), paths, FakeClient())
    shutil.rmtree(paths.cache)  # what a clone + `dvc pull` has: the output, no local cache
    client = FakeClient()
    go(base_cfg(), paths, client)
    assert client.calls == []


def test_a_torn_cache_line_is_asked_again_and_not_glued_to_the_next(paths):
    write_questions(paths.questions, 2)
    go(base_cfg(), paths, FakeClient())
    cache = paths.cache / CACHE_FILE
    cache.write_bytes(cache.read_bytes()[:-20])  # a crash cut the last line short
    paths.out.unlink()
    client = FakeClient()
    go(base_cfg(), paths, client)
    assert len(client.calls) == 1
    assert all(json.loads(line) for line in cache.read_text().splitlines()[-1:])


def test_empty_answers_fail_the_stage_naming_the_questions(paths):
    write_questions(paths.questions, 3, edit={2: "Say nothing?"})
    with pytest.raises(GenerateError, match=r"1 question\(s\).*q-0002.*allow_failed is 0"):
        go(base_cfg(), paths, FakeClient(empty_for=("Say nothing",)))
    assert not paths.out.exists()
    assert json.loads(paths.metrics.read_text())["failed_ids"] == ["q-0002"]
    client = FakeClient(empty_for=("Say nothing",))
    result = go(base_cfg(allow_failed=1), paths, client)
    assert len(client.calls) == 2  # only the failed question, retried once; the rest cached
    assert [r["id"] for r in rows_of(paths.out)] == ["q-0001", "q-0003"]
    assert result.failed == ["q-0002"]


class GatedClient(FakeClient):
    """Each call waits until `gate` calls are in flight together (or 30 s pass): reaching the
    bound never depends on how fast threads start on a loaded machine."""

    def __init__(self, gate: int):
        super().__init__()
        self.gate, self.cond, self.reached = gate, threading.Condition(), False

    def chat(self, messages, sampling, schema=None):
        with self.cond:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.reached = self.reached or self.active >= self.gate
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.reached, timeout=30)
            self.active -= 1
        return FakeClient.chat(self, messages, sampling, schema)


def test_concurrency_is_bounded_by_the_setting(paths):
    write_questions(paths.questions, 12)
    client = GatedClient(gate=3)
    go(base_cfg(concurrency=3), paths, client)
    assert client.reached and client.max_active == 3


def test_bad_question_rows_are_reported_with_row_and_id(paths):
    paths.questions.write_text('{"id": "q-1", "question": "A?"}\n{"id": "q-1", "question": "B?"}\n')
    with pytest.raises(Exception, match="row 2: id q-1 already used by row 1"):
        go(base_cfg(), paths, FakeClient())


def test_progress_prints_plain_lines_off_a_terminal():
    out, now = io.StringIO(), [0.0]
    bar = Progress(10, "generate", out, every_s=10, clock=lambda: now[0])
    for _ in range(10):
        now[0] += 3
        bar.advance()
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 3  # at 12 s, 24 s, then the end
    assert lines[-1] == "generate: 10/10 (100%) 0.33/s elapsed 00:30 eta 00:00"


def test_progress_draws_a_bar_with_rate_and_eta_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out, now = Tty(), [0.0]
    bar = Progress(4, "generate", out, clock=lambda: now[0])
    now[0] = 2.0
    bar.advance()
    assert out.getvalue().startswith("\rgenerate [#####...............] 1/4 (25%) 0.50/s")
    assert "eta 00:06" in out.getvalue()


def test_clean_followup_is_idempotent():
    once = clean_followup('**Follow-up:** "Can I undo it?"\n\nMore text')
    assert once == "Can I undo it?" and clean_followup(once) == once
    assert clean_followup("追问：如何回滚？") == "如何回滚？"


# --- real processes: the stand-in server and the generate command ------------------------


def start_standin(log: Path, delay: float = 0.0, parallel: int = 4, hold_after: int | None = None,
                  hold_file: Path | None = None) -> tuple[subprocess.Popen, str]:
    hold = [] if hold_after is None else ["--hold-after", str(hold_after), "--hold-file",
                                          str(hold_file)]
    proc = subprocess.Popen([sys.executable, str(STANDIN), "--delay", str(delay), "--parallel",
                             str(parallel), "--log", str(log), *hold], stdout=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()  # "listening http://127.0.0.1:PORT"
    assert line.startswith("listening "), line
    return proc, line.split()[1]


def served(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(x) for x in log.read_text().splitlines() if x.strip()]


def served_key(entry: dict[str, Any]) -> str:
    o = entry["options"]
    sampling = llm.Sampling(o["temperature"], o.get("seed"), o["num_predict"])
    return llm.request_key(f"ollama:tiny@{DIGEST}", entry["messages"], sampling)


def cached_keys(cache_dir: Path) -> list[str]:
    path = cache_dir / CACHE_FILE
    keys = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            keys.append(json.loads(line)["key"])
        except ValueError:
            pass
    return keys


def wait_until(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_server_killed_mid_run_keeps_finished_answers_and_rerun_asks_only_the_rest(tmp_path,
                                                                                   paths):
    write_questions(paths.questions, 10)
    log1, hold = tmp_path / "served1.jsonl", tmp_path / "hold"
    hold.touch()  # the server answers 6 requests, then holds the rest until it is killed
    proc, url = start_standin(log1, parallel=2, hold_after=6, hold_file=hold)
    killer = threading.Thread(target=lambda: (
        wait_until(lambda: len(cached_keys(paths.cache)) >= 6, 60),
        proc.send_signal(signal.SIGKILL)))
    killer.start()
    cfg = base_cfg(backend="ollama", url=url, model="tiny", concurrency=2, retries=2,
                   backoff=0.05)
    try:
        with pytest.raises(llm.LLMError, match=rf"{url}.*'tiny'.*connection refused"):
            run(cfg, paths, seed=BASE_SEED, progress=io.StringIO())
    finally:
        killer.join()
        proc.wait()
    kept = set(cached_keys(paths.cache))
    assert len(kept) == 6 and not paths.out.exists()
    log2 = tmp_path / "served2.jsonl"
    proc2, url2 = start_standin(log2)
    try:
        result = run(replace(cfg, url=url2), paths, seed=BASE_SEED, progress=io.StringIO())
    finally:
        proc2.kill()
        proc2.wait()
    again = {served_key(e) for e in served(log2)}
    assert not again & kept and len(again) == 20 - len(kept) == result.requests
    assert len(rows_of(paths.out)) == 10


def settled_count(log: Path) -> int:
    """Requests logged once the stand-in has finished the ones in flight (no growth for 0.5 s)."""
    count = -1
    while count != (now := len(served(log))):
        count = now
        time.sleep(0.5)
    return count


def test_resumes_after_kill_9_without_requerying(tmp_path):
    write_questions(tmp_path / "questions.jsonl", 16)
    log, hold = tmp_path / "served.jsonl", tmp_path / "hold"
    hold.touch()  # after 8 answers the server holds requests: the kill lands mid-run
    server, url = start_standin(log, parallel=2, hold_after=8, hold_file=hold)
    params = yaml.safe_load(PARAMS.read_text())
    params["generate"].update(backend="ollama", url=url, model="tiny", concurrency=2,
                              backoff=0.05)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    cmd = [sys.executable, "-m", "pipeline", "generate", "--questions", "questions.jsonl",
           "--out", "answers.jsonl", "--metrics", "generate.json", "--cache", "cache",
           "--base-model", "unused", "--params", "params.yaml"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
        wait_until(lambda: len(cached_keys(tmp_path / "cache")) >= 8, 60)
        first.send_signal(signal.SIGKILL)
        first.wait()
        kept = set(cached_keys(tmp_path / "cache"))
        hold.unlink()  # held requests of the killed run finish (nobody reads the replies)
        asked_first = settled_count(log)  # the server logs in-flight requests as they finish
        assert not (tmp_path / "answers.jsonl").exists() and len(kept) == 8
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)
        second = [served_key(e) for e in served(log)[asked_first:]]
        twin = tmp_path / "uninterrupted"  # the same run, never killed
        twin.mkdir()
        for name in ("questions.jsonl", "params.yaml"):
            shutil.copy(tmp_path / name, twin / name)
        subprocess.run(cmd, cwd=twin, env=env, check=True, capture_output=True)
    finally:
        server.kill()
        server.wait()
    assert (tmp_path / "answers.jsonl").read_bytes() == (twin / "answers.jsonl").read_bytes()
    assert not set(second) & kept  # nothing answered before the kill is asked again
    assert len(second) == len(set(second)) == 32 - len(kept)
    assert len(second) + asked_first - 32 <= 2  # repeats: at most the requests in flight
    rows = rows_of(tmp_path / "answers.jsonl")
    assert len(rows) == 16 and all(r["answer"] and r["followup"] for r in rows)


# --- slow: the embedded model, real DVC ------------------------------------------------------


@pytest.mark.slow
def test_embedded_default_answers_with_llama_cpp(paths):
    from pipeline.base_model import EMBEDDED

    write_questions(paths.questions, 2)
    cfg = base_cfg(max_tokens=24, followup_max_tokens=16)
    assert cfg.backend == "embedded" and cfg.model == "base"
    result = run(cfg, paths, seed=BASE_SEED, base=llm.BaseModel(EMBEDDED, Path("unused")),
                 progress=io.StringIO())
    rows = rows_of(paths.out)
    cut = sum(r["finish_reason"] == "length" for r in rows)  # a cut answer gets no follow-up
    assert result.requests == 4 - cut and all(r["answer"].strip() for r in rows)
    assert all(r["backend"] == "embedded" and r["finish_reason"] in ("stop", "length")
               for r in rows)
    assert all(0 < r["tokens"]["completion"] <= 40 for r in rows)


@pytest.mark.slow
def test_dvc_repro_after_editing_one_question_sends_two_requests(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pipeline").mkdir(parents=True)
    (repo / "data").mkdir()
    (repo / "models" / "base").mkdir(parents=True)
    (repo / "models" / "base" / "stand-in").write_text("the base_model stage's output\n")
    shutil.copytree(REPO / "scripts", repo / "scripts")  # the stage command's wrapper
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["generate"]
    # The stage's code as declared, plus what runs any command (cli.py, the packages' __init__
    # files): the copy, first on PYTHONPATH, must run its own code, not the editable install's.
    runs_any = ["pipeline/cli.py", "pipeline/__main__.py", "pipeline/commands/app.py",
                *(str(p.relative_to(REPO)) for p in (REPO / "pipeline").rglob("__init__.py"))]
    for dep in [*stage["deps"], *runs_any]:
        if dep.startswith("pipeline/"):
            (repo / dep).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / dep, repo / dep)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"generate": stage}}))
    log = tmp_path / "served.jsonl"
    server, url = start_standin(log)
    params = yaml.safe_load(PARAMS.read_text())
    params["generate"].update(backend="ollama", url=url, model="tiny", concurrency=4)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    write_questions(repo / "data" / "questions.jsonl", 20)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}:"
           + os.environ["PATH"]}
    sh = lambda *a: subprocess.run(a, cwd=repo, env=env, check=True, capture_output=True)
    try:
        sh("git", "init", "-q")
        sh("dvc", "init", "-q")
        sh("dvc", "repro", "generate")
        assert len(served(log)) == 40
        write_questions(repo / "data" / "questions.jsonl", 20, edit={7: "How do I do thing 7 now?"})
        sh("dvc", "repro", "generate")
    finally:
        server.kill()
        server.wait()
    assert len(served(log)) == 42
    report = json.loads((repo / "reports" / "generate.timings.json").read_text())
    assert (report["requests"], report["generated"], report["reused"]) == (2, 1, 19)
    assert len(rows_of(repo / "data" / "generated" / "answers.jsonl")) == 20


def test_a_lone_surrogate_in_questions_is_a_clear_error_before_any_request(paths):
    paths.questions.write_text('{"id": "q-0001", "question": "Fine?"}\n'
                               '{"id": "q-0002", "question": "Emoji \\ud83d cut?"}\n')
    client = FakeClient()
    with pytest.raises(UserError, match=r"questions.jsonl:2: a lone surrogate"):
        go(base_cfg(), paths, client)
    assert client.calls == [] and not paths.out.exists()
