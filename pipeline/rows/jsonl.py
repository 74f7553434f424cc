"""JSONL and atomic file writes shared by every stage.

Writes go to a temporary file in the same folder and are renamed into place, so a crash never
leaves a half-written output that a later stage (or DVC) would mistake for a finished one.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from pipeline.core.errors import UserError


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
        # orjson refuses lone surrogate escapes; json accepts them, and they crash later.
        _check_surrogates(path, lineno, row)
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


def _check_surrogates(path: Path, lineno: int, value: Any) -> None:
    """A lone UTF-16 surrogate escape ("\\ud83d") parses, then crashes whatever encodes it."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_surrogates(path, lineno, key)
            _check_surrogates(path, lineno, item)
    elif isinstance(value, list):
        for item in value:
            _check_surrogates(path, lineno, item)
    elif isinstance(value, str) and (m := _SURROGATE.search(value)):
        raise DataError(
            f"{path}:{lineno}: a lone surrogate escape \\u{ord(m.group()):04x} (half of an emoji "
            "or other character cut in two); write the whole character or its escape pair")


_SURROGATE = re.compile("[\ud800-\udfff]")


_LINE_BREAKS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file (a copy cut short, an HTML error page saved
    under the name), or None: the header parses and the file holds every byte it points at."""
    try:
        with path.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 2 <= size <= min(path.stat().st_size - 8, 100 << 20):
                return "no valid header"
            header = json.loads(fh.read(size))
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return "no valid header"
    need = 8 + size + max(ends, default=0)
    actual = path.stat().st_size
    return None if actual == need else f"{actual} bytes where the header needs {need}"


def check_safetensors(path: Path) -> None:
    problem = safetensors_problem(path)
    if problem is not None:
        raise DataError(f"{path}: not a complete safetensors file ({problem}); the copy is "
                        "damaged or cut short: copy or download it again")


def dumps(row: Any) -> str:
    # JSON allows U+2028/U+2029/U+0085 raw inside strings, but tools that split with
    # str.splitlines() (and some editors) break lines there: write them escaped.
    text = json.dumps(row, ensure_ascii=False, sort_keys=False)
    for char, escaped in _LINE_BREAKS.items():
        text = text.replace(char, escaped)
    return text


TMP_SUFFIX = ".tmp"  # `.*.tmp` is in .gitignore and .dvcignore: a killed run's leftover stays out of both


def _tmp_prefix(path: Path) -> str:
    # The pid lets the next run tell a dead run's leftover from a live one's work in progress.
    return f".{path.name}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(path: Path) -> None:
    """Remove temporaries that a killed run (SIGKILL, power loss) left next to `path`."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[^/]*{re.escape(TMP_SUFFIX)}(\.\w+)?")
    if not path.parent.is_dir():
        return
    for entry in path.parent.iterdir():
        m = pattern.fullmatch(entry.name)
        if m and not _pid_alive(int(m.group(1))):
            _remove(entry)


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


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
def atomic_path(path: Path | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it into place only on success.

    The data is fsynced before the rename and the folder after it, so a power loss leaves the old
    file or the new one; the replaced file's permissions are kept (mkstemp would make it 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    mode = path.stat().st_mode & 0o7777 if path.exists() else _new_file_mode()
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=TMP_SUFFIX + suffix,
                               dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)
        _fsync(tmp_path)
        os.replace(tmp_path, path)
        _fsync(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(text.encode("utf-8"))  # exactly these bytes: no newline translation


def write_json(path: Path | str, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# Measured each run, different on every run and machine: kept out of git-tracked metrics (and
# so out of dvc.lock), so a rerun that changes nothing changes no tracked byte.
VOLATILE_KEYS = frozenset({"wall_s", "wall_seconds", "completion_tokens_per_s", "tokens_per_second",
                           "steps_per_second", "peak_memory_gb", "process_peak_memory_gb",
                           "mlx_held_peak_gb",
                           "load_seconds", "check_seconds", "export_seconds", "mlx_seconds"})


def split_volatile(data: Any, volatile: frozenset[str] = VOLATILE_KEYS) -> tuple[Any, Any]:
    """(data without the `volatile` keys, the same shape holding only them), at any depth."""
    if isinstance(data, dict):
        kept, moved = {}, {}
        for key, value in data.items():
            if key in volatile:
                moved[key] = value
                continue
            kept[key], inner = split_volatile(value, volatile)
            if inner not in ({}, None):
                moved[key] = inner
        return kept, moved
    return data, None


def timings_path(path: Path | str) -> Path:
    """reports/train.json -> reports/train.timings.json (git-ignored, never a DVC output)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.timings.json")


def write_metrics(path: Path | str, data: dict[str, Any],
                  volatile: frozenset[str] = VOLATILE_KEYS) -> None:
    """A stage's tracked metrics file, and its volatile facts beside it in timings_path."""
    kept, volatile = split_volatile(data, volatile)
    write_json(path, kept)
    if volatile:
        write_json(timings_path(path), volatile)


def write_jsonl(path: Path | str, rows: Iterable[Any]) -> None:
    """Streamed into the temporary file: no second copy of the whole file in memory."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        fh.writelines(dumps(r) + "\n" for r in rows)


@contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Build a directory under a temporary name and swap it in only when complete.

    On Linux the swap is one renameat2(RENAME_EXCHANGE): `path` is never missing. Elsewhere it is
    two renames, and a run killed between them finds the old copy at `.NAME.old` next time and puts
    it back: the only good copy is never deleted.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover_old(path)
    clean_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=TMP_SUFFIX, dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; outputs are for the whole team
    try:
        yield tmp
        _fsync_tree(tmp)
        _swap_in(tmp, path)
        _fsync(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _old_copy(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _recover_old(path: Path) -> None:
    old = _old_copy(path)
    if not old.exists():
        return
    if path.exists():
        shutil.rmtree(old)  # the swap finished; only the cleanup was cut short
    else:
        old.rename(path)  # killed between the two renames: the old copy is the only good one


def _fsync_tree(root: Path) -> None:
    for folder, _dirs, files in os.walk(root):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


def _swap_in(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.rename(tmp, path)
        return
    if _exchange(tmp, path):
        shutil.rmtree(tmp)  # tmp now holds the previous output
        return
    old = _old_copy(path)
    path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system cannot."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0
