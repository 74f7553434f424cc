"""tuneline: questions -> dataset -> LoRA -> GGUF -> Hub, as one DVC pipeline."""

__version__ = "0.1.0"
