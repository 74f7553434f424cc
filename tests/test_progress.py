"""Stage output fits where it goes: colour and redraw codes on a terminal only, never with
NO_COLOR; mlx-lm's training display (which forces truecolor) follows the same rule."""

from __future__ import annotations

import io

import pytest

from pipeline.core import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def train_display(stream) -> str:
    from mlx_lm import cli_ui

    progress.plain_mlx_console(stream)
    ui = cli_ui.TrainUI(2)
    with ui:
        ui.advance()
        ui.report_train(1, 1.25, 100.0, 1000)
        ui.report_val(1, 1.5, 0.1)
    return stream.getvalue()


@pytest.fixture(autouse=True)
def _restore_mlx_console(monkeypatch):
    cli_ui = pytest.importorskip("mlx_lm.cli_ui")
    monkeypatch.setattr(cli_ui, "make_console", cli_ui.make_console)  # undone after each test
    monkeypatch.delenv("NO_COLOR", raising=False)


def test_training_display_into_a_pipe_has_no_escape_codes():
    out = train_display(io.StringIO())
    assert "1.250" in out and "\x1b[" not in out


def test_training_display_on_a_terminal_with_no_color_has_no_escape_codes(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    out = train_display(Terminal())
    assert "1.250" in out and "\x1b[" not in out


def test_terminal_without_no_color_keeps_mlx_lms_console():
    from mlx_lm import cli_ui

    before = cli_ui.make_console
    progress.plain_mlx_console(Terminal())
    assert cli_ui.make_console is before


def test_progress_bar_redraws_only_on_a_terminal_without_no_color(monkeypatch):
    for stream, no_color, escapes in ((Terminal(), "", True), (Terminal(), "1", False),
                                      (io.StringIO(), "", False)):
        monkeypatch.setenv("NO_COLOR", no_color)
        bar = progress.Progress(2, "generate", stream=stream, every_s=0.0)
        bar.advance()
        bar.close()
        assert ("\x1b[" in stream.getvalue()) == escapes, (no_color, stream.getvalue())
