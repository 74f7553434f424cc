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


SLOW_TIMEOUT_S = 1800  # real end-to-end runs (dvc repro of every stage) on a shared 2-core CI box


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """pyproject's per-test timeout fits unit tests; a slow-marked test without its own
    @pytest.mark.timeout(N) gets SLOW_TIMEOUT_S, so a hang still ends, a long real run does not."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
