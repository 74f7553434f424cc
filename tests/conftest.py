"""Shared pytest fixtures. Tiny models are built in code (tests/tiny.py); nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tiny import make_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer llama (GQA, tied embeddings) with a byte-level BPE and ChatML template."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model", seed=0)
