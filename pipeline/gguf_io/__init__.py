"""GGUF files: write and read the model file (file), the tokenizer metadata (tokenizer), the LoRA
adapter GGUF (adapter) and the llama.cpp proof that a file loads and agrees with MLX (proof).
May import pipeline.core only. Named gguf_io so that `import gguf` (the gguf-py package it
writes with) is never in doubt."""
