"""The script tuneline's `generate` stage replaces, written from its description (issue 3):

    python bench/baseline_sequential.py QUESTIONS OUT [--url URL] [--model MODEL]

For each question, one after another: ask Ollama (`POST /api/generate`, `stream: false`) for an
answer, then for "a likely follow-up question or request", and append
`{"text": "<s>[INST] q[/INST] a</s>[INST]follow-up[/INST]"}` to OUT. Faithful to the original's
habits: sequential, no retries, appends on every run, no cache. The original hard-coded the model
and URL; they are flags here only so the benchmark can point it at the same server as tuneline.
QUESTIONS is data/questions.jsonl (the "question" field) or plain text, one question a line.
"""

from __future__ import annotations

import argparse
import json
import urllib.request
from pathlib import Path

MODEL = "llama2"  # hard-coded in the original
URL = "http://localhost:11434"


def generate(url: str, model: str, prompt: str) -> str:
    body = json.dumps({"model": model, "prompt": prompt, "stream": False}).encode()
    req = urllib.request.Request(f"{url}/api/generate", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as resp:
        return json.loads(resp.read())["response"]


def questions(path: Path) -> list[str]:
    lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    if path.suffix == ".jsonl":
        return [json.loads(x)["question"] for x in lines]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("questions", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--url", default=URL)
    ap.add_argument("--model", default=MODEL)
    args = ap.parse_args()
    with args.out.open("a", encoding="utf-8") as out:
        for q in questions(args.questions):
            answer = generate(args.url, args.model, q)
            followup = generate(args.url, args.model,
                                f"Question: {q}\nAnswer: {answer}\n"
                                "What is a likely follow-up question or request?")
            text = f"<s>[INST] {q}[/INST] {answer}</s>[INST]{followup}[/INST]"
            out.write(json.dumps({"text": text}) + "\n")


if __name__ == "__main__":
    main()
