"""data/corrections.jsonl: errors name the line an editor shows."""

from __future__ import annotations

import pytest

from pipeline.rows import corrections

# Each of these is whitespace to str.strip() (so the reader skips the line as blank) but not to
# bytes.strip(): counting them differently shifted every later line number.
UNICODE_SPACES = ["\u00a0", "\x1c", "\u2028", "\u3000", "\x85"]


@pytest.mark.parametrize("space", UNICODE_SPACES, ids=lambda s: f"U+{ord(s):04X}")
def test_a_line_of_only_a_unicode_space_keeps_later_line_numbers(tmp_path, space):
    path = tmp_path / "corrections.jsonl"
    path.write_text(space + "\n"
                    '{"id": "q-0001", "action": "drop"}\n'
                    '{"id": "q-0002", "action": "rename"}\n', encoding="utf-8")
    with pytest.raises(corrections.CorrectionError, match=r"corrections\.jsonl:3: action 'rename'"):
        corrections.load(path)


def test_correction_lines_carry_the_line_an_editor_shows(tmp_path):
    path = tmp_path / "corrections.jsonl"
    path.write_text('\u00a0\n\n{"id": "q-0001", "action": "drop"}\n\u2028\n'
                    '{"id": "q-0002", "action": "drop"}\n', encoding="utf-8")
    assert [(c.id, c.line) for c in corrections.load(path)] == [("q-0001", 3), ("q-0002", 5)]
