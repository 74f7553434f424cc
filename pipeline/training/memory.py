"""MLX memory settings for a process that runs a model, and the peaks it reports.

MLX keeps freed buffers in a cache for reuse. On CUDA that cache is not handed back when the
device fills up: a 7B LoRA run with padded batches of 12 different widths grew it until
`cudaMallocAsync` failed (issue 26: out of memory with 26 GiB live on an 80 GB H100), and the
same run fits with the cache capped. `configure` caps it from the device memory and the working
set: at most `CACHE_FRACTION` of the device, and never more than what is left beside twice the
model's weights (weights + as much again for activations, gradients, optimizer state). On Apple
silicon it also wires the recommended working set, as mlx-lm does, so the weights stay resident.
CPUs keep MLX's defaults (the cache is ordinary host memory there).
"""

from __future__ import annotations

import platform
import resource
from typing import Any

CACHE_FRACTION = 0.1  # of the device memory; measured on an H100 (bench/README.md, issue 26)
GB = 1e9


def device_memory() -> int:
    """Bytes of memory of the default device (0 when MLX does not say)."""
    import mlx.core as mx

    info = mx.device_info()
    return int(info.get("total_memory") or info.get("memory_size") or 0)


def weights_bytes(model: Any) -> int:
    from mlx.utils import tree_flatten

    return sum(p.nbytes for _, p in tree_flatten(model.parameters()))


def cache_limit(total: int, weights: int, fraction: float = CACHE_FRACTION) -> int:
    """The cache cap for a device of `total` bytes running a model of `weights` bytes."""
    return int(max(0, min(fraction * total, total - 2 * weights)))


def configure(model: Any) -> dict[str, float]:
    """Cap MLX's buffer cache (GPUs) and wire the working set (Apple silicon); what was set, GB."""
    import mlx.core as mx

    if mx.default_device().type != mx.DeviceType.gpu:
        return {}
    total = device_memory()
    if not total:
        return {}
    limit = cache_limit(total, weights_bytes(model))
    mx.set_cache_limit(limit)
    out = {"device_memory_gb": total / GB, "cache_limit_gb": limit / GB}
    if mx.metal.is_available():
        wired = int(mx.device_info().get("max_recommended_working_set_size", 0))
        if wired:
            mx.set_wired_limit(wired)
            out["wired_limit_gb"] = wired / GB
    return out


def process_peak_gb() -> float:
    """Peak resident set of this process (ru_maxrss: KiB on Linux, bytes on macOS), GB.
    On CUDA this is host memory only; `held_gb` is what MLX holds on the device."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if platform.system() == "Darwin" else 1024) / GB


def held_gb() -> float:
    """Memory MLX holds now: live arrays plus its buffer cache, GB."""
    import mlx.core as mx

    return (mx.get_active_memory() + mx.get_cache_memory()) / GB
