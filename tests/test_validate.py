"""`tuneline validate` and the validate stage: every check fires at its line, exit codes, DVC."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny import make_tiny_tokenizer

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # before any test imports GX
from typer.testing import CliRunner

from pipeline import validate as stage
from pipeline.cli import app
from pipeline.core import config

REPO = Path(__file__).resolve().parents[1]
MAX_SEQ = 200
LONG = "VACUUM reclaims storage and ANALYZE collects statistics for the planner. " * 30


def chat(rid, question, answer, **extra):
    return {"id": rid, "source": "expert", "messages": [
        {"role": "user", "content": question}, {"role": "assistant", "content": answer}], **extra}


def msgs(rid, *pairs, **extra):
    return {"id": rid, "source": "expert",
            "messages": [{"role": r, "content": c} for r, c in pairs], **extra}


OK = "Run the command shown above and check the log."
# (line, check, id) for every defect; line 1 is clean except that line 17 repeats its question.
DEFECTS = [
    (2, "blank_line", None),
    (3, "json", None),
    (4, "json", None),
    (5, "format", "fmt-1"),
    (6, "schema", "sch-1"),
    (7, "schema", "sch-2"),
    (8, "roles", "rol-1"),
    (9, "turn_order", "ord-1"),
    (10, "turn_order", "ord-2"),
    (11, "empty_answer", "emp-1"),
    (12, "truncated", "trn-1"),
    (13, "unterminated", "unt-1"),
    (14, "refusal", "ref-1"),
    (15, "template_markers", "tpl-1"),
    (16, "answer_length", "len-1"),
    (1, "duplicate_question", "ok-1"),
    (17, "duplicate_question", "dup-1"),
    (18, "token_length", "tok-1"),
    (19, "utf8", None),
    (20, "format", "alp-1"),
]
LINES = [
    chat("ok-1", "How do I list tables?", OK),
    "",
    "{not json",
    "[1, 2]",
    {"id": "fmt-1", "source": "expert", "prompt": "Completions here?", "completion": OK},
    {"id": "sch-1", "messages": "Where is the list of messages?"},
    msgs("sch-2", ("user", "Is 5 a string?"), ("assistant", 5)),
    msgs("rol-1", ("user", "Who is the bot?"), ("bot", OK)),
    msgs("ord-1", ("assistant", OK), ("user", "Answer first?")),
    msgs("ord-2", ("user", "Question one?"), ("assistant", OK), ("user", "Unanswered?")),
    chat("emp-1", "Empty answer?", "   "),
    chat("trn-1", "Cut off?", OK, finish_reasons=["length"]),
    chat("unt-1", "Unterminated?", "It depends on the setting of the"),
    chat("ref-1", "Refusal?", "As an AI language model, I cannot help with that request."),
    chat("tpl-1", "[INST] Template in the question?", OK),
    chat("len-1", "Too short?", "Yes."),
    chat("dup-1", "how do I list   TABLES", OK),
    chat("tok-1", "Long answer?", LONG),
    b'\xff\xfe{"id": "bad"}',
    {"id": "alp-1", "instruction": "Alpaca here?", "output": OK},
]


def write_lines(path: Path, lines: list) -> Path:
    out = b""
    for line in lines:
        if isinstance(line, bytes):
            out += line + b"\n"
        else:
            out += (line if isinstance(line, str) else json.dumps(line)).encode() + b"\n"
    path.write_bytes(out)
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    make_tiny_tokenizer(out)
    return out / "tokenizer.json"


@pytest.fixture(scope="module")
def params_file(tmp_path_factory) -> Path:
    data = config.read_params(REPO / "params.yaml")
    data["train"]["max_seq_length"] = MAX_SEQ
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def cfg(params_file: Path, **severity) -> stage.ValidateConfig:
    c = config.load(stage.ValidateConfig, "validate", params_file)
    return dataclasses.replace(c, severity=dataclasses.replace(c.severity, **severity))


@pytest.fixture(scope="module")
def defects(tmp_path_factory, params_file, tokenizer):
    path = write_lines(tmp_path_factory.mktemp("defects") / "train.jsonl", LINES)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    report = stage.run(cfg(params_file), stage.ValidatePaths([path], tokenizer), max_seq_length=MAX_SEQ)
    return path, before, report


def test_every_defect_is_found_at_its_line_and_nothing_else(defects):
    _, _, report = defects
    found = {(f.line, f.check, f.id) for f in report.findings}
    assert found == set(DEFECTS)


def test_findings_carry_params_severity_and_a_message_that_says_what_to_do(defects, params_file):
    _, _, report = defects
    severity = config.read_params(params_file)["validate"]["severity"]
    by_check = {f.check: f for f in report.findings}
    assert all(f.severity == severity[f.check] for f in report.findings)
    dups = [f for f in report.findings if f.check == "duplicate_question"]
    assert "also at train.jsonl:17" in dups[0].message and "train.jsonl:1)" in dups[1].message
    assert "> train.max_seq_length 200" in by_check["token_length"].message
    assert "data.messages[1].content must be string" in {
        f.id: f for f in report.findings}["sch-2"].message
    assert "'[INST]'" in by_check["template_markers"].message
    assert not report.ok and report.errors > 0 and report.warnings == 3


def test_validation_never_modifies_its_input(defects):
    path, before, _ = defects
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
USER_LAYOUTS = {
    "chat": [{"messages": [{"role": "system", "content": "You are terse."},
                           {"role": "user", "content": f"How do I list tables number {i}?"},
                           {"role": "assistant", "content": OK}]} for i in range(3)],
    "chat_tools": [{"tools": TOOLS, "messages": [
        {"role": "user", "content": f"Weather in city {i}?"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": {"city": f"c{i}"}}}]},
        {"role": "tool", "content": "Sunny, 21 C."},
        {"role": "assistant", "content": "It is sunny and 21 degrees."}]} for i in range(3)],
    "completions": [{"prompt": f"List tables {i}?", "completion": OK} for i in range(3)],
    "text": [{"text": f"Tables are listed with \\dt, case {i}."} for i in range(3)],
    "inst_text": [{"text": f"<s>[INST] How do I list tables {i}?[/INST] {OK}</s>"}
                  for i in range(3)],
    "sharegpt": [{"conversations": [{"from": "human", "value": f"List tables {i}?"},
                                    {"from": "gpt", "value": OK}]} for i in range(3)],
    "alpaca": [{"instruction": f"List tables {i}.", "input": "", "output": OK} for i in range(3)],
}
LAYOUT_SHOWN = {"chat": "chat (messages)", "chat_tools": "chat (messages)",
                "completions": "completions (prompt/completion)", "text": "text",
                "inst_text": "text", "sharegpt": "ShareGPT (conversations)",
                "alpaca": "alpaca (instruction/output)"}


@pytest.mark.parametrize("layout", sorted(USER_LAYOUTS))
def test_plain_files_in_every_layout_pass_and_the_layout_is_named(tmp_path, params_file,
                                                                  tokenizer, layout):
    path = write_lines(tmp_path / f"{layout}.jsonl", USER_LAYOUTS[layout])
    out = CliRunner().invoke(app, ["validate", str(path), "--tokenizer", str(tokenizer),
                                   "--params", str(params_file)])
    assert out.exit_code == 0, out.output
    assert f"{path}: {LAYOUT_SHOWN[layout]} layout" in out.output


def test_a_plain_file_still_names_the_line_of_each_defect(tmp_path, params_file, tokenizer):
    rows = USER_LAYOUTS["chat_tools"] + [
        {"messages": [{"role": "user", "content": "Q?"}, {"role": "tool", "content": "x"}]},
        {"prompt": "mixed layout?", "completion": OK},
        {"conversations": [{"from": "human", "value": 5}]}]
    report = stage.run(cfg(params_file),
                       stage.ValidatePaths([write_lines(tmp_path / "t.jsonl", rows)], tokenizer),
                       max_seq_length=MAX_SEQ)
    assert {(f.line, f.check) for f in report.findings if f.severity == "error"} == {
        (4, "turn_order"), (5, "format"), (6, "format"), (6, "schema")}


def test_the_curated_dataset_demands_id_and_source_and_chat_roles(tmp_path, params_file,
                                                                  tokenizer):
    root = dataset(tmp_path / "dataset")
    write_lines(root / "valid.jsonl", [chat(f"v-{i}", f"Question valid {i}?", OK)
                                       for i in range(5)]
                + [{"id": "v-5", "messages": chat("x", "Where is the source field?", OK)[
                    "messages"]}])
    report = stage.run(cfg(params_file), stage.ValidatePaths([root], tokenizer),
                       max_seq_length=MAX_SEQ)
    [finding] = [f for f in report.findings if f.severity == "error"]
    assert (Path(finding.file).name, finding.line, finding.check) == ("valid.jsonl", 6, "schema")
    assert "required fields: ['id', 'source']" in finding.message


def dataset(root: Path, rows: int = 6, splits=("train", "valid", "test")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for s in splits:
        write_lines(root / f"{s}.jsonl", [chat(f"{s}-{i}", f"Question {s} number {i}?", OK)
                                          for i in range(rows)])
    return root


def test_a_clean_dataset_passes_and_writes_metrics_and_data_docs(tmp_path, params_file,
                                                                  tokenizer):
    data = dataset(tmp_path / "dataset")
    paths = stage.ValidatePaths([data], tokenizer.parent, tmp_path / "validation.json",
                                tmp_path / "docs")
    report = stage.run(cfg(params_file), paths, max_seq_length=MAX_SEQ)
    assert report.ok and report.findings == []
    metrics = json.loads((tmp_path / "validation.json").read_text())
    assert metrics["rows"] == 18 and metrics["errors"] == 0
    assert set(metrics["checks"]) == {f.name for f in dataclasses.fields(stage.Severity)}
    assert (tmp_path / "docs/index.html").exists()


def test_missing_and_empty_splits_and_leakage_across_splits(tmp_path, params_file, tokenizer):
    data = dataset(tmp_path / "dataset", splits=("train",))
    (data / "valid.jsonl").write_text("")
    write_lines(data / "valid.jsonl", [])
    with (data / "train.jsonl").open("a") as fh:
        fh.write(json.dumps(chat("t-9", "Question train number 0?", OK)) + "\n")
    report = stage.run(cfg(params_file), stage.ValidatePaths([data], tokenizer), max_seq_length=MAX_SEQ)
    found = {(Path(f.file).name, f.line, f.check) for f in report.findings}
    assert found == {("valid.jsonl", None, "splits"), ("test.jsonl", None, "splits"),
                     ("train.jsonl", 1, "duplicate_question"),
                     ("train.jsonl", 7, "duplicate_question")}


def test_duplicates_across_files_are_leakage(tmp_path, params_file, tokenizer):
    data = dataset(tmp_path / "dataset")
    write_lines(data / "test.jsonl", [chat("leak", "Question train number 3?", OK)])
    report = stage.run(cfg(params_file), stage.ValidatePaths([data], tokenizer), max_seq_length=MAX_SEQ)
    assert {(Path(f.file).name, f.line) for f in report.findings} == {
        ("train.jsonl", 4), ("test.jsonl", 1)}


def test_near_duplicates_across_splits_are_leaks_naming_both_rows(tmp_path, params_file,
                                                                  tokenizer):
    from validation.leakage import Leakage

    data = dataset(tmp_path / "dataset")
    write_lines(data / "train.jsonl", [chat("tr-1", "How do I rename a column in PostgreSQL?", OK),
                                       chat("tr-2", "如何修改用户的密码？", OK),
                                       chat("tr-3", "How do I list tables?", OK)])
    write_lines(data / "test.jsonl", [chat("te-1", "How can I rename columns in PostgreSQL?", OK),
                                      chat("te-2", "What is a tablespace?", OK)])
    write_lines(data / "valid.jsonl", [chat("va-1", "怎样修改用户密码", OK)])
    leak = Leakage(0.8, ())
    report = stage.run(cfg(params_file), stage.ValidatePaths([data], tokenizer),
                       max_seq_length=MAX_SEQ, leak=leak)
    found = {(f.id, f.check) for f in report.findings}
    assert found == {("tr-1", "leakage"), ("te-1", "leakage"), ("tr-2", "leakage"),
                     ("va-1", "leakage")}
    by_id = {f.id: f for f in report.findings}
    assert "test.jsonl:1 [te-1]" in by_id["tr-1"].message
    assert "train.jsonl:1 [tr-1]" in by_id["te-1"].message
    assert "valid.jsonl:1 [va-1]" in by_id["tr-2"].message
    assert not report.ok and by_id["tr-1"].severity == "error"


def test_a_train_row_near_an_evaluate_prompt_is_a_leak(tmp_path, params_file, tokenizer):
    from validation.leakage import Leakage

    data = dataset(tmp_path / "dataset")
    write_lines(data / "train.jsonl", [chat("tr-1", "What's the difference between VACUUM and "
                                                    "VACUUM FULL?", OK)])
    write_lines(data / "test.jsonl", [chat("te-1", "How do I see running queries?", OK)])
    prompts = ("What is the difference between VACUUM and VACUUM FULL?",
               "How do I see which queries are running right now?")
    report = stage.run(cfg(params_file), stage.ValidatePaths([data], tokenizer),
                       max_seq_length=MAX_SEQ, leak=Leakage(0.8, prompts))
    assert [(f.id, f.check) for f in report.findings] == [("tr-1", "leakage")]
    assert "evaluate.prompts[0]" in report.findings[0].message


def test_warning_severity_passes_and_off_skips(tmp_path, params_file, tokenizer):
    refusal = chat("a", "Refusal?", "As an AI language model, no.")
    path = write_lines(tmp_path / "x.jsonl", [refusal])
    warned = stage.run(cfg(params_file, refusal="warning"), stage.ValidatePaths([path], tokenizer),
                       max_seq_length=MAX_SEQ)
    assert warned.ok and [f.severity for f in warned.findings] == ["warning"]
    skipped = stage.run(cfg(params_file, refusal="off"), stage.ValidatePaths([path], tokenizer),
                         max_seq_length=MAX_SEQ)
    assert skipped.findings == [] and "refusal" not in skipped.checks


def test_without_a_tokenizer_token_length_is_skipped_and_said_so(tmp_path, params_file):
    path = write_lines(tmp_path / "x.jsonl", [chat("a", "Long?", LONG)])
    report = stage.run(cfg(params_file), stage.ValidatePaths([path], tmp_path / "no-model"),
                       max_seq_length=MAX_SEQ)
    assert report.ok and "token_length" not in report.checks
    assert report.skipped and "dvc repro base_model" in report.skipped[0]


def test_a_check_that_crashes_inside_gx_fails_loudly(tmp_path, params_file, monkeypatch):
    from validation import patterns

    def boom(text):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(patterns, "is_refusal", boom)
    path = write_lines(tmp_path / "x.jsonl", [chat("a", "Fine?", OK)])
    with pytest.raises(stage.ValidationCrash, match="check refusal could not run.*kaboom"):
        stage.run(cfg(params_file), stage.ValidatePaths([path], None), max_seq_length=MAX_SEQ)


def test_severity_keys_are_exactly_the_checks_of_the_suites():
    from validation.suites import CHECK_NAMES

    assert tuple(f.name for f in dataclasses.fields(stage.Severity)) == CHECK_NAMES


def test_custom_schema_expectation_agrees_with_the_gx_builtin(tmp_path):
    import great_expectations as gx
    import pandas as pd
    from great_expectations.data_context.types.base import ProgressBarsConfig

    from validation import expectations as custom
    from validation.suites import chat_schema

    schema = chat_schema(("id", "source"))
    raws = [json.dumps(r) if not isinstance(r, (str, bytes)) else r for r in LINES
            if not isinstance(r, bytes) and r not in ("", "{not json")]
    frame = pd.DataFrame({"raw": raws, "_i": range(len(raws))})
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = context.data_sources.add_pandas("p").add_dataframe_asset("a") \
        .add_batch_definition_whole_dataframe("b").get_batch(batch_parameters={"dataframe": frame})
    fmt = {"result_format": "COMPLETE", "unexpected_index_column_names": ["_i"]}
    built_in = batch.validate(gx.expectations.ExpectColumnValuesToMatchJsonSchema(
        column="raw", json_schema=schema), result_format=fmt)
    ours = batch.validate(custom.ExpectColumnValuesToMatchCompiledJsonSchema(
        column="raw", schema_text=json.dumps(schema)), result_format=fmt)
    def failing(r):
        return sorted(e["_i"] for e in r.result["unexpected_index_list"])
    assert failing(ours) == failing(built_in) and len(failing(ours)) == 5


runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["validate", *map(str, args)])


def test_cli_exit_codes_and_json_report(tmp_path, params_file, tokenizer, defects):
    path, _, _ = defects
    bad = invoke(path, "--json", "--tokenizer", tokenizer, "--params", params_file)
    assert bad.exit_code == 1
    report = json.loads(bad.stdout)
    assert report["errors"] > 0
    first = report["findings"][0]
    assert set(first) == {"file", "line", "id", "check", "severity", "message"}
    assert "errors" in bad.stderr and "train.jsonl:2: error blank_line" in bad.stderr

    clean = invoke(dataset(tmp_path / "d"), "--tokenizer", tokenizer, "--params", params_file)
    assert clean.exit_code == 0, clean.stderr
    missing = invoke(tmp_path / "nope.jsonl", "--params", params_file)
    assert missing.exit_code == 2 and "no such file" in missing.stderr
    assert invoke("--json").exit_code == 2  # no path: usage error


def test_dvc_yaml_declares_curate_and_validate_with_their_code_and_params():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    names = list(stages)
    assert names.index("curate") < names.index("validate") < names.index("train")
    assert {"pipeline/curate.py", "pipeline/rows/corrections.py", "pipeline/rows/formats.py",
            "data/corrections.jsonl", "data/imports"} <= set(stages["curate"]["deps"])
    assert stages["curate"]["params"] == ["curate", "evaluate.prompts"]
    assert {"pipeline/validate.py", "pipeline/rows/neardup.py", "validation"} <= set(
        stages["validate"]["deps"])
    assert "pipeline/rows/neardup.py" in stages["curate"]["deps"]
    assert stages["validate"]["params"] == ["validate", "train.max_seq_length",
                                            "curate.near_dup_threshold", "evaluate.prompts"]
    assert "reports/validation.json" in stages["train"]["deps"]


STANDINS = {
    "base_model": {"cmd": "mkdir -p models/base && cp tok.json models/base/tokenizer.json",
                   "deps": ["tok.json"], "outs": ["models/base"]},
    "generate": {"cmd": "mkdir -p data/generated && cp answers.jsonl data/generated/answers.jsonl",
                 "deps": ["answers.jsonl"], "outs": ["data/generated/answers.jsonl"]},
    "train": {"cmd": "mkdir -p models && cat data/dataset/train.jsonl | wc -l > models/trained",
              "deps": ["data/dataset/train.jsonl", "reports/validation.json"],
              "outs": ["models/trained"]},
}


@pytest.mark.slow
def test_dvc_repro_stops_at_validate_on_bad_data_and_keeps_earlier_outputs(tmp_path, tokenizer):
    """The real curate and validate stages of dvc.yaml, with stand-ins around them."""
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("params.yaml", "data/questions.jsonl", "data/corrections.jsonl"):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, work / name)
    shutil.copytree(REPO / "data/imports", work / "data/imports")
    shutil.copytree(REPO / "scripts", work / "scripts")  # the stage commands' wrapper
    shutil.copy(tokenizer, work / "tok.json")
    (work / "answers.jsonl").write_text("")
    real = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    stages = {**STANDINS, "curate": real["curate"], "validate": real["validate"]}
    for name in ("curate", "validate"):  # the stage code lives in the installed package
        stages[name]["deps"] = [d for d in stages[name]["deps"]
                                if not d.startswith(("pipeline/", "validation"))]
    (work / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def sh(*cmd, check=True):
        return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, check=check)

    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    sh("dvc", "repro")
    trained = (work / "models/trained").read_text()
    good = (work / "data/dataset/train.jsonl").read_bytes()
    with (work / "data/corrections.jsonl").open("a") as fh:
        fh.write(json.dumps({"id": "bad-1", "action": "add_conversation", "messages": [
            {"role": "user", "content": "Broken?"},
            {"role": "assistant", "content": "Yes [/INST] it leaks a template marker."}]}) + "\n")
    failed = sh("dvc", "repro", check=False)
    assert failed.returncode != 0
    assert "template_markers" in failed.stderr + failed.stdout
    assert "bad-1" in failed.stderr + failed.stdout
    assert (work / "models/trained").read_text() == trained  # train never ran on bad data
    cached = hashlib.md5(good).hexdigest()
    assert (work / ".dvc/cache/files/md5" / cached[:2] / cached[2:]).exists()
    report = json.loads((work / "reports/validation.json").read_text())
    assert report["checks"]["template_markers"]["failed"] == 1


# --- lines other readers refuse, and pathological input ---------------------------------------

GOOD_TEXT = b'{"text": "Tables are listed with \\\\dt."}'
DEEP = 1000  # orjson reads up to 1024 levels; Python's json stops near its recursion limit
STRICT_REFUSALS = {  # line 2 of a text file, and what its finding must say
    "deep_1000": (b'{"text": "Deep.", "x": ' + b"[" * DEEP + b"]" * DEEP + b"}",
                  "nested deeper than Python's json reads"),
    "cr_between_tokens": (b'{"text": "A carriage return",\r"id": "x"}', "carriage return"),
    "raw_control_char": (b'{"text": "tab\there"}', "not valid JSON (Invalid control character"),
    "int_10000_digits": (b'{"text": "Big.", "n": ' + b"7" * 10_000 + b"}",
                         "a number Python's json refuses (Exceeds the limit (4300 digits)"),
    "depth_100k": (b"[" * 100_000 + b"]" * 100_000, "nested deeper than Python's json reads"),
}
# Python's json takes these (mlx-lm would train on them), but they are not JSON: orjson (curate
# and the other tuneline readers), pyarrow and every other standard reader refuse them.
NON_STANDARD = {
    "nan": b'{"text": "Not a number.", "score": NaN}',
    "infinity": b'{"text": "Endless.", "score": -Infinity}',
    "lone_surrogate": b'{"text": "half \\ud800 a pair"}',
}


def mlx_lm_loads(folder: Path) -> bool:
    """Whether mlx-lm's own dataset loader reads the folder's train.jsonl."""
    from types import SimpleNamespace

    from mlx_lm.tuner.datasets import load_local_dataset

    try:
        load_local_dataset(folder, None, SimpleNamespace())
    except (ValueError, RecursionError):
        return False
    return True


@pytest.mark.parametrize("name", sorted(STRICT_REFUSALS) + sorted(NON_STANDARD))
def test_a_line_python_json_refuses_is_an_error_at_its_line(tmp_path, params_file, name):
    line, says = STRICT_REFUSALS.get(name) or (NON_STANDARD[name], "not standard JSON")
    path = tmp_path / "train.jsonl"
    path.write_bytes(GOOD_TEXT + b"\n" + line + b"\n" + GOOD_TEXT.replace(b"dt", b"dn") + b"\n")
    # The loader that will read it refuses it (or, for NaN and kin, only Python's json takes
    # it)...
    assert mlx_lm_loads(tmp_path) is (name in NON_STANDARD)
    report = stage.run(cfg(params_file), stage.ValidatePaths([path], None), max_seq_length=MAX_SEQ)
    errors = [(f.line, f.check) for f in report.findings if f.severity == "error"]
    assert errors == [(2, "json")], report.findings  # ...so validate does, at that line
    assert says in report.findings[0].message, report.findings[0].message


def test_what_mlx_lm_reads_validate_reads_too(tmp_path, params_file):
    lines = [GOOD_TEXT, b'{"text": "Nested ' + b"[" * 50 + b'", "x": ' + b"[" * 900 +
             b"]" * 900 + b"}", b'{"text": "Unicode \\u00e9 and \\ud83d\\ude00 pairs."}']
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\r\n")
    assert mlx_lm_loads(tmp_path)
    report = stage.run(cfg(params_file), stage.ValidatePaths([path], None), max_seq_length=MAX_SEQ)
    assert report.ok, report.findings


def test_a_50_mb_line_is_an_error_at_its_line_without_reading_it_whole(tmp_path, params_file):
    path = tmp_path / "train.jsonl"
    with path.open("wb") as out:
        out.write(GOOD_TEXT + b"\n" + b'{"text": "' + b"a" * (50 << 20) + b'."}\n' + GOOD_TEXT
                  .replace(b"dt", b"dn") + b"\n")
    report = stage.run(cfg(params_file), stage.ValidatePaths([path], None), max_seq_length=MAX_SEQ)
    assert [(f.line, f.check, f.severity) for f in report.findings] == [(2, "json", "error")]
    assert "the line is 50.0 MiB, longer than the 16 MiB" in report.findings[0].message
    assert report.rows == 3


def test_pathological_lines_through_the_command_exit_1_with_their_lines(tmp_path, params_file):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join([GOOD_TEXT] + [STRICT_REFUSALS[n][0] for n in (
        "deep_1000", "int_10000_digits", "depth_100k", "cr_between_tokens")]) + b"\n")
    out = invoke(path, "--params", params_file)
    assert out.exit_code == 1, out.output
    assert out.exception is None or isinstance(out.exception, SystemExit), out.exception
    assert "Traceback" not in out.output
    for line in (2, 3, 4, 5):
        assert f"train.jsonl:{line}: error json" in out.stderr, out.stderr


def test_an_answer_that_only_repeats_its_question_is_a_quality_warning(tmp_path, params_file):
    rows = [chat("q-1", "How do I list tables?", "You list tables."),
            chat("q-2", "How do I vacuum a table?", "How do I vacuum tables"),
            chat("q-3", "How do I list schemas?", "Use \\dn in psql to list every schema."),
            msgs("q-4", ("user", "What does ANALYZE do?"),
                 ("assistant", "It collects statistics for the planner."),
                 ("user", "When should I run VACUUM?"), ("assistant", "You should run VACUUM."))]
    path = write_lines(tmp_path / "train.jsonl", rows)
    report = stage.run(cfg(params_file), stage.ValidatePaths([path], None), max_seq_length=MAX_SEQ)
    found = [(f.line, f.id, f.severity) for f in report.findings
             if f.check == "restates_question"]
    assert found == [(1, "q-1", "warning"), (2, "q-2", "warning"), (4, "q-4", "warning")]
    assert report.ok  # a warning: reported, never a stop
    by_id = {f.id: f.message for f in report.findings if f.check == "restates_question"}
    assert "answer 2 only repeats its question" in by_id["q-4"]
    assert "'You list tables.'" in by_id["q-1"]
