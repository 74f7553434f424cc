"""data/corrections.jsonl as editable lines, for `tuneline review apply` and `review serve`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.rows.jsonl import dumps, read_jsonl, write_text


@dataclass
class Lines:
    """data/corrections.jsonl as editable lines: untouched lines are written back byte for byte.

    Lines end at "\n" only, as JSONL defines them: str.splitlines() would also break at U+2028,
    U+2029 and U+0085 inside an expert's text and put the rows and lines out of step. Each text keeps
    its own line ending (CRLF stays CRLF); blank lines stay where they are (row None).
    """

    rows: list[dict[str, Any] | None]
    texts: list[str]

    @classmethod
    def read(cls, path: Path) -> Lines:
        if not path.exists():
            return cls([], [])
        read_jsonl(path)  # the line-numbered errors for bad lines
        texts = re.findall(r"[^\n]*\n|[^\n]+$", path.read_bytes().decode("utf-8"))
        return cls([json.loads(t) if t.strip() else None for t in texts], texts)

    def _newline(self) -> str:
        return "\r\n" if self.texts and self.texts[0].endswith("\r\n") else "\n"

    def _hits(self, rid: str, action: str) -> list[int]:
        return [i for i, r in enumerate(self.rows)
                if r is not None and r.get("id") == rid and r.get("action") == action]

    def find(self, rid: str, action: str) -> dict[str, Any] | None:
        hits = self._hits(rid, action)
        return self.rows[hits[-1]] if hits else None

    def set(self, row: dict[str, Any]) -> bool:
        """Replace the last line with this id and action, or append; True if anything changed."""
        idx = self._hits(row["id"], row["action"])
        if idx and self.rows[idx[-1]] == row:
            return False
        if idx:
            old = self.texts[idx[-1]]
            ending = old[len(old.rstrip("\r\n")):] or self._newline()
            self.rows[idx[-1]], self.texts[idx[-1]] = row, dumps(row) + ending
        else:
            if self.texts and not self.texts[-1].endswith("\n"):
                self.texts[-1] += self._newline()
            self.rows.append(row)
            self.texts.append(dumps(row) + self._newline())
        return True

    def remove(self, rid: str, action: str) -> bool:
        gone = set(self._hits(rid, action))
        self.rows = [r for i, r in enumerate(self.rows) if i not in gone]
        self.texts = [t for i, t in enumerate(self.texts) if i not in gone]
        return bool(gone)

    def write(self, path: Path) -> None:
        write_text(path, "".join(self.texts))
