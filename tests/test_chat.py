"""`tuneline chat` and `compare`: the loop with a recording reply, the CLI on a tiny model."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_evaluate import ROWS, make_trained_adapter
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.commands import chat
from pipeline.training.model import greedy_answer


class Recorder:
    """A `Reply` that remembers every conversation it was shown and streams a canned answer."""

    def __init__(self) -> None:
        self.seen: list[list[dict[str, str]]] = []

    def __call__(self, messages: list[dict[str, str]]) -> Iterator[str]:
        self.seen.append([dict(m) for m in messages])
        yield from ("answer ", str(len(self.seen)))


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("chat-adapter") / "adapters"
    return make_trained_adapter(tiny_model_dir, out, ROWS, steps=10)


def talk(lines: str, reply: Recorder, system: str | None = None) -> tuple[list, str]:
    out = io.StringIO()
    history = chat.chat_loop(reply, io.StringIO(lines), out, system)
    return history, out.getvalue()


def test_history_is_kept_across_turns_and_reset_forgets_it() -> None:
    reply = Recorder()
    history, shown = talk("hello\nand then?\n/reset\nagain\n/exit\nnot read\n", reply)

    assert [len(s) for s in reply.seen] == [1, 3, 1]
    assert reply.seen[1] == [{"role": "user", "content": "hello"},
                             {"role": "assistant", "content": "answer 1"},
                             {"role": "user", "content": "and then?"}]
    assert history == [{"role": "user", "content": "again"},
                       {"role": "assistant", "content": "answer 3"}]
    assert "model> answer 2" in shown and "(conversation cleared)" in shown


def test_end_of_input_leaves_like_exit() -> None:
    reply = Recorder()
    history, _ = talk("only line\n", reply)
    assert len(reply.seen) == 1 and len(history) == 2


def test_system_prompt_survives_reset_and_commands_are_not_sent() -> None:
    reply = Recorder()
    talk("/help\n\none\n/reset\ntwo\n", reply, system="Be brief.")
    assert [s[0] for s in reply.seen] == [{"role": "system", "content": "Be brief."}] * 2
    assert all(m["content"] not in ("/help", "") for s in reply.seen for m in s)


def test_ctrl_c_stops_the_reply_and_keeps_what_was_said() -> None:
    def interrupted(messages: list[dict[str, str]]) -> Iterator[str]:
        yield "partial"
        raise KeyboardInterrupt

    history, shown = talk("q\n/exit\n", interrupted)  # type: ignore[arg-type]
    assert history[-1] == {"role": "assistant", "content": "partial"}
    assert "[stopped]" in shown


def test_chat_command_streams_the_tuned_models_greedy_reply(tiny_model_dir: Path,
                                                            adapter_dir: Path) -> None:
    model, tokenizer = chat.load_model(tiny_model_dir, adapter_dir)
    expected = greedy_answer(model, tokenizer, [{"role": "user", "content": "Where?"}], 8)
    result = CliRunner().invoke(app, ["chat", "--model", str(tiny_model_dir), "--adapters",
                                      str(adapter_dir), "--max-tokens", "8"],
                                input="Where?\n/exit\n")
    assert result.exit_code == 0, result.output
    said = result.output.split("model> ", 1)[1].split("\nyou> ", 1)[0]
    assert said.strip() == expected["answer"]


def test_chat_with_a_fused_model_needs_no_adapter(tiny_model_dir: Path) -> None:
    assert chat.resolve(tiny_model_dir, None) == (tiny_model_dir, None)
    assert chat.resolve(None, None) == (chat.BASE_DIR, chat.ADAPTERS_DIR)
    result = CliRunner().invoke(app, ["chat", "--model", str(tiny_model_dir)], input="/exit\n")
    assert result.exit_code == 0, result.output
    assert f"chatting with {tiny_model_dir}\n" in result.output


def test_missing_model_or_adapter_says_what_to_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(chat.ChatError, match="dvc repro"):
        chat.check_paths(tmp_path / "models" / "base", None)
    with pytest.raises(chat.ChatError, match="models/fused"):
        chat.check_paths(tiny_model_dir, tmp_path / "models" / "adapters")


def test_compare_shows_base_and_tuned_answers_side_by_side(tiny_model_dir: Path,
                                                           adapter_dir: Path) -> None:
    base, tuned = chat.compare(tiny_model_dir, adapter_dir, "How do I create an index?", 10)
    assert base["answer"] != tuned["answer"]
    result = CliRunner().invoke(app, ["compare", "How do I create an index?", "--model",
                                      str(tiny_model_dir), "--adapters", str(adapter_dir),
                                      "--max-tokens", "10"])
    assert result.exit_code == 0, result.output
    expected = chat.side_by_side([("base", base["answer"]), ("tuned", tuned["answer"])])
    assert result.output.strip("\n") == expected.strip("\n")


def test_side_by_side_wraps_each_column_and_keeps_line_breaks() -> None:
    text = chat.side_by_side([("base", "one two three four five six"), ("tuned", "a\nb")],
                             width=43)
    lines = text.splitlines()
    assert lines[0].startswith("base") and "| tuned" in lines[0]
    assert all(len(line) <= 43 for line in lines)
    right = [line.split(" | ", 1)[1].strip() for line in lines[2:] if " | " in line]
    assert right[:2] == ["a", "b"]
    left = " ".join(line.split(" | ", 1)[0].strip() for line in lines[2:])
    assert left.split() == ["one", "two", "three", "four", "five", "six"]
