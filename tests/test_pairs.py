"""Preference pairs from expert corrections (curate) and from TRL-layout files (imports)."""

from __future__ import annotations

import json

import pytest
from test_curate import Repo, answer, many, params

from pipeline import curate
from pipeline.commands import review
from pipeline.rows import pairs
from pipeline.rows.jsonl import read_jsonl


@pytest.fixture
def repo(tmp_path) -> Repo:
    return Repo(tmp_path)


def pair_rows(repo: Repo) -> dict[str, tuple[str, dict]]:
    return {row["id"]: (name, row) for name in curate.SPLITS
            for row in read_jsonl(repo.paths.out / "preference" / f"{name}.jsonl")}


def fix(qid: str, old: str, new: str, **extra) -> dict:
    return {"id": qid, "action": "replace_answer", "answer": new, "replaces": pairs.digest(old),
            **extra}


def test_the_replaces_hash_is_the_digest_review_writes():
    for text in ("Use numeric.", "  two\r\nlines \n", ""):
        assert pairs.digest(text) == review.digest(text)


def test_one_pair_per_expert_replacement_in_its_conversations_split(repo):
    gen = many(30) + [answer("q-0100", "Why is NULL = NULL not true?", "Because it is.",
                             followup="And IS NULL?", followup_answer="Use it maybe.",
                             followup_finish_reason="stop")]
    repo.write(repo.paths.generated, gen)
    fixes = [fix(f"q-{i:04d}", "It works like this.", f"Set subsystem{i} in postgresql.conf.")
             for i in range(0, 30, 3)]
    fixes.append({"id": "q-0100", "action": "replace_followup",
                  "followup_answer": "IS NULL is true for a NULL.",
                  "replaces": f"{pairs.digest('And IS NULL?')}:{pairs.digest('Use it maybe.')}"})
    fixes.append(fix("q-0100", "Because it is.", "NULL means unknown."))
    repo.write(repo.paths.corrections, fixes)
    r = repo.run()
    found = pair_rows(repo)
    assert len(found) == len(fixes) == r.report["preference"]["from_corrections"]
    splits = repo.split_of()
    for split, row in found.values():
        assert split == splits[row["conversation"]]  # no leakage across splits
        assert row["prompt"][-1]["role"] == "user"
    _, first = found["q-0100/1"]
    assert first["chosen"][0]["content"] == "NULL means unknown."
    assert first["rejected"][0]["content"] == "Because it is."
    assert first["provenance"]["correction"].endswith("corrections.jsonl:12")
    assert first["provenance"]["generated"].endswith("answers.jsonl:31")
    _, second = found["q-0100/2"]
    assert [m["content"] for m in second["prompt"]] == [
        "Why is NULL = NULL not true?", "NULL means unknown.", "And IS NULL?"]  # the expert's
    assert second["rejected"][0]["content"] == "Use it maybe."


def test_no_pair_from_an_experts_own_conversation_or_without_the_replaced_text(repo):
    repo.write(repo.paths.generated, many(14))
    repo.write(repo.paths.questions, [{"id": "q-0500", "question": "Is VACUUM FULL safe?"}])
    repo.write(repo.paths.corrections, [
        {"id": "own-1", "action": "add_conversation", "messages": [
            {"role": "user", "content": "Who wrote this?"},
            {"role": "assistant", "content": "An expert."}]},
        fix("own-1", "An expert.", "An expert, twice."),             # edits their own
        fix("q-0500", "", "It locks the table."),                   # a bare question
        {"id": "q-0001", "action": "replace_answer", "answer": "No hash."},
        fix("q-0002", "An answer regenerated since.", "Stale."),
        fix("q-0003", "It works like this.", "It works like this."),  # nothing changed
        fix("q-0004", "It works like this.", "Gone."),
        {"id": "q-0004", "action": "drop"},
        fix("q-0005", "It works like this.", "It works like this. Really."),
    ])
    r = repo.run()
    assert pair_rows(repo) == {}
    whys = {s["id"]: s["why"] for s in r.report["details"]["no_pair"]}
    assert set(whys) == {"own-1", "q-0500", "q-0001", "q-0002", "q-0003", "q-0004", "q-0005"}
    assert "add_conversation" in whys["own-1"] and "replaces" in whys["q-0001"]
    assert "regenerated" in whys["q-0002"] and "equals" in whys["q-0003"]
    assert "truncated copy" in whys["q-0005"]


TRL_ROWS = [
    {"prompt": "How do I rename a table?", "chosen": "ALTER TABLE a RENAME TO b;",
     "rejected": "You cannot."},
    {"prompt": [{"role": "user", "content": "How do I drop a column?"}],
     "chosen": [{"role": "assistant", "content": "ALTER TABLE t DROP COLUMN c;"}],
     "rejected": [{"role": "assistant", "content": "DELETE it."}]},
    {"chosen": [{"role": "user", "content": "Is VACUUM blocking?"},
                {"role": "assistant", "content": "Plain VACUUM is not."}],
     "rejected": [{"role": "user", "content": "Is VACUUM blocking?"},
                  {"role": "assistant", "content": "Yes, always."}]},
]


def test_trl_preference_files_are_imported_as_pairs_in_every_layout(repo):
    repo.write(repo.paths.generated, many(12))
    repo.write(repo.paths.imports / "prefs.jsonl", TRL_ROWS)
    r = repo.run()
    found = pair_rows(repo)
    assert sorted(found) == ["prefs-1", "prefs-2", "prefs-3"]
    assert r.report["preference"]["imported"] == 3
    _, implicit = found["prefs-3"]
    assert implicit["prompt"] == [{"role": "user", "content": "Is VACUUM blocking?"}]
    assert implicit["rejected"][0]["content"] == "Yes, always."
    assert sum(r.counts.values()) == 12  # pairs are not conversations


def test_an_imported_pair_follows_the_split_of_the_row_with_its_question(repo):
    repo.write(repo.paths.generated, many(40))
    questions = {row["id"]: row["question"] for row in many(40)}
    repo.write(repo.paths.imports / "prefs.jsonl", [
        {"id": f"p-{qid}", "prompt": q, "chosen": "Edit postgresql.conf.", "rejected": "No."}
        for qid, q in questions.items()])
    repo.run()
    splits = repo.split_of()
    for pid, (split, _) in pair_rows(repo).items():
        assert split == splits[pid.removeprefix("p-")]


def test_a_malformed_preference_row_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(TRL_ROWS[0]) + "\n" + json.dumps(
        {"prompt": "q", "chosen": [{"role": "assistant", "content": 3}], "rejected": "r"}) + "\n")
    with pytest.raises(pairs.PairError, match=r"p.jsonl:2: chosen"):
        pairs.read(path)


@pytest.mark.parametrize(("prompt", "chosen", "rejected", "defect"), [
    ("q", "Same.", "Same.", "chosen equals rejected"),
    ("q", "", "No.", "empty chosen"),
    ("q", "Use VACUUM FULL to rewrite it.", "Use VACUUM", "truncated copy"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "b", "c",
     "does not end with a user turn"),
])
def test_defects_name_what_is_wrong(prompt, chosen, rejected, defect):
    pair = pairs.to_pair({"prompt": prompt, "chosen": chosen, "rejected": rejected}, "f:1",
                         "f-1", "imported")
    assert any(defect in d for d in pairs.defects(pair.prompt, pair.chosen, pair.rejected))


def test_curated_rerun_keeps_the_same_pairs_byte_for_byte(repo):
    repo.write(repo.paths.generated, many(20))
    repo.write(repo.paths.corrections, [fix("q-0001", "It works like this.", "Better.")])
    repo.run(params())
    first = (repo.paths.out / "preference" / "train.jsonl").read_bytes() + (
        repo.paths.out / "preference" / "test.jsonl").read_bytes() + (
        repo.paths.out / "preference" / "valid.jsonl").read_bytes()
    repo.run(params())
    again = (repo.paths.out / "preference" / "train.jsonl").read_bytes() + (
        repo.paths.out / "preference" / "test.jsonl").read_bytes() + (
        repo.paths.out / "preference" / "valid.jsonl").read_bytes()
    assert first == again and b"Better." in first
