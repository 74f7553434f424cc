"""evaluate after a dpo run: base, the SFT-only baseline (adapters/sft) and the DPO adapter side
by side in eval.json, compare.html and the judge's verdicts; on a tiny llama trained here."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from ollama_standin import StandIn
from test_evaluate import ROWS, eval_cfg, make_trained_adapter, paths, prefer_tuned
from test_train_preference import make_paths, params

from pipeline import evaluate as ev
from pipeline import train

SPEC = ev.LossSpec(512, True)


@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> train.TrainPaths:
    """A short DPO run: models/adapters with the DPO adapter on top and sft/ inside."""
    run_paths = make_paths(tmp_path_factory.mktemp("dpo"), tiny_model_dir)
    train.run(params(), run_paths, seed=0)
    assert (run_paths.adapters / "sft" / "adapter_config.json").exists()
    return run_paths


def evaluate(tmp: Path, model: Path, adapters: Path, pairs: Path, **cfg) -> dict:
    p = replace(paths(tmp, model, adapters), pairs=pairs)
    ev.run(eval_cfg(**cfg), p, spec=SPEC, seed=0)
    return json.loads(p.metrics.read_text())


def test_eval_reports_preference_accuracy_for_base_sft_and_dpo(tiny_model_dir, dpo_run,
                                                                tmp_path):
    pairs = dpo_run.data / "preference" / "test.jsonl"
    report = evaluate(tmp_path / "three", tiny_model_dir, dpo_run.adapters, pairs)
    assert [k for k in report if k in ("base", "sft", "tuned")] == ["base", "sft", "tuned"]
    pref = report["preference"]
    assert pref["objective"] == "dpo" and pref["pairs"] == 8
    assert set(pref) >= {"base", "sft", "tuned"}
    assert pref["tuned"]["accuracy"] > pref["base"]["accuracy"], pref  # DPO learned the pairs
    for side in ("base", "sft", "tuned"):
        assert report[side]["preference_accuracy"] == pref[side]["accuracy"]
    assert report["improvement_over_sft"] == pytest.approx(
        report["sft"]["test_loss"] - report["tuned"]["test_loss"], abs=1e-5)
    assert report["judge_vs_sft"] == {"enabled": False}
    page = (tmp_path / "three/reports/compare.html").read_text()
    assert "<th>sft</th>" in page and "<h4>sft</h4>" in page and "over sft" in page

    # each side scores as that adapter does when it is evaluated alone (swapping the weights
    # in place equals a fresh load)
    alone = evaluate(tmp_path / "sft", tiny_model_dir, dpo_run.adapters / "sft", pairs)
    dpo_only = tmp_path / "dpo-only"
    shutil.copytree(dpo_run.adapters, dpo_only, ignore=shutil.ignore_patterns("sft"))
    plain = evaluate(tmp_path / "dpo", tiny_model_dir, dpo_only, pairs)
    assert alone["tuned"] == report["sft"] and alone["preference"]["tuned"] == pref["sft"]
    assert plain["tuned"] == report["tuned"] and plain["preference"]["tuned"] == pref["tuned"]
    assert "sft" not in plain and "improvement_over_sft" not in plain
    assert "judge_vs_sft" not in plain and set(plain["preference"]) == {
        "pairs", "objective", "base", "tuned"}


def test_an_sft_adapter_of_other_layers_is_scored_on_a_reloaded_model(tiny_model_dir, dpo_run,
                                                                       tmp_path):
    # tuned: the DPO adapter (rank 8, all linears); sft/: a rank-4 adapter of other shape
    adapters = tmp_path / "adapters"
    shutil.copytree(dpo_run.adapters, adapters, ignore=shutil.ignore_patterns("sft"))
    make_trained_adapter(tiny_model_dir, adapters / "sft", ROWS, steps=5)
    pairs = dpo_run.data / "preference" / "test.jsonl"
    report = evaluate(tmp_path / "mixed", tiny_model_dir, adapters, pairs)
    plain = evaluate(tmp_path / "plain", tiny_model_dir, dpo_run.adapters / "sft", pairs)
    alone = evaluate(tmp_path / "alone", tiny_model_dir, adapters / "sft", pairs)
    assert report["sft"] == alone["tuned"]
    dpo_only = tmp_path / "dpo-only"
    shutil.copytree(dpo_run.adapters, dpo_only, ignore=shutil.ignore_patterns("sft"))
    assert report["tuned"] == evaluate(tmp_path / "dpo", tiny_model_dir, dpo_only, pairs)["tuned"]
    assert report["sft"] != plain["tuned"]  # it is the other adapter that was scored


def test_judge_reports_win_rate_against_the_sft_adapter(tiny_model_dir, dpo_run, tmp_path):
    pairs = dpo_run.data / "preference" / "test.jsonl"
    first = evaluate(tmp_path / "first", tiny_model_dir, dpo_run.adapters, pairs, n_samples=3,
                     prompts=())
    tuned = [a["answer"] for a in first["tuned"]["answers"]]
    for other in ("base", "sft"):  # every question tells the two sides apart
        assert all(t != o["answer"] for t, o in zip(tuned, first[other]["answers"]))
    seen: list[str] = []
    with StandIn(models=("judge",), reply=prefer_tuned(set(tuned), seen)) as server:
        report = evaluate(tmp_path / "judged", tiny_model_dir, dpo_run.adapters, pairs,
                          judge=True, n_samples=3, prompts=(), url=server.url)
        sent = [r for r in server.requests if r.get("path") == "/api/chat"]
    assert len(sent) == 6  # 3 questions, judged against base and against sft
    versus = report["judge_vs_sft"]
    assert versus["tuned_wins"] == 3 and versus["sft_wins"] == 0 and versus["ties"] == 0
    assert versus["tuned_win_rate"] == 1.0 and versus["model"] == "judge"
    assert [v["winner"] for v in versus["verdicts"]] == ["tuned"] * 3
    assert [v["id"] for v in versus["verdicts"]] == [r["id"] for r in ROWS]
    assert report["judge"]["tuned_wins"] == 3 and report["judge"]["base_wins"] == 0
    shown = [frozenset(t.split("\nA: ", 1)[1].split("\nB: ", 1)) for t in seen]
    assert shown == [frozenset((first[other]["answers"][i]["answer"], tuned[i]))
                     for other in ("base", "sft") for i in range(3)]  # the sft side was asked
    assert "judge vs sft: tuned" in (tmp_path / "judged/reports/compare.html").read_text()


def test_the_model_card_shows_sft_preference_accuracy_and_the_judge_against_it(
        tiny_model_dir, dpo_run, tmp_path):
    from pipeline.hub import card_text, modelcard

    pairs = dpo_run.data / "preference" / "test.jsonl"
    report = evaluate(tmp_path / "e", tiny_model_dir, dpo_run.adapters, pairs)
    report["judge_vs_sft"] = {"enabled": True, "model": "judge", "tuned_wins": 2, "sft_wins": 1,
                              "ties": 0, "unparsed": 0, "tuned_win_rate": 0.6667,
                              "verdicts": []}
    facts = {"eval": {"base": modelcard._scalars(report["base"]),
                      "tuned": modelcard._scalars(report["tuned"]), "judge": None,
                      "samples": [], **modelcard._sft_baseline(report)},
             "training": {"params": {"objective": "dpo"}}}
    text = card_text._eval_section(facts)
    acc = {k: report[k]["preference_accuracy"] for k in ("base", "sft", "tuned")}
    row = (f"| preference_accuracy | {card_text._cell(acc['base'])} | "
           f"{card_text._cell(acc['sft'])} | {card_text._cell(acc['tuned'])} |")
    assert "| Metric | Base | SFT only | Tuned |" in text and row in text, text
    assert "LLM judge (tuned vs SFT only):" in text and "tuned_win_rate 0.6667" in text
    assert "the dpo adapter (Tuned)" in text
    # without a baseline the card is as before: two columns, no judge line against it
    plain = {k: v for k, v in report.items() if k not in ("sft", "judge_vs_sft")}
    assert modelcard._sft_baseline(plain) == {}
    facts["eval"] = {k: v for k, v in facts["eval"].items() if k not in ("sft", "judge_vs_sft")}
    assert "SFT" not in card_text._eval_section(facts)


def test_the_sft_side_is_scored_once_per_adapter_and_kept_in_the_cache(tiny_model_dir, dpo_run,
                                                                        tmp_path):
    # a beta sweep: the same SFT baseline beside another preference adapter reuses its scores
    pairs = dpo_run.data / "preference" / "test.jsonl"
    cache = tmp_path / "cache"
    first = replace(paths(tmp_path / "a", tiny_model_dir, dpo_run.adapters, cache), pairs=pairs)
    ev.run(eval_cfg(), first, spec=SPEC, seed=0)
    kept = [f for f in cache.glob("*-sft-*.json")]
    assert len(kept) == 1
    stored = json.loads(kept[0].read_text())
    assert stored["side"] == {k: v for k, v in json.loads(first.metrics.read_text())["sft"].items()
                              if k not in ("preference_accuracy", "preference_margin")}
    stored["side"]["test_loss"] = 123.0  # a marker: the next run must read it, not recompute
    kept[0].write_text(json.dumps(stored))
    again = replace(paths(tmp_path / "b", tiny_model_dir, dpo_run.adapters, cache), pairs=pairs)
    ev.run(eval_cfg(), again, spec=SPEC, seed=0)
    report = json.loads(again.metrics.read_text())
    assert report["sft"]["test_loss"] == 123.0
    assert report["tuned"] == json.loads(first.metrics.read_text())["tuned"]  # attached fresh
    # another SFT adapter (other weights) is scored anew
    other = tmp_path / "other"
    shutil.copytree(dpo_run.adapters, other)
    make_trained_adapter(tiny_model_dir, other / "sft", ROWS, steps=5)
    third = replace(paths(tmp_path / "c", tiny_model_dir, other, cache), pairs=pairs)
    ev.run(eval_cfg(), third, spec=SPEC, seed=0)
    assert json.loads(third.metrics.read_text())["sft"]["test_loss"] != 123.0
    assert len(list(cache.glob("*-sft-*.json"))) == 2
