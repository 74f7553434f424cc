"""The two GGUF writers on one model: `python bench/bench_gguf_writers.py [MODEL_DIR]`

Writes the model (default: the embedded SmolLM2-135M-Instruct, converted by the base_model stage)
as F16 with tuneline's built-in writer and with llama.cpp's convert_hf_to_gguf.py (installed on
first use, pipeline/gguf_io/convert.py), then compares: seconds, tensors (bit for bit), tokenizer
fields, and llama.cpp's logits and greedy choices on a chat prompt. Prints one JSON object.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline import base_model
from pipeline.gguf_io import convert, proof
from pipeline.gguf_io import file as gguf_file

GENERAL = {"name": "bench", "license": "apache-2.0", "base": {"name": "bench"}, "tuneline": {}}
PROMPT = ("<|im_start|>user\nHow do I create an index in PostgreSQL? Explain briefly.<|im_end|>\n"
          "<|im_start|>assistant\nUse CREATE INDEX name ON table (column); it builds a b-tree.")


def tensors(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data) for t in gguf_file.read(path).tensors}


def logits(path: Path) -> np.ndarray:
    llm = proof.load_llama(path, n_ctx=256, seed=0)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    llm.eval(ids)
    out = np.asarray(llm.scores[: len(ids)])
    llm.close()
    return out


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    if len(sys.argv) > 1:
        model = Path(sys.argv[1])
    else:
        model = tmp / "base"
        base_model.run(base_model.SourceConfig(model=base_model.EMBEDDED),
                       base_model.BasePaths(model))
    built, conv = tmp / "builtin.gguf", tmp / "convert.gguf"
    t0 = time.perf_counter()
    info = convert.write_f16(model, built, GENERAL)
    builtin_s = time.perf_counter() - t0
    assert info["writer"] == "built-in", info
    convert.install()
    t0 = time.perf_counter()
    convert.convert(model, conv, pre=None, general=GENERAL)
    convert_s = time.perf_counter() - t0
    a, b = tensors(built), tensors(conv)
    same = [n for n in a if n in b and a[n].shape == b[n].shape and np.array_equal(a[n], b[n])]
    meta_a = gguf_file.metadata(gguf_file.read(built), "tokenizer.")
    meta_b = gguf_file.metadata(gguf_file.read(conv), "tokenizer.")
    la, lb = logits(built), logits(conv)
    print(json.dumps({
        "model": str(model), "builtin_seconds": round(builtin_s, 2),
        "converter_seconds": round(convert_s, 2),
        "builtin_bytes": built.stat().st_size, "converter_bytes": conv.stat().st_size,
        "tensors": len(a), "tensors_only_builtin": sorted(set(a) - set(b)),
        "tensors_only_converter": sorted(set(b) - set(a)), "tensors_bit_identical": len(same),
        "tokenizer_fields_differ": sorted(k for k in set(meta_a) | set(meta_b)
                                          if meta_a.get(k) != meta_b.get(k)),
        "logits_max_abs_diff": float(np.abs(la - lb).max()),
        "greedy_agreement": float((la.argmax(-1) == lb.argmax(-1)).mean()),
        "positions": len(la),
    }, indent=2))


if __name__ == "__main__":
    main()
