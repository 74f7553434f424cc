"""Hostile LLM servers against pipeline/llm/clients.py and llm_http.py, real sockets on 127.0.0.1
(tests/scripted_http.py): redirects, secrets in error bodies, JSON of the wrong shape, oversized
replies, bytes trickled past any deadline. Each ends in one clear `LLMError` naming the server and
what to check; through `tuneline generate`: exit code 1, one line, no traceback, nothing written."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from scripted_http import Request, Scripted, response

from pipeline.llm import clients as llm
from pipeline.llm import transport as llm_http

REPO = Path(__file__).resolve().parents[1]
SAMPLING = llm.Sampling(temperature=0.0, seed=7, max_tokens=50)
HELLO = [{"role": "user", "content": "How do I list tables?"}]
KEY = "sk-live-0123456789abcdef"
GOOD_OPENAI = {"choices": [{"message": {"role": "assistant", "content": "Use \\dt."},
                            "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 5, "completion_tokens": 3}}


def settings(backend: str, url: str, **kw: object) -> llm.LLMSettings:
    base = {"backend": backend, "url": url, "model": "tiny", "api_key_env": "TUNELINE_HOSTILE_KEY",
            "stream": True, "timeout": 5.0, "deadline": 60.0, "retries": 1, "backoff": 0.01}
    return llm.LLMSettings(**{**base, **kw})  # type: ignore[arg-type]


def ask(s: llm.LLMSettings) -> llm.Reply:
    return llm.ask(llm.connect(s), HELLO, SAMPLING, s, sleep=lambda _: None)


def always(raw: bytes):
    return lambda req, out: out.write(raw)


# --- redirects --------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_is_refused_and_the_key_never_reaches_the_other_host(status, monkeypatch):
    monkeypatch.setenv("TUNELINE_HOSTILE_KEY", KEY)
    with Scripted(always(response(200, GOOD_OPENAI))) as other:
        moved = response(status, "", {"Location": f"{other.url}/v1/chat/completions?t=x"})
        with Scripted(always(moved)) as first, pytest.raises(llm.LLMError) as err:
            ask(settings("openai", first.url + "/v1"))
        assert other.requests == []  # neither the key nor a GET went there
    msg = str(err.value)
    assert f"HTTP {status}" in msg and "redirect" in msg and first.url in msg
    assert "?t=x" not in msg and "`url`" in msg
    assert len(first.requests) == 1  # not retried: the same answer would come back


# --- secrets in error bodies ----------------------------------------------------------------


def test_error_bodies_are_redacted_before_they_reach_the_message(monkeypatch):
    monkeypatch.setenv("TUNELINE_HOSTILE_KEY", KEY)
    body = {"error": {"message": f"invalid api key {KEY}; Authorization: Bearer {KEY}; "
                                 "also token=abcd1234efgh and hf_AbCdEfGhIjKlMnOp"}}
    with Scripted(always(response(401, body))) as server, pytest.raises(llm.LLMError) as err:
        ask(settings("openai", server.url + "/v1"))
    msg = str(err.value)
    assert server.requests[0].headers["authorization"] == f"Bearer {KEY}"  # it was sent...
    assert KEY not in msg and "abcd1234efgh" not in msg and "hf_AbCd" not in msg  # ...not shown
    assert "HTTP 401: invalid api key ***" in msg and "TUNELINE_HOSTILE_KEY" in msg


def test_credentials_in_the_url_are_not_shown():
    with Scripted(always(response(500, {"error": "down"}))) as server:
        url = server.url.replace("http://", "http://user:hunter22@") + "/v1"
        with pytest.raises(llm.LLMError) as err:
            ask(settings("openai", url, retries=0))
    assert "hunter22" not in str(err.value) and server.url in str(err.value)


def test_a_key_straddling_the_300_character_cut_leaks_no_prefix(monkeypatch):
    key = "Zq8Xw2Lm4Np6Rt0Vy3Bc5Df7Gh9Jk1Ms"  # 32 characters, shaped like no known token
    monkeypatch.setenv("TUNELINE_HOSTILE_KEY", key)
    body = {"error": {"message": "x" * 290 + key + " was rejected"}}  # the cut falls inside it
    with Scripted(always(response(401, body))) as server, pytest.raises(llm.LLMError) as err:
        ask(settings("openai", server.url + "/v1"))
    msg = str(err.value)
    assert server.requests[0].headers["authorization"] == f"Bearer {key}"
    assert key[:4] not in msg and "x" * 290 + "***" in msg


def test_a_key_straddling_the_cut_in_a_stream_error_leaks_no_prefix():
    key = "hf_" + "Zq8Xw2Lm4Np6Rt0Vy3Bc5Df7Gh9Jk1"  # joined here: no token-like literal in git
    body = ndjson({"error": "y" * 294 + " " + key})
    with Scripted(always(response(200, body))) as server, pytest.raises(llm.LLMError) as err:
        ask(settings("ollama", server.url))
    assert key[:4] not in str(err.value) and "y" * 294 + " ***" in str(err.value)


def test_credentials_in_the_url_travel_as_basic_auth_and_are_never_shown():
    replies = [response(500, {"error": "proxy says: hunter22 is wrong"}),
               response(200, GOOD_OPENAI)]
    with Scripted(lambda req, out: out.write(replies.pop(0))) as server:
        url = server.url.replace("http://", "http://ann:hunter22@") + "/v1"
        s = settings("openai", url, api_key_env="TUNELINE_NO_SUCH_KEY")
        assert ask(s).text == "Use \\dt."
        with Scripted(always(response(500, {"error": "hunter22 is wrong"}))) as bad, \
                pytest.raises(llm.LLMError) as err:
            ask(settings("openai", bad.url.replace("http://", "http://ann:hunter22@") + "/v1",
                         api_key_env="TUNELINE_NO_SUCH_KEY"))
    first = server.requests[0]
    assert first.headers["authorization"] == "Basic " + base64.b64encode(b"ann:hunter22").decode()
    assert first.path == "/v1/chat/completions" and "hunter22" not in first.headers.get("host", "")
    assert "hunter22" not in str(err.value) and bad.url in str(err.value)


def test_credentials_in_a_url_without_a_port_are_not_echoed_by_the_url_parser():
    # urllib took `ann:hunter22@localhost` for host and port: "nonnumeric port: 'hunter22@...'"
    for backend in ("openai", "ollama"):
        s = settings(backend, "http://ann:hunter22@127.0.0.1/v1", retries=0, timeout=2.0,
                     deadline=3.0, api_key_env="TUNELINE_NO_SUCH_KEY")
        with pytest.raises((llm.LLMError, llm.Transient)) as err:
            if backend == "ollama":
                llm.connect(s).identity()
            else:
                ask(s)
        assert "hunter22" not in str(err.value) and "ann" not in str(err.value), err.value


# --- replies Python's parsers refuse ----------------------------------------------------------


def test_an_unparseable_retry_after_is_ignored_and_the_usual_backoff_applies():
    replies = [response(503, {"error": "busy"}, {"Retry-After": "soon"}),
               response(429, {"error": "busy"}, {"Retry-After": "Wed, 99 Foo 2020 25:61:61 GMT"}),
               response(200, GOOD_OPENAI)]
    slept: list[float] = []
    with Scripted(lambda req, out: out.write(replies.pop(0))) as server:
        s = settings("openai", server.url + "/v1", retries=2, backoff=0.01)
        reply = llm.ask(llm.connect(s), HELLO, SAMPLING, s, sleep=slept.append)
    assert reply.text == "Use \\dt." and len(server.requests) == 3
    assert len(slept) == 2 and all(0.01 <= d < 0.1 for d in slept), slept  # backoff, not a date


def test_a_bad_status_line_is_one_redacted_line():
    raw = b"HTTP/1.1 abc token=abcd1234efgh\r\nX: y\r\n\r\n"
    with Scripted(always(raw)) as server, pytest.raises(llm.LLMError) as err:
        ask(settings("openai", server.url + "/v1"))
    msg = str(err.value)
    assert "BadStatusLine" in msg and "\n" not in msg and "abcd1234efgh" not in msg


HUGE_INT = b"1" * 5000  # past Python's int-string limit (4300 digits): json.loads raises


@pytest.mark.parametrize("status,body", [
    (200, b'{"choices": [{"message": {"content": "hi"}}], "usage": {"prompt_tokens": '
          + HUGE_INT + b"}}"),
    (500, b'{"error": ' + HUGE_INT + b"}"),
    (200, HUGE_INT),
], ids=["200-usage", "500-error", "200-bare"])
def test_a_number_past_the_int_string_limit_is_retried_then_explained(status, body):
    with Scripted(always(response(status, body))) as server, pytest.raises(llm.LLMError) as err:
        ask(settings("openai", server.url + "/v1"))
    assert "2 attempts" in str(err.value) and len(server.requests) == 2
    assert f"HTTP {status}" in str(err.value) if status == 500 else "not JSON" in str(err.value)


def test_a_number_past_the_int_string_limit_in_a_stream_is_explained():
    body = b'{"message": {"content": "a"}, "done": true, "eval_count": ' + HUGE_INT + b"}\n"
    with Scripted(always(response(200, body))) as server, \
            pytest.raises(llm.LLMError, match="not JSON"):
        ask(settings("ollama", server.url))


# --- wrong shapes ---------------------------------------------------------------------------

OPENAI_SHAPES = [
    [], 42, {"choices": "x"}, {"choices": []}, {"choices": [None]},
    {"choices": [{"message": "hello"}]}, {"choices": [{"message": {"content": 5}}]},
    {"choices": [{"message": {"content": "hi"}}], "usage": []},
    {"choices": [{"message": {"content": "hi"}}], "usage": {"prompt_tokens": "many"}},
    {"choices": [{"message": {"content": "hi"}, "finish_reason": {"a": 1}}]},
]


@pytest.mark.parametrize("data", OPENAI_SHAPES, ids=range(len(OPENAI_SHAPES)))
def test_openai_reply_of_the_wrong_shape_is_retried_then_explained(data):
    with Scripted(always(response(200, data))) as server, pytest.raises(llm.LLMError) as err:
        ask(settings("openai", server.url + "/v1"))
    assert "unexpected reply shape" in str(err.value) and "2 attempts" in str(err.value)
    assert "`backend`" in str(err.value) and len(server.requests) == 2


def test_a_wrong_shape_once_then_a_good_reply_is_taken():
    replies = [response(200, {"choices": [{"message": "x"}]}), response(200, GOOD_OPENAI)]
    with Scripted(lambda req, out: out.write(replies.pop(0))) as server:
        assert ask(settings("openai", server.url + "/v1")).text == "Use \\dt."


def ndjson(*chunks: object) -> bytes:
    return "".join(json.dumps(c) + "\n" for c in chunks).encode()


OLLAMA_STREAMS = [
    ndjson([1, 2]), ndjson("done"), ndjson({"message": "hi", "done": True}),
    ndjson({"message": {"content": ["a"]}, "done": False}),
    ndjson({"message": {"content": "a"}, "done": True, "eval_count": "lots"}),
    ndjson({"message": {"content": "a"}, "done": True, "prompt_eval_count": 1.0e999}),
]


@pytest.mark.parametrize("body", OLLAMA_STREAMS, ids=range(len(OLLAMA_STREAMS)))
def test_ollama_stream_of_the_wrong_shape_is_explained(body):
    reply = always(response(200, body, {"Content-Type": "application/x-ndjson"}))
    with Scripted(reply) as server, pytest.raises(llm.LLMError, match="unexpected reply shape"):
        ask(settings("ollama", server.url))


def test_ollama_identity_with_odd_tags_is_a_clear_error():
    tags = always(response(200, {"models": "tiny"}))
    with Scripted(tags) as server, pytest.raises(llm.Transient, match="unexpected reply shape"):
        llm.connect(settings("ollama", server.url)).identity()


# --- size bounds ----------------------------------------------------------------------------


def test_a_reply_larger_than_the_bound_is_refused():
    huge = {"choices": [{"message": {"content": "a" * (llm_http.MAX_REPLY_BYTES + 10)}}]}
    with Scripted(always(response(200, huge))) as server, \
            pytest.raises(llm.LLMError, match="larger than 8 MiB"):
        ask(settings("openai", server.url + "/v1"))
    assert len(server.requests) == 1  # not retried


def test_a_stream_line_larger_than_the_bound_is_refused():
    line = ndjson({"message": {"content": "a" * (llm_http.MAX_LINE_BYTES + 10)}, "done": True})
    with Scripted(always(response(200, line))) as server, \
            pytest.raises(llm.LLMError, match="streamed line is larger than 1 MiB"):
        ask(settings("ollama", server.url))


# --- deadline -------------------------------------------------------------------------------


def trickle(head: bytes, drip: bytes):
    """Send `head`, then `drip` every 0.1 s until the client hangs up (never silent for long)."""
    def respond(req: Request, out) -> None:
        out.write(head)
        while True:
            time.sleep(0.1)
            out.write(drip)
    return respond


def finishes_within(seconds: float, call) -> tuple[BaseException | None, float]:
    """Run `call` in a thread; fail the test (instead of hanging) if it outlives `seconds`.
    Returns what it raised and how long it took."""
    caught: list[BaseException] = []
    started = time.monotonic()

    def target() -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            caught.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s: no overall deadline"
    return (caught[0] if caught else None), time.monotonic() - started


STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("head,drip", [
    (STREAM_HEAD, b"\n"),                         # blank stream lines forever
    (b"HTTP/1.1 200 OK\r\nX-Slow: ", b"a"),       # one endless header
], ids=["body", "headers"])
def test_a_server_trickling_bytes_hits_the_overall_deadline(head, drip):
    with Scripted(trickle(head, drip)) as server:
        s = settings("ollama", server.url, timeout=1.0, deadline=1.5, retries=0)
        # The request ends at its 1.5 s deadline: not before (it was never silent for the 1 s
        # timeout), and well within 10 s (generous for a loaded machine, yet 6x the deadline).
        exc, elapsed = finishes_within(10, lambda: ask(s))
    assert 1.5 <= elapsed < 10, f"ended after {elapsed:.2f} s, deadline 1.5 s"
    assert isinstance(exc, llm.LLMError), exc
    assert "deadline of 1.5 s" in str(exc) and "Raise `deadline`" in str(exc)


def test_a_deadline_shorter_than_the_timeout_is_a_params_error():
    with pytest.raises(llm.ConfigError, match=r"deadline \(2 s\) at least as long"):
        llm.connect(settings("ollama", "http://127.0.0.1:9", timeout=5.0, deadline=2.0))


def test_a_complete_reply_within_the_deadline_is_unaffected():
    with Scripted(always(response(200, GOOD_OPENAI))) as server:
        reply = ask(settings("openai", server.url + "/v1", deadline=5.0))
    assert (reply.text, reply.prompt_tokens, reply.completion_tokens) == ("Use \\dt.", 5, 3)


# --- the command: exit code, one line, nothing written ---------------------------------------

CORPUS = {
    "redirect": response(302, "", {"Location": "http://127.0.0.2:9/elsewhere"}),
    "secret_500": response(500, {"error": f"backend crashed; key={KEY}"}),
    "wrong_shape": response(200, {"choices": [{"message": {"content": "hi"}}], "usage": []}),
    "not_json": response(200, b"<html>login page</html>", {"Content-Type": "text/html"}),
    "huge": response(200, b"[" + b"1," * (llm_http.MAX_REPLY_BYTES // 2) + b"1]"),
    "retry_after_soon": response(503, {"error": "busy"}, {"Retry-After": "soon"}),
    "huge_int": response(200, b'{"choices": [], "n": ' + b"9" * 5000 + b"}"),
}


def run_command(tmp_path: Path, section: str, url: str, args: list[str]):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params[section].update(backend="openai", url=url, model="tiny", retries=0,
                           api_key_env="TUNELINE_HOSTILE_KEY")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    env = {**os.environ, "PYTHONPATH": str(REPO), "TUNELINE_HOSTILE_KEY": KEY}
    return subprocess.run([sys.executable, "-m", "pipeline", "--params", "params.yaml", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def assert_one_clear_line(done: subprocess.CompletedProcess, url: str) -> None:
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and len(errors) == 1, done.stderr
    assert url in errors[0] and "Check:" in errors[0] and KEY not in done.stderr


@pytest.mark.parametrize("name", list(CORPUS))
def test_questions_draft_fails_with_one_clear_line_and_appends_nothing(name, tmp_path):
    questions = tmp_path / "questions.jsonl"
    questions.write_bytes(b'{"id": "q-0001", "question": "How do I list tables?"}\n')
    before = questions.read_bytes()
    with Scripted(always(CORPUS[name])) as server:
        done = run_command(tmp_path, "questions", server.url + "/v1",
                           ["questions", "draft", "--out", "questions.jsonl"])
    assert_one_clear_line(done, server.url)
    assert questions.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "questions.jsonl"]


@pytest.mark.parametrize("name", list(CORPUS))
def test_generate_command_fails_with_one_clear_line_and_writes_nothing(name, tmp_path):
    questions = tmp_path / "questions.jsonl"
    questions.write_bytes(b'{"id": "q1", "question": "How do I list tables?"}\n')
    before = questions.read_bytes()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    with Scripted(always(CORPUS[name])) as server:
        params["generate"].update(backend="openai", url=server.url + "/v1", model="tiny",
                                  retries=0, api_key_env="TUNELINE_HOSTILE_KEY")
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
        cmd = [sys.executable, "-m", "pipeline", "generate", "--questions", "questions.jsonl",
               "--out", "answers.jsonl", "--metrics", "generate.json", "--cache", "cache",
               "--base-model", "unused", "--params", "params.yaml"]
        env = {**os.environ, "PYTHONPATH": str(REPO), "TUNELINE_HOSTILE_KEY": KEY}
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120, check=False)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and len(errors) == 1, done.stderr
    assert server.url in errors[0] and "Check:" in errors[0] and KEY not in done.stderr
    assert not (tmp_path / "answers.jsonl").exists() and not (tmp_path / "generate.json").exists()
    assert questions.read_bytes() == before


def test_generate_stores_and_prints_no_credentials_from_the_url(tmp_path):
    (tmp_path / "questions.jsonl").write_bytes(b'{"id": "q1", "question": "How do I list?"}\n')
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    with Scripted(always(response(200, GOOD_OPENAI))) as server:
        url = server.url.replace("http://", "http://ann:hunter22@") + "/v1"
        params["generate"].update(backend="openai", url=url, model="tiny", retries=0,
                                  structured_followup=False, api_key_env="TUNELINE_NO_SUCH_KEY")
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
        cmd = [sys.executable, "-m", "pipeline", "generate", "--questions", "questions.jsonl",
               "--out", "answers.jsonl", "--metrics", "generate.json", "--cache", "cache",
               "--base-model", "unused", "--params", "params.yaml"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert server.requests and all(r.headers["authorization"].startswith("Basic ")
                                   for r in server.requests)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "params.yaml"]
    assert {p.name for p in written} >= {"answers.jsonl", "generate.json"}
    for path in written:
        assert b"hunter22" not in path.read_bytes(), path
    assert "hunter22" not in done.stdout + done.stderr
