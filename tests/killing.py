"""Real kill -9 for the resume tests: run a script in a child Python, SIGKILL it at a marker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def kill_at(script: str, *args: str, marker: str | Callable[[str], bool]) -> None:
    """Run `python -c script args` (repository and tests/ importable) and SIGKILL it once its
    stdout reaches the marker: a string must be the first line, a predicate any line. The
    marker is asserted, so a child that never gets there fails the test instead of passing."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        if isinstance(marker, str):
            assert proc.stdout.readline() == marker
        else:
            assert any(marker(line) for line in iter(proc.stdout.readline, ""))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
