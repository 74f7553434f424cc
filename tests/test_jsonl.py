"""JSONL reading with line-numbered errors; atomic writes never leave half-written files."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.rows.jsonl import DataError, atomic_dir, atomic_path, read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def test_bad_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": 1}\n{"id": 2,}\n')
    with pytest.raises(DataError, match=r"q.jsonl:2: not valid JSON .* column"):
        read_jsonl(path)


def test_non_utf8_line_is_reported(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes(b'{"id": 1}\n{"q": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"q.jsonl:2: not UTF-8"):
        read_jsonl(path)


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl(path, rows())
    assert read_jsonl(path) == [{"a": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_atomic_dir_swaps_in_only_complete_directories(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "w.bin").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "w.bin").write_text("half")
        raise RuntimeError("crash")
    assert (out / "w.bin").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_replacing_a_file_keeps_its_permissions(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text("{}\n")
    path.chmod(0o664)
    write_jsonl(path, [{"a": 1}])
    assert stat.S_IMODE(path.stat().st_mode) == 0o664
    fresh = tmp_path / "new.jsonl"
    write_jsonl(fresh, [{"a": 1}])
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask


def test_write_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    write_jsonl(tmp_path / "out.jsonl", [{"a": 1}])
    assert events == ["fsync", "replace", "fsync"]  # file data, rename, then the folder entry


KILLED_WRITER = """
import sys, time
from pipeline.rows.jsonl import atomic_path, atomic_dir
target = sys.argv[1]
ctx = atomic_dir(target) if sys.argv[2] == "dir" else atomic_path(target)
with ctx as tmp:
    if sys.argv[2] == "dir":
        (tmp / "half.bin").write_text("half")
    else:
        tmp.write_text("half")
    print("writing", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_sigkill_mid_write_leaves_nothing_git_sees_and_next_run_cleans_up(tmp_path, kind):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    shutil.copy(ROOT / ".gitignore", tmp_path / ".gitignore")
    target = tmp_path / "data" / ("out.jsonl" if kind == "file" else "model")
    if kind == "file":
        write_jsonl(target, [{"a": 1}])
    else:
        with atomic_dir(target) as tmp:
            (tmp / "w.bin").write_text("v1")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target), kind],
                            stdout=subprocess.PIPE, text=True, env={**os.environ,
                                                                    "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline() == "writing\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = [p.name for p in target.parent.iterdir() if p.name != target.name]
    assert leftovers, "the killed writer should have left its temporary behind"
    status = subprocess.run(["git", "-C", str(tmp_path), "status", "--porcelain",
                             "--untracked-files=all"], capture_output=True, text=True, check=True)
    assert ".tmp" not in status.stdout
    if kind == "file":
        assert read_jsonl(target) == [{"a": 1}]
        write_jsonl(target, [{"a": 2}])
    else:
        assert (target / "w.bin").read_text() == "v1"
        with atomic_dir(target) as tmp:
            (tmp / "w.bin").write_text("v2")
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_a_live_writers_temporary_is_not_removed(tmp_path):
    path = tmp_path / "out.jsonl"
    with atomic_path(path) as tmp:
        tmp.write_text("mine")
        write_jsonl(path, [{"other": 1}])  # another write of the same file meanwhile
        assert tmp.read_text() == "mine"


def test_kill_between_the_two_renames_never_loses_the_only_good_copy(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "w.bin").write_text("v1")
    out.rename(tmp_path / ".model.old")  # what a kill after the first rename of a swap leaves
    with pytest.raises(RuntimeError), atomic_dir(out):
        raise RuntimeError("the next run fails too")
    assert (out / "w.bin").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_directory_swap_never_leaves_the_output_missing(tmp_path, monkeypatch):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "w.bin").write_text("v1")
    seen = []
    real_rename, real_rmtree = os.rename, shutil.rmtree

    def watch(fn):
        def wrapped(*args, **kw):
            seen.append(out.exists())
            return fn(*args, **kw)
        return wrapped

    monkeypatch.setattr(Path, "rename", watch(Path.rename))
    monkeypatch.setattr(os, "rename", watch(real_rename))
    monkeypatch.setattr(shutil, "rmtree", watch(real_rmtree))
    with atomic_dir(out) as tmp:
        (tmp / "w.bin").write_text("v2")
    seen.append(out.exists())
    assert all(seen) and (out / "w.bin").read_text() == "v2"


def test_line_separator_characters_are_written_escaped(tmp_path):
    row = {"answer": "one\u2028two\u2029three\x85four"}
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [row])
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) == 1 and "\\u2028" in text  # safe for splitlines() readers
    assert read_jsonl(path) == [row]
