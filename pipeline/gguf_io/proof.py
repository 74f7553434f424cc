"""The llama.cpp proof of a GGUF: it loads in llama-cpp-python, renders its own chat template
like the MLX tokenizer, tokenizes alike, answers each prompt greedily and stops by itself (an
end-of-generation token, not the token budget), and llama.cpp's greedy choices agree with a
reference answer (teacher-forced: llama.cpp predicts each next token of the reference).

The reference comes from the caller (the export stage runs the MLX model); everything here takes
plain values and raises ProofError. `llama_log` also serves the quantizer, which logs the same way.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import UserError
from pipeline.gguf_io import file as gguf_file


class ProofError(UserError):
    """A GGUF that llama.cpp cannot load, with llama.cpp's own reason."""


@dataclass(frozen=True)
class Reference:
    """What the reference model (MLX) does with one prompt."""

    prompt: str
    text: str  # chat template rendered by the MLX tokenizer
    prompt_ids: list[int]
    tokens: list[int]  # greedy answer, including the end-of-generation token if reached
    stopped: bool
    messages: list[dict[str, str]] | None = None  # as rendered (system merged where refused)


def messages_for(system_prompt: str, prompt: str) -> list[dict[str, str]]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": prompt}]


def load_llama(path: Path, n_ctx: int, seed: int, lora_path: Path | None = None) -> Any:
    """llama.cpp model for `path` (with the LoRA adapter GGUF `lora_path` applied), with a clear
    error (llama.cpp's own reason) for bad files."""
    import llama_cpp

    for file in (path, lora_path):
        if file is not None:
            gguf_file.read(file)  # a truncated/corrupt file fails here with a readable message
    lora = {"lora_path": str(lora_path)} if lora_path is not None else {}
    with llama_log() as errors:
        try:
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, seed=seed,
                                  verbose=False, **lora)
        except (ValueError, RuntimeError) as exc:
            reason = next((e.strip() for e in errors if "error loading" in e or "lora" in e.lower()),
                          str(exc))
        else:
            # llama-cpp-python checks the adapter pointer with `is None`, so a NULL one (llama.cpp
            # refused the adapter, e.g. another base's shapes) silently runs the bare base.
            refused = [e.strip() for e in errors if "failed to apply lora" in e]
            if lora_path is None or (getattr(llm, "_lora_adapter", None) and not refused):
                return llm
            llm.close()
            reason = refused[0] if refused else "llama.cpp did not apply the LoRA adapter"
    where = f"{path} + {lora_path}" if lora_path is not None else str(path)
    raise ProofError(
        f"{where}: llama.cpp cannot load this GGUF: {reason}; the file may be damaged or miss "
        "metadata llama.cpp needs: re-run `dvc repro export`"
    )


@contextmanager
def llama_log() -> Iterator[list[str]]:
    """Collect llama.cpp's log instead of printing it (it explains load failures only there)."""
    import ctypes

    import llama_cpp
    from llama_cpp import _logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", "replace"))  # level numbering differs across versions

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def check_file(path: Path, refs: list[Reference], *, system_prompt: str, max_tokens: int,
               seed: int, threshold: float, lora_path: Path | None = None,
               reference: str = "MLX") -> dict[str, Any]:
    """The proof of one file (with a LoRA adapter GGUF applied): per answer what happened,
    `failures` empty when it passed. `reference` names who produced `refs`, for messages."""
    t0 = time.perf_counter()
    llm = load_llama(path, context_size(refs, max_tokens), seed, lora_path=lora_path)
    result: dict[str, Any] = {"file": path.name, "load_seconds": round(time.perf_counter() - t0, 3),
                              "answers": [], "failures": []}
    matched = compared = generated = 0
    gen_seconds = 0.0
    for ref in refs:
        answer = check_prompt(llm, ref, system_prompt, max_tokens)
        result["answers"].append(answer)
        matched += answer.pop("_matched")
        compared += answer.pop("_compared")
        generated += answer["completion_tokens"]
        gen_seconds += answer.pop("_seconds")
        result["failures"] += [f"prompt {ref.prompt!r}: {m}" for m in answer["problems"]]
    result["agreement"] = round(matched / compared, 4) if compared else 1.0
    result["min_agreement"] = threshold
    result["tokens_per_second"] = round(generated / gen_seconds, 1) if gen_seconds else None
    if result["agreement"] < threshold:
        result["failures"].append(
            f"greedy agreement with {reference} {result['agreement']:.3f} < min_agreement {threshold} "
            f"over {compared} tokens (see first_divergence per answer)"
        )
    llm.close()
    result["check_seconds"] = round(time.perf_counter() - t0, 3)
    return result


def context_size(refs: list[Reference], max_tokens: int) -> int:
    return max(len(r.prompt_ids) for r in refs) + max_tokens + 64  # + template slack


def llama_reference(path: Path, refs: list[Reference], max_tokens: int, seed: int) -> list[Reference]:
    """What llama.cpp answers (greedy) with the GGUF `path` to the prompts of `refs`: the
    reference for a file that must match another GGUF (base + adapter vs the fused F16)."""
    llm = load_llama(path, context_size(refs, max_tokens), seed)
    out = []
    for ref in refs:
        tokens, finish = greedy(llm, ref.prompt_ids, max_tokens)
        out.append(Reference(ref.prompt, ref.text, ref.prompt_ids, tokens, finish == "stop",
                             ref.messages))
    llm.close()
    return out


def check_prompt(llm: Any, ref: Reference, system_prompt: str, max_tokens: int) -> dict[str, Any]:
    problems = []
    text = llama_chat_prompt(llm, ref.messages or messages_for(system_prompt, ref.prompt))
    if text != ref.text:
        problems.append("the GGUF's chat template renders the prompt differently from MLX's")
    # Like llama.cpp's chat code: a BOS already rendered by the template is not added again.
    bos = llm.detokenize([llm.token_bos()], special=True).decode() if llm.token_bos() >= 0 else ""
    add_bos = _add_bos(llm) and not (bos and text.startswith(bos))
    ids = llm.tokenize(text.encode(), add_bos=add_bos, special=True)
    if ids != ref.prompt_ids:
        at = next((i for i, (a, b) in enumerate(zip(ids, ref.prompt_ids)) if a != b),
                  min(len(ids), len(ref.prompt_ids)))
        problems.append(f"llama.cpp tokenizes the prompt differently from MLX from token {at}")
    t0 = time.perf_counter()
    tokens, finish = greedy(llm, ids, max_tokens)
    seconds = time.perf_counter() - t0
    if finish != "stop":
        problems.append(f"did not stop within max_tokens={max_tokens} (finish_reason {finish})")
    matched, compared = teacher_forced(llm, ids, ref.tokens)
    div = first_divergence(tokens, ref.tokens)

    def detok(ts: list[int]) -> str:
        return llm.detokenize(ts).decode("utf-8", "replace")

    return {
        "prompt": ref.prompt,
        "finish_reason": finish,
        "completion_tokens": len(tokens),
        "answer": detok([t for t in tokens if not _is_eog(llm, t)]),
        "agreement": round(matched / compared, 4) if compared else 1.0,
        "first_divergence": None if div is None else {
            "index": div, "gguf": detok(tokens[div:div + 1]), "mlx": detok(ref.tokens[div:div + 1]),
        },
        "problems": problems,
        "_matched": matched, "_compared": compared, "_seconds": seconds,
    }


def llama_chat_prompt(llm: Any, messages: list[dict[str, str]]) -> str:
    """The prompt as llama-cpp-python renders it from the GGUF's own chat template."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return ""

    def piece(tid: int) -> str:
        return llm.detokenize([tid], special=True).decode("utf-8", "replace")

    bos = piece(llm.token_bos()) if llm.token_bos() >= 0 else ""
    formatter = Jinja2ChatFormatter(template, eos_token=piece(llm.token_eos()), bos_token=bos)
    return formatter(messages=messages).prompt


def _add_bos(llm: Any) -> bool:
    return str(llm.metadata.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"


def _is_eog(llm: Any, token: int) -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token))


def greedy(llm: Any, ids: list[int], max_tokens: int) -> tuple[list[int], str]:
    """Greedy decoding; finish_reason as llama-cpp-python reports it ("stop" at an EOG token)."""
    tokens = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        tokens.append(int(token))
        if _is_eog(llm, token):
            return tokens, "stop"
        if len(tokens) >= max_tokens:
            break
    return tokens, "length"


def teacher_forced(llm: Any, ids: list[int], target: list[int]) -> tuple[int, int]:
    """How many of the reference's greedy tokens llama.cpp also ranks first, same prefix."""
    if not target:
        return 0, 0
    llm.reset()
    llm.eval(ids + target[:-1])
    logits = np.asarray(llm.scores[len(ids) - 1:len(ids) - 1 + len(target)])
    predicted = logits.argmax(axis=-1)
    return int((predicted == np.asarray(target)).sum()), len(target)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
