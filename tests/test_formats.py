"""Import of conversation layouts people already have (pipeline/rows/formats.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.rows import formats
from pipeline.rows.formats import FormatError, read_import

REPO = Path(__file__).resolve().parents[1]
TWO_TURNS = [
    {"role": "user", "content": "How do I list tables?"},
    {"role": "assistant", "content": "Run \\dt in psql."},
    {"role": "user", "content": "And in every schema?"},
    {"role": "assistant", "content": "Use \\dt *.* instead."},
]


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_seed_guide_text_becomes_messages_and_drops_the_unanswered_followup(tmp_path):
    text = ("<s>[INST] How do I list tables?[/INST] Run \\dt in psql.</s>"
            "[INST]And in every schema?[/INST]")
    [conv] = read_import(write(tmp_path / "seed.jsonl", [{"text": text}]))
    assert list(conv.messages) == TWO_TURNS[:2]
    assert conv.dropped_turns == 1
    assert conv.source == "imported"


def test_llama2_system_block_becomes_a_system_message():
    text = "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi?[/INST] Hello.</s>"
    messages, dropped = formats.to_messages({"text": text}, "text")
    assert messages == [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hi?"},
                        {"role": "assistant", "content": "Hello."}]
    assert dropped == 0


def test_chatml_text_is_parsed():
    text = formats.render_chatml(TWO_TURNS)
    assert formats.to_messages({"text": text}, "text") == (TWO_TURNS, 0)


@pytest.mark.parametrize("layout", formats.LAYOUTS)
def test_every_layout_round_trips_through_an_import_file(tmp_path, layout):
    convs = [TWO_TURNS, TWO_TURNS[:2]] if layout != "completions" else [TWO_TURNS[:2]]
    rows = [formats.from_messages(c, layout) for c in convs]
    imported = read_import(write(tmp_path / f"{layout}.jsonl", rows))
    assert [list(c.messages) for c in imported] == convs
    if layout != "chat":  # the file's own content is not messages: it really was converted
        assert "messages" not in rows[0]


def test_alpaca_input_and_system_are_kept():
    row = {"instruction": "Translate to SQL", "input": "all users", "output": "SELECT * FROM u;",
           "system": "You write SQL."}
    messages, _ = formats.to_messages(row, "alpaca")
    assert messages[0] == {"role": "system", "content": "You write SQL."}
    assert messages[1]["content"] == "Translate to SQL\n\nall users"


def test_sharegpt_speakers_map_to_roles():
    row = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                             {"from": "gpt", "value": "a"}]}
    assert [m["role"] for m in formats.to_messages(row, "sharegpt")[0]] == [
        "system", "user", "assistant"]


def test_unknown_layout_error_names_the_file_line_and_keys_seen(tmp_path):
    path = write(tmp_path / "odd.jsonl", [{"messages": TWO_TURNS[:2]}, {"q": "x", "a": "y"}])
    with pytest.raises(FormatError) as err:
        read_import(path)
    assert f"{path}:2" in str(err.value)
    assert "['a', 'q']" in str(err.value)


def test_mixed_layouts_in_one_file_are_refused_with_both_lines(tmp_path):
    path = write(tmp_path / "mixed.jsonl", [{"messages": TWO_TURNS[:2]},
                                            {"prompt": "q", "completion": "a"}])
    with pytest.raises(FormatError, match=r"mixed.jsonl:2: layout completions but line 1 is chat"):
        read_import(path)


def test_plain_text_without_turn_markers_is_refused_with_a_hint(tmp_path):
    path = write(tmp_path / "plain.jsonl", [{"text": "Just a paragraph about VACUUM."}])
    with pytest.raises(FormatError, match=r"plain.jsonl:1: .*no turn markers.*messages"):
        read_import(path)


def test_bad_role_error_names_the_line(tmp_path):
    path = write(tmp_path / "roles.jsonl", [
        "", {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}])
    with pytest.raises(FormatError, match=r"roles.jsonl:2: chat row: message 0: role 'bot'"):
        read_import(path)


def test_derived_ids_follow_the_question_not_the_line(tmp_path):
    rows = [{"prompt": "first?", "completion": "a."}, {"prompt": "second?", "completion": "b."}]
    ids = {c.messages[0]["content"]: c.id for c in read_import(write(tmp_path / "x.jsonl", rows))}
    again = {c.messages[0]["content"]: c.id
             for c in read_import(write(tmp_path / "x.jsonl", rows[::-1]))}
    assert ids == again
    assert ids["first?"].startswith("x-") and ids["first?"] != ids["second?"]


def test_the_shipped_expert_seed_imports_as_expert_rows():
    path = REPO / "data/imports/postgresql_expert.jsonl"
    convs = read_import(path)
    lines = [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    assert len(convs) == len(lines) > 0  # one conversation per line, however many the expert keeps
    assert {c.source for c in convs} == {"expert"}
    assert all(c.messages[-1]["role"] == "assistant" for c in convs)
