"""Sheet cells that spreadsheet apps would run as formulas, escaped on export, unescaped on apply."""

from __future__ import annotations

import re

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
