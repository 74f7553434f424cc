"""The shared MLX model layer on a tiny llama built in code: loading, adapters, the assistant
mask, the masked loss and greedy generation (streamed, batched, token ids)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_evaluate import ROWS, make_trained_adapter

from pipeline.training import model as mlx_model

QUESTION = [{"role": "user", "content": "Where?"}]


def test_loss_mask_covers_every_assistant_turn_and_nothing_else(tiny_model_dir):
    _, tok = mlx_model.load(tiny_model_dir)
    messages = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A one"},
                {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A two"}]
    tokens, mask = mlx_model.encode_chat(tok, messages, mask_prompt=True)
    learned = tok.decode([t for t, m in zip(tokens, mask) if m])
    assert learned == "A one<|im_end|>\nA two<|im_end|>\n"
    _, full = mlx_model.encode_chat(tok, messages, mask_prompt=False)
    assert all(full)


def test_load_casts_to_the_backend_dtype_only_when_asked(tiny_model_dir, monkeypatch):
    import mlx.core as mx

    from pipeline.training import accel

    monkeypatch.setattr(accel, "compute_dtype", lambda: "bfloat16")
    cast, _ = mlx_model.load(tiny_model_dir)
    own, _ = mlx_model.load(tiny_model_dir, backend_dtype=False)
    assert cast.model.embed_tokens.weight.dtype == mx.bfloat16
    assert own.model.embed_tokens.weight.dtype == mx.float32  # as tiny.py saved it


def test_masked_loss_counts_only_selected_targets(tiny_model_dir):
    import mlx.core as mx

    model, tok = mlx_model.load(tiny_model_dir)
    tokens, mask = mlx_model.encode_chat(tok, [*QUESTION, {"role": "assistant", "content": "Here"}],
                                         mask_prompt=True)
    loss, n = mlx_model.masked_loss(model, mx.array([tokens]), mx.array([mask], dtype=mx.float32))
    assert int(n.item()) == sum(mask[1:]) > 0
    none, zero = mlx_model.masked_loss(model, mx.array([tokens]),
                                       mx.zeros((1, len(tokens)), dtype=mx.float32))
    assert int(zero.item()) == 0 and none.item() == 0.0 and loss.item() > 0


def test_batched_greedy_matches_one_conversation_at_a_time(tiny_model_dir):
    model, tok = mlx_model.load(tiny_model_dir)
    conversations = [QUESTION, [{"role": "user", "content": "How do I vacuum?"}]]
    batched = mlx_model.batch_greedy(model, tok, conversations, 12)
    single = [mlx_model.greedy_answer(model, tok, c, 12) for c in conversations]
    assert [b["answer"] for b in batched] == [s["answer"] for s in single]
    assert [b["tokens"] for b in batched] == [s["tokens"] for s in single]
    assert mlx_model.batch_greedy(model, tok, [], 12) == []


def test_greedy_tokens_are_what_the_streamed_greedy_answer_says(tiny_model_dir):
    model, tok = mlx_model.load(tiny_model_dir, backend_dtype=False)
    ids = mlx_model.prompt_ids(tok, QUESTION)
    tokens = mlx_model.greedy_tokens(model, ids, 10, stop=set(tok.eos_token_ids))
    streamed = mlx_model.greedy_answer(model, tok, QUESTION, 10)
    assert len(tokens) == 10 or tokens[-1] in tok.eos_token_ids
    assert tok.decode([t for t in tokens if t not in tok.eos_token_ids]).strip() == \
        streamed["answer"]


@pytest.mark.slow
def test_attached_adapter_changes_answers_and_is_in_eval_mode(tiny_model_dir, tmp_path: Path):
    adapters = make_trained_adapter(tiny_model_dir, tmp_path / "adapters", ROWS, steps=10)
    model, tok = mlx_model.load(tiny_model_dir)
    base = mlx_model.greedy_answer(model, tok, ROWS[0]["messages"][:1], 12)
    mlx_model.attach_adapters(model, adapters)
    assert not model.training
    tuned = mlx_model.greedy_answer(model, tok, ROWS[0]["messages"][:1], 12)
    loaded, _ = mlx_model.load(tiny_model_dir, adapters)  # adapter given at load time: the same
    assert mlx_model.greedy_answer(loaded, tok, ROWS[0]["messages"][:1], 12) == tuned
    assert tuned != base
