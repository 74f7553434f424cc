"""The curate stage: generated answers + imports + corrections -> stable train/valid/test splits."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from killing import kill_at

from pipeline import curate
from pipeline.core import config
from pipeline.rows.corrections import CorrectionError
from pipeline.rows.jsonl import read_jsonl

REPO = Path(__file__).resolve().parents[1]


def params(**overrides) -> curate.CurateConfig:
    cfg = config.load(curate.CurateConfig, "curate", REPO / "params.yaml")
    return dataclasses.replace(cfg, **overrides)


def answer(qid: str, question: str, text: str = "It works like this.", **extra) -> dict:
    row = {"id": qid, "question": question, "answer": text, "followup": None,
           "followup_answer": None, "model": "tiny", "backend": "test", "sampling": {},
           "finish_reason": "stop", "followup_finish_reason": None,
           "tokens": {"prompt": 1, "completion": 1}}
    return {**row, **extra}


def many(n: int, start: int = 0) -> list[dict]:
    # Distinct topics, so near-duplicate removal keeps them all.
    return [answer(f"q-{i:04d}", f"How do I configure subsystem{i} number {i * 7919}?")
            for i in range(start, start + n)]


class Repo:
    """A data folder laid out like the repository's."""

    def __init__(self, root: Path):
        self.root = root
        self.paths = curate.CuratePaths(
            generated=root / "generated/answers.jsonl", questions=root / "questions.jsonl",
            corrections=root / "corrections.jsonl", imports=root / "imports",
            out=root / "dataset", report=root / "curate.json")
        self.paths.imports.mkdir(parents=True)

    def write(self, path: Path, rows: list[dict]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    def run(self, cfg: curate.CurateConfig | None = None) -> curate.CurateResult:
        return curate.run(cfg or params(), self.paths)

    def split_of(self) -> dict[str, str]:
        return {row["id"]: name for name in curate.SPLITS
                for row in read_jsonl(self.paths.out / f"{name}.jsonl")}

    def rows(self) -> dict[str, dict]:
        return {row["id"]: row for name in curate.SPLITS
                for row in read_jsonl(self.paths.out / f"{name}.jsonl")}


@pytest.fixture
def repo(tmp_path) -> Repo:
    return Repo(tmp_path)


def test_shipped_data_without_generated_answers_gives_trainable_splits(tmp_path):
    # The generate stage has not run: imports + corrections alone must make a usable dataset.
    r = curate.run(params(), curate.CuratePaths(
        generated=tmp_path / "absent.jsonl", questions=REPO / "data/questions.jsonl",
        corrections=REPO / "data/corrections.jsonl", imports=REPO / "data/imports",
        out=tmp_path / "dataset", report=tmp_path / "curate.json"))
    train_cfg = config.read_params(REPO / "params.yaml")["train"]
    assert r.counts["train"] >= train_cfg["batch_size"]
    assert r.counts["valid"] >= 4 and r.counts["test"] >= 1
    row = json.loads((tmp_path / "dataset/train.jsonl").read_text().splitlines()[0])
    assert {"messages", "id", "source", "turn_sources", "origin"} <= set(row)


def test_sixty_generated_answers_keep_every_split_nonempty(repo):
    repo.write(repo.paths.generated, many(60))
    r = repo.run()
    assert r.counts["valid"] >= 4 and r.counts["test"] >= 4
    assert sum(r.counts.values()) + r.duplicates == 60


KILLED_CURATE = """
import sys, time
from pathlib import Path
import test_curate
from pipeline import curate
from pipeline.rows import jsonl
real = jsonl.write_jsonl
def slow(path, rows):
    real(path, rows)
    if Path(path).name.startswith("train"):
        print("wrote train", flush=True)
        time.sleep(600)
curate.write_jsonl = slow
repo = object.__new__(test_curate.Repo)
repo.root = Path(sys.argv[1])
repo.paths = curate.CuratePaths(
    generated=repo.root / "generated/answers.jsonl", questions=repo.root / "questions.jsonl",
    corrections=repo.root / "corrections.jsonl", imports=repo.root / "imports",
    out=repo.root / "dataset", report=repo.root / "curate.json")
repo.run()
"""


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under the dataset folder (the splits and preference/ pairs) by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_sigkill_between_split_files_never_mixes_two_runs(repo):

    repo.write(repo.paths.generated, many(30))
    repo.run()
    before = files_of(repo.paths.out)
    repo.write(repo.paths.generated, many(40))  # new answers: every split file would change
    kill_at(KILLED_CURATE, str(repo.root), marker="wrote train\n")
    assert files_of(repo.paths.out) == before
    repo.run()
    after = files_of(repo.paths.out)
    shutil.rmtree(repo.paths.out)
    repo.run()  # an uninterrupted run
    assert files_of(repo.paths.out) == after
    assert sorted(p.name for p in repo.root.iterdir() if p.name.endswith(".tmp")) == []


def test_adding_questions_never_moves_existing_rows(repo):
    repo.write(repo.paths.generated, many(200))
    repo.run()
    before = repo.split_of()
    repo.write(repo.paths.generated, many(200) + many(150, start=200))
    repo.run()
    after = repo.split_of()
    assert {k: after[k] for k in before} == before
    assert set(after.values()) == {"train", "valid", "test"}


def test_split_depends_on_the_seed(repo):
    repo.write(repo.paths.generated, many(100))
    repo.run(params(seed=0))
    first = repo.split_of()
    repo.run(params(seed=1))
    assert repo.split_of() != first


def test_small_datasets_top_up_valid_and_test_to_the_minimum(repo):
    repo.write(repo.paths.generated, many(12))
    r = repo.run(params(min_split_rows=4, valid_fraction=0.0, test_fraction=0.0))
    assert r.counts == {"train": 4, "valid": 4, "test": 4}
    assert len(r.report["details"]["moved_for_minimum"]) == 8


def test_too_few_rows_for_the_minimum_is_an_error_with_the_numbers(repo):
    repo.write(repo.paths.generated, many(5))
    with pytest.raises(curate.CurateError, match=r"only 5 rows.*need 4 each.*\(9 in all\)"):
        repo.run(params(min_split_rows=4))


def test_exact_and_near_duplicates_are_removed_keeping_the_expert_row(repo):
    repo.write(repo.paths.generated, many(12) + [
        answer("q-0100", "How do I rename a column?"),
        answer("q-0101", "how do i RENAME a column"),       # exact after normalisation
        answer("q-0102", "How can I rename columns?"),      # near duplicate
        answer("q-0103", "How do I rename a table?"),       # different question
    ])
    repo.write(repo.paths.imports / "mine.jsonl", [{"id": "exp-1", "source": "expert", "messages": [
        {"role": "user", "content": "How do I rename a column?"},
        {"role": "assistant", "content": "ALTER TABLE t RENAME COLUMN a TO b;"}]}])
    r = repo.run()
    dups = {d["id"]: d for d in r.report["details"]["duplicates"]}
    assert set(dups) == {"q-0100", "q-0101", "q-0102"}
    assert {d["duplicate_of"] for d in dups.values()} == {"exp-1"}
    assert dups["q-0102"]["kind"] == "near" and dups["q-0101"]["kind"] == "exact"
    assert "q-0103" in repo.rows() and "exp-1" in repo.rows()


def test_corrections_replace_answer_and_followup_drop_and_add(repo):
    repo.write(repo.paths.generated, many(12) + [
        answer("q-0100", "Why is NULL = NULL not true?", "Because.", followup="And IS NULL?",
               followup_answer="Use it.", followup_finish_reason="stop")])
    repo.write(repo.paths.corrections, [
        {"id": "q-0100", "action": "replace_answer", "answer": "NULL means unknown."},
        {"id": "q-0100", "action": "replace_followup", "followup_answer": "IS NULL tests it."},
        {"id": "q-0003", "action": "drop"},
        {"id": "new-1", "action": "add_conversation", "messages": [
            {"role": "user", "content": "Who wrote this?"},
            {"role": "assistant", "content": "An expert."}]},
    ])
    repo.run()
    rows = repo.rows()
    fixed = rows["q-0100"]
    assert [m["content"] for m in fixed["messages"]] == [
        "Why is NULL = NULL not true?", "NULL means unknown.", "And IS NULL?", "IS NULL tests it."]
    assert fixed["source"] == "expert" and fixed["turn_sources"] == ["expert", "expert"]
    assert fixed["origin"][1:] == [f"{repo.paths.corrections}:1", f"{repo.paths.corrections}:2"]
    assert "q-0003" not in rows
    assert rows["new-1"]["source"] == "expert"
    assert rows["q-0004"]["source"] == "generated"


def test_an_expert_answer_stands_in_for_a_question_never_generated(repo):
    repo.write(repo.paths.generated, many(12))
    repo.write(repo.paths.questions, [{"id": "q-0500", "question": "Is VACUUM FULL safe?",
                                       "source": "expert"}])
    repo.write(repo.paths.corrections, [
        {"id": "q-0500", "action": "replace_answer", "answer": "It locks the table."},
        {"id": "q-0999", "action": "replace_answer", "answer": "Orphan."}])
    r = repo.run()
    assert repo.rows()["q-0500"]["messages"][1]["content"] == "It locks the table."
    assert [u["id"] for u in r.report["details"]["unmatched"]] == ["q-0999"]


def test_a_correction_whose_question_changed_is_reported_stale(repo):
    repo.write(repo.paths.generated, many(12))
    repo.write(repo.paths.corrections, [{
        "id": "q-0001", "action": "replace_answer", "answer": "Old answer.",
        "question": "The question as it was when the expert answered it?"}])
    r = repo.run()
    [stale] = r.report["details"]["stale"]
    assert stale["id"] == "q-0001" and stale["line"] == 1


def test_a_bad_correction_line_names_the_line(repo):
    repo.write(repo.paths.generated, many(12))
    repo.write(repo.paths.corrections, [{"id": "q-0001", "action": "drop"},
                                        {"id": "q-0002", "action": "rewrite"}])
    with pytest.raises(CorrectionError, match=r"corrections.jsonl:2: action 'rewrite'"):
        repo.run()


def test_bad_generated_answers_are_dropped_and_reported(repo):
    repo.write(repo.paths.generated, many(12) + [
        answer("q-0100", "Cut?", "It goes on and on", finish_reason="length"),
        answer("q-0101", "Refuse?", "As an AI language model, I cannot help."),
        answer("q-0102", "Empty?", "   "),
        answer("q-0103", "Good first turn?", "Yes.", followup="Bad second?",
               followup_answer="<|im_start|>assistant oops", followup_finish_reason="stop"),
        answer("q-0104", "Unanswered follow-up?", "Fine.", followup="Then?"),
    ])
    r = repo.run()
    bad = {b["id"]: b for b in r.report["details"]["bad_generated"]}
    assert set(bad) == {"q-0100", "q-0101", "q-0102", "q-0103"}
    rows = repo.rows()
    assert not {"q-0100", "q-0101", "q-0102"} & set(rows)
    assert len(rows["q-0103"]["messages"]) == 2  # the good first turn stays
    assert len(rows["q-0104"]["messages"]) == 2  # no answer, no follow-up
    assert r.report["removed"]["unanswered_turns"] == 1


def test_an_expert_fix_rescues_a_cut_off_generated_answer(repo):
    repo.write(repo.paths.generated, many(12) + [
        answer("q-0100", "Cut?", "It goes on and on", finish_reason="length")])
    repo.write(repo.paths.corrections, [
        {"id": "q-0100", "action": "replace_answer", "answer": "Short and complete."}])
    repo.run()
    assert repo.rows()["q-0100"]["finish_reasons"] == [None]


def test_system_prompt_from_params_is_prepended(repo):
    repo.write(repo.paths.generated, many(12))
    repo.run(params(system_prompt="You are a PostgreSQL expert."))
    row = next(iter(repo.rows().values()))
    assert row["messages"][0] == {"role": "system", "content": "You are a PostgreSQL expert."}


def test_an_id_in_two_inputs_is_an_error_naming_both(repo):
    repo.write(repo.paths.generated, many(12))
    repo.write(repo.paths.imports / "x.jsonl", [{"id": "q-0001", "prompt": "p", "completion": "c"}])
    with pytest.raises(curate.CurateError, match=r"'q-0001' appears twice: .*answers.jsonl:2 and "
                                                 r".*x.jsonl:1"):
        repo.run()


def test_rerun_gives_byte_identical_outputs(repo, tmp_path):
    repo.write(repo.paths.generated, many(40))
    repo.run()
    first = files_of(repo.paths.out)
    shutil.rmtree(repo.paths.out)
    repo.run()
    assert files_of(repo.paths.out) == first


def test_a_followup_fix_listed_before_the_answer_fix_still_applies(repo):
    repo.write(repo.paths.generated, many(12))
    repo.write(repo.paths.questions, [{"id": "q-0500", "question": "Is VACUUM FULL safe?"}])
    repo.write(repo.paths.corrections, [
        {"id": "q-0500", "action": "replace_followup", "followup": "And VACUUM?",
         "followup_answer": "It does not block writes."},
        {"id": "q-0500", "action": "replace_answer", "answer": "It locks the table."}])
    repo.run()
    assert [m["content"] for m in repo.rows()["q-0500"]["messages"]] == [
        "Is VACUUM FULL safe?", "It locks the table.", "And VACUUM?", "It does not block writes."]


@pytest.mark.parametrize("text", [
    "As an AI language model, I cannot browse the internet.",
    "I'm sorry, but I cannot help with that.",
    "I am just an AI and have no opinions.",
    "My knowledge cutoff is 2023, so I may be wrong.",
    "I can't assist with that request.",
])
def test_refusal_boilerplate_is_recognised(text):
    from validation.patterns import is_refusal

    assert is_refusal(text)


@pytest.mark.parametrize("text", [
    "You cannot drop a table that other tables reference; drop the constraint first.",
    "Sorry to hear that! Run VACUUM FULL during a maintenance window.",
    "The planner can help with that if statistics are current.",
])
def test_technical_answers_are_not_refusals(text):
    from validation.patterns import is_refusal

    assert not is_refusal(text)


def chain(n: int) -> tuple[str, str, str]:
    """Three questions, each a near duplicate of the next, the two ends not of each other."""
    tag = hashlib.sha256(str(n).encode()).hexdigest()  # chains are not near each other
    head = f"Configure {tag[:6]} {tag[6:12]} thresholds partitioned tables nightly batch"
    return (f"{head} loads warehouse replicas", f"{head} loads warehouse standbys",
            f"{head} imports warehouse standbys")


def test_near_duplicate_chains_stay_in_one_split(repo):
    # Both ends of each chain are kept (they are not near duplicates of each other), but the
    # middle links them: on a split by row id they would land in different splits.
    rows = many(8)
    for n in range(30):
        rows += [answer(f"c{n:02d}-{k}", q) for k, q in enumerate(chain(n))]
    repo.write(repo.paths.generated, rows)
    r = repo.run(params(valid_fraction=0.3, test_fraction=0.3))
    where = repo.split_of()
    assert r.duplicates == 30 and all(f"c{n:02d}-1" not in where for n in range(30))
    assert all(where[f"c{n:02d}-0"] == where[f"c{n:02d}-2"] for n in range(30))


def test_rows_near_an_evaluate_prompt_never_land_in_train(repo):
    prompts = ("How do I see which queries are running right now in PostgreSQL?",
               "如何查看正在运行的查询？")
    near = [answer(f"n-{i:02d}", q) for i, q in enumerate([
        "How can I see which queries are running right now in PostgreSQL",
        "怎样查看正在运行的查询"])]
    repo.write(repo.paths.generated, many(40) + near)
    r = curate.run(params(), repo.paths, held_out=prompts)
    where = repo.split_of()
    assert where["n-00"] == "test" and where["n-01"] == "test"
    assert {h["id"] for h in r.report["details"]["near_evaluate_prompts"]} == {"n-00", "n-01"}


def test_curated_splits_pass_the_leakage_check(repo):
    from pipeline import validate
    from validation.leakage import Leakage

    rows = many(20)
    for n in range(10):
        rows += [answer(f"c{n:02d}-{k}", q) for k, q in enumerate(chain(n))]
    rows += [answer("zh-1", "如何创建索引？"), answer("zh-2", "怎样创建索引")]
    repo.write(repo.paths.generated, rows)
    repo.run(params(valid_fraction=0.3, test_fraction=0.3))
    cfg = config.load(validate.ValidateConfig, "validate", REPO / "params.yaml")
    report = validate.run(cfg, validate.ValidatePaths([repo.paths.out], None), max_seq_length=512,
                          leak=Leakage(0.8, ()))
    assert [f for f in report.findings if f.check == "leakage"] == []
    assert "leakage" in report.checks
