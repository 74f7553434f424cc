"""`tuneline review serve` shows a conversation's preference pair: the expert's answer (chosen)
over the generated answer it replaced (rejected), as curate wrote it."""

from __future__ import annotations

import json

from pipeline.commands import review_server
from pipeline.rows.pairs import digest
from tests.review_project import make_project, paths, served


def test_a_replaced_answer_shows_its_pair(tmp_path):
    old = "Answer 4: set option4 = 12 in the config file and reload."
    root = make_project(tmp_path, n=12, corrections=[
        {"id": "q-0004", "action": "replace_answer", "answer": "Set option4 with ALTER SYSTEM.",
         "replaces": digest(old)}])
    rows = {r["id"]: r for r in review_server.build_view(paths(root))}
    [pair] = rows["q-0004"]["pairs"]
    assert pair["chosen"] == "Set option4 with ALTER SYSTEM." and pair["rejected"] == old
    assert pair["generated"].endswith("answers.jsonl:5")
    assert rows["q-0005"]["pairs"] == []
    with served(root) as url:
        import urllib.request

        page = json.loads(urllib.request.urlopen(f"{url}/api/rows?q=q-0004").read())
        shown = next(r for r in page["rows"] if r["id"] == "q-0004")
        assert shown["pairs"][0]["rejected"] == old
