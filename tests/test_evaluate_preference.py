"""evaluate on held-out preference pairs: accuracy and margin of base and tuned, in eval.json,
the publish gate (publish.min_preference_accuracy) and the model card."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from test_evaluate import ROWS, adapter_dir, eval_cfg, paths  # noqa: F401 (fixture)

from pipeline import evaluate as ev
from pipeline.hub import card_text, gate
from pipeline.rows.jsonl import write_jsonl
from pipeline.rows.pairs import Pair


def held_out_pairs(path: Path) -> Path:
    """Chosen: the answers the adapter was fitted to; rejected: answers it never saw."""
    rows = []
    for row, other in zip(ROWS, ("Pack my box with jugs.", "The lazy dog.", "Sphinx judge.")):
        msgs = row["messages"]
        at = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        rows.append(Pair(row["id"], tuple(msgs[:at]), msgs[at]["content"], other,
                         "correction", row["id"]).row())
    write_jsonl(path, rows)
    return path


def test_eval_reports_preference_accuracy_and_margin_for_base_and_tuned(
        tiny_model_dir, adapter_dir, tmp_path):  # noqa: F811
    p = paths(tmp_path, tiny_model_dir, adapter_dir, cache=tmp_path / "cache")
    p = replace(p, pairs=held_out_pairs(tmp_path / "data/preference/test.jsonl"))
    ev.run(eval_cfg(), p, spec=ev.LossSpec(512, True))
    report = json.loads(p.metrics.read_text())
    pref = report["preference"]
    assert pref["pairs"] == 3 and pref["objective"] == "sft"
    assert pref["tuned"]["mean_margin"] > pref["base"]["mean_margin"]
    assert pref["tuned"]["accuracy"] >= pref["base"]["accuracy"]
    assert report["tuned"]["preference_accuracy"] == pref["tuned"]["accuracy"]
    assert "preference accuracy" in p.html.read_text()
    cached = sorted(f.name for f in (tmp_path / "cache").iterdir())
    assert any("-pairs-" in name for name in cached)  # the base side is kept between runs
    ev.run(eval_cfg(), p, spec=ev.LossSpec(512, True))
    assert json.loads(p.metrics.read_text())["preference"] == pref


def test_without_pairs_eval_says_so_and_the_gate_names_the_fix(
        tiny_model_dir, adapter_dir, tmp_path):  # noqa: F811
    p = paths(tmp_path, tiny_model_dir, adapter_dir)
    ev.run(eval_cfg(), p, spec=ev.LossSpec(512, True))
    report = json.loads(p.metrics.read_text())
    assert report["preference"]["pairs"] == 0 and report["tuned"]["preference_accuracy"] is None
    check = gate.check_preference(p.metrics, report, 0.5)
    assert not check.passed and "review" in check.detail
    assert gate.check_preference(p.metrics, report, None).passed


def test_the_gate_compares_tuned_preference_accuracy_with_the_minimum():
    evaluation = {"base": {"preference_accuracy": 0.25}, "tuned": {"preference_accuracy": 0.75}}
    assert gate.check_preference(Path("eval.json"), evaluation, 0.7).passed
    failed = gate.check_preference(Path("eval.json"), evaluation, 0.8)
    assert not failed.passed and "0.750" in failed.detail and "dpo" in failed.detail


def test_the_model_card_shows_preference_accuracy_beside_the_loss():
    facts = {"eval": {"base": {"test_loss": 2.0, "preference_accuracy": 0.25},
                      "tuned": {"test_loss": 1.5, "preference_accuracy": 0.75},
                      "judge": None, "samples": []}}
    text = card_text._eval_section(facts)
    assert "| preference_accuracy | 0.25 | 0.75 |" in text and "nats" in text
