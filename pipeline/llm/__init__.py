"""Talking to LLMs: the clients (clients: Ollama, OpenAI-compatible, embedded llama.cpp and mlx),
the HTTP they speak (transport: no redirects, bounds, deadlines, redaction) and the JSON schemas
that constrain replies (schemas). May import pipeline.core and pipeline.training.model (the
embedded mlx backend)."""
