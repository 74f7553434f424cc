"""GGUF files: write and read the model file (file), the tokenizer metadata (tokenizer), the LoRA
adapter GGUF (adapter), the llama.cpp proof that a file loads and agrees with MLX (proof), which
writer writes a model (built-in or llama.cpp's converter: convert) and the Ollama Modelfile's
TEMPLATE (ollama).
May import pipeline.core only. Named gguf_io so that `import gguf` (the gguf-py package it
writes with) is never in doubt."""
