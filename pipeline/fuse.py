"""Fuse: `tuneline fuse --model models/base --adapters models/adapters --out models/fused`

Merges the trained adapter into the base weights and writes a standalone mlx-lm model directory
(weights, config, tokenizer files): what export turns into GGUF and what `tuneline chat` can load.
A quantized base (base.quantize, or an mlx-community folder: QLoRA) is de-quantized here, so the
fused model, the GGUFs and export's proof all use float weights.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.rows.jsonl import atomic_dir

# tokenizer.model: SentencePiece vocabularies (Llama 2, Mistral, Gemma, Phi-3) that llama.cpp's
# converter reads scores from; chat_template.jinja: where newer models keep their template.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "tuneline.json", "tokenizer.model",
                   "added_tokens.json", "chat_template.jinja")


@dataclass(frozen=True)
class FusePaths:
    model: Path  # base model directory
    adapters: Path  # trained adapter directory
    out: Path  # fused model directory to write


def run(paths: FusePaths) -> Path:
    """No params section: fusing has no knobs."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import dequantize_model

    from pipeline.training import model as mlx_model

    model, adapters, out = paths.model, paths.adapters, paths.out
    if not (adapters / "adapter_config.json").exists():
        raise UserError(f"{adapters}: no adapter_config.json; run `dvc repro train` first")
    # The checkpoint's own dtype: fused weights must not depend on the machine that fused them.
    fused, _ = mlx_model.load(model, adapters, backend_dtype=False)
    merged = [(name, module.fuse(dequantize=True)) for name, module in fused.named_modules()
              if hasattr(module, "fuse")]
    if merged:
        fused.update_modules(tree_unflatten(merged))
    dequantize_model(fused)  # the blocks and embeddings no adapter touched
    config = float_config(json.loads((model / "config.json").read_text()))
    with atomic_dir(out) as tmp:
        weights = dict(tree_flatten(fused.parameters()))
        if config.get("tie_word_embeddings"):
            weights.pop("lm_head.weight", None)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (model / name).exists():
                shutil.copy2(model / name, tmp / name)
        shutil.copy2(adapters / "adapter_config.json", tmp / "adapter_config.json")
    return out


def float_config(config: dict) -> dict:
    """config.json of the de-quantized model: without the quantization mlx-lm would apply."""
    return {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
