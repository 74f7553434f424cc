"""The evaluate stage on a tiny llama built in code, with an adapter fitted here in a few steps."""

from __future__ import annotations

import html
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from ollama_standin import Fault, StandIn
from typer.testing import CliRunner

from pipeline import evaluate as ev
from pipeline.cli import app
from pipeline.core import config
from pipeline.llm import clients as llm
from pipeline.llm import judge as llm_judge
from pipeline.rows.jsonl import write_jsonl
from pipeline.training import model as mlx_model

REPO = Path(__file__).resolve().parents[1]
ROWS = [
    {"id": "t-1", "source": "expert", "messages": [
        {"role": "user", "content": "How do I create an index in PostgreSQL?"},
        {"role": "assistant", "content": "Use CREATE INDEX name ON table (column);"}]},
    {"id": "t-2", "source": "generated", "messages": [
        {"role": "user", "content": "Where do I find the logs?"},
        {"role": "assistant", "content": "They live in the data directory under log/."},
        {"role": "user", "content": "And the statistics?"},
        {"role": "assistant", "content": "ANALYZE collects statistics for the query planner."}]},
    {"id": "t-3", "source": "generated", "messages": [
        {"role": "system", "content": "Answer briefly and stop."},
        {"role": "user", "content": "What does VACUUM do?"},
        {"role": "assistant", "content": "VACUUM reclaims storage."}]},
]
LORA = {"rank": 4, "scale": 10.0, "dropout": 0.0}


def make_trained_adapter(model_dir: Path, out: Path, rows: list[dict[str, Any]],
                         steps: int = 40, seed: int = 0) -> Path:
    """A LoRA adapter (mlx-lm layout) fitted to `rows` with the stage's own masked loss."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx import nn
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from pipeline.training.model import masked_loss

    mx.random.seed(seed)
    model, tokenizer = load(str(model_dir))
    model.freeze()
    linear_to_lora_layers(model, 2, LORA)
    encoded = ev.encode_rows(tokenizer, rows, mask_prompt=True)
    width = max(len(t) for t, _ in encoded)
    tokens = mx.array([t + [0] * (width - len(t)) for t, _ in encoded])
    mask = mx.array([m + [0] * (width - len(m)) for _, m in encoded], dtype=mx.float32)
    opt = optim.Adam(learning_rate=2.0e-2)
    step = nn.value_and_grad(model, lambda m, t, k: masked_loss(m, t, k)[0])
    for _ in range(steps):
        _, grads = step(model, tokens, mask)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "adapters.safetensors"),
                        dict(tree_flatten(model.trainable_parameters())))
    adapter_config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": LORA}
    (out / "adapter_config.json").write_text(json.dumps(adapter_config))
    return out


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_trained_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "adapters",
                                ROWS)


def judge_cfg(enabled: bool, url: str = "http://127.0.0.1:9") -> ev.JudgeConfig:
    prompt = 'Reply {"winner": "A"|"B"|"tie"}.\nQ: {question}\nA: {answer_a}\nB: {answer_b}'
    return ev.JudgeConfig(backend="ollama", url=url, model="judge", api_key_env="NO_KEY",
                          stream=True, timeout=10.0, deadline=60.0, retries=2, backoff=0.01, enabled=enabled,
                          max_tokens=64, prompt=prompt)


def eval_cfg(judge: bool = False, prompts: tuple[str, ...] = ("Where do I find the logs?",),
             n_samples: int = 2, url: str = "http://127.0.0.1:9") -> ev.EvalConfig:
    return ev.EvalConfig(n_samples=n_samples, prompts=prompts, max_tokens=12, batch_size=2,
                         judge=judge_cfg(judge, url))


def paths(tmp: Path, model: Path, adapters: Path, cache: Path | None = None) -> ev.EvalPaths:
    test = tmp / "data" / "test.jsonl"
    if not test.exists():
        write_jsonl(test, ROWS)
    return ev.EvalPaths(model, adapters, test, tmp / "reports" / "eval.json",
                        tmp / "reports" / "compare.html", cache)


def prefer_tuned(tuned_answers: set[str], seen: list[str]) -> Any:
    """A judge's reply function that prefers the tuned answer wherever it was placed."""

    def reply(messages: list[dict[str, str]], options: dict[str, Any]) -> str:
        text = messages[-1]["content"]
        seen.append(text)
        a = text.split("\nA: ", 1)[1].split("\nB: ", 1)[0]
        return f'Sure. {{"winner": "{"A" if a in tuned_answers else "B"}", "reason": "closer"}}'

    return reply


class FakeClient:
    """Stands in for a `pipeline.llm.clients.Client`: same attributes, replies from a function."""

    backend, model, server = "fake", "fake-judge", "nowhere"

    def __init__(self, reply: Any):
        self.reply, self.sampling = reply, []

    def identity(self) -> str:
        return self.model

    def chat(self, messages: Any, sampling: llm.Sampling) -> llm.Reply:
        self.sampling.append(sampling)
        return llm.Reply(self.reply(list(messages), {}), "stop", 1, 1)


def test_tuned_adapter_lowers_test_loss_and_reports_both_models(
        tiny_model_dir: Path, adapter_dir: Path, tmp_path: Path) -> None:
    xss = "<script>alert('x')</script> & more?"
    p = paths(tmp_path, tiny_model_dir, adapter_dir)
    result = ev.run(eval_cfg(prompts=("Where do I find the logs?", xss)), p,
                    spec=ev.LossSpec(max_seq_length=512, mask_prompt=True), seed=0)

    report = json.loads(p.metrics.read_text())
    base, tuned = report["base"], report["tuned"]
    assert tuned["test_loss"] < base["test_loss"] - 0.5  # fitted to these rows: a clear drop
    assert report["improvement"] == pytest.approx(base["test_loss"] - tuned["test_loss"], abs=1e-5)
    assert result.improvement == report["improvement"]
    for side in (base, tuned):
        assert side["test_ppl"] == pytest.approx(math.exp(side["test_loss"]), rel=1e-4)
        assert [a["id"] for a in side["answers"]] == ["t-1", "t-2", "prompt-1", "prompt-2"]
        assert all(a["finish_reason"] in ("stop", "length") for a in side["answers"])
    assert [a["answer"] for a in base["answers"]] != [a["answer"] for a in tuned["answers"]]
    assert report["prompts"][0]["reference"] == ROWS[0]["messages"][1]["content"]
    assert report["judge"] == {"enabled": False}

    page = p.html.read_text()
    assert "<script>alert" not in page and html.escape(xss) in page
    assert html.escape(ROWS[0]["messages"][0]["content"]) in page
    for answer in base["answers"] + tuned["answers"]:
        assert html.escape(answer["answer"]) in page


def test_batched_answers_match_one_prompt_at_a_time(tiny_model_dir: Path) -> None:
    from mlx_lm import load

    model, tokenizer = load(str(tiny_model_dir))
    prompts = ev.prompts_for(ROWS, eval_cfg(n_samples=3, prompts=("Where is the config?",)))
    batched = ev.batch_answers(model, tokenizer, prompts, 16)
    single = [mlx_model.greedy_answer(model, tokenizer, p.messages, 16) for p in prompts]
    assert [b["answer"] for b in batched] == [s["answer"] for s in single]
    assert [b["finish_reason"] for b in batched] == [s["finish_reason"] for s in single]
    assert ev.batch_answers(model, tokenizer, [], 16) == []


def test_base_results_are_reused_when_only_the_adapter_changes(
        tiny_model_dir: Path, adapter_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real_side = ev.side
    monkeypatch.setattr(ev, "side", lambda *a: calls.append(1) or real_side(*a))
    other = make_trained_adapter(tiny_model_dir, tmp_path / "other", ROWS[:1], steps=5, seed=1)
    cache, spec = tmp_path / "cache", ev.LossSpec(512, True)

    ev.run(eval_cfg(), paths(tmp_path / "a", tiny_model_dir, adapter_dir, cache), spec=spec)
    first = json.loads((tmp_path / "a" / "reports" / "eval.json").read_text())
    ev.run(eval_cfg(), paths(tmp_path / "b", tiny_model_dir, other, cache), spec=spec)
    second = json.loads((tmp_path / "b" / "reports" / "eval.json").read_text())
    assert len(calls) == 3  # base + tuned, then the new tuned only
    assert second["base"] == first["base"] and second["tuned"] != first["tuned"]

    ev.run(eval_cfg(), paths(tmp_path / "c", tiny_model_dir, other, cache),
           spec=ev.LossSpec(64, True))
    assert len(calls) == 5  # a train knob the loss depends on: the base is scored again


def test_held_out_prompt_stops_before_the_first_answer() -> None:
    prompts = ev.prompts_for(ROWS, eval_cfg(n_samples=5, prompts=("extra",)))
    assert [p.id for p in prompts] == ["t-1", "t-2", "t-3", "prompt-1"]
    assert [m["role"] for m in prompts[2].messages] == ["system", "user"]
    assert prompts[1].question == "Where do I find the logs?"  # not the follow-up
    assert prompts[3].reference is None


def test_test_loss_is_the_same_in_any_batch_size(tiny_model_dir: Path) -> None:
    from mlx_lm import load

    model, tokenizer = load(str(tiny_model_dir))
    encoded = ev.encode_rows(tokenizer, ROWS, mask_prompt=True)
    one, n_one = ev.test_loss(model, encoded, 1, 512)
    many, n_many = ev.test_loss(model, encoded, 3, 512)  # rows padded to the longest
    assert n_one == n_many
    assert many == pytest.approx(one, rel=1e-5)


def test_test_loss_scores_every_assistant_turn_and_nothing_else(tiny_model_dir: Path) -> None:
    from mlx_lm import load

    model, tokenizer = load(str(tiny_model_dir))
    expected = 0
    for row in ROWS:
        msgs = row["messages"]
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                expected += (len(tokenizer.apply_chat_template(msgs[: i + 1]))
                             - len(tokenizer.apply_chat_template(msgs[:i],
                                                                 add_generation_prompt=True)))
    _, scored = ev.test_loss(model, ev.encode_rows(tokenizer, ROWS, True), 2, 512)
    _, everything = ev.test_loss(model, ev.encode_rows(tokenizer, ROWS, False), 2, 512)
    assert scored == expected
    total = sum(len(t) for t, _ in ev.encode_rows(tokenizer, ROWS, False))
    assert everything == total - len(ROWS)  # each row's first token has nothing to predict it


def test_judge_credits_the_tuned_answer_in_either_position() -> None:
    prompts = [ev.Prompt(f"p{i}", ({"role": "user", "content": f"q{i}"},), None) for i in range(8)]
    base = [{"answer": f"base answer {i}"} for i in range(8)]
    tuned = [{"answer": f"tuned answer {i}"} for i in range(8)]
    seen: list[str] = []
    client = FakeClient(prefer_tuned({t["answer"] for t in tuned}, seen))
    verdict = ev.judge(client, judge_cfg(True), prompts, base, tuned, seed=0)

    assert verdict["tuned_wins"] == 8 and verdict["base_wins"] == 0 and verdict["ties"] == 0
    assert verdict["tuned_win_rate"] == 1.0 and verdict["model"] == "fake-judge"
    firsts = {p.split("\nA: ", 1)[1].split(" ", 1)[0] for p in seen}
    assert firsts == {"base", "tuned"}  # the order was shuffled, and the mapping undid it
    assert '{"winner": "A"|"B"|"tie"}' in seen[0]  # braces in the template kept
    assert {(s.temperature, s.max_tokens) for s in client.sampling} == {(0.0, 64)}


def test_judge_runs_in_the_stage_against_an_ollama_server(tiny_model_dir: Path, adapter_dir: Path,
                                                          tmp_path: Path) -> None:
    p = paths(tmp_path, tiny_model_dir, adapter_dir)
    tie = lambda messages, options: '{"winner": "tie", "reason": "both <b>fine</b>"}'
    with StandIn(models=("judge",), reply=tie) as server:
        server.fail(Fault("status", status=500))  # retried, as generation requests are
        ev.run(eval_cfg(judge=True, n_samples=1, prompts=(), url=server.url), p,
               spec=ev.LossSpec(512, True), seed=0)
        sent = [r for r in server.requests if r.get("path") == "/api/chat"]
    report = json.loads(p.metrics.read_text())
    assert report["judge"]["ties"] == 1 and report["judge"]["model"] == "judge"
    assert report["judge"]["verdicts"] == [{"id": "t-1", "winner": "tie",
                                            "reason": "both <b>fine</b>"}]
    assert "both &lt;b&gt;fine&lt;/b&gt;" in p.html.read_text()
    assert len(sent) == 2


@pytest.mark.parametrize("reply, pick", [
    ('{"winner": "B", "reason": "more precise"}', "B"),
    ('```json\n{"winner": "a", "reason": "x"}\n```', "A"),
    ('{"winner": "tie", "reason": "same"}', "tie"),
    ("The better answer is B because it names the command.", "B"),
    ("Winner: A", "A"),
    ("I cannot decide.", "unparsed"),
])
def test_parse_verdict_reads_json_and_plain_replies(reply: str, pick: str) -> None:
    assert llm_judge.parse_verdict(reply)[0] == pick


def test_missing_adapter_names_the_stage_to_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    p = paths(tmp_path, tiny_model_dir, tmp_path / "models" / "adapters")
    with pytest.raises(ev.EvalError, match="dvc repro train"):
        ev.run(eval_cfg(), p, spec=ev.LossSpec(512, True))


def test_empty_test_split_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "test.jsonl").write_text("\n")
    with pytest.raises(ev.EvalError, match="no rows"):
        ev.read_test(tmp_path / "test.jsonl")


def test_loss_spec_names_the_train_key_that_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    packing = {"pack": False, "pack_width": 1024}
    path.write_text(yaml.safe_dump({"train": {"max_seq_length": 512, "mask_prompt": "yes",
                                              **packing}}))
    with pytest.raises(config.ConfigError, match=r"train\.mask_prompt"):
        ev.loss_spec(path)
    path.write_text(yaml.safe_dump({"train": {"mask_prompt": True, **packing}}))
    with pytest.raises(config.ConfigError, match=r"train\.max_seq_length missing"):
        ev.loss_spec(path)


def test_cli_runs_the_stage_from_params_yaml(tiny_model_dir: Path, adapter_dir: Path,
                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             ) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["evaluate"].update(n_samples=1, prompts=["Where is the config?"], max_tokens=6)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    p = paths(tmp_path, tiny_model_dir, adapter_dir)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [
        "evaluate", "--model", str(p.model), "--adapters", str(p.adapters), "--test", str(p.test),
        "--metrics", "reports/eval.json", "--html", "reports/compare.html"])
    assert result.exit_code == 0, result.output
    assert "test loss base" in result.output
    report = json.loads((tmp_path / "reports" / "eval.json").read_text())
    assert len(report["tuned"]["answers"]) == 2 and report["judge"] == {"enabled": False}


def test_dvc_stage_declares_the_module_inputs_and_params() -> None:
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["evaluate"]
    assert {"pipeline/evaluate.py", "pipeline/training/model.py", "models/base", "models/adapters",
            "data/dataset/test.jsonl"} <= set(stage["deps"])
    assert set(stage["params"]) == {"base.seed", "train.max_seq_length", "train.mask_prompt",
                                    "train.pack", "train.pack_width", "evaluate"}
    for flag in ("--model models/base", "--adapters models/adapters",
                 "--test data/dataset/test.jsonl", "--metrics reports/eval.json",
                 "--html reports/compare.html", "--cache .tuneline/cache/evaluate"):
        assert flag in stage["cmd"]
    config.load(ev.EvalConfig, "evaluate", REPO / "params.yaml")  # the user may enable the judge
    ev.loss_spec(REPO / "params.yaml")


def test_shipped_judge_prompt_fills_without_touching_its_json_example() -> None:
    cfg = config.load(ev.EvalConfig, "evaluate", REPO / "params.yaml")
    text = llm_judge.fill(cfg.judge.prompt, question="Q?", answer_a="{answer_b}", answer_b="two")
    assert "Q?" in text and "{answer_b}" in text and "two" in text and '"winner"' in text


def test_importing_the_module_does_not_load_mlx_lm() -> None:
    # `tuneline --help` and the config tests import it; mlx-lm loads only when a model does.
    code = "import sys, pipeline.evaluate; print('mlx_lm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True)
    assert out.stdout.strip() == "False"
