"""The LoRA adapter as a llama.cpp adapter GGUF (what `llama-cli --lora`, Ollama's ADAPTER and
llama-cpp-python's `Llama(lora_path=...)` load on top of the base model's GGUF).

Layout, as llama.cpp's convert_lora_to_gguf.py writes it: `general.type = adapter`,
`adapter.type = lora`, `adapter.lora.alpha`; per adapted matrix `<base tensor>.lora_a` with
GGUF shape (n_in, rank) and `<base tensor>.lora_b` with (rank, n_out), i.e. PEFT's A (rank x n_in)
and B (n_out x rank) as numpy arrays. llama.cpp adds `alpha / rank * B @ A` to the base weight.

mlx-lm differs in three ways handled here: it stores `lora_a` as (n_in, rank) and `lora_b` as
(rank, n_out) (transposed against PEFT); it multiplies by `scale` (so alpha = scale * rank); and
the q/k rows of a llama GGUF are in llama.cpp's rotary order, so `lora_b` of q_proj and k_proj
gets the same row permutation as the base weight (pipeline/gguf_file.permute_qk).

    from pipeline.gguf_io import adapter as gguf_adapter
    reason = gguf_adapter.unsupported_reason(adapters_dir)  # None for a LoRA adapter
    gguf_adapter.write(adapters_dir, base_config, out, general)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.gguf_io import file as gguf_file

ADAPTER_FILE = "adapter-f16.gguf"
BASE_FILE = "base-f16.gguf"  # the base model in F16: what the adapter is proved against


def read_adapter_config(adapters: Path) -> dict[str, Any]:
    path = adapters / "adapter_config.json"
    if not path.exists():
        raise gguf_file.GGUFError(f"{path}: not found; run the train stage first (dvc repro train)")
    return json.loads(path.read_text())


def unsupported_reason(adapters: Path) -> str | None:
    """Why this adapter directory cannot become a llama.cpp LoRA GGUF; None when it can."""
    config = read_adapter_config(adapters)
    kind = config.get("fine_tune_type", "lora")
    if kind == "dora":
        return ("train.fine_tune_type is dora: llama.cpp's adapter format holds LoRA A/B "
                "matrices only, not DoRA's magnitude vector; share the fused GGUF instead")
    if kind == "full":
        return ("train.fine_tune_type is full: full fine-tuning changes the weights themselves, "
                "there is no low-rank adapter to share; share the fused GGUF instead")
    if kind != "lora":
        return f"train.fine_tune_type {kind!r} is not a LoRA adapter"
    return None


def adapter_tensors(adapters: Path, config: Mapping[str, Any],
                    arch: str = "llama") -> tuple[dict[str, np.ndarray], float]:
    """GGUF-named lora_a/lora_b arrays (F16) and alpha, from mlx-lm's adapters.safetensors.
    `arch`: the base GGUF's architecture; only llama's q/k rows are in llama.cpp's rotary order."""
    import mlx.core as mx

    params = read_adapter_config(adapters)["lora_parameters"]
    rank, scale = int(params["rank"]), float(params["scale"])
    weights = adapters / "adapters.safetensors"
    if not weights.is_file():
        raise gguf_file.GGUFError(f"{weights}: not found next to adapter_config.json; "
                                  "re-run the train stage (dvc repro train)")
    raw = {name: np.array(arr.astype(mx.float32))
           for name, arr in mx.load(str(weights)).items()}
    out: dict[str, np.ndarray] = {}
    for name, lora_a in raw.items():
        if not name.endswith(".lora_a"):
            continue
        stem = name[: -len(".lora_a")]
        lora_b = raw[f"{stem}.lora_b"]
        base = gguf_file.gguf_name(f"{stem}.weight", adapters)
        a, b = lora_a.T, lora_b.T  # PEFT layout: A (rank, n_in), B (n_out, rank)
        if arch == "llama" and stem.endswith("q_proj"):
            b = gguf_file.permute_qk(b, config["num_attention_heads"])
        elif arch == "llama" and stem.endswith("k_proj"):
            b = gguf_file.permute_qk(b, config.get("num_key_value_heads")
                                     or config["num_attention_heads"])
        out[f"{base}.lora_a"] = np.ascontiguousarray(a).astype(np.float16)
        out[f"{base}.lora_b"] = np.ascontiguousarray(b).astype(np.float16)
    unknown = sorted(n for n in raw if not n.endswith((".lora_a", ".lora_b")))
    if unknown or not out:
        raise gguf_file.GGUFError(
            f"{adapters}/adapters.safetensors: "
            f"{'tensors ' + str(unknown[:3]) if unknown else 'no lora_a tensors'}: "
            "llama.cpp adapters hold LoRA matrices of linear layers only")
    return dict(sorted(out.items(), key=lambda kv: gguf_file._tensor_order(kv[0]))), scale * rank


def write(adapters: Path, config: Mapping[str, Any], out: Path,
          general: Mapping[str, Any], base_gguf: Path) -> dict[str, Any]:
    """Write the adapter GGUF for the base model file `base_gguf`;
    `general`: {name, license, base: {...}, tuneline: {key: text}}."""
    import gguf

    reader = gguf_file.read(base_gguf)
    arch = str(gguf_file.metadata(reader, "general.architecture")["general.architecture"])
    tensors, alpha = adapter_tensors(adapters, config, arch)
    missing = sorted({n.rsplit(".", 1)[0] for n in tensors}
                     - {t.name for t in reader.tensors})
    if missing:
        raise gguf_file.GGUFError(f"{base_gguf}: has no {missing[:3]}: the adapter was not "
                                  "trained on this base model")
    # llama.cpp refuses an adapter whose architecture differs from the base model's.
    writer = gguf.GGUFWriter(str(out), arch)
    gguf_file.add_general(writer, {**general, "type": gguf.GGUFType.ADAPTER})
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    gguf_file.finish(writer, tensors)
    return {"alpha": alpha, "rank": int(next(iter(tensors.values())).shape[0]),
            "adapted_matrices": len(tensors) // 2}
