"""Talk to the tuned model: `tuneline chat` and `tuneline compare "prompt"`.

`tuneline chat` loads models/base with the adapter in models/adapters (or any model directory with
`--model`, e.g. `--model models/fused`) and keeps a multi-turn conversation in the terminal,
streaming each reply as it is generated. `/reset` forgets the conversation, `/exit` (or Ctrl-D)
leaves; Ctrl-C stops the reply being written.

`tuneline compare "prompt"` answers one prompt with the base model and with the tuned one (greedy,
as the evaluate stage does) and prints both side by side.
"""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pipeline.core.errors import UserError

BASE_DIR = Path("models/base")  # where dvc.yaml puts them
ADAPTERS_DIR = Path("models/adapters")
HELP = "commands: /reset forgets the conversation, /exit leaves (Ctrl-C stops a reply)"

Messages = list[dict[str, str]]
Reply = Callable[[Messages], Iterator[str]]  # a conversation in, reply text pieces out


class ChatError(UserError):
    """A model or adapter that cannot be loaded, with the command that makes it."""


@dataclass(frozen=True)
class AnswerBudget:
    """`compare` answers as the evaluate stage does: `evaluate.max_tokens` unless told."""

    max_tokens: int


def resolve(model: Path | None, adapters: Path | None) -> tuple[Path, Path | None]:
    """No `--model`: the base with the tuned adapter. `--model DIR`: DIR alone unless
    `--adapters` is given too (a fused model has the adapter merged in)."""
    if model is None:
        return BASE_DIR, adapters if adapters is not None else ADAPTERS_DIR
    return model, adapters


def check_paths(model: Path, adapters: Path | None) -> None:
    if not (model / "config.json").exists():
        raise ChatError(f"{model}: no model here (config.json missing); run `dvc repro` "
                        "(or `dvc pull`) first, or pass --model DIR")
    if adapters is not None and not (adapters / "adapter_config.json").exists():
        raise ChatError(f"{adapters}: no adapter here (adapter_config.json missing); run "
                        "`dvc repro train` first, or use --model models/fused")


def load_model(model: Path, adapters: Path | None) -> tuple[Any, Any]:
    """mlx-lm model and tokenizer, with the adapter applied, in the dtype training used."""
    from pipeline.training import model as mlx_model

    check_paths(model, adapters)
    return mlx_model.load(model, adapters)


def stream_reply(model: Any, tokenizer: Any, max_tokens: int, temp: float) -> Reply:
    """A `Reply` that streams text pieces from mlx-lm's `stream_generate`."""
    from pipeline.training import model as mlx_model

    def reply(messages: Messages) -> Iterator[str]:
        for piece in mlx_model.stream(model, tokenizer, messages, max_tokens, temp):
            yield piece.text

    return reply


def chat_loop(reply: Reply, inp: TextIO, out: TextIO, system: str | None = None) -> Messages:
    """Read a line, stream the reply, keep the history; returns the conversation at exit."""
    start: Messages = [{"role": "system", "content": system}] if system else []
    history = list(start)
    out.write(HELP + "\n")
    while True:
        out.write("you> ")
        out.flush()
        try:
            line = inp.readline()
        except KeyboardInterrupt:
            break
        text = line.strip()
        if not line or text == "/exit":  # empty read: end of input (Ctrl-D)
            break
        if text == "/reset":
            history = list(start)
            out.write("(conversation cleared)\n")
        elif text.startswith("/") or not text:
            out.write(HELP + "\n" if text else "")
        else:
            history.append({"role": "user", "content": text})
            history.append({"role": "assistant", "content": speak(reply, history, out)})
    out.write("\n")
    return history


def speak(reply: Reply, history: Messages, out: TextIO) -> str:
    """Write the reply as it streams; Ctrl-C keeps what was said so far."""
    pieces = []
    out.write("model> ")
    try:
        for piece in reply(history):
            pieces.append(piece)
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        out.write(" [stopped]")
    out.write("\n")
    return "".join(pieces).strip()


def compare(model: Path, adapters: Path, prompt: str, max_tokens: int) -> tuple[dict[str, Any],
                                                                              dict[str, Any]]:
    """Greedy answers of the base and the tuned model; the model is loaded once."""
    from pipeline.training import model as mlx_model

    check_paths(model, adapters)
    m, tokenizer = load_model(model, None)
    messages = [{"role": "user", "content": prompt}]
    base = mlx_model.greedy_answer(m, tokenizer, messages, max_tokens)
    mlx_model.attach_adapters(m, adapters)
    return base, mlx_model.greedy_answer(m, tokenizer, messages, max_tokens)


def side_by_side(columns: Sequence[tuple[str, str]], width: int | None = None) -> str:
    """Columns of wrapped text with a title each, separated by ` | `."""
    width = width or shutil.get_terminal_size((100, 24)).columns
    col = max(20, (width - 3 * (len(columns) - 1)) // len(columns))
    wrapped = [[title, "-" * min(col, max(len(title), 8))] + wrap(text, col)
               for title, text in columns]
    height = max(len(w) for w in wrapped)
    lines = []
    for i in range(height):
        cells = [(w[i] if i < len(w) else "").ljust(col) for w in wrapped]
        lines.append(" | ".join(cells).rstrip())
    return "\n".join(lines)


def wrap(text: str, width: int) -> list[str]:
    """Wrap each line on its own so lists and code in an answer keep their line breaks."""
    out: list[str] = []
    for line in text.splitlines() or [""]:
        out.extend(textwrap.wrap(line, width, replace_whitespace=False, drop_whitespace=True)
                   or [""])
    return out
