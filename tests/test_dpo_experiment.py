"""`dvc exp run -S train.objective=dpo` on a scaled-down copy of the pipeline: the real curate,
validate, train and evaluate stages of dvc.yaml, a tiny model in place of the base_model stage
and a fixed answers file in place of the generate stage; the experts' replacements become the
pairs, and eval.json compares base, the SFT-only adapter and the DPO adapter on the held-out ones."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny import make_tiny_llama

from pipeline.rows.pairs import digest

REPO = Path(__file__).resolve().parents[1]
TOPICS = ["vacuum", "indexes", "backups", "logs", "roles", "tables", "locks", "views", "joins",
          "types", "dumps", "slots", "statistics", "casts", "rules", "triggers", "ports",
          "hosts", "pages", "plans", "scans", "sorts", "dates", "keys", "sequences", "columns",
          "schemas", "extensions", "tablespaces", "replicas"]


def answers() -> list[dict]:
    return [{"id": f"q-{i:04d}", "question": f"How do I manage {t} in PostgreSQL today?",
             "answer": f"You can look it up in the manual for {t}.", "finish_reason": "stop",
             "followup": None, "followup_answer": None} for i, t in enumerate(TOPICS)]


def corrections(rows: list[dict]) -> list[dict]:
    return [{"id": r["id"], "action": "replace_answer", "question": r["question"],
             "answer": f"Use the {TOPICS[i]} commands of psql and check the result.",
             "replaces": digest(r["answer"])} for i, r in enumerate(rows) if i % 5]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dvc_repro_stays_sft_and_exp_run_with_objective_dpo_trains_a_dpo_adapter(tmp_path):
    work = tmp_path / "repo"
    (work / "data/imports").mkdir(parents=True)
    shutil.copy(REPO / "params.yaml", work / "params.yaml")
    shutil.copytree(REPO / "scripts", work / "scripts")
    make_tiny_llama(work / "models/base", seed=0)
    rows = answers()
    for name, data in (("data/generated/answers.jsonl", rows),
                       ("data/corrections.jsonl", corrections(rows)),
                       ("data/questions.jsonl", [])):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text("".join(json.dumps(r) + "\n" for r in data))
    (work / "data/imports/.keep").write_text("")
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["curate"]["min_split_rows"] = 2
    params["train"].update(num_layers=2, iters=4, warmup=1, steps_per_report=2,
                           steps_per_eval=2, save_every=2, val_batches=1, batch_size=2,
                           learning_rate=5.0e-3)
    params["evaluate"].update(n_samples=1, prompts=[], max_tokens=4)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    real = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    stages = {name: real[name] for name in ("curate", "validate", "train", "evaluate")}
    for spec in stages.values():  # the stage code runs from this checkout (PYTHONPATH)
        spec["deps"] = [d for d in spec["deps"] if not d.startswith(("pipeline/", "validation"))]
    (work / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    (work / ".gitignore").write_text(".tuneline/\n")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false",
           "PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def sh(*cmd):
        done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, check=False)
        assert done.returncode == 0, (cmd, done.stdout[-3000:], done.stderr[-3000:])
        return done

    sh("git", "init", "-q", "-b", "main")
    sh("dvc", "init", "-q")
    sh("git", "add", "-A")
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    sh("dvc", "repro")  # the default: sft, the pairs written but not trained on
    sft = json.loads((work / "models/adapters/adapter_config.json").read_text())
    assert sft["tuneline"]["objective"] == "sft"
    assert (work / "models/reference_logps.jsonl").read_text() == ""
    assert not (work / "models/adapters/sft").exists()  # sft: the adapter folder as before
    default_eval = json.loads((work / "reports/eval.json").read_text())
    assert "sft" not in default_eval and "sft" not in default_eval["preference"]
    sft_weights = (work / "models/adapters/adapters.safetensors").read_bytes()
    sh("git", "add", "-A")
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "sft")
    sh("dvc", "exp", "run", "-S", "train.objective=dpo")
    config = json.loads((work / "models/adapters/adapter_config.json").read_text())
    assert config["tuneline"]["objective"] == "dpo"
    refs = [json.loads(x) for x in (work / "models/reference_logps.jsonl").read_text().split("\n")
            if x]
    pairs = sum(1 for split in ("train", "valid") for x in
                (work / f"data/dataset/preference/{split}.jsonl").read_text().split("\n") if x)
    assert len(refs) == pairs >= 2
    shown = json.loads(sh("dvc", "exp", "show", "--json").stdout)
    assert "dpo" in json.dumps(shown)
    # the SFT-only baseline beside it is the default run's adapter, reused, not trained again
    baseline = work / "models/adapters/sft"
    assert json.loads((baseline / "adapter_config.json").read_text())["tuneline"]["objective"] \
        == "sft"
    assert (baseline / "adapters.safetensors").read_bytes() == sft_weights
    assert json.loads((work / "reports/train.timings.json").read_text())["sft_baseline"] \
        == "cached"
    evaluation = json.loads((work / "reports/eval.json").read_text())
    pref = evaluation["preference"]
    assert pref["objective"] == "dpo" and pref["pairs"] >= 1
    assert pref["base"] == default_eval["preference"]["base"]
    assert pref["sft"] == default_eval["preference"]["tuned"]  # the same SFT adapter, scored again
    for side in ("base", "sft", "tuned"):  # preference accuracy side by side
        assert evaluation[side]["preference_accuracy"] == pref[side]["accuracy"] is not None
    assert evaluation["sft"]["test_loss"] == default_eval["tuned"]["test_loss"]
