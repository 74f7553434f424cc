"""`tuneline review serve`: the HTTP API under a real uvicorn on 127.0.0.1 (the page itself is
driven in a real browser in test_review_browser.py)."""

from __future__ import annotations

import csv
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from pipeline.commands import review, review_server
from pipeline.rows import corrections
from pipeline.rows.jsonl import read_jsonl
from tests.review_project import (
    curate_now,
    generated,
    make_project,
    page_token,
    paths,
    served,
    write_jsonl,
)


def get(url: str, **query: str) -> dict[str, Any]:
    qs = "&".join(f"{k}={urllib.request.quote(v)}" for k, v in query.items())
    with urllib.request.urlopen(f"{url}/api/rows?{qs}", timeout=30) as res:
        return json.load(res)


def post(url: str, body: Any, content_type: str = "application/json",
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """A save as the page sends it (with the page's session token unless headers say else)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = {"Content-Type": content_type, "X-Tuneline-Token": page_token(url), **(headers or {})}
    req = urllib.request.Request(f"{url}/api/save", data=data, method="POST",
                                 headers={k: v for k, v in sent.items() if v is not None})
    try:
        with urllib.request.urlopen(req, timeout=30) as res:
            return res.status, json.load(res)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def row(url: str, rid: str) -> dict[str, Any]:
    hits = [r for r in get(url, q=rid, limit="200")["rows"] if r["id"] == rid]
    assert hits, rid
    return hits[0]


def edit(r: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """What the page sends for a row: every cell, the base it got, and the changes."""
    return {"id": r["id"], "action": "", **{k: r[k] for k in review.EDITABLE}, "base": r["base"],
            "reviewed": None, **changes}


def save(url: str, *edits: dict[str, Any]) -> dict[str, Any]:
    status, reply = post(url, {"version": get(url)["version"], "edits": list(edits)})
    assert status == 200, reply
    return reply


@pytest.fixture
def project(tmp_path) -> Path:
    return make_project(tmp_path / "proj")


def test_web_saves_write_the_same_lines_as_the_sheet_apply(project, tmp_path):
    twin = make_project(tmp_path / "twin")
    with served(project) as url:
        save(url, edit(row(url, "q-0002"), answer="Set it with ALTER SYSTEM, then reload."),
             edit(row(url, "q-0003"), action="drop"),
             edit(row(url, "q-0006"), followup_answer="Only the primary reads it."))
    sheet = tmp_path / "review.csv"
    review.export(twin / "data/dataset", twin / "data/corrections.jsonl",
                  twin / "data/questions.jsonl", sheet)
    with sheet.open(encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        if r["id"] == "q-0002":
            r["answer"] = "Set it with ALTER SYSTEM, then reload."
        if r["id"] == "q-0003":
            r["action"] = "drop"
        if r["id"] == "q-0006":
            r["followup_answer"] = "Only the primary reads it."
    with sheet.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=review.COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    review.apply(sheet, twin / "data/corrections.jsonl", twin / "data/dataset")
    web = (project / "data/corrections.jsonl").read_text()
    assert web == (twin / "data/corrections.jsonl").read_text()
    assert [(c.id, c.action) for c in corrections.load(project / "data/corrections.jsonl")] == [
        ("q-0002", "replace_answer"), ("q-0003", "drop"), ("q-0006", "replace_followup")]


def test_a_save_rewrites_only_the_lines_it_changes(tmp_path):
    hand = ['{ "id":"q-0004",  "action":"replace_answer", "answer":"Hand written, odd spacing."}',
            '{"note": "keys in my order", "action": "drop", "id": "q-0007"}']
    root = make_project(tmp_path / "proj")
    (root / "data/corrections.jsonl").write_text("\n".join(hand) + "\n")
    with served(root) as url:
        save(url, edit(row(url, "q-0002"), answer="A new answer from the web page."))
        again = save(url, edit(row(url, "q-0002"), answer="A second, better answer."))
    assert again["notes"] == []  # its own first edit is not news to the expert
    lines = (root / "data/corrections.jsonl").read_text().splitlines()
    assert lines[:2] == hand
    assert len(lines) == 3 and json.loads(lines[2])["answer"] == "A second, better answer."


def test_a_save_against_an_older_file_is_refused_and_changes_nothing(project):
    with served(project) as url:
        seen = get(url)
        r = row(url, "q-0002")
        # A teammate's `git pull` (or another tab) changes the file underneath.
        theirs = '{"id": "q-0005", "action": "drop"}\n'
        (project / "data/corrections.jsonl").write_text(theirs)
        status, reply = post(url, {"version": seen["version"],
                                   "edits": [edit(r, answer="My edit.")]})
        assert status == 409
        assert "changed since this page was loaded" in reply["error"]
        assert (project / "data/corrections.jsonl").read_text() == theirs
        save(url, edit(row(url, "q-0002"), answer="My edit, redone on the new file."))
    assert [c.action for c in corrections.load(project / "data/corrections.jsonl")] == [
        "drop", "replace_answer"]


BAD_BODIES = {
    "not json": (b"{not json", 400),
    "a list": ([], 400),
    "no version": ({"edits": []}, 400),
    "a path key": ({"version": "0" * 64, "edits": [{"id": "q-0002", "path": "../../x"}]}, 400),
    "unknown id": ({"version": "0" * 64, "edits": [{"id": "../../etc/passwd", "answer": "x"}]},
                   400),
    "answer not text": ({"version": "0" * 64, "edits": [{"id": "q-0002", "answer": 7}]}, 400),
    "unknown action": ({"version": "0" * 64, "edits": [{"id": "q-0002", "action": "rm"}]}, 400),
    "base not object": ({"version": "0" * 64, "edits": [{"id": "q-0002", "base": "x"}]}, 400),
    "edits empty": ({"version": "0" * 64, "edits": []}, 400),
}


@pytest.mark.parametrize("name", sorted(BAD_BODIES))
def test_a_malformed_save_gets_a_4xx_and_changes_nothing(project, name):
    body, expected = BAD_BODIES[name]
    before = (project / "data/corrections.jsonl").read_bytes()
    with served(project) as url:
        if isinstance(body, dict) and "version" in body:
            body = {**body, "version": get(url)["version"]}  # only the edit itself is wrong
        status, reply = post(url, body)
    assert status == expected and reply["error"]
    assert (project / "data/corrections.jsonl").read_bytes() == before


def test_an_edit_review_refuses_is_a_422_naming_the_row(project):
    with served(project) as url:
        status, reply = post(url, {"version": get(url)["version"],
                                   "edits": [edit(row(url, "q-0002"), answer="  ")]})
    assert status == 422 and "q-0002" in reply["error"] and "answer" in reply["error"]
    assert (project / "data/corrections.jsonl").read_text() == ""


def test_cross_site_posts_and_foreign_host_names_are_refused(project):
    with served(project) as url:
        body = {"version": get(url)["version"], "edits": [edit(row(url, "q-0002"), answer="x!")]}
        # A form on another site can only send text/plain without a preflight.
        assert post(url, json.dumps(body).encode(), content_type="text/plain")[0] == 415
        assert post(url, body, headers={"Origin": "http://evil.example"})[0] == 403
        req = urllib.request.Request(f"{url}/api/rows", headers={"Host": "evil.example"})
        with pytest.raises(urllib.error.HTTPError) as err:  # DNS rebinding
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code == 400
        with urllib.request.urlopen(url + "/", timeout=30) as res:
            assert "script-src 'self'" in res.headers["Content-Security-Policy"]
    assert (project / "data/corrections.jsonl").read_text() == ""


def test_refuses_to_start_when_saves_would_land_outside_data(project):
    outside = review_server.ServePaths(**{**paths(project).__dict__,
                                          "corrections": project / "corrections.jsonl"})
    with pytest.raises(review_server.ServeError, match="writes only inside"):
        review_server.create_app(outside)
    sneaky = review_server.ServePaths(**{**paths(project).__dict__,
                                         "corrections": project / "data/../x.jsonl"})
    with pytest.raises(review_server.ServeError):
        review_server.create_app(sneaky)


def test_a_saved_edit_shows_at_once_marked_until_dvc_repro(project):
    with served(project) as url:
        save(url, edit(row(url, "q-0002"), answer="Fresh expert answer."))
        r = row(url, "q-0002")
        assert (r["answer"], r["source"], r["pending"], r["reviewed"]) == (
            "Fresh expert answer.", "expert", True, True)
        assert get(url)["pending"] == 1
        curate_now(project)  # what dvc repro runs
        assert row(url, "q-0002")["pending"] is False


def test_drop_restore_and_add_round_trip(project):
    with served(project) as url:
        save(url, edit(row(url, "q-0003"), action="drop"))
        dropped = row(url, "q-0003")
        assert dropped["dropped"] and dropped["split"] == "dropped"
        save(url, {"id": "q-0003", "action": "", "base": dropped["base"],
                   "question": dropped["question"]},
             {"id": "", "question": "How do I list extensions?", "answer": "Run \\dx in psql.",
              "base": {}})
        assert not row(url, "q-0003")["dropped"]
        lines = corrections.load(project / "data/corrections.jsonl")
        assert [c.action for c in lines] == ["add_conversation"]
        added = row(url, lines[0].id)
        assert (added["split"], added["answer"], added["source"]) == (
            "new", "Run \\dx in psql.", "expert")


def test_reviewed_counts_until_the_answer_is_regenerated_and_changes_no_data(project):
    dataset = {s: (project / f"data/dataset/{s}.jsonl").read_bytes() for s in review.SPLITS}
    with served(project) as url:
        assert get(url)["reviewed"] == 0
        save(url, edit(row(url, "q-0002"), reviewed=True))
        assert get(url)["reviewed"] == 1 and row(url, "q-0002")["reviewed"]
        assert [r["id"] for r in get(url, unreviewed="1", limit="200")["rows"]].count(
            "q-0002") == 0
        curate_now(project)
        assert dataset == {s: (project / f"data/dataset/{s}.jsonl").read_bytes()
                           for s in review.SPLITS}
        # Regenerated answers: the mark vouches for the old text only.
        answers = read_jsonl(project / "data/generated/answers.jsonl")
        answers[2] = {**generated("q-0002", "A different generated answer."),
                      "question": answers[2]["question"]}
        write_jsonl(project / "data/generated/answers.jsonl", answers)
        curate_now(project)
        assert get(url)["reviewed"] == 0
        save(url, edit(row(url, "q-0002"), reviewed=False))
    assert (project / "data/corrections.jsonl").read_text() == ""


def test_rows_show_findings_and_model_answers_as_plain_text(project):
    with served(project) as url:
        hostile = row(url, "q-0000")
        assert "<script>" in hostile["answer"]
        flagged = get(url, findings="1")
        assert [r["id"] for r in flagged["rows"]] == ["q-0001"]
        assert {f["check"] for f in flagged["rows"][0]["findings"]} == {"refusal",
                                                                        "answer_length"}
        test_rows = get(url, split="test", limit="200")["rows"]
        assert test_rows and all(r["tuned_answer"] == f"tuned model says <u>{r['id']}</u>"
                                 and r["base_answer"].startswith("base model") for r in test_rows)


def ten_thousand(root: Path) -> Path:
    """10,000 synthetic dataset rows written straight into data/dataset (no curate needed)."""
    (root / "data/dataset").mkdir(parents=True)
    split_of = ["train"] * 8 + ["valid", "test"]
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in review.SPLITS}
    for i in range(10_000):
        rows[split_of[i % 10]].append({
            "id": f"q-{i:05d}", "source": "expert" if i % 4 == 0 else "generated",
            "messages": [{"role": "user", "content": f"Question number {i}?"},
                         {"role": "assistant", "content": f"Answer {i}."}],
            "turn_sources": ["expert" if i % 4 == 0 else "generated"],
            "finish_reasons": [None], "origin": [f"data/generated/answers.jsonl:{i + 1}"]})
    for split, items in rows.items():
        write_jsonl(root / f"data/dataset/{split}.jsonl", items)
    (root / "reports").mkdir()
    return root


def test_ten_thousand_rows_are_filtered_and_paged_on_the_server(tmp_path):
    root = ten_thousand(tmp_path)
    with served(root) as url:
        first = get(url, limit="50")
        assert (first["total"], first["matched"], len(first["rows"])) == (10_000, 10_000, 50)
        assert first["reviewed"] == 2500  # every expert-written row
        last = get(url, offset="9990", limit="50")
        assert [r["id"] for r in last["rows"]] == [f"q-{i:05d}" for i in range(9990, 10_000)]
        assert get(url, split="test")["matched"] == 1000
        unreviewed_train = sum(1 for i in range(10_000) if i % 10 < 8 and i % 4)
        assert get(url, split="train", unreviewed="1")["matched"] == unreviewed_train
        assert get(url, source="expert")["matched"] == 2500
        assert [r["id"] for r in get(url, q="question number 4321?")["rows"]] == ["q-04321"]
        assert len(get(url, limit="100000")["rows"]) == review_server.PAGE_MAX


@pytest.mark.slow
def test_findings_of_the_real_validate_stage_show_on_their_rows(tmp_path):
    import os
    import subprocess
    import sys

    root = make_project(tmp_path / "proj", corrections=[
        {"id": "q-0007", "action": "replace_answer", "answer": "Yes, do it."}])
    (root / "reports/validation.json").unlink()
    done = subprocess.run([sys.executable, "-m", "pipeline", "validate", "data/dataset",
                           "--tokenizer", "models/base", "--report", "reports/validation.json"],
                          cwd=root, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 0, done.stderr  # a warning only
    with served(root) as url:
        flagged = get(url, findings="1")["rows"]
    assert [r["id"] for r in flagged] == ["q-0007"]
    assert [f["check"] for f in flagged[0]["findings"]] == ["answer_length"]


def listening(pid: int) -> set[tuple[str, int]]:
    """The addresses a process listens on, read from its sockets."""
    import psutil

    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections("inet")
            if c.status == psutil.CONN_LISTEN}


def test_review_serve_listens_on_loopback_only_by_default(project):
    from tests.review_project import served_cli_process

    with served_cli_process(project) as (url, proc):
        assert get(url)["total"] == 12
        port = int(url.rsplit(":", 1)[1])
        assert listening(proc.pid) == {("127.0.0.1", port)}
        token = page_token(url)
    printed = proc.stdout.read()
    assert f"review page: {url}/" in printed and token not in printed  # the page holds it only


def test_review_serve_on_the_ipv6_loopback_reads_and_saves(project):
    from tests.review_project import served_cli_process

    with served_cli_process(project, "--host", "::1") as (url, proc):
        assert url.startswith("http://[::1]:")
        assert listening(proc.pid) == {("::1", int(url.rsplit(":", 1)[1]))}
        assert get(url)["total"] == 12
        save(url, edit(row(url, "q-0002"), answer="Saved over IPv6."))
    assert corrections.load(project / "data/corrections.jsonl")[0].row["answer"] == (
        "Saved over IPv6.")


def test_an_oversized_save_is_refused_before_it_is_read(project):
    import http.client

    with served(project) as url:
        conn = http.client.HTTPConnection(url.split("//")[1], timeout=30)
        conn.putrequest("POST", "/api/save")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("X-Tuneline-Token", page_token(url))
        conn.putheader("Content-Length", str(review_server.BODY_MAX + 1))
        conn.endheaders()  # the body never comes: the answer must not wait for it
        res = conn.getresponse()
        status, reply = res.status, json.loads(res.read())
        conn.close()
    assert status == 413 and "at most" in reply["error"]
    assert (project / "data/corrections.jsonl").read_text() == ""


def test_an_unanswered_question_gets_an_expert_answer_that_curate_takes(project):
    qs = read_jsonl(project / "data/questions.jsonl")
    write_jsonl(project / "data/questions.jsonl", [*qs, {
        "id": "q-0100", "question": "How do I see the server version?", "source": "expert"}])
    with served(project) as url:
        waiting = row(url, "q-0100")
        assert (waiting["split"], waiting["answer"]) == ("unanswered", "")
        save(url, edit(waiting, answer="Run SELECT version(); in psql."))
        curate_now(project)
        answered = row(url, "q-0100")
    assert answered["split"] in review.SPLITS and answered["source"] == "expert"
    assert answered["answer"] == "Run SELECT version(); in psql." and not answered["pending"]


def test_serve_refuses_a_corrections_file_outside_data_with_one_line(project):
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pipeline", "review", "serve", "--corrections",
                           "../elsewhere.jsonl"], cwd=project, capture_output=True, text=True,
                          timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 1
    assert done.stderr.startswith("error: ../elsewhere.jsonl: review serve writes only inside")
    assert "Traceback" not in done.stderr and not (project.parent / "elsewhere.jsonl").exists()


def test_a_broken_corrections_line_is_shown_with_its_place_and_blocks_saves(project):
    (project / "data/corrections.jsonl").write_text('{"id": "q-0002", "action": "rename"}\n')
    with served(project) as url:
        with pytest.raises(urllib.error.HTTPError) as err:
            get(url)
        assert "corrections.jsonl:1" in json.loads(err.value.read())["error"]
        status, reply = post(url, {"version": "0" * 64, "edits": [{"id": "q-0002"}]})
    assert status == 422 and "rename" in reply["error"]
    assert (project / "data/corrections.jsonl").read_text() == (
        '{"id": "q-0002", "action": "rename"}\n')


def test_a_chunked_save_past_the_limit_is_cut_off_while_it_is_read(project):
    """No Content-Length to refuse early: the server must stop at the limit, not read it all."""
    import socket
    import threading

    with served(project) as url:
        host, port = url.split("//")[1].split(":")
        head = (f"POST /api/save HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                f"X-Tuneline-Token: {page_token(url)}\r\n\r\n").encode()
        chunk = 2**16
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(head)

            def send_past_the_limit() -> None:  # and never the last chunk: the body never ends
                try:
                    for _ in range(review_server.BODY_MAX // chunk + 2):
                        sock.sendall(b"%x\r\n%s\r\n" % (chunk, b" " * chunk))
                except OSError:
                    pass  # the server answered and closed: that is the point

            sender = threading.Thread(target=send_past_the_limit, daemon=True)
            sender.start()
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                data = sock.recv(65536)
                if not data:
                    break
                reply += data
            sender.join(timeout=30)
    status = int(reply.split(b" ", 2)[1])
    assert status == 413 and b"at most" in reply
    assert (project / "data/corrections.jsonl").read_text() == ""


def raw(url: str, method: str, path: str, headers: dict[str, str],
        body: bytes | None = None) -> tuple[int, dict[str, Any]]:
    """A request with exactly these headers (Host and Origin included), as a hostile page's
    browser would send it after DNS rebinding."""
    import http.client

    conn = http.client.HTTPConnection(url.split("//")[1], timeout=30)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for k, v in headers.items():
        conn.putheader(k, v)
    if body is not None:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    res = conn.getresponse()
    data = res.read()
    conn.close()
    try:
        return res.status, json.loads(data)
    except ValueError:
        return res.status, {"page": data.decode(errors="replace")}


@pytest.mark.parametrize("started_for", ["127.0.0.1", "0.0.0.0", "::"])
def test_forged_host_and_origin_can_neither_read_nor_write(project, started_for):
    import socket

    with served(project, started_for) as url:
        port = url.rsplit(":", 1)[1]
        token = page_token(url)
        r = row(url, "q-0002")
        body = json.dumps({"version": get(url)["version"],
                           "edits": [edit(r, answer="Written by evil.example.")]}).encode()
        write = {"Content-Type": "application/json", "X-Tuneline-Token": token}
        # DNS rebinding: evil.example resolves to this machine; its page sends its own name.
        evil = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
        assert raw(url, "GET", "/api/rows", evil)[0] == 400
        assert raw(url, "GET", "/", evil)[0] == 400
        assert raw(url, "POST", "/api/save", {**evil, **write}, body)[0] == 400
        # A right Host does not let a foreign Origin in (Origin is checked against the list).
        ours = {"Host": f"127.0.0.1:{port}"}
        for origin in (f"http://evil.example:{port}", "null", "http://127.0.0.1:1",
                       f"https://127.0.0.1:{port}"):
            assert raw(url, "POST", "/api/save", {**ours, **write, "Origin": origin},
                       body)[0] == 403, origin
            assert raw(url, "GET", "/api/rows", {**ours, "Origin": origin})[0] == 403, origin
        # Writes need the page's token: without it, or with another, nothing is written.
        assert raw(url, "POST", "/api/save", {**ours, "Content-Type": "application/json"},
                   body)[0] == 403
        assert raw(url, "POST", "/api/save", {**ours, **write, "X-Tuneline-Token": "x" * 43},
                   body)[0] == 403
        assert (project / "data/corrections.jsonl").read_text() == ""
        # The names it was started for still work, the page's own Origin included.
        for name in ("localhost", "127.0.0.1", "[::1]"):
            assert raw(url, "GET", "/api/rows", {"Host": f"{name}:{port}"})[0] == 200, name
        mine = socket.gethostname()
        expected = 200 if started_for in ("0.0.0.0", "::") else 400
        assert raw(url, "GET", "/api/rows", {"Host": f"{mine}:{port}"})[0] == expected
        status, reply = raw(url, "POST", "/api/save", {
            **ours, **write, "Origin": f"http://127.0.0.1:{port}"}, body)
        assert status == 200, reply
    assert corrections.load(project / "data/corrections.jsonl")[0].row["answer"] == (
        "Written by evil.example.")


def test_two_tabs_a_stale_edit_never_overwrites_and_gets_both_texts(project):
    with served(project) as url:
        tab_b = row(url, "q-0003")  # tab B opens q-0003 (then moves to another page)
        save(url, edit(row(url, "q-0003"), answer="Tab A's answer."))  # tab A saves first
        saved = (project / "data/corrections.jsonl").read_bytes()
        # Tab B reloaded after its 409 (a fresh version) but still holds its older edit.
        status, reply = post(url, {"version": get(url)["version"], "edits": [
            edit(tab_b, answer="Tab B's answer."),
            edit(row(url, "q-0004"), answer="An unrelated edit.")]})
        assert status == 409, reply
        assert (project / "data/corrections.jsonl").read_bytes() == saved  # nothing written
        [conflict] = reply["conflicts"]
        assert (conflict["id"], conflict["fields"], conflict["edited"]) == (
            "q-0003", ["answer"], ["answer"])
        assert conflict["theirs"]["answer"] == "Tab A's answer."
        assert conflict["mine"]["answer"] == "Tab B's answer."
        assert conflict["theirs"]["question"] == tab_b["question"]
        assert "q-0003" in reply["error"] and "answer" in reply["error"]
        assert row(url, "q-0003")["answer"] == "Tab A's answer."
        # B chooses, with the current text as its base: a merge of both.
        merged = "Tab A's answer. Tab B's answer."
        save(url, edit(tab_b, answer=merged, base=conflict["base"]))
        assert row(url, "q-0003")["answer"] == merged


def test_the_same_new_question_twice_in_one_save_is_refused_naming_both(project):
    with served(project) as url:
        new = {"id": "", "question": "How do I list extensions?", "base": {}}
        status, reply = post(url, {"version": get(url)["version"], "edits": [
            {**new, "answer": "Run \\dx in psql."}, {**new, "answer": "Query pg_extension."}]})
    assert status == 422 and "edit 1 and edit 2" in reply["error"]
    assert "same question" in reply["error"]
    assert (project / "data/corrections.jsonl").read_text() == ""


def test_a_stale_question_edit_keeps_the_answer_another_tab_saved(project):
    with served(project) as url:
        tab_b = row(url, "q-0004")
        save(url, edit(row(url, "q-0004"), answer="Tab A's answer."))
        # Tab B changed only the question, on the old page: the answer it holds is the old one.
        save(url, edit(tab_b, question="How do I configure subsystem4, the short way?"))
        now = row(url, "q-0004")
    assert (now["question"], now["answer"]) == (
        "How do I configure subsystem4, the short way?", "Tab A's answer.")
