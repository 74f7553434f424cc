"""pipeline/rows/neardup.py: the one near-duplicate measure, found by MinHash + LSH, verified exactly."""

from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

import pytest

from pipeline.rows import neardup

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from synth_rows import synth


@pytest.mark.parametrize("a, b", [
    ("如何创建索引？", "怎样创建索引"),
    ("怎么备份数据库？", "如何 备份 数据库?"),
    ("我应该如何修改用户的密码？", "怎样修改用户密码"),
    ("如何修改 PostgreSQL 用户的密码？", "怎样修改PostgreSQL用户的密码"),
    ("What is the difference between a schema and a database?",
     "What's the difference between a database and a schema?"),
    ("How do I rename a column?", "How can I rename columns?"),
])
def test_short_paraphrases_are_near_duplicates_in_chinese_and_english(a, b):
    assert neardup.similarity(a, b) >= 0.8


@pytest.mark.parametrize("a, b", [
    ("如何创建索引？", "如何删除索引？"),
    ("如何创建表？", "如何删除表？"),
    ("怎样备份数据库？", "怎样恢复数据库？"),
    ("How do I rename a column?", "How do I rename a table?"),
    ("日本語のテキストを検索するには？", "英語のテキストを削除するには？"),
])
def test_different_short_questions_are_not(a, b):
    assert neardup.similarity(a, b) < 0.8


def test_numpy_shingle_hashes_match_the_python_shingles():
    questions = ["如何修改 PostgreSQL 用户的密码？", "表", "?", "How do I vacuum?",
                 "สวัสดีครับ PostgreSQL", "日本語のテキストを検索するには？", "a b"]
    texts = [neardup.content_text(q) for q in questions]
    hashes, rows = neardup.gram_hashes(texts)
    for i, q in enumerate(questions):
        assert len(set(hashes[rows == i].tolist())) == len(neardup.shingles(q)), q


def test_lsh_finds_every_pair_that_brute_force_finds():
    rng = random.Random(3)
    words = ["vacuum", "index", "table", "replica", "backup", "restore", "role", "grant", "lock", "wal", "query", "plan"]
    questions = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 6))) + "?"
                 for _ in range(300)]
    texts = [neardup.content_text(q) for q in questions]
    found = neardup.near_pairs(texts, 0.8)
    got = {(p.i, p.j) for p in found.expanded()}
    want = {(i, j) for i, j in itertools.combinations(range(len(texts)), 2)
            if neardup.jaccard(neardup.shingles(questions[i]),
                               neardup.shingles(questions[j])) >= 0.8}
    assert want and got <= want  # verified exactly: no pair below the threshold
    assert len(got & want) >= 0.95 * len(want)


def test_planted_near_duplicates_are_found_with_high_recall_and_exact_precision():
    data = synth(3000, dup_share=0.2, seed=1)
    found = neardup.dedupe(data.questions, 0.8)
    hits = [j for j, (i, _) in found.duplicate_of.items() if data.planted.get(j) == i]
    assert len(hits) >= 0.95 * len(data.planted)
    assert all(neardup.similarity(data.questions[j], data.questions[i]) >= 0.8
               for j, (i, _) in found.duplicate_of.items())


def test_dedupe_keeps_the_first_and_names_the_most_similar_kept_question():
    questions = ["How do I rename a column?", "How do I rename a table?",
                 "how can i RENAME columns", "How do I rename a column?"]
    found = neardup.dedupe(questions, 0.8)
    assert found.kept == [0, 1]
    assert found.duplicate_of == {2: (0, 1.0), 3: (0, 1.0)}
    assert found.family == [0, 1, 0, 0]


def test_a_copy_of_a_removed_question_is_removed_too():
    # 1 is a near copy of 0 (removed); 2 has 1's exact content, so it goes where 1 went.
    questions = ["How do I rename a column in PostgreSQL quickly?",
                 "How can I rename columns in PostgreSQL quickly?",
                 "how can I rename columns in postgresql quickly"]
    found = neardup.dedupe(questions, 0.8)
    assert found.kept == [0] and found.duplicate_of[2][0] == 0


def test_chains_form_one_family_even_when_both_ends_are_kept():
    a = "Configure autovacuum thresholds partitioned tables nightly batch loads warehouse replicas"
    b = "Configure autovacuum thresholds partitioned tables nightly batch loads warehouse standbys"
    c = "Configure autovacuum thresholds partitioned tables nightly batch imports warehouse standbys"
    assert neardup.similarity(a, b) >= 0.8 and neardup.similarity(b, c) >= 0.8
    assert neardup.similarity(a, c) < 0.8
    found = neardup.dedupe([a, b, c], 0.8)
    assert found.kept == [0, 2] and found.family == [0, 0, 0]


def test_matches_pair_queries_with_questions_only():
    queries = ["What is the difference between VACUUM and VACUUM FULL?"]
    questions = ["What's the difference between VACUUM FULL and VACUUM?", "How do I vacuum?",
                 "what is the difference between vacuum and vacuum full"]
    assert sorted((q, k) for q, k, _ in neardup.matches(queries, questions, 0.8)) == [
        (0, 0), (0, 2)]


def test_a_family_larger_than_a_bucket_window_keeps_one_question():
    base = "Configure autovacuum thresholds partitioned tables nightly batch loads warehouse"
    questions = [f"{base} r{i:03d}?" for i in range(300)]
    assert min(neardup.similarity(questions[0], q) for q in questions) >= 0.8
    found = neardup.dedupe(questions, 0.8)
    assert found.kept == [0] and set(found.family) == {0}
