"""`tuneline questions draft`: parsing what models really return, near-duplicates (English and
Chinese), appending with provenance, and a reply in no known format appending nothing."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from ollama_standin import StandIn
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.commands.questions import (
    Draft,
    DraftConfig,
    DraftFormatError,
    drop_near_duplicates,
    parse_drafts,
    reply_schema,
    run,
    similarity,
    well_formed,
)
from pipeline.core import config
from pipeline.llm import clients as llm

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
CATS = ("students", "DBAs", "kernel developers")


class Canned:
    """A client that returns one canned reply."""

    backend, server, model = "fake", "fake://local", "drafter-1"

    def __init__(self, text: str, structured: bool = False):
        self.text, self.structured, self.prompts, self.schemas = text, structured, [], []

    def identity(self) -> str:
        return "fake"

    def chat(self, messages, sampling, schema=None):
        self.prompts.append(messages[-1]["content"])
        self.schemas.append(schema)
        return llm.Reply(self.text, "stop", 10, 10, structured=self.structured)


THRESHOLD = config.read_params(PARAMS)["curate"]["near_dup_threshold"]  # the shared one


def cfg(**changes) -> DraftConfig:
    return replace(config.load(DraftConfig, "questions", PARAMS), **{"retries": 0, **changes})


def existing(path: Path, *questions: str) -> None:
    path.write_text("".join(json.dumps({"id": f"q-{i:04d}", "question": q, "source": "expert"},
                                       ensure_ascii=False) + "\n"
                            for i, q in enumerate(questions, start=1)), encoding="utf-8")


def test_parses_a_json_array():
    assert parse_drafts('["How do I a?", "Can I b?"]') == [Draft("How do I a?", None),
                                                          Draft("Can I b?", None)]


def test_parses_a_fenced_json_block_inside_chatter():
    text = 'Sure! Here you go:\n```json\n[{"question": "Where do I c?"}]\n```\nEnjoy [1].'
    assert parse_drafts(text) == [Draft("Where do I c?", None)]


def test_parses_a_json_object_of_categories_onto_requested_names():
    text = '{"Students": ["What is a table?"], "For DBAs": [{"question": "How do I back up?"}]}'
    assert parse_drafts(text, CATS) == [Draft("What is a table?", "students"),
                                        Draft("How do I back up?", "DBAs")]


def test_parses_numbered_and_bulleted_lists_ignoring_intro_and_outro():
    text = ("Here are 4 questions about WordPress:\n1. How do I install it?\n2) **Can I change "
            "the theme?**\n- Is it okay to use plugins?\n* Where is the log?\nHope this helps!")
    assert [d.question for d in parse_drafts(text)] == [
        "How do I install it?", "Can I change the theme?", "Is it okay to use plugins?",
        "Where is the log?"]


def test_parses_category_headings_with_questions_under_them():
    text = ("### For students\n1. What is SQL?\n\n**DBAs:**\n- How do I vacuum?\n"
            "3. Kernel developers:\n1. Where is the WAL code?")
    assert parse_drafts(text, CATS) == [Draft("What is SQL?", "students"),
                                        Draft("How do I vacuum?", "DBAs"),
                                        Draft("Where is the WAL code?", "kernel developers")]


def test_parses_chinese_category_headings_and_lists():
    text = "一、学生\n1、什么是事务？\n2. 如何创建表？\n二、DBA\n（1）如何备份数据库？"
    assert parse_drafts(text, ("学生", "DBA")) == [Draft("什么是事务？", "学生"),
                                                   Draft("如何创建表？", "学生"),
                                                   Draft("如何备份数据库？", "DBA")]


def test_a_reply_in_no_known_format_is_a_clear_error():
    with pytest.raises(DraftFormatError, match="no questions in a known format.*I am a model"):
        parse_drafts("I am a model and I would rather talk about the weather today.")


def test_near_duplicates_are_dropped_in_english_and_chinese():
    assert similarity("What is the difference between a schema and a database?",
                      "What's the difference between a database and a schema?") >= 0.8
    assert similarity("如何修改 PostgreSQL 用户的密码？", "怎样修改PostgreSQL用户的密码") >= 0.8
    assert similarity("如何创建索引？", "如何删除索引？") < 0.8
    drafts = [Draft(q, None) for q in ("HOW DO I RESET MY PASSWORD", "How do I drop a table?",
                                       "怎样修改PostgreSQL用户的密码", "How do I drop a table ?")]
    kept, dropped = drop_near_duplicates(
        drafts, ["How do I reset my password?", "如何修改 PostgreSQL 用户的密码？"], 0.8)
    assert [d.question for d in kept] == ["How do I drop a table?"]
    assert len(dropped) == 3  # two against the file, one against the batch itself


def test_draft_appends_new_questions_with_provenance(tmp_path):
    path = tmp_path / "questions.jsonl"
    existing(path, "How do I reset my password?")
    before = path.read_text()
    client = Canned('["How do I reset my password", "Can I rename a database?"]')
    fixed = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    result = run(cfg(topic="PostgreSQL", count=2), 0, path, client=client, now=lambda: fixed,
                 near_dup_threshold=THRESHOLD)
    assert "Write 2 different questions a new user asks about PostgreSQL" in client.prompts[0]
    assert result.duplicates == ["How do I reset my password"] and result.parsed == 2
    lines = path.read_text().splitlines()
    assert path.read_text().startswith(before) and len(lines) == 2
    row = json.loads(lines[-1])
    assert row == {"id": "q-0002", "question": "Can I rename a database?", "source": "drafted",
                   "model": "drafter-1", "prompt_id": result.prompt_id,
                   "created": "2025-01-02T03:04:05+00:00"}
    assert result.prompt_id.startswith("faq_en@")


def test_unknown_format_appends_nothing(tmp_path):
    path = tmp_path / "questions.jsonl"
    existing(path, "How do I reset my password?")
    before = path.read_bytes()
    with pytest.raises(DraftFormatError, match="Nothing was appended"):
        run(cfg(), 0, path, client=Canned("Sorry, I cannot do that."),
            near_dup_threshold=THRESHOLD)
    assert path.read_bytes() == before


def test_dry_run_appends_nothing(tmp_path):
    path = tmp_path / "questions.jsonl"
    existing(path, "A?")
    before = path.read_bytes()
    result = run(cfg(), 0, path, client=Canned('["Can I b?"]'), dry_run=True,
            near_dup_threshold=THRESHOLD)
    assert [r["question"] for r in result.added] == ["Can I b?"] and path.read_bytes() == before


def test_unknown_prompt_name_says_which_exist(tmp_path):
    with pytest.raises(config.ConfigError, match=r"'nope' is not one of \['by_category_en'"):
        run(cfg(prompt="nope"), 0, tmp_path / "q.jsonl", client=Canned("[]"),
            near_dup_threshold=THRESHOLD)


def chinese_reply(messages, options):
    drafts = '{"学生": ["什么是事务？", "如何创建表？"], "DBA": ["如何备份数据库？", "如何 备份 数据库?"]}'
    if options.get("format"):  # constrained: exactly the JSON (the stand-in checks the schema)
        return drafts
    return f"```json\n{drafts}\n```"  # free text, as models reply without a schema


def draft_zh_by_category(tmp_path, path, url):
    """`questions draft --prompt by_category_zh` for two categories against the stand-in."""
    params = yaml.safe_load(PARAMS.read_text())
    params["questions"].update(backend="ollama", url=url, model="tiny")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    return CliRunner().invoke(app, [
        "questions", "draft", "--out", str(path), "--prompt", "by_category_zh", "--count",
        "2", "--category", "学生", "--category", "DBA", "--params", str(tmp_path / "params.yaml")])


def test_cli_drafts_chinese_questions_through_ollama(tmp_path):
    path = tmp_path / "questions.jsonl"
    existing(path, "如何创建表？")
    with StandIn(reply=chinese_reply) as server:
        result = draft_zh_by_category(tmp_path, path, server.url)
        sent = server.requests[0]["messages"][-1]["content"]
        schema = server.requests[0]["format"]
    assert result.exit_code == 0, result.output
    assert "以下每一类人群各 2 个问题：学生, DBA" in sent
    assert schema["required"] == ["学生", "DBA"]
    assert schema["properties"]["DBA"]["minItems"] == schema["properties"]["DBA"]["maxItems"] == 2
    assert "note:" not in result.output
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [(r["id"], r["question"], r.get("category")) for r in rows[1:]] == [
        ("q-0002", "什么是事务？", "学生"), ("q-0003", "如何备份数据库？", "DBA")]
    assert rows[1]["model"] == "tiny" and rows[1]["prompt_id"].startswith("by_category_zh@")
    assert "dropped 2 near-duplicates, appended 2" in result.output


def test_a_deleted_questions_id_is_never_given_to_a_new_one(tmp_path):
    path = tmp_path / "questions.jsonl"
    existing(path, "How do I reset my password?", "How do I drop a table?")
    # The expert corrected q-0002, then deleted the question: the correction stays behind.
    (tmp_path / "corrections.jsonl").write_text(
        '{"id": "q-0002", "action": "replace_answer", "answer": "Use DROP TABLE."}\n')
    path.write_text(path.read_text().splitlines()[0] + "\n")
    result = run(cfg(), 0, path, client=Canned('["Can I rename a database?"]'),
                 near_dup_threshold=THRESHOLD)
    assert [r["id"] for r in result.added] == ["q-0003"]


def test_a_lone_surrogate_escape_is_an_error_with_file_and_line(tmp_path):
    from pipeline.rows.jsonl import DataError, read_jsonl

    path = tmp_path / "questions.jsonl"
    path.write_text('{"id": "q-0001", "question": "Fine \\ud83d\\ude00?"}\n'
                    '{"id": "q-0002", "question": "Cut \\ud83d in half?"}\n')
    with pytest.raises(DataError, match=r"questions.jsonl:2: a lone surrogate escape \\ud83d"):
        read_jsonl(path)


def test_server_rejecting_the_schema_is_parsed_as_text_and_said(tmp_path):
    path = tmp_path / "questions.jsonl"
    with StandIn(reply=chinese_reply, formats="json") as server:  # an Ollama before 0.5
        result = draft_zh_by_category(tmp_path, path, server.url)
    assert result.exit_code == 0, result.output
    assert "note: Ollama's `format` (a JSON schema) was rejected (HTTP 400" in result.output
    assert "parsing it" in result.output and "appended 3" in result.output


def test_schema_follows_the_template_shape():
    list_schema = reply_schema(cfg(prompt="faq_en", count=3))
    items = list_schema["properties"]["questions"]["prefixItems"]
    starters = cfg().starters
    assert [i["pattern"].startswith(f"^{s} ") for i, s in zip(items, starters)] == [True] * 3
    by_cat = reply_schema(cfg(prompt="by_category_en", count=2, categories=("dba", "beginner")))
    assert by_cat["required"] == ["dba", "beginner"]
    first = by_cat["properties"]["dba"]["prefixItems"][0]["pattern"]
    assert first.startswith(f"^{starters[0]} ") and first.endswith("[?？]$")
    zh = reply_schema(cfg(prompt="by_category_zh", count=2, categories=("学生", "DBA")))
    assert zh["required"] == ["学生", "DBA"] and "prefixItems" not in zh["properties"]["DBA"]
    plain = reply_schema(cfg(prompts={"x": "Ask about {topic}."}, prompt="x", count=4))
    assert plain["properties"]["questions"]["minItems"] == 4
    assert "prefixItems" not in plain["properties"]["questions"]
    import jsonschema

    jsonschema.validate({"questions": ["What is WAL?"] * 4}, plain)
    with pytest.raises(jsonschema.ValidationError):  # numbering cannot even start
        jsonschema.validate({"questions": ["1. What is WAL?"] * 4}, plain)


def test_schema_rejects_debris_and_accepts_questions():
    import jsonschema

    schema = reply_schema(cfg(prompt="faq_en", count=2))
    ok = {"questions": [f"{cfg().starters[0]} install PostgreSQL on Debian?",
                        f"{cfg().starters[1]} run two clusters on one host?"]}
    jsonschema.validate(ok, schema)
    for bad in (["1. How do I x?", ok["questions"][1]],  # wrong starter / numbering
                [ok["questions"][0], ok["questions"][1] + " And more?"],  # two questions
                [ok["questions"][0], ok["questions"][1].replace(" run", " run, stop")],  # list
                [ok["questions"][0].replace(" install", "\ninstall"), ok["questions"][1]],
                ok["questions"][:1]):  # too few
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"questions": bad}, schema)


def test_bad_question_length_bounds_are_a_config_error(tmp_path):
    with pytest.raises(config.ConfigError, match="question_chars: \\[50, 10\\]"):
        run(cfg(question_chars=(50, 10)), 0, tmp_path / "q.jsonl", client=Canned("[]"),
            near_dup_threshold=THRESHOLD)


def test_structured_reply_cut_short_keeps_its_complete_questions(tmp_path):
    path = tmp_path / "questions.jsonl"
    cut = '{"questions": ["How do I list tables?", "Can I rename a role?", "What is a tu'
    result = run(cfg(), 0, path, client=Canned(cut, structured=True),
                 near_dup_threshold=THRESHOLD)
    assert [r["question"] for r in result.added] == ["How do I list tables?",
                                                    "Can I rename a role?"]
    assert result.structured and result.note is None


def test_well_formed_rejects_numbering_json_and_echoed_starter_lists():
    assert well_formed("How do I install PostgreSQL?") and well_formed("如何创建索引？")
    assert well_formed("I need to move a database to another server.")
    for bad in ("1. How do I x?", '{"q": "How?"}', "Where do I, Is it okay to, Can I?",
                "What? Why?", "Here are 10 questions.", "**How do I x?**"):
        assert not well_formed(bad), bad


# --- the real embedded model ---------------------------------------------------------------

ON_TOPIC = ("postgres", "database", "table", "index", "backup", "sql", "query", "quer", "user",
            "install", "schema", "server", "password", "connect", "data", "column", "role")


@pytest.mark.slow
def test_embedded_model_drafts_at_least_8_distinct_well_formed_questions(tmp_path):
    path = tmp_path / "questions.jsonl"
    existing(path, "How do I install PostgreSQL on Ubuntu?")
    before = path.read_text()
    result = CliRunner().invoke(app, ["questions", "draft", "--topic", "PostgreSQL", "--count",
                                      "10", "--out", str(path), "--params", str(PARAMS)])
    assert result.exit_code == 0, result.output
    assert "note:" not in result.output  # the schema was enforced, not parsed around
    assert path.read_text().startswith(before)
    rows = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    questions = [r["question"] for r in rows]
    assert len(questions) >= 8, result.output
    assert all(well_formed(q) for q in questions), questions
    assert len({q.casefold() for q in questions}) == len(questions)
    assert "How do I install PostgreSQL on Ubuntu?" not in questions
    assert sum(any(w in q.casefold() for w in ON_TOPIC) for q in questions) >= 8, questions
    assert all(r["source"] == "drafted" and r["prompt_id"].startswith("faq_en@") for r in rows)


@pytest.mark.slow
def test_embedded_model_drafts_by_category_in_the_schema_shape(tmp_path):
    path = tmp_path / "questions.jsonl"
    result = CliRunner().invoke(app, [
        "questions", "draft", "--prompt", "by_category_en", "--count", "3", "--category",
        "beginner", "--category", "dba", "--out", str(path), "--params", str(PARAMS)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert {r["category"] for r in rows} <= {"beginner", "dba"} and len(rows) >= 3, result.output
    assert all(well_formed(r["question"]) for r in rows), [r["question"] for r in rows]
