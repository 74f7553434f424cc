"""The review sheet's cells: columns, the escape against spreadsheet formulas (undone on apply),
and reading a sheet back as the app saved it."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from pipeline.core.errors import UserError

COLUMNS = ("id", "action", "split", "source", "question", "answer", "followup",
           "followup_answer", "_base")
EDITABLE = ("question", "answer", "followup", "followup_answer")


class ReviewError(UserError):
    """A sheet that cannot be applied: names the sheet row and what to do."""


# A cell starting with one of these runs as a formula in spreadsheet apps (CSV injection), and
# "- item" comes back as #NAME?. Export prefixes such cells (and ones starting with the quote
# itself) with a quote, which apps show as text; apply removes exactly that quote again.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")
SPREADSHEET_ERRORS = re.compile(
    r"#(NAME\?|VALUE!|REF!|DIV/0!|N/A|NUM!|NULL!|ERROR!|SPILL!|CALC!)|Err:\d{3}")


def escape_cell(text: str) -> str:
    stripped = text.lstrip()
    return "'" + stripped if stripped.startswith(FORMULA_START) else text


def unescape_cell(text: str) -> str:
    return text[1:] if text.startswith("'") and text[1:].startswith(FORMULA_START) else text


def escape_exact(text: str) -> str:
    """escape_cell for the id and source columns, where apply needs the exact text back: leading
    spaces are kept (never stripped) and the quote goes in front of them."""
    return "'" + text if text.lstrip().startswith(FORMULA_START) else text


def unescape_exact(text: str) -> str:
    return text[1:] if text.startswith("'") and text[1:].lstrip().startswith(FORMULA_START) else text


def read_sheet(sheet: Path) -> list[tuple[int, dict[str, str]]]:
    if not sheet.exists():
        raise ReviewError(f"{sheet}: not found; run `tuneline review export --sheet {sheet}` first")
    text = _decode(sheet)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ReviewError(f"{sheet}: columns {missing} are missing; keep the exported header "
                              "row (you may reorder columns, not rename them)")
        # Row 1 is the header, as a spreadsheet app numbers it.
        rows = [(n, _cells(r)) for n, r in enumerate(reader, start=2)]
    except csv.Error as exc:
        raise ReviewError(f"{sheet}:{reader.line_num}: not a readable CSV sheet ({exc}); save it "
                          "from the spreadsheet app as CSV UTF-8") from None
    return rows


def _decode(sheet: Path) -> str:
    data = sheet.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ReviewError(
            f"{sheet}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x}); the sheet was saved in a "
            "legacy encoding (Windows 'CSV'): save it as 'CSV UTF-8' and apply again") from None


def _cells(raw: dict[str, str | None]) -> dict[str, str]:
    cells = {c: _cell(raw.get(c)) for c in COLUMNS}
    rid = unescape_exact(raw.get("id") or "")
    cells["id"] = rid if rid.strip() else ""  # ids come back exactly as exported
    return cells


def _cell(value: str | None) -> str:
    # Only the app's CRLF is undone: a lone CR in the text stays (digest() ignores the difference).
    return unescape_cell((value or "").replace("\r\n", "\n").strip())
