"""JSONL and atomic file writes shared by every stage.

Writes go to a temporary file in the same folder and are renamed into place, so a crash never
leaves a half-written output that a later stage (or DVC) would mistake for a finished one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from pipeline.errors import UserError


class DataError(UserError):
    """Bad input data: the message names the file, the line and what to do."""


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    rows = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            rows.append(_parse_line(path, lineno, raw))
    return [r for r in rows if r is not None]


def _parse_line(path: Path, lineno: int, raw: bytes) -> dict[str, Any] | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:{lineno}: not UTF-8 ({exc.reason}); re-save the file as UTF-8")
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
            "each line must be one JSON object"
        ) from exc
    if not isinstance(row, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
    return row


def dumps(row: Any) -> str:
    return json.dumps(row, ensure_ascii=False, sort_keys=False)


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
    write_text(path, "".join(dumps(r) + "\n" for r in rows))


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
