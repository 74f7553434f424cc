"""JSONL reading with line-numbered errors; atomic writes never leave half-written files."""

from __future__ import annotations

import pytest

from pipeline.jsonl import DataError, atomic_dir, read_jsonl, write_jsonl


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
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "w.bin").write_text("half")
            raise RuntimeError("crash")
    assert (out / "w.bin").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
