"""Every architecture people tune goes train -> evaluate -> fuse -> export -> llama.cpp proof,
on tiny random models built in code (tests/tiny_archs.py): SentencePiece Llama 2 and Mistral,
Llama 3's BPE, qwen2, qwen3, gemma2 and phi3. Each test is one row of the README's table."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from test_evaluate import eval_cfg
from test_export import make_cfg
from test_train import ROWS, params_train
from tiny_archs import KINDS, make_tiny_arch

from pipeline import evaluate, export, fuse, train
from pipeline.gguf_io import file as gguf_file
from pipeline.training import model as mlx_model

SYSTEM_ROWS = [{**r, "messages": [{"role": "system", "content": "Answer briefly."}, *r["messages"]]}
               for r in ROWS]
BUILT_IN = {"llama3"}  # the rest go through llama.cpp's converter


def write_dataset(root: Path) -> Path:
    data = root / "dataset"
    data.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", SYSTEM_ROWS[:8]), ("valid", SYSTEM_ROWS[8:])):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", KINDS)
def test_architecture_trains_fuses_exports_and_runs_in_llama_cpp(kind, tmp_path):
    base = make_tiny_arch(kind, tmp_path / "base")
    (base / "tuneline.json").write_text(json.dumps({"base.model": f"example/{kind}-tiny"}))
    data = write_dataset(tmp_path)
    cfg = dataclasses.replace(params_train(), iters=3, learning_rate=1.0e-5, steps_per_eval=3,
                              save_every=3, val_batches=1, warmup=0)
    paths = train.TrainPaths(base, data, tmp_path / "adapters", tmp_path / "reports/train.json",
                             tmp_path / "reports/train_loss.tsv", tmp_path / "ckpt")
    trained = train.run(cfg, paths, seed=0)
    assert trained.iters == 3 and trained.trained_tokens > 0
    scored = evaluate.run(eval_cfg(), evaluate.EvalPaths(
        base, paths.adapters, data / "valid.jsonl", tmp_path / "reports/eval.json",
        tmp_path / "reports/compare.html"), spec=evaluate.LossSpec(512, True), seed=0)
    assert scored.answers > 0 and scored.base_loss > 0 and scored.tuned_loss > 0
    fused = fuse.run(fuse.FusePaths(base, paths.adapters, tmp_path / "fused"))
    exp_cfg = make_cfg(quantizations=("q8_0",), modelfile_quantization="q8_0", adapter=True,
                       min_agreement={"f16": 0.99, "q8_0": 0.9, "adapter": 0.99})
    result = export.run(exp_cfg, dataclasses.replace(
        export.ExportPaths(fused, base, data, tmp_path / "gguf", tmp_path / "reports/gguf.json"),
        adapters=paths.adapters), seed=0)
    report = result.report
    assert report["writer"] == ("built-in" if kind in BUILT_IN
                                else "llama.cpp convert_hf_to_gguf.py")
    f16 = report["files"]["f16"]
    assert f16["failures"] == [] and f16["agreement"] >= 0.99
    assert [a["finish_reason"] for a in f16["answers"]] == ["stop", "stop"]
    assert report["files"]["q8_0"]["failures"] == []
    lora = report["files"]["adapter"]
    assert lora["failures"] == [] and lora["agreement"] >= 0.99
    # The adapter names its base model (general.base_model.*), as the fused file does.
    meta = gguf_file.metadata(gguf_file.read(tmp_path / "gguf" / "adapter-f16.gguf"))
    assert meta["general.type"] == "adapter"
    assert meta["general.base_model.0.name"] == f"{kind}-tiny"
    assert meta["general.base_model.0.repo_url"] == f"https://huggingface.co/example/{kind}-tiny"
    assert meta["general.tuneline.base_model"] == f"example/{kind}-tiny"
    # The Modelfile carries a TEMPLATE of the family (test_ollama_template renders it in Go).
    assert report["modelfile"]["template"] != "from-gguf"
    assert 'TEMPLATE """' in (tmp_path / "gguf" / "Modelfile").read_text()


@pytest.mark.parametrize("kind", ["mistral", "gemma2"])
def test_system_turn_is_merged_into_the_first_user_turn_where_the_template_refuses_it(kind,
                                                                                      tmp_path):
    model_dir = make_tiny_arch(kind, tmp_path / kind)
    _, tokenizer = mlx_model.load(model_dir, backend_dtype=False)
    with_system = SYSTEM_ROWS[0]["messages"]
    merged = [{"role": "user", "content": "Answer briefly.\n\nHow do I vacuum table t0?"},
              with_system[2]]
    tokens, mask = mlx_model.encode_chat(tokenizer, with_system, mask_prompt=True)
    assert (tokens, mask) == mlx_model.encode_chat(tokenizer, merged, mask_prompt=True)
    answer = tokenizer.decode([t for t, m in zip(tokens, mask) if m])
    assert "Use VACUUM ANALYZE on it." in answer and "vacuum table" not in answer


def test_template_that_accepts_a_system_role_keeps_it(tmp_path):
    model_dir = make_tiny_arch("phi3", tmp_path / "phi3")
    _, tokenizer = mlx_model.load(model_dir, backend_dtype=False)
    fitted = mlx_model.template_messages(tokenizer, SYSTEM_ROWS[0]["messages"])
    assert fitted == SYSTEM_ROWS[0]["messages"]


def test_system_turn_without_user_turn_says_what_to_do(tmp_path):
    model_dir = make_tiny_arch("mistral", tmp_path / "m")
    _, tokenizer = mlx_model.load(model_dir, backend_dtype=False)
    with pytest.raises(ValueError, match="no user turn to merge the system prompt into"):
        mlx_model.template_messages(tokenizer, [{"role": "system", "content": "S"}])


def test_gemma2_batch_answers_equal_one_by_one_answers(tmp_path):
    # mlx-lm 0.32's gemma2 cannot mask a padded batch with grouped-query attention (a
    # broadcast error); evaluate's batch path falls back to one conversation at a time.
    model_dir = make_tiny_arch("gemma2", tmp_path / "g")
    model, tokenizer = mlx_model.load(model_dir, backend_dtype=False)
    conversations = [[{"role": "user", "content": "Hi"}],
                     [{"role": "user", "content": "How do I create an index in PostgreSQL?"}]]
    batch = mlx_model.batch_greedy(model, tokenizer, conversations, max_tokens=8)
    alone = [mlx_model.greedy_answer(model, tokenizer, c, max_tokens=8) for c in conversations]
    assert [b["answer"] for b in batch] == [a["answer"] for a in alone]
    assert all(b["finish_reason"] == "stop" for b in batch)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_gguf_logits_equal_mlx_logits_with_attention_at_full_strength(kind, tmp_path):
    # The stop-taught models above damp attention; here plain random weights make rotary
    # order, norms, biases and scaling count: llama.cpp's logits must match MLX's at every
    # position of a chat prompt (F16 weights: a small rounding difference).
    import mlx.core as mx
    import numpy as np

    from pipeline.gguf_io import convert
    from pipeline.gguf_io import proof as gguf_proof

    model_dir = make_tiny_arch(kind, tmp_path / kind, seed=1, teach=False)
    model, tokenizer = mlx_model.load(model_dir, backend_dtype=False)
    messages = [{"role": "user", "content": "How do I create an index in PostgreSQL? " * 4}]
    ids = mlx_model.prompt_ids(tokenizer, messages)
    expected = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    out = tmp_path / "m.gguf"
    convert.write_f16(model_dir, out, {"name": "t", "license": None, "base": {"name": "t"},
                                       "tuneline": {}})
    llm = gguf_proof.load_llama(out, n_ctx=256, seed=0)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    llm.close()
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() < 0.02 * scale
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.95
