"""The fast-BLAS re-exec (pipeline/training/accel.py): OpenBLAS preloaded, and on x86-64 one
kernel set for every CPU, so training gives the same bytes on a teammate's machine."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from pipeline.training import accel

SNIPPET = ("import os; from pipeline.training import accel; accel.prefer_fast_blas(); "
           "print(os.environ.get('LD_PRELOAD', ''), os.environ.get('OPENBLAS_CORETYPE', ''))")


def run(env_extra: dict[str, str]) -> list[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "OPENBLAS_CORETYPE", accel.MARKER)}
    out = subprocess.run([sys.executable, "-c", SNIPPET], env={**env, **env_extra},
                         capture_output=True, text=True, check=True, timeout=120).stdout
    return out.split()


needs_openblas = pytest.mark.skipif(
    platform.system() != "Linux" or accel.find_openblas() is None,
    reason="OpenBLAS preload is Linux-only; scripts/setup.sh installs it there")


@needs_openblas
def test_the_re_exec_preloads_openblas_and_pins_one_kernel_set_on_x86():
    preload, *coretype = run({})
    assert "openblas" in preload
    expected = [accel.X86_CORETYPE] if platform.machine() in ("x86_64", "AMD64") else []
    assert coretype == expected


@needs_openblas
def test_a_coretype_the_user_chose_is_kept():
    _, coretype = run({"OPENBLAS_CORETYPE": "Zen"})
    assert coretype == "Zen"
