"""Review: `tuneline review export --sheet review.csv`, edit the sheet, then
`tuneline review apply --sheet review.csv` turns what you changed into data/corrections.jsonl lines.
`tuneline review serve` (review_server.py) saves through the same function, `save_edits`.

The sheet (CSV, UTF-8, opens in any spreadsheet app) has one row per dataset row plus the questions
dropped by corrections. Columns you edit:
- action: `drop` removes the question; clear it on a dropped row to bring the question back
- question, answer, followup, followup_answer: the conversation (first two turns)
- a row with an empty id and a question + answer adds a new expert conversation (its id comes
  from the question: a second new conversation with the same question is refused, never merged)
Columns for information: id, split, source (escaped like the text cells, read back exactly). The last column, _base, records what was exported;
apply compares each cell with it, so only cells you changed become corrections:
- answer changed -> replace_answer; follow-up changed -> replace_followup (both cells empty
  removes the follow-up); question changed -> add_conversation (the whole row, pinned as expert)
- a cell changed back to what was exported -> the correction this sheet made is removed again
- applying the same sheet twice changes nothing the second time; a sheet exported before the
  answers were regenerated still applies your edits (and only them): untouched cells never pin
  an old generated answer.
- a cell whose text an expert changed since the export (the dataset's row is an expert's now) is
  never overwritten: apply refuses it with both texts; export a fresh sheet and redo the edit.
  `review serve` goes further: any edit made on text that has changed since is refused with both
  texts (save_edits(refuse_stale=True)), and the page lets the expert choose.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.commands.review_cells import (
    COLUMNS,
    EDITABLE,
    SPREADSHEET_ERRORS,
    ReviewError,
    escape_cell,
    escape_exact,
    read_sheet,
)
from pipeline.commands.review_lines import Lines
from pipeline.rows.jsonl import read_jsonl, write_text

SPLITS = ("train", "valid", "test")
SOURCE = "_source"  # in the current cells of a row: who wrote it ("expert": never overwritten)


def digest(text: str) -> str:
    return hashlib.sha256(_norm(text).encode()).hexdigest()[:16]


def _norm(text: str | None) -> str:
    # Spreadsheet apps turn \n into \r\n inside cells: that is not an edit.
    return (text or "").replace("\r\n", "\n").replace("\r", "\n").strip()


@dataclass(frozen=True)
class ExportResult:
    rows: int
    dropped: int


def export(dataset: Path, corrections: Path, questions: Path, sheet: Path) -> ExportResult:
    rows = []
    for split in SPLITS:
        path = dataset / f"{split}.jsonl"
        for row in read_jsonl(path) if path.exists() else []:
            rows.append(_sheet_row(row, split))
    dropped = _dropped_rows(corrections, questions)
    rows += dropped
    buf = io.StringIO()
    # "\r\n" as RFC 4180 has it: the writer then quotes every cell holding a "\r" or a "\n"
    # (with "\n" it left a lone CR bare, and readers split the row there).
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows({**r, "id": escape_exact(r["id"]), "source": escape_exact(r["source"])}
                     for r in sorted(rows, key=lambda r: r["id"]))
    write_text(sheet, "\ufeff" + buf.getvalue())  # BOM: Excel then reads UTF-8 correctly
    return ExportResult(len(rows), len(dropped))


def _turns(messages: list[dict[str, str]]) -> list[str]:
    return [m["content"] for m in messages if m["role"] in ("user", "assistant")]


def _sheet_row(row: dict[str, Any], split: str) -> dict[str, str]:
    turns = _turns(row["messages"]) + [""] * 4
    cells = dict(zip(EDITABLE, turns[:4]))
    base = {k: digest(v) for k, v in cells.items()}
    return {"id": row["id"], "action": "", "split": split, "source": row.get("source", ""),
            **{k: escape_cell(v) for k, v in cells.items()}, "_base": json.dumps(base, sort_keys=True)}


def _dropped_rows(corrections: Path, questions: Path) -> list[dict[str, str]]:
    from pipeline.rows import corrections as corr_mod

    known = {}
    if questions.exists():
        known = {r["id"]: r.get("question", "") for r in read_jsonl(questions)}
    out, seen = [], set()
    for corr in corr_mod.load(corrections):
        if corr.action == "drop" and corr.id not in seen:
            seen.add(corr.id)
            question = known.get(corr.id) or corr.row.get("question") or ""
            out.append({"id": corr.id, "action": "drop", "split": "", "source": "",
                        "question": escape_cell(question), "answer": "", "followup": "",
                        "followup_answer": "", "_base": json.dumps({"drop": True})})
    return out


@dataclass
class ApplyResult:
    changed: list[str] = field(default_factory=list)  # "q-0003 replace_answer (set)"
    notes: list[str] = field(default_factory=list)


def apply(sheet: Path, corrections: Path, dataset: Path) -> ApplyResult:
    """Sheet edits -> corrections; idempotent."""
    edits = []
    for n, cells in read_sheet(sheet):
        base = _base(n, cells)
        _check_no_spreadsheet_error(sheet, n, cells, base)
        edits.append(Edit(f"sheet row {n}", cells, base))
    return save_edits(edits, corrections, dataset)


@dataclass(frozen=True)
class Edit:
    """One conversation as an editor left it: a sheet row or a save from `review serve`."""

    where: str                # "sheet row 7", "edit 2 (q-0003)": named in errors
    cells: dict[str, str]     # id, action and EDITABLE, normalised by _norm
    base: dict[str, Any]      # digests of what the editor was shown (the sheet's _base)
    reviewed: bool | None = None  # True: mark reviewed; False: clear the mark; None: leave it


class StaleError(ReviewError):
    """The corrections file changed since the editor loaded it."""


class ConflictError(StaleError):
    """Edits made on text that has changed since (another tab saved first): each conflict holds
    both texts, so the editor can choose; nothing was written."""

    def __init__(self, message: str, conflicts: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.conflicts = conflicts


def version(corrections: Path) -> str:
    """sha256 of data/corrections.jsonl as it is now (an absent file counts as empty)."""
    data = corrections.read_bytes() if corrections.exists() else b""
    return hashlib.sha256(data).hexdigest()


def save_edits(edits: list[Edit], corrections: Path, dataset: Path,
               expect_version: str | None = None,
               current: dict[str, dict[str, str]] | None = None,
               refuse_stale: bool = False) -> ApplyResult:
    """The one path from edits to correction lines (CSV apply and `review serve`): only lines
    that change are rewritten, the file is replaced atomically, nothing is written on error.
    `current`: the cells by id as they are now, where the caller has them (the page's view).
    `refuse_stale`: an edited cell whose text changed since the editor saw it (its base is not
    the current text) raises ConflictError with both texts instead of overwriting; without it
    (a sheet exported before answers were regenerated) the edit wins and a note says so."""
    if expect_version is not None and version(corrections) != expect_version:
        raise StaleError(f"{corrections} changed since this page was loaded (another tab, a "
                         "teammate's git pull?); reload to see the current state, then redo the "
                         "edits that are not there yet")
    lines, result = Lines.read(corrections), ApplyResult()
    _check_new_conversations(edits, lines, corrections)
    current = _current_answers(dataset) if current is None else current
    if refuse_stale:
        conflicts = [c for e in edits if (c := _conflict(e, current.get(e.cells["id"])))]
        if conflicts:
            raise ConflictError(
                "; ".join(f"{c['where']} ({c['id']}): {', '.join(c['fields'])} changed since you "
                          "edited it (another tab or a teammate saved first)" for c in conflicts)
                + "; nothing was saved: choose which text to keep, then save again", conflicts)
    for edit in edits:
        cells, base, where = edit.cells, edit.base, edit.where
        if not cells["id"]:
            _new_conversation(where, cells, lines, result)
        elif cells["action"] == "drop" or base.get("drop"):
            _drop(cells, base, lines, result)
        else:
            _edit(where, cells, base, lines, result, current.get(cells["id"]))
        if edit.reviewed is not None and cells["id"]:
            _reviewed(cells, edit.reviewed, lines, result)
    if result.changed:
        lines.write(corrections)
    return result


def _conflict(edit: Edit, now: dict[str, str] | None) -> dict[str, Any] | None:
    """Both texts of each cell this edit changed where the current text is neither the one the
    editor started from nor the editor's own."""
    cells, base = edit.cells, edit.base
    if not cells["id"] or now is None or cells["action"] == "drop" or base.get("drop"):
        return None
    edited = [k for k in EDITABLE if _changed(cells, base, k)]
    stale = [k for k in edited
             if digest(now.get(k, "")) not in (base.get(k), digest(cells[k]))]
    if not stale:
        return None
    return {"where": edit.where, "id": cells["id"], "fields": stale, "edited": edited,
            "theirs": {k: now.get(k, "") for k in EDITABLE},
            "mine": {k: cells[k] for k in EDITABLE},
            "base": {k: digest(now.get(k, "")) for k in EDITABLE}}


def conversation_digest(cells: dict[str, str]) -> str:
    """What a `reviewed` line vouches for: the conversation's turns as the reviewer saw them."""
    return digest("\x1e".join(_norm(cells.get(k)) for k in EDITABLE))


def _reviewed(cells: dict[str, str], on: bool, lines: Lines, result: ApplyResult) -> None:
    rid = cells["id"]
    if not on:
        if lines.remove(rid, "reviewed"):
            result.changed.append(f"{rid} reviewed (removed)")
        return
    row = {"id": rid, "action": "reviewed", "digest": conversation_digest(cells),
           "question": cells["question"]}
    if lines.set(row):
        result.changed.append(f"{rid} reviewed (set)")


def _check_no_spreadsheet_error(sheet: Path, n: int, cells: dict[str, str],
                                base: dict[str, Any]) -> None:
    for key in EDITABLE:
        if "\x00" in cells[key] and _changed(cells, base, key):
            raise ReviewError(f"{sheet}: row {n} ({cells['id'] or 'new'}): the {key} cell holds a "
                              "NUL byte (a damaged sheet); export a fresh sheet and edit again")
        if SPREADSHEET_ERRORS.fullmatch(cells[key]) and _changed(cells, base, key):
            raise ReviewError(
                f"{sheet}: row {n} ({cells['id'] or 'new'}): the {key} cell holds the spreadsheet "
                f"error {cells[key]} (the app ran the text as a formula); type the text again "
                "starting with a quote (') and apply again")


def _base(n: int, cells: dict[str, str]) -> dict[str, Any]:
    if not cells["_base"]:
        return {}
    try:
        return json.loads(cells["_base"])
    except ValueError:
        raise ReviewError(f"sheet row {n}: the _base column was edited; export a fresh sheet "
                          "(it records what was exported)") from None


def _changed(cells: dict[str, str], base: dict[str, Any], key: str) -> bool:
    return digest(cells[key]) != base.get(key)


def _drop(cells: dict[str, str], base: dict[str, Any], lines: Lines, result: ApplyResult) -> None:
    rid = cells["id"]
    if cells["action"] == "drop":
        if lines.find(rid, "drop") is None:
            lines.set({"id": rid, "action": "drop", "question": cells["question"]})
            result.changed.append(f"{rid} drop (set)")
    elif lines.remove(rid, "drop"):  # exported as dropped, action cleared: bring it back
        result.changed.append(f"{rid} drop (removed)")


def _edit(where: str, cells: dict[str, str], base: dict[str, Any], lines: Lines,
          result: ApplyResult, current: dict[str, str] | None) -> None:
    rid = cells["id"]
    if cells["action"] not in ("", "keep"):
        raise ReviewError(f"{where} ({rid}): action {cells['action']!r}: use drop or "
                          "leave it empty")
    now = current or {}
    stale = [k for k in EDITABLE if now and _changed(cells, base, k)
             and digest(now.get(k, "")) not in (base.get(k), digest(cells[k]))]
    if stale and now.get(SOURCE) == "expert":  # someone's work, not regenerated model output
        k = stale[0]
        raise ReviewError(
            f"{where} ({rid}): the {k} was changed by an expert since this sheet was exported "
            f"(a teammate, or you before `dvc repro`): now {_short(now[k])}, yours "
            f"{_short(cells[k])}; nothing was applied: export a fresh sheet (`tuneline review "
            "export`), redo the edit there (merge both texts where both matter) and apply it")
    if _changed(cells, base, "question") or lines.find(rid, "add_conversation"):
        if any(_changed(cells, base, k) for k in EDITABLE):
            # The whole conversation is written: cells the editor left alone take the current
            # text, never the older one the editor was shown.
            merged = {**cells, **{k: now[k] for k in EDITABLE if k in now and not _changed(
                cells, base, k) and digest(now[k]) != base.get(k)}}
            _set_conversation(where, merged, lines, result)
        return
    if stale:
        result.notes.append(f"{rid}: the dataset changed since this sheet was exported (answers "
                            "regenerated?); your edit replaces the current text")
    _answer(cells, base, lines, result)
    _followup(where, cells, base, lines, result)


def _answer(cells: dict[str, str], base: dict[str, Any], lines: Lines,
            result: ApplyResult) -> None:
    rid = cells["id"]
    if _changed(cells, base, "answer"):
        if not cells["answer"]:
            raise ReviewError(f"{rid}: the answer cell is empty; write an answer or put drop in "
                              "the action column")
        row = {"id": rid, "action": "replace_answer", "answer": cells["answer"],
               "question": cells["question"], "replaces": base.get("answer")}
        if lines.set(row):
            result.changed.append(f"{rid} replace_answer (set)")
        return
    made = lines.find(rid, "replace_answer")
    # Unchanged cell, but this very sheet made a correction earlier: the edit was undone.
    if made and made.get("replaces") == base.get("answer") and digest(made["answer"]) != base.get(
            "answer"):
        lines.remove(rid, "replace_answer")
        result.changed.append(f"{rid} replace_answer (removed)")


def _followup(where: str, cells: dict[str, str], base: dict[str, Any], lines: Lines,
              result: ApplyResult) -> None:
    rid = cells["id"]
    edited = _changed(cells, base, "followup") or _changed(cells, base, "followup_answer")
    marker = f"{base.get('followup')}:{base.get('followup_answer')}"
    if edited:
        if bool(cells["followup"]) != bool(cells["followup_answer"]):
            raise ReviewError(f"{where} ({rid}): fill both followup and followup_answer, "
                              "or clear both to remove the follow-up")
        row: dict[str, Any] = {"id": rid, "action": "replace_followup",
                               "followup": cells["followup"] or None}
        if cells["followup"]:
            row["followup_answer"] = cells["followup_answer"]
        row.update(question=cells["question"], replaces=marker)
        if lines.set(row):
            result.changed.append(f"{rid} replace_followup (set)")
        return
    made = lines.find(rid, "replace_followup")
    if made and made.get("replaces") == marker:
        lines.remove(rid, "replace_followup")
        result.changed.append(f"{rid} replace_followup (removed)")


def _messages(cells: dict[str, str]) -> list[dict[str, str]]:
    msgs = [{"role": "user", "content": cells["question"]},
            {"role": "assistant", "content": cells["answer"]}]
    if cells["followup"] and cells["followup_answer"]:
        msgs += [{"role": "user", "content": cells["followup"]},
                 {"role": "assistant", "content": cells["followup_answer"]}]
    return msgs


def _set_conversation(where: str, cells: dict[str, str], lines: Lines, result: ApplyResult) -> None:
    rid = cells["id"]
    if not cells["question"] or not cells["answer"]:
        raise ReviewError(f"{where} ({rid}): a conversation needs a question and an answer")
    row = {"id": rid, "action": "add_conversation", "messages": _messages(cells)}
    # The whole conversation is the expert's now: older per-turn edits would override it.
    for action in ("replace_answer", "replace_followup"):
        if lines.remove(rid, action):
            result.changed.append(f"{rid} {action} (removed)")
    if lines.set(row):
        result.changed.append(f"{rid} add_conversation (set)")


def new_id(question: str) -> str:
    """The id of an added conversation: from its question, so applying a sheet again adds nothing
    new (two conversations with one question are refused, never merged: _check_new_conversations)."""
    return f"expert-{digest(question)[:10]}"


def _check_new_conversations(edits: list[Edit], lines: Lines, corrections: Path) -> None:
    """A second added conversation with the same question would get the same id and replace the
    first one's line: refuse it, naming both, before anything is written."""
    seen: dict[str, str] = {}
    for edit in edits:
        cells = edit.cells
        if cells["id"] or not any(cells[k] for k in EDITABLE):
            continue
        rid = new_id(cells["question"])
        if rid in seen:
            raise ReviewError(
                f"{seen[rid]} and {edit.where} both add a conversation with the same question "
                f"({_short(cells['question'])}); they would share the id {rid} and the second "
                "would replace the first: merge them into one, or change one question")
        seen[rid] = edit.where
        hits = lines._hits(rid, "add_conversation")
        if hits and lines.rows[hits[-1]].get("messages") != _messages(cells):
            raise ReviewError(
                f"{edit.where}: {corrections}:{hits[-1] + 1} already holds a conversation with "
                f"the same question ({rid}: {_short(cells['question'])}) and other turns; to "
                "change that one, edit its row (a fresh `tuneline review export`, or the review "
                "page); to keep both, change this question")


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def _new_conversation(where: str, cells: dict[str, str], lines: Lines, result: ApplyResult) -> None:
    if not any(cells[k] for k in EDITABLE):
        return  # an empty line
    cells = {**cells, "id": new_id(cells["question"])}
    _set_conversation(where, cells, lines, result)


def _current_answers(dataset: Path) -> dict[str, dict[str, str]]:
    out = {}
    for split in SPLITS:
        path = dataset / f"{split}.jsonl"
        for row in read_jsonl(path) if path.exists() else []:
            turns = _turns(row["messages"]) + [""] * 4
            out[row["id"]] = {**dict(zip(EDITABLE, turns[:4])), SOURCE: row.get("source", "")}
    return out
