"""JSONL and atomic file writes shared by every stage.

Writes go to a temporary file in the same folder and are renamed into place, so a crash never
leaves a half-written output that a later stage (or DVC) would mistake for a finished one.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from pipeline.errors import UserError


class DataError(UserError):
    """Bad input data: the message names the file, the line and what to do."""


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    return [row for _, row in read_jsonl_numbered(path)]


def read_jsonl_numbered(path: Path | str) -> list[tuple[int, dict[str, Any]]]:
    """(1-based line number, row) for each non-blank line: messages can name the line."""
    return list(iter_jsonl_numbered(path))


def iter_jsonl_numbered(path: Path | str) -> Iterator[tuple[int, dict[str, Any]]]:
    """read_jsonl_numbered one row at a time: a caller that converts rows as it goes never holds
    every parsed dict at once (a million-row file is gigabytes of dicts)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            row = _parse_line(path, lineno, raw)
            if row is not None:
                yield lineno, row


def _parse_line(path: Path, lineno: int, raw: bytes) -> dict[str, Any] | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:{lineno}: not UTF-8 ({exc.reason}); re-save the file as UTF-8")
    if not text.strip():
        return None
    try:
        row = orjson.loads(text)  # ~3x json.loads: it matters at a million rows
    except orjson.JSONDecodeError:
        row = _json_loads(path, lineno, text)  # NaN, huge ints, or json's error message
    if not isinstance(row, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
    return row


def _json_loads(path: Path, lineno: int, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
            "each line must be one JSON object"
        ) from exc


def dumps(row: Any) -> str:
    return json.dumps(row, ensure_ascii=False, sort_keys=False)


@contextmanager
def paused_gc() -> Iterator[None]:
    """Bulk reads build millions of small dicts and lists and no cycles: Python's cyclic GC
    would rescan them again and again (bench/README.md, "Curate at scale")."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it into place only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path | str, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: Path | str, rows: Iterable[Any]) -> None:
    """Streamed into the temporary file: no second copy of the whole file in memory."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        fh.writelines(dumps(r) + "\n" for r in rows)


@contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Build a directory under a temporary name and swap it in only when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; outputs are for the whole team
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
