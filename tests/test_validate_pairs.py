"""validate on preference pairs: GX names the line of every defect, in curated and TRL files."""

from __future__ import annotations

import json
from pathlib import Path

from test_validate import MAX_SEQ, cfg, dataset, params_file, tokenizer  # noqa: F401 (fixtures)

from pipeline import validate as stage

GOOD = {"prompt": [{"role": "user", "content": "How do I rename a table?"}],
        "chosen": [{"role": "assistant", "content": "ALTER TABLE a RENAME TO b;"}],
        "rejected": [{"role": "assistant", "content": "You cannot rename tables."}]}
LINES = [
    GOOD,                                                                          # 1 clean
    {**GOOD, "rejected": GOOD["chosen"]},                                          # 2 equal
    {**GOOD, "chosen": [{"role": "assistant", "content": "  "}]},                  # 3 empty
    {**GOOD, "prompt": GOOD["prompt"] + GOOD["chosen"]},                           # 4 prompt
    {**GOOD, "rejected": [{"role": "assistant", "content": "ALTER TABLE a"}]},     # 5 truncated
    {"prompt": "q", "chosen": "a"},                                                # 6 not a pair
    {"prompt": "How?", "chosen": "Like this.", "rejected": "Not like that."},      # 7 clean
]
EXPECTED = {2: "chosen equals rejected", 3: "empty side", 4: "user turn",
            5: "truncated copy", 6: "not a preference pair"}


def write(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_each_pair_defect_is_named_at_its_line(tmp_path, params_file, tokenizer):  # noqa: F811
    path = write(tmp_path / "prefs.jsonl", LINES)
    report = stage.run(cfg(params_file), stage.ValidatePaths([path], tokenizer),
                       max_seq_length=MAX_SEQ)
    found = {f.line: f.message for f in report.findings}
    assert set(found) == set(EXPECTED)
    for line, words in EXPECTED.items():
        assert words in found[line], (line, found[line])
    assert {f.check for f in report.findings} == {"preference_pairs"}
    assert not report.ok and report.layouts[str(path)] == "preference"


def test_a_dataset_folder_validates_its_preference_pairs(tmp_path, params_file,  # noqa: F811
                                                         tokenizer):  # noqa: F811
    data = dataset(tmp_path / "dataset")
    write(data / "preference" / "train.jsonl", [GOOD])
    write(data / "preference" / "test.jsonl", [GOOD, {**GOOD, "rejected": GOOD["chosen"]}])
    report = stage.run(cfg(params_file), stage.ValidatePaths([data], tokenizer.parent),
                       max_seq_length=MAX_SEQ)
    [finding] = report.findings
    assert finding.file.endswith("preference/test.jsonl") and finding.line == 2
    assert report.rows == 18 + 3


def test_pair_checks_can_be_switched_off(tmp_path, params_file, tokenizer):  # noqa: F811
    path = write(tmp_path / "prefs.jsonl", LINES)
    report = stage.run(cfg(params_file, preference_pairs="off"),
                       stage.ValidatePaths([path], tokenizer), max_seq_length=MAX_SEQ)
    assert report.ok and report.findings == []
