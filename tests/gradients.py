"""Gradient and weight comparison for the equivalence tests (packed vs padded, 2 ranks vs 1).

Each tensor is compared relative to its own largest entry, so a tensor of small gradients
counts as much as a large one. REL is far above float32 summation-order noise (about 1e-6 on
CPU) and far below a 1% scale error (1e-2): the tests assert both sides with `scaled`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

REL = 1.0e-4


def worst(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest per-tensor max|a - b| / max|b| (keys must match)."""
    assert a.keys() == b.keys() and a, (sorted(a), sorted(b))
    out = 0.0
    for name, value in b.items():
        x, y = np.asarray(a[name], np.float64), np.asarray(value, np.float64)
        out = max(out, float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30)))
    return out


def scaled(a: dict[str, Any], factor: float) -> dict[str, Any]:
    return {k: np.asarray(v, np.float64) * factor for k, v in a.items()}
