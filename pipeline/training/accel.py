"""Pick the fast path for MLX on this machine: BLAS on Linux CPUs, dtype per backend.

The `mlx[cpu]` wheel calls a reference BLAS: a float32 1024x1024 matmul ran at 4.5 GFLOP/s here
and at 178 GFLOP/s with OpenBLAS preloaded. A preload has to happen before the process starts, so
`prefer_fast_blas()` re-executes the CLI once with LD_PRELOAD set (see bench/README.md).
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
# OpenBLAS picks its kernels per CPU (Zen, SkylakeX, Haswell...), and they round differently: the
# same training gave other adapter bytes here with its Zen kernels than with Haswell's. One kernel
# set for every x86-64 CPU with AVX2 keeps `dvc repro` byte-identical across machines (a
# teammate's rerun changes no tracked byte). Set OPENBLAS_CORETYPE yourself to choose another.
X86_CORETYPE = "Haswell"
OPT_OUT = "TUNELINE_NO_BLAS_PRELOAD"  # set to 1 to run on the wheel's own BLAS (benchmarks)
MARKER = "TUNELINE_BLAS_PRELOADED"


def find_openblas() -> str | None:
    return next((p for p in OPENBLAS_CANDIDATES if Path(p).exists()), None)


def blas_in_use() -> str:
    """What BLAS MLX's CPU backend calls in this process."""
    if platform.system() == "Darwin":
        return "Accelerate"
    preload = os.environ.get("LD_PRELOAD", "")
    return "OpenBLAS (preloaded)" if "openblas" in preload else "reference BLAS of the mlx wheel"


def prefer_fast_blas() -> None:
    """Re-exec this process with OpenBLAS preloaded when on Linux and it is installed."""
    if platform.system() != "Linux" or os.environ.get(OPT_OUT) == "1" or os.environ.get(MARKER):
        return
    if "openblas" in os.environ.get("LD_PRELOAD", ""):
        return
    lib = find_openblas()
    if lib is None or not getattr(sys, "orig_argv", None):
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    if platform.machine() in ("x86_64", "AMD64"):
        env.setdefault("OPENBLAS_CORETYPE", X86_CORETYPE)
    env[MARKER] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def device_name() -> str:
    import mlx.core as mx

    return str(mx.default_device())


def compute_dtype() -> str:
    """float32 on CPU (bf16 is 17x slower there), bf16 on GPUs (CUDA, Metal)."""
    import mlx.core as mx

    return "float32" if mx.default_device() == mx.cpu else "bfloat16"
