"""Entry point run in a subprocess by pipeline/gguf_io/convert.py (never imported by tuneline):

    python convert_main.py LLAMA_DIR TORCH_DIR '{"pre": ..., "extra": {...}}' MODEL_DIR [args]

Runs llama.cpp's convert_hf_to_gguf.py from LLAMA_DIR (with its own gguf-py) and CPU torch
from TORCH_DIR, with two additions: a BPE pre-tokenizer the converter does not know by hash
(a tokenizer trained or edited by its user) falls back to `pre` when tuneline recognised the
split rule; and `extra` string fields (general.tuneline.*) are written after the standard ones.
"""

import json
import runpy
import sys

llama_dir, torch_dir, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.path[:0] = [llama_dir, f"{llama_dir}/gguf-py", torch_dir]

from conversion import base  # the converter's package, found via sys.path

stock_pre = base.TextModel.get_vocab_base_pre
stock_prepare = base.TextModel.prepare_metadata


def get_vocab_base_pre(self, tokenizer):
    try:
        return stock_pre(self, tokenizer)
    except NotImplementedError:
        if options["pre"] is None:
            raise
        return options["pre"]


def prepare_metadata(self, vocab_only):
    stock_prepare(self, vocab_only)
    for key, value in options["extra"].items():
        self.gguf_writer.add_string(key, value)


base.TextModel.get_vocab_base_pre = get_vocab_base_pre
base.TextModel.prepare_metadata = prepare_metadata
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[4:]]
runpy.run_path(f"{llama_dir}/convert_hf_to_gguf.py", run_name="__main__")
