"""Progress for long loops: a redrawn bar with rate and ETA on a terminal, plain lines in CI logs.

A bar full of carriage returns is noise in a CI log, so off a terminal it prints one line every
`every_s` seconds (and at the end) instead. Colour and cursor codes only on a terminal, and never
with NO_COLOR set (https://no-color.org): `plain_mlx_console` applies the same rule to mlx-lm's
training display, which forces truecolor even into `dvc repro`'s captured output.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import TextIO


class Progress:
    def __init__(self, total: int, label: str, stream: TextIO | None = None,
                 every_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.total, self.label, self.done = total, label, 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = styled(self.stream)
        self.every_s, self.clock = every_s, clock
        self.start = self.last = clock()
        self.shown = -1  # `done` when a plain line was last printed

    def advance(self, n: int = 1, note: str = "") -> None:
        self.done += n
        now = self.clock()
        if self.tty:
            self.stream.write("\r" + self.line(now, note) + "\033[K")
            self.stream.flush()
        elif now - self.last >= self.every_s:
            self.stream.write(self.line(now, note) + "\n")
            self.stream.flush()
            self.last, self.shown = now, self.done

    def close(self, note: str = "") -> None:
        if not self.tty and self.shown == self.done:
            return  # the last plain line already says it
        self.stream.write(("\r" if self.tty else "") + self.line(self.clock(), note) + "\n")
        self.stream.flush()

    def line(self, now: float, note: str = "") -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = fmt_time(left) if left != float("inf") else "?"
        frac = self.done / self.total if self.total else 1.0
        bar = ("#" * int(frac * 20)).ljust(20, ".") if self.tty else ""
        head = f"{self.label} [{bar}] " if bar else f"{self.label}: "
        tail = f" {note}" if note else ""
        return (f"{head}{self.done}/{self.total} ({frac:.0%}) {rate:.2f}/s "
                f"elapsed {fmt_time(elapsed)} eta {eta}{tail}")


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def styled(stream: TextIO) -> bool:
    """Escape codes (colour, redraw) are welcome: a terminal, and NO_COLOR unset or empty."""
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR")


def plain_mlx_console(stream: TextIO | None = None) -> None:
    """Make mlx-lm's rich console (training progress, reports) plain text unless `styled`."""
    try:
        from mlx_lm import cli_ui
        from rich.console import Console
    except ImportError:
        return
    stream = stream if stream is not None else sys.stdout
    if styled(stream) or not hasattr(cli_ui, "make_console"):
        return
    plain = Console(file=stream, color_system=None, no_color=True, force_terminal=False,
                    highlight=False, width=120,
                    theme=getattr(cli_ui, "_make_theme", lambda: None)())
    cli_ui.make_console = lambda: plain
