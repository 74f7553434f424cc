"""`tuneline review serve` in a real browser: Debian's headless Chromium driven by Selenium.

An expert opens the page, filters, edits an answer, drops a row and saves; the corrections file
then holds exactly those lines and `dvc repro` builds them into the dataset. No text from a row
ever runs as HTML or script.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.rows.jsonl import read_jsonl
from tests.browser import chromium
from tests.review_project import CURATE_STAGE, HOSTILE, make_project, served_cli

pytestmark = pytest.mark.slow
NEW_ANSWER = "Set option2 with ALTER SYSTEM SET, then SELECT pg_reload_conf(); no restart."


def run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(Path(__file__).parents[1]),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def dvc_project(root: Path) -> Path:
    """A git + DVC repository whose curate stage is dvc.yaml's, on tiny data."""
    make_project(root)
    shutil.rmtree(root / "data/dataset")
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"curate": CURATE_STAGE}}))
    run(["git", "init", "-q", "-b", "main"], root)
    run(["dvc", "init", "-q"], root)
    run(["dvc", "repro", "-q"], root)
    return root


def dataset(root: Path) -> dict[str, dict]:
    return {r["id"]: r for s in ("train", "valid", "test")
            for r in read_jsonl(root / f"data/dataset/{s}.jsonl")}


def wait_for(driver, script: str, timeout: float = 20):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout).until(lambda d: d.execute_script(script))
    except TimeoutException:
        shown = driver.execute_script("return document.querySelector('header').innerText")
        raise AssertionError(f"page never satisfied {script!r}; header shows: {shown}") from None


def cards(driver) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#rows .card')].map(c => c.dataset.id)")


def card(driver, rid: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f'#rows .card[data-id="{rid}"]')


def search(driver, text: str, expect: int) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "f-q")
    box.clear()
    box.send_keys(text)
    wait_for(driver, f"return document.getElementById('f-q').value === {json.dumps(text)} && "
                     f"document.getElementById('page').textContent.endsWith('of {expect}')")


def retype(field, text: str) -> None:
    """Replace a text field's whole content, as a user does: select all, delete, type."""
    from selenium.webdriver.common.keys import Keys

    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(text)


def keys(driver, *sequence: str) -> None:
    """Typed into the page as a person types: to whatever has focus."""
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(*sequence).perform()


def test_expert_edits_and_drops_in_the_browser_and_dvc_repro_builds_it(tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    root = dvc_project(tmp_path / "proj")
    before = dataset(root)
    assert "q-0004" in before and before["q-0002"]["messages"][1]["content"] != NEW_ANSWER
    with served_cli(root) as url, chromium(tmp_path) as driver:
        driver.get(url + "/")
        wait_for(driver, "return document.querySelectorAll('#rows .card').length === 12")
        assert driver.find_element(By.ID, "progress").text == "reviewed 0 / 12"

        # Filter: one split, then a text search.
        Select(driver.find_element(By.ID, "f-split")).select_by_value("test")
        wait_for(driver, "const cs = [...document.querySelectorAll('#rows .card')]; return "
                         "cs.length > 0 && cs.every(c => c.querySelector('.badge').textContent "
                         "=== 'test')")
        assert set(cards(driver)) == {r["id"] for r in before.values() if r["id"] in
                                      {x["id"] for x in read_jsonl(
                                          root / "data/dataset/test.jsonl")}}
        Select(driver.find_element(By.ID, "f-split")).select_by_value("")
        search(driver, "subsystem2 number", expect=1)
        assert cards(driver) == ["q-0002"]

        # Edit the answer, keyboard first: e focuses the answer of the focused card.
        keys(driver, Keys.ESCAPE, "e")
        answer = driver.switch_to.active_element
        assert answer.get_attribute("class") == "f-answer"
        retype(answer, NEW_ANSWER)
        keys(driver, Keys.ESCAPE)
        assert driver.find_element(By.ID, "save").text == "Save 1 change"

        # Drop another row with j (next conversation) and d (drop).
        search(driver, "subsystem", expect=12)
        assert cards(driver)[:5] == ["q-0000", "q-0001", "q-0002", "q-0003", "q-0004"]
        assert card(driver, "q-0002").find_element(By.CSS_SELECTOR, ".f-answer").get_attribute(
            "value") == NEW_ANSWER  # unsaved edits survive a new filter
        keys(driver, Keys.ESCAPE, "j", "j", "j", "j", "d")
        assert "dropped" in card(driver, "q-0004").get_attribute("class")
        assert driver.find_element(By.ID, "save").text == "Save 2 changes"

        ActionChains(driver).key_down(Keys.CONTROL).send_keys("s").key_up(Keys.CONTROL).perform()
        wait_for(driver, "return document.getElementById('status').textContent"
                         ".startsWith('Saved 2 correction')")
        wait_for(driver, "return document.getElementById('pending-count').textContent"
                         ".includes('2 saved change')")

    lines = [json.loads(x) for x in (root / "data/corrections.jsonl").read_text().splitlines()]
    assert [(c["id"], c["action"]) for c in lines] == [("q-0002", "replace_answer"),
                                                       ("q-0004", "drop")]
    assert lines[0]["answer"] == NEW_ANSWER

    out = run(["dvc", "repro"], root)
    assert "Running stage 'curate'" in out
    after = dataset(root)
    assert after["q-0002"]["messages"][1]["content"] == NEW_ANSWER
    assert after["q-0002"]["source"] == "expert"
    assert "q-0004" not in after and set(after) == set(before) - {"q-0004"}


def test_no_text_from_a_row_ever_runs_as_html_or_script(tmp_path):
    from selenium.webdriver.common.by import By

    root = make_project(tmp_path / "proj")
    with served_cli(root) as url, chromium(tmp_path) as driver:
        driver.get(url + "/")
        wait_for(driver, "return document.querySelectorAll('#rows .card').length === 12")
        hostile = card(driver, "q-0000")
        assert hostile.find_element(By.CSS_SELECTOR, ".f-answer").get_attribute("value") == (
            "Use this snippet: " + HOSTILE)
        finding = card(driver, "q-0001").find_element(By.CSS_SELECTOR, ".findings").text
        assert "answer <i>refuses</i>" in finding
        tuned = driver.find_elements(By.CSS_SELECTOR, ".tuned-answer")
        assert tuned and all("<u>" in t.text for t in tuned)
        # Nothing ran, and no element came out of a row's text.
        assert driver.execute_script("return window.__xss") is None
        assert driver.execute_script(
            "return document.querySelectorAll('#rows img, #rows script, #rows b, #rows u, "
            "#rows i').length") == 0


def test_a_save_from_a_stale_tab_is_refused_in_the_page(tmp_path):
    from selenium.webdriver.common.by import By

    root = make_project(tmp_path / "proj")
    with served_cli(root) as url, chromium(tmp_path) as driver:
        driver.get(url + "/")
        wait_for(driver, "return document.querySelectorAll('#rows .card').length === 12")
        # Another tab saved meanwhile.
        theirs = '{"id": "q-0005", "action": "drop"}\n'
        (root / "data/corrections.jsonl").write_text(theirs)
        card(driver, "q-0003").find_element(By.CSS_SELECTOR, "button.drop").click()
        driver.find_element(By.ID, "save").click()
        wait_for(driver, "return document.getElementById('status').textContent"
                         ".includes('changed since this page was loaded')")
        assert (root / "data/corrections.jsonl").read_text() == theirs
        driver.find_element(By.ID, "reload").click()
        wait_for(driver, "return document.getElementById('status').textContent"
                         ".includes('Reloaded')")
        driver.find_element(By.ID, "save").click()
        wait_for(driver, "return document.getElementById('status').textContent"
                         ".startsWith('Saved 1')")
    assert [json.loads(x)["id"] for x in (root / "data/corrections.jsonl").read_text(
        ).splitlines()] == ["q-0005", "q-0003"]


def test_add_a_conversation_mark_reviewed_and_restore_in_the_page(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    root = make_project(tmp_path / "proj", corrections=[{"id": "q-0003", "action": "drop"}])
    with served_cli(root) as url, chromium(tmp_path) as driver:
        driver.get(url + "/")
        wait_for(driver, "return document.querySelectorAll('#rows .card').length === 12")
        assert "dropped" in card(driver, "q-0003").get_attribute("class")
        driver.find_element(By.CSS_SELECTOR, "#add summary").click()
        driver.find_element(By.ID, "new-question").send_keys("How do I list installed extensions?")
        driver.find_element(By.ID, "new-answer").send_keys("Run \\dx in psql.")
        driver.find_element(By.ID, "add-button").click()
        search(driver, "subsystem", expect=12)
        keys(driver, Keys.ESCAPE, "j", "j", "r", "j", "d")  # q-0002 reviewed, q-0003 restored
        assert driver.find_element(By.ID, "save").text == "Save 3 changes"
        driver.find_element(By.ID, "save").click()
        wait_for(driver, "return document.getElementById('status').textContent"
                         ".startsWith('Saved 3')")
        wait_for(driver, "return document.getElementById('progress').textContent === "
                         "'reviewed 2 / 13'")  # q-0002 and the expert's new conversation
        # Restored: listed (without an answer) until dvc repro brings its answer back.
        assert card(driver, "q-0003").find_element(By.CSS_SELECTOR, ".badge").text == (
            "unanswered")
    lines = [json.loads(x) for x in (root / "data/corrections.jsonl").read_text().splitlines()]
    assert [c["action"] for c in lines] == ["reviewed", "add_conversation"]
    assert lines[0]["id"] == "q-0002"
    assert lines[1]["messages"][1]["content"] == "Run \\dx in psql."


def test_two_tabs_a_stale_edit_shows_both_texts_and_the_expert_merges(tmp_path):
    import urllib.request

    from selenium.webdriver.common.by import By

    from tests.review_project import page_token

    root = make_project(tmp_path / "proj")
    with served_cli(root) as url, chromium(tmp_path) as driver:
        driver.get(url + "/")
        wait_for(driver, "return document.querySelectorAll('#rows .card').length === 12")
        # Tab B edits q-0003, then filters it out of view (the edit stays, unsaved).
        answer = card(driver, "q-0003").find_element(By.CSS_SELECTOR, ".f-answer")
        retype(answer, "Tab B's answer.")
        search(driver, "subsystem2 number", expect=1)
        assert cards(driver) == ["q-0002"]
        # Tab A saves q-0003 meanwhile.
        with urllib.request.urlopen(url + "/api/rows?q=subsystem3+number", timeout=30) as res:
            seen = json.load(res)
        [r] = seen["rows"]
        body = {"version": seen["version"], "edits": [{
            "id": "q-0003", "action": "", "question": r["question"], "answer": "Tab A's answer.",
            "followup": r["followup"], "followup_answer": r["followup_answer"],
            "base": r["base"], "reviewed": None}]}
        req = urllib.request.Request(url + "/api/save", data=json.dumps(body).encode(),
                                     method="POST", headers={
                                         "Content-Type": "application/json",
                                         "X-Tuneline-Token": page_token(url)})
        urllib.request.urlopen(req, timeout=30).close()
        saved = (root / "data/corrections.jsonl").read_bytes()

        driver.find_element(By.ID, "save").click()  # the file changed: reload first
        wait_for(driver, "return !!document.getElementById('reload')")
        driver.find_element(By.ID, "reload").click()
        wait_for(driver, "return document.getElementById('status').textContent"
                         ".includes('Reloaded')")
        driver.find_element(By.ID, "save").click()  # B's edit is stale: both texts, no write
        wait_for(driver, "return document.querySelectorAll('#conflicts .conflict').length === 1")
        assert (root / "data/corrections.jsonl").read_bytes() == saved
        conflict = driver.find_element(By.CSS_SELECTOR, '#conflicts .conflict[data-id="q-0003"]')
        assert conflict.find_element(By.CSS_SELECTOR, "pre.theirs").text == "Tab A's answer."
        assert conflict.find_element(By.CSS_SELECTOR, "pre.mine").text == "Tab B's answer."
        merge = conflict.find_element(By.CSS_SELECTOR, "textarea.merge")
        retype(merge, "Tab A's answer, and what tab B added.")
        conflict.find_element(By.CSS_SELECTOR, "button.keep-merged").click()
        wait_for(driver, "return !document.getElementById('conflicts')")
        assert driver.find_element(By.ID, "save").text == "Save 1 change"
        driver.find_element(By.ID, "save").click()
        wait_for(driver, "return document.getElementById('status').textContent"
                         ".startsWith('Saved 1')")
    lines = [json.loads(x) for x in (root / "data/corrections.jsonl").read_text().splitlines()]
    assert [(c["id"], c["action"], c["answer"]) for c in lines] == [
        ("q-0003", "replace_answer", "Tab A's answer, and what tab B added.")]


def test_a_stale_edit_kept_as_theirs_writes_nothing_more(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    root = make_project(tmp_path / "proj")
    with served_cli(root) as url, chromium(tmp_path) as driver:
        driver.get(url + "/")
        wait_for(driver, "return document.querySelectorAll('#rows .card').length === 12")
        answer = card(driver, "q-0005").find_element(By.CSS_SELECTOR, ".f-answer")
        answer.send_keys(Keys.END, " Mine.")
        # A teammate's line for q-0005 arrives (git pull) while the edit is open.
        theirs = '{"id": "q-0005", "action": "replace_answer", "answer": "Theirs."}\n'
        (root / "data/corrections.jsonl").write_text(theirs)
        driver.find_element(By.ID, "save").click()
        wait_for(driver, "return !!document.getElementById('reload')")
        driver.find_element(By.ID, "reload").click()
        wait_for(driver, "return document.getElementById('status').textContent"
                         ".includes('Changed meanwhile: q-0005')")
        driver.find_element(By.ID, "save").click()
        wait_for(driver, "return document.querySelectorAll('#conflicts .conflict').length === 1")
        driver.find_element(By.CSS_SELECTOR, "#conflicts button.keep-theirs").click()
        wait_for(driver, "return !document.getElementById('conflicts')")
        assert driver.find_element(By.ID, "save").text == "Save"  # nothing left to save
        assert card(driver, "q-0005").find_element(By.CSS_SELECTOR, ".f-answer").get_attribute(
            "value") == "Theirs."
    assert (root / "data/corrections.jsonl").read_text() == theirs
