"""Hostile input at every entry point that reads a user's files.

Each case breaks one source file (questions, corrections, imports, review.csv, params.yaml, a
teammate's GGUF or safetensors), runs the real command through the CLI's `main()` and asserts what
an expert needs: exit code 1 or 2, exactly one `error:` line that names the file (and the line
where there is one) and says what to do, no traceback, no output written, every source file
byte-identical afterwards. LLM replies and Hub errors are covered in test_llm.py / test_publish.py.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipeline import cli

REPO = Path(__file__).resolve().parents[1]
OK = "Run the command shown above and check the log."


def jsonl(rows: list) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """A repository-shaped folder with good sources; cwd is its root."""
    (tmp_path / "data/imports").mkdir(parents=True)
    (tmp_path / "data/generated").mkdir()
    questions = [{"id": f"q-{i:04d}", "question": f"How do I configure subsystem{i} number "
                  f"{i * 7919}?", "source": "expert"} for i in range(1, 13)]
    (tmp_path / "data/questions.jsonl").write_text(jsonl(questions))
    answers = [{"id": q["id"], "question": q["question"], "answer": OK, "followup": None,
                "followup_answer": None, "model": "tiny", "backend": "test", "sampling": {},
                "finish_reason": "stop", "followup_finish_reason": None} for q in questions]
    (tmp_path / "data/generated/answers.jsonl").write_text(jsonl(answers))
    (tmp_path / "data/corrections.jsonl").write_text(jsonl([
        {"id": "q-0002", "action": "replace_answer", "answer": "The expert answer."}]))
    (tmp_path / "data/imports/seed.jsonl").write_text(jsonl([
        {"text": "<s>[INST] How do I vacuum?[/INST] Run VACUUM.</s>"}]))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["generate"].update(backend="ollama", url="http://127.0.0.1:9", retries=0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNELINE_NO_BLAS_PRELOAD", "1")  # main() must not re-exec pytest
    return tmp_path


CURATE = ["curate", "--generated", "data/generated/answers.jsonl", "--questions",
          "data/questions.jsonl", "--corrections", "data/corrections.jsonl", "--imports",
          "data/imports", "--out", "data/dataset", "--report", "reports/curate.json"]
GENERATE = ["generate", "--questions", "data/questions.jsonl", "--out",
            "data/generated/new.jsonl", "--metrics", "reports/generate.json", "--cache",
            ".tuneline/cache", "--base-model", "models/base"]
APPLY = ["review", "apply", "--sheet", "review.csv", "--dataset", "data/dataset",
         "--corrections", "data/corrections.jsonl"]
OUTPUTS = ("data/dataset", "reports", "data/generated/new.jsonl")


@dataclass(frozen=True)
class Case:
    name: str
    file: str  # the file to break, relative to the work folder
    content: bytes | Callable[[bytes], bytes]  # new bytes, or a function of the old ones
    command: list[str]
    says: tuple[str, ...]  # substrings of the error line (file:line, what is wrong / to do)


def _b(text: str) -> bytes:
    return text.encode("utf-8")


def append(extra: bytes) -> Callable[[bytes], bytes]:
    return lambda old: old + extra


CASES = [
    # questions.jsonl (generate reads it first; curate too)
    Case("questions-not-json", "data/questions.jsonl", append(b'{"id": "q-0099", "question": \n'),
         GENERATE, ("questions.jsonl:13", "not valid JSON")),
    Case("questions-cp1252", "data/questions.jsonl",
         append('{"id": "q-0099", "question": "Caf\u00e9?"}\n'.encode("cp1252")), GENERATE,
         ("questions.jsonl:13", "not UTF-8", "UTF-8")),
    Case("questions-lone-surrogate", "data/questions.jsonl",
         append(b'{"id": "q-0099", "question": "Cut \\ud83d?"}\n'), GENERATE,
         ("questions.jsonl:13", "lone surrogate")),
    Case("questions-array", "data/questions.jsonl", append(b'["q-0099", "A list?"]\n'), GENERATE,
         ("questions.jsonl:13", "JSON object")),
    Case("questions-duplicate-id", "data/questions.jsonl",
         append(b'{"id": "q-0001", "question": "Again?"}\n'), GENERATE,
         ("questions.jsonl", "row 13", "q-0001", "unique")),
    Case("questions-no-question", "data/questions.jsonl", append(b'{"id": "q-0099"}\n'), GENERATE,
         ("questions.jsonl", "row 13", "question")),
    Case("questions-number-question", "data/questions.jsonl",
         append(b'{"id": "q-0099", "question": 5}\n'), GENERATE, ("questions.jsonl", "q-0099")),
    Case("questions-curate-not-json", "data/questions.jsonl", append(b"{\n"), CURATE,
         ("questions.jsonl:13", "not valid JSON")),
    # corrections.jsonl (curate, review apply)
    Case("corrections-not-json", "data/corrections.jsonl", append(b'{"id": "q-0003",}\n'), CURATE,
         ("corrections.jsonl:2", "not valid JSON")),
    Case("corrections-unknown-action", "data/corrections.jsonl",
         append(b'{"id": "q-0003", "action": "rewrite"}\n'), CURATE,
         ("corrections.jsonl:2", "rewrite")),
    Case("corrections-no-id", "data/corrections.jsonl",
         append(b'{"action": "drop"}\n'), CURATE, ("corrections.jsonl:2", "id")),
    Case("corrections-lone-surrogate", "data/corrections.jsonl",
         append(b'{"id": "q-0003", "action": "replace_answer", "answer": "\\udc00"}\n'), CURATE,
         ("corrections.jsonl:2", "lone surrogate")),
    Case("corrections-cp1252", "data/corrections.jsonl",
         append('{"id": "q-0003", "action": "drop", "note": "\u00e9"}\n'.encode("cp1252")),
         CURATE, ("corrections.jsonl:2", "not UTF-8")),
    # imports
    Case("import-unknown-layout", "data/imports/seed.jsonl", append(b'{"question": "Q?"}\n'),
         CURATE, ("seed.jsonl:2",)),
    Case("import-mixed-layouts", "data/imports/seed.jsonl",
         append(b'{"prompt": "Q?", "completion": "A."}\n'), CURATE, ("seed.jsonl:2",)),
    Case("import-sharegpt-bad-role", "data/imports/share.jsonl",
         _b(jsonl([{"conversations": [{"from": "alien", "value": "Q?"},
                                      {"from": "gpt", "value": "A."}]}])), CURATE,
         ("share.jsonl:1", "alien")),
    Case("import-text-without-turns", "data/imports/plain.jsonl",
         _b(jsonl([{"text": "Just some prose without turn markers."}])), CURATE,
         ("plain.jsonl:1",)),
    Case("import-not-json", "data/imports/seed.jsonl", append(b"not json\n"), CURATE,
         ("seed.jsonl:2", "not valid JSON")),
    # params.yaml
    Case("params-not-yaml", "params.yaml", append(b"curate:\n\t- tab indented\n"), CURATE,
         ("params.yaml:", "not valid YAML", "indent with spaces")),
    Case("params-cp1252", "params.yaml", append("# caf\u00e9\n".encode("cp1252")), CURATE,
         ("params.yaml", "UTF-8")),
    Case("params-unknown-key", "params.yaml",
         lambda old: old.replace(b"curate:\n", b"curate:\n  valid_fractoin: 0.2\n", 1), CURATE,
         ("params.yaml", "valid_fractoin")),
    Case("params-missing-key", "params.yaml",
         lambda old: b"\n".join(line for line in old.split(b"\n")
                                if not line.startswith(b"  test_fraction:")), CURATE,
         ("params.yaml", "test_fraction")),
    Case("params-wrong-type", "params.yaml",
         lambda old: old.replace(b"  min_split_rows: 4", b"  min_split_rows: four", 1), CURATE,
         ("params.yaml", "min_split_rows")),
]


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".tuneline" not in p.parts}


def tuneline(monkeypatch, capsys, args: list[str]) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["tuneline", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err
    code = exit_.value.code
    return (code if isinstance(code, int) else 1), err


def assert_one_clear_error(code: int, err: str, says: tuple[str, ...]) -> None:
    assert code in (1, 2), err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, err
    assert errors[0] == lines[-1], err  # nothing after it
    for text in says:
        assert text in errors[0], (text, errors[0])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_source_file_gives_one_clear_error_and_changes_nothing(work, monkeypatch, capsys,
                                                                   case):
    target = work / case.file
    old = target.read_bytes() if target.exists() else b""
    target.write_bytes(case.content(old) if callable(case.content) else case.content)
    before = snapshot(work)
    code, err = tuneline(monkeypatch, capsys, case.command)
    assert_one_clear_error(code, err, case.says)
    assert snapshot(work) == before  # sources byte-identical, no output, no temporary left
    assert not any((work / out).exists() for out in OUTPUTS)


# --- review.csv ------------------------------------------------------------------------------


@pytest.fixture
def sheet(work, monkeypatch, capsys) -> Path:
    assert tuneline(monkeypatch, capsys, CURATE)[0] == 0
    assert tuneline(monkeypatch, capsys, ["review", "export", "--sheet", "review.csv",
                                          "--dataset", "data/dataset", "--corrections",
                                          "data/corrections.jsonl", "--questions",
                                          "data/questions.jsonl"])[0] == 0
    return work / "review.csv"


def edit_sheet(path: Path, rid: str, **cells: str) -> None:
    rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig"))))
    for row in rows:
        if row["id"] == rid:
            row.update(cells)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")


SHEETS = {
    "cp1252": (lambda p: p.write_bytes(p.read_text(encoding="utf-8-sig").replace(
        OK, "Caf\u00e9 " + OK, 1).encode("cp1252")), ("review.csv:", "not UTF-8", "CSV UTF-8")),
    "spreadsheet-error": (lambda p: edit_sheet(p, "q-0003", answer="#NAME?"),
                          ("q-0003", "#NAME?", "formula")),
    "missing-column": (lambda p: p.write_text(p.read_text(encoding="utf-8-sig").replace(
        "followup_answer", "follow_answer", 1), encoding="utf-8"), ("review.csv", "columns")),
    "base-edited": (lambda p: edit_sheet(p, "q-0003", _base="{oops"), ("row", "_base")),
    "nul-byte": (lambda p: p.write_bytes(p.read_bytes().replace(b"Run the", b"Run\x00the", 1)),
                 ("review.csv", "NUL")),
    "bad-action": (lambda p: edit_sheet(p, "q-0003", action="delete"), ("q-0003", "delete")),
    "half-followup": (lambda p: edit_sheet(p, "q-0003", followup="And then?"),
                      ("q-0003", "followup")),
}


@pytest.mark.parametrize("name", sorted(SHEETS))
def test_bad_review_sheet_gives_one_clear_error_and_keeps_corrections(sheet, monkeypatch,
                                                                      capsys, name):
    spoil, says = SHEETS[name]
    spoil(sheet)
    before = snapshot(sheet.parent)
    code, err = tuneline(monkeypatch, capsys, APPLY)
    assert_one_clear_error(code, err, says)
    assert snapshot(sheet.parent) == before


# --- a teammate's model files ----------------------------------------------------------------


def _use_base_model(work: Path, model: str) -> None:
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["base"]["model"] = model
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_a_truncated_gguf_as_base_model_is_one_clear_error(work, monkeypatch, capsys):
    from pipeline.base_model import embedded_gguf

    gguf = work / "teammate.gguf"
    gguf.write_bytes(embedded_gguf().read_bytes()[:100_000])  # a download cut short
    _use_base_model(work, str(gguf))
    before = snapshot(work)
    code, err = tuneline(monkeypatch, capsys, ["base-model", "--out", "models/base"])
    assert_one_clear_error(code, err, ("teammate.gguf",))
    assert snapshot(work) == before and not (work / "models/base").exists()


def test_a_gguf_that_is_not_one_is_one_clear_error(work, monkeypatch, capsys):
    gguf = work / "teammate.gguf"
    gguf.write_bytes(b"<html>404 Not Found</html>")
    _use_base_model(work, str(gguf))
    code, err = tuneline(monkeypatch, capsys, ["base-model", "--out", "models/base"])
    assert_one_clear_error(code, err, ("teammate.gguf",))
    assert not (work / "models/base").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupt_safetensors_model_is_one_clear_error(work, monkeypatch, capsys,
                                                        tiny_model_dir, damage):
    model = work / "teammate-model"
    shutil.copytree(tiny_model_dir, model)
    weights = next(model.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00" * 64)
    _use_base_model(work, str(model))
    before = snapshot(work)
    code, err = tuneline(monkeypatch, capsys, ["base-model", "--out", "models/base"])
    assert_one_clear_error(code, err, (weights.name,))
    assert snapshot(work) == before and not (work / "models/base").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_training_on_a_corrupt_safetensors_model_is_one_clear_error(work, monkeypatch, capsys,
                                                                    tiny_model_dir, damage):
    assert tuneline(monkeypatch, capsys, CURATE)[0] == 0
    model = work / "models/base"
    shutil.copytree(tiny_model_dir, model)
    weights = next(model.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00" * 64)
    before = snapshot(work)
    code, err = tuneline(monkeypatch, capsys, [
        "train", "--model", "models/base", "--data", "data/dataset", "--adapters",
        "models/adapters", "--metrics", "reports/train.json", "--curve",
        "reports/train_loss.tsv"])
    assert_one_clear_error(code, err, (weights.name,))
    assert snapshot(work) == before and not (work / "models/adapters").exists()
