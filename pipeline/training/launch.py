"""How the train stage starts its processes: one, or N data-parallel ranks under `mlx.launch`.

`params.yaml:launch` asks for N processes per host; `tuneline train` then re-runs itself as
`mlx.launch --backend B --hosts H -n N -- <the same command>`, so `dvc repro` and
`dvc exp run -S launch.processes=2` drive it with the stage's own command. Every rank trains its
share of each global batch (train.batch_size / train.tokens_per_step are totals over all ranks);
rank 0 alone writes the stage outputs, in the layout of a one-process run.

Two things MLX leaves to the caller:
- `mlx.launch` exits 0 even when a rank fails, so rank 0 leaves a mark in a folder the launching
  process names (TUNELINE_LAUNCH_STATUS) and the launching process fails without it;
- mlx-lm's trainer sums its losses and token counts with `all_sum(..., stream=mx.cpu)`. MLX's
  NCCL group reduces on the CUDA command encoder of the stream it is given, and a CPU stream has
  none ("There is no Stream(gpu, N) in current thread", mlx/backend/cuda/device.cpp in MLX
  0.32), so under NCCL those sums go to the default (GPU) stream. Read in the source, not yet
  seen on two GPUs (bench/README.md "Two GPUs").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.core.errors import UserError

STATUS_ENV = "TUNELINE_LAUNCH_STATUS"  # folder where rank 0 marks a finished run
# What `mlx.launch` exports for each backend (mlx/_distributed_utils/launch.py, MLX 0.32).
LAUNCH_ENV = {"nccl": ("NCCL_HOST_IP", "NCCL_PORT", "MLX_WORLD_SIZE"),
              "jaccl": ("MLX_JACCL_COORDINATOR",), "ring": ("MLX_HOSTFILE",)}


class LaunchError(UserError):
    """A launch that cannot start or did not finish, with what to do."""


@dataclass(frozen=True)
class LaunchConfig:
    processes: int  # ranks per host; 1 = this process alone
    backend: Literal["auto", "nccl", "ring"]  # auto = nccl with CUDA, ring otherwise
    hosts: tuple[str, ...]  # the first is this machine (rank 0 writes the outputs)
    port: int  # ring: first port (one per rank); nccl: rank 0's rendezvous port


# --- the launching process -------------------------------------------------------------------


def launched() -> bool:
    """True inside a rank that `mlx.launch` (or a scheduler) started."""
    return "MLX_RANK" in os.environ


def backend_for(cfg: LaunchConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    import mlx.core as mx

    return "nccl" if mx.cuda.is_available() else "ring"  # mlx.launch's own default


def command(cfg: LaunchConfig, argv: list[str]) -> list[str]:
    """The `mlx.launch` command line that runs `argv` (a whole command) on every rank."""
    launcher = Path(sys.executable).parent / "mlx.launch"
    exe = str(launcher) if launcher.exists() else shutil.which("mlx.launch")
    if exe is None:
        raise LaunchError("params.yaml:launch.processes: mlx.launch not found next to "
                          f"{sys.executable} or on PATH; install mlx or set launch.processes: 1")
    backend = backend_for(cfg)
    port = ["--nccl-port" if backend == "nccl" else "--starting-port", str(cfg.port)]
    return [exe, "--backend", backend, "--hosts", ",".join(cfg.hosts), "-n", str(cfg.processes),
            *port, "--", *argv]


def relaunch(cfg: LaunchConfig) -> bool:
    """Run this command's ranks under mlx.launch when asked to; False = train here, one process.

    Raises LaunchError when rank 0 did not finish (its own error is printed above by the rank).
    """
    if launched() or (cfg.processes == 1 and len(cfg.hosts) == 1):
        return False
    if cfg.processes < 1 or not cfg.hosts:
        raise LaunchError("params.yaml:launch: processes must be >= 1 and hosts non-empty, "
                          f"got processes {cfg.processes}, hosts {list(cfg.hosts)}")
    argv = list(getattr(sys, "orig_argv", []) or [sys.executable, *sys.argv])
    with tempfile.TemporaryDirectory(prefix="tuneline-launch-") as status:
        env = {**os.environ, STATUS_ENV: status}
        cmd = command(cfg, argv)
        print("launching: " + " ".join(cmd[: cmd.index("--")]), flush=True)
        code = subprocess.run(cmd, env=env, check=False).returncode
        if code or not (Path(status) / "rank0").exists():
            raise LaunchError(f"distributed training did not finish (mlx.launch exit {code}, no "
                              "result from rank 0); see the ranks' messages above")
    return True


def mark_done() -> None:
    """Rank 0: tell the launching process that the stage finished."""
    status = os.environ.get(STATUS_ENV)
    if status and os.environ.get("MLX_RANK") == "0" and Path(status).is_dir():
        (Path(status) / "rank0").write_text("ok\n")


# --- inside a rank ---------------------------------------------------------------------------


def launched_backend(env: dict[str, str] | None = None) -> str | None:
    """Which backend `mlx.launch` set up for this process (None: not launched, or by mpirun)."""
    env = dict(os.environ) if env is None else env
    if "MLX_RANK" not in env:
        return None
    return next((b for b, keys in LAUNCH_ENV.items() if all(k in env for k in keys)), None)


def init_world() -> Any:
    """The process group: size 1 alone, else the backend mlx.launch set up (strictly: a rank
    that cannot join must not train alone and write the outputs as a second 'rank 0')."""
    import mlx.core as mx

    backend = launched_backend()
    if backend is None:
        return mx.distributed.init()  # size 1, or whatever MLX finds (mpirun)
    try:
        world = mx.distributed.init(strict=True, backend=backend)
    except (RuntimeError, ValueError) as exc:
        hint = " (NCCL needs the CUDA build: pip install 'mlx[cuda]')" if backend == "nccl" else ""
        raise LaunchError(f"rank {os.environ['MLX_RANK']}: MLX could not start the {backend} "
                          f"backend that mlx.launch set up{hint}: {exc}") from exc
    if backend == "nccl" and world.size() > 1:
        _reduce_on_default_stream()
    return world


def _reduce_on_default_stream() -> None:
    """NCCL reduces on a GPU stream only: drop mlx-lm's `stream=mx.cpu` (see the module doc)."""
    import mlx.core as mx

    original = mx.distributed.all_sum
    if getattr(original, "tuneline_nccl", False):
        return

    def all_sum(x, *, group=None, stream=None):
        return original(x, group=group)

    all_sum.tuneline_nccl = True  # type: ignore[attr-defined]
    mx.distributed.all_sum = all_sum
