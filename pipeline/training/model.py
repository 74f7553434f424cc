"""The MLX model layer: what train, evaluate, chat, export's reference and the embedded client share.

    model, tokenizer = mlx_model.load(Path("models/base"))           # backend dtype (accel.py)
    mlx_model.attach_adapters(model, Path("models/adapters"))         # in place, eval mode
    mlx_model.swap_adapters(model, attached, other)                   # same layers: new weights
    tokens, mask = mlx_model.encode_chat(tokenizer, messages, mask_prompt=True)
    loss, n = mlx_model.masked_loss(model, tokens_batch, mask_batch)
    mlx_model.greedy_answer(model, tokenizer, messages, max_tokens=64)

One place for these so that training and evaluation score tokens the same way, and so that editing
a stage's own code (checkpoints in train.py, say) never re-runs a stage that only shares this layer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

Messages = Sequence[dict[str, str]]


def load(model_dir: Path, adapters: Path | None = None, *,
         backend_dtype: bool = True) -> tuple[Any, Any]:
    """mlx-lm model and tokenizer; in the dtype training uses on this backend unless
    `backend_dtype` is False (the checkpoint's own dtype, e.g. a reference run). Sets MLX's
    memory limits for this process (pipeline/training/memory.py)."""
    import mlx.core as mx
    from mlx_lm import load as mlx_load

    from pipeline.training import accel, memory

    model, tokenizer = mlx_load(str(model_dir),
                                adapter_path=str(adapters) if adapters is not None else None)
    if backend_dtype:
        model.set_dtype(getattr(mx, accel.compute_dtype()))
    memory.configure(model)  # cache cap from the device and the weights; wired limit on Metal
    return model, tokenizer


def attach_adapters(model: Any, adapters: Path) -> None:
    """Apply a trained adapter in place, in eval mode: adapter layers are created in training
    mode (dropout on), which would make answers and losses random."""
    from mlx_lm.tuner.utils import load_adapters

    load_adapters(model, str(adapters))
    model.eval()


ADAPTER_SHAPE = ("fine_tune_type", "num_layers", "lora_parameters")  # what layers an adapter adds


def swap_adapters(model: Any, attached: Path, adapters: Path) -> bool:
    """Put the adapter in `adapters` in place of the attached one without loading the model
    again, when both add the same layers (ADAPTER_SHAPE): only the weights change. False when
    they differ: the caller loads the model afresh and attaches it."""
    import json

    import mlx.core as mx

    def shape(folder: Path) -> list[Any]:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        return [config.get(k, "lora" if k == "fine_tune_type" else None) for k in ADAPTER_SHAPE]

    if shape(attached) != shape(adapters):
        return False
    model.load_weights(list(mx.load(str(adapters / "adapters.safetensors")).items()), strict=False)
    model.eval()
    return True


# --- tokens and loss ---------------------------------------------------------------------------


def fit_system_turn(messages: Messages, render: Any) -> list[dict[str, str]]:
    """`messages` as the chat template accepts them: templates that refuse a system role
    (Mistral's and Gemma's raise on it) get the system prompt merged into the first user turn,
    "system\n\nuser", as Ollama's templates for them do. `render(messages)` renders or raises."""
    from jinja2.exceptions import TemplateError

    messages = list(messages)
    if not any(m["role"] == "system" for m in messages):
        return messages
    try:
        render(messages)
        return messages
    except TemplateError:
        pass
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    first_user = next((m for m in rest if m["role"] == "user"), None)
    if first_user is None:
        raise ValueError("the chat template refuses a system role and there is no user turn to "
                         "merge the system prompt into; add a user turn or drop the system turn")
    first_user["content"] = f"{system}\n\n{first_user['content']}"
    return rest


def template_messages(tokenizer: Any, messages: Messages) -> list[dict[str, str]]:
    """`fit_system_turn` with the tokenizer's own chat template."""
    return fit_system_turn(messages, lambda m: tokenizer.apply_chat_template(m, tokenize=False))


def encode_chat(tokenizer: Any, messages: Messages, mask_prompt: bool):
    """Token ids of a conversation and a 0/1 mask marking the assistant tokens to learn.

    Every assistant turn is learned, not only the last (mlx-lm's `mask_prompt` masks all but the
    last). A system turn the template refuses is merged into the first user turn."""
    messages = template_messages(tokenizer, messages)
    tokens = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
    if not mask_prompt:
        return tokens, [1] * len(tokens)
    mask = [0] * len(tokens)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(
            messages[:i], tokenize=True, add_generation_prompt=True, return_dict=False))
        end = len(tokenizer.apply_chat_template(
            messages[: i + 1], tokenize=True, return_dict=False))
        mask[start:end] = [1] * (end - start)
    return tokens, mask


def masked_loss(model: Any, tokens: Any, mask: Any, denominator: Any = None):
    """Mean cross-entropy over the target tokens the mask selects; returns (loss, n_tokens).
    `denominator`: a data-parallel rank's share of the batch's targets (train.batch_iterator)."""
    import mlx.core as mx
    from mlx import nn

    logits = model(tokens[:, :-1])
    weights = mask[:, 1:]
    # Cross-entropy on the model's own dtype, then float32: a float32 copy of bf16 logits
    # (batch x length x vocab) cost 0.7-1.7 GB more peak memory on GPU (bench/README.md).
    ce = nn.losses.cross_entropy(logits, tokens[:, 1:]).astype(mx.float32) * weights
    ntoks = weights.sum()
    denom = mx.maximum(ntoks, 1) if denominator is None else denominator
    return ce.sum() / denom, ntoks.astype(mx.int32)


# --- generation --------------------------------------------------------------------------------


def prompt_ids(tokenizer: Any, messages: Messages) -> list[int]:
    """The conversation rendered with the model's chat template, ready for the assistant turn."""
    return list(tokenizer.apply_chat_template(template_messages(tokenizer, messages),
                                              add_generation_prompt=True))


def stream(model: Any, tokenizer: Any, messages: Messages, max_tokens: int,
           temperature: float = 0.0) -> Iterator[Any]:
    """mlx-lm's `GenerationResponse`s (`.text`, `.finish_reason`, token counts) as they come."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    yield from stream_generate(model, tokenizer, prompt_ids(tokenizer, messages),
                               max_tokens=max_tokens, sampler=make_sampler(temp=temperature))


def greedy_answer(model: Any, tokenizer: Any, messages: Messages,
                  max_tokens: int) -> dict[str, Any]:
    """The model's greedy reply to `messages` rendered with its chat template."""
    text, last = "", None
    for last in stream(model, tokenizer, messages, max_tokens):
        text += last.text
    return {"answer": text.strip(), "finish_reason": last.finish_reason if last else "length",
            "tokens": last.generation_tokens if last else 0}


def batch_greedy(model: Any, tokenizer: Any, conversations: Sequence[Messages],
                 max_tokens: int) -> list[dict[str, Any]]:
    """Greedy answers to all conversations in one batch: ~2.8x faster than one by one on CPU
    (measured on the embedded model, 6 prompts) and the same text as `greedy_answer`."""
    from mlx_lm import batch_generate

    if not conversations:
        return []
    tokens = [prompt_ids(tokenizer, c) for c in conversations]
    try:
        out = batch_generate(model, tokenizer, tokens, max_tokens=max_tokens,
                             return_token_ids=True)
    except ValueError as exc:  # mlx-lm 0.32's gemma2 cannot mask a padded batch under GQA
        if "broadcast" not in str(exc):
            raise
        return [greedy_answer(model, tokenizer, c, max_tokens) for c in conversations]
    return [{"answer": text.strip(), "tokens": len(ids),
             "finish_reason": "length" if len(ids) >= max_tokens else "stop"}
            for text, ids in zip(out.texts, out.token_ids)]


def greedy_tokens(model: Any, ids: Sequence[int], max_tokens: int,
                  stop: set[int]) -> list[int]:
    """Greedy token ids after `ids`, up to and including the first token in `stop` (export's
    reference: llama.cpp must reproduce these ids)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    tokens: list[int] = []
    steps = generate_step(mx.array(list(ids)), model, max_tokens=max_tokens,
                          sampler=lambda logits: mx.argmax(logits, axis=-1))
    for token, _ in steps:
        tokens.append(int(token))
        if int(token) in stop:
            break
    return tokens
