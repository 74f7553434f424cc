"""Talking to LLMs: the clients (clients: Ollama, OpenAI-compatible, embedded llama.cpp and mlx),
the HTTP they speak (transport: no redirects, bounds, deadlines, redaction), the JSON schemas
that constrain replies (schemas) and the judge that compares two models' answers (judge).
May import pipeline.core and pipeline.training.model (the embedded mlx backend)."""
