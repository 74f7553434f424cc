"""Draft questions: `tuneline questions draft [--topic T] [--count N] [--prompt NAME] [--dry-run]`.

Asks an LLM (the `questions` section of params.yaml: backend, model, prompt templates, topic,
starter phrases, audience categories) for a list of questions. With `structured`, the request
carries a JSON schema shaped like the template (a list, or an object by category when it uses
{categories}; each question a bounded string ending in a question mark, opening with the starters
when it uses {starters}: pipeline/llm/schemas.py), which every backend enforces while decoding; where
a server rejects it, the reply is parsed as text and the output says so. The parser reads what
models really return
(a JSON array or object, a fenced JSON block, a numbered or bulleted list, category headings with
questions under them), drops near-duplicates of existing and of each other (pipeline/rows/neardup.py,
with curate's `curate.near_dup_threshold`: the same measure curate and validate use, for Chinese as
for English), and appends the rest
to data/questions.jsonl with provenance (model, prompt id, time). People curate the file afterwards.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.core.config import ConfigError
from pipeline.core.errors import UserError
from pipeline.llm import clients as llm
from pipeline.llm import schemas
from pipeline.rows import neardup
from pipeline.rows.jsonl import dumps, read_jsonl, write_text


@dataclass(frozen=True)
class DraftConfig(llm.LLMSettings):
    temperature: float
    seed: int | None  # null = base.seed
    max_tokens: int  # the whole list comes in one reply
    topic: str
    count: int  # questions asked for (per category when the prompt uses categories)
    starters: tuple[str, ...]  # phrases the questions should start with ({starters})
    categories: tuple[str, ...]  # audience categories ({categories}); headings map to these
    prompt: str  # which entry of `prompts` to send
    prompts: dict[str, str]  # templates: {topic} {count} {starters} {categories}
    system: str
    structured: bool  # send a JSON schema the backend enforces (false: parse free text only)
    question_chars: tuple[int, int]  # length bounds of one question in the schema


@dataclass(frozen=True)
class Draft:
    question: str
    category: str | None


@dataclass(frozen=True)
class DraftResult:
    added: list[dict[str, Any]]
    duplicates: list[str]  # drafted questions dropped as near-duplicates
    parsed: int
    prompt_id: str
    structured: bool = False  # the reply was constrained to the schema
    note: str | None = None  # why it was not, where a schema was asked for


class DraftFormatError(UserError):
    """The model's reply is in no format the parser knows: nothing was appended."""


# --- parsing -------------------------------------------------------------------------------

FENCE = re.compile(r"```[a-zA-Z]*\s*\n(.*?)```", re.DOTALL)
ITEM = re.compile(r"^\s*(?:[-*•·+]|\d{1,3}[.)、:]|\(\d{1,3}\)|（\d{1,3}）|[qQ]\d*[.:：])\s+(.*)$")
CN_ITEM = re.compile(r"^\s*(?:\d{1,3}[.、．]|[（(]\d{1,3}[)）])\s*(.*)$")  # often no space
CN_HEADING = re.compile(r"^\s*[一二三四五六七八九十]+[、.．]\s*(.+)$")
MD_HEADING = re.compile(r"^\s*#{1,6}\s*(.+?)\s*#*\s*$")
BOLD_LINE = re.compile(r"^\s*\*\*(.+?)\*\*\s*[:：]?\s*$")
QUESTION_KEYS = ("question", "q", "text", "content", "问题")
CATEGORY_KEYS = ("category", "audience", "type", "类别", "分类")


def parse_drafts(text: str, categories: tuple[str, ...] = ()) -> list[Draft]:
    """Questions from a model's reply; raises DraftFormatError when there are none to be found."""
    for candidate in json_candidates(text):
        drafts = from_json(candidate, categories)
        if drafts:
            return drafts
    drafts = from_lines(text, categories)
    if not drafts:
        snippet = text.strip()[:160].replace("\n", " | ")
        raise DraftFormatError(
            f"the model's reply has no questions in a known format (a JSON array or object, a "
            f"fenced JSON block, a numbered or bulleted list); it starts: {snippet!r}. Nothing "
            "was appended; try again, or a stronger model, or ask for JSON in the prompt")
    return drafts


def json_candidates(text: str) -> Iterator[Any]:
    """Fenced blocks first, then the first JSON value starting at any [ or {."""
    decoder = json.JSONDecoder()
    sources = [m.group(1) for m in FENCE.finditer(text)] + [text]
    for source in sources:
        for match in re.finditer(r"[\[{]", source):
            try:
                value, _ = decoder.raw_decode(source, match.start())
            except json.JSONDecodeError:
                continue
            yield value
            break


def from_json(value: Any, categories: tuple[str, ...], category: str | None = None) -> list[Draft]:
    if isinstance(value, str):
        return [Draft(clean(value), category)] if clean(value) else []
    if isinstance(value, list):
        return [d for item in value for d in from_json(item, categories, category)]
    if not isinstance(value, dict):
        return []
    question = next((value[k] for k in QUESTION_KEYS if isinstance(value.get(k), str)), None)
    if question is not None:
        named = next((value[k] for k in CATEGORY_KEYS if isinstance(value.get(k), str)), None)
        cat = match_category(named, categories) if named else category
        return [Draft(clean(question), cat)] if clean(question) else []
    # {"questions": [...]} or {"students": [...], "DBAs": [...]}
    drafts = []
    for key, items in value.items():
        cat = category if key.lower() in ("questions", "faq", "faqs", "items", "问题") else (
            match_category(key, categories))
        drafts += from_json(items, categories, cat)
    return drafts


def from_lines(text: str, categories: tuple[str, ...]) -> list[Draft]:
    drafts: list[Draft] = []
    category: str | None = None
    for line in text.splitlines():
        heading = heading_of(line, categories)
        if heading is not None:
            category = heading or None  # '' = a section we cannot name
            continue
        bare = re.sub(r"^\s*#{1,6}\s*", "", line)
        item = ITEM.match(bare) or CN_ITEM.match(bare)
        body = clean(item.group(1)) if item else ""
        if not item and is_question(bare):
            body = clean(bare)  # a bare line that is plainly a question
        if body:
            drafts.append(Draft(body, category))
    return drafts


def heading_of(line: str, categories: tuple[str, ...]) -> str | None:
    """The category a heading line names, '' for a heading of no known category, else None."""
    m = MD_HEADING.match(line) or BOLD_LINE.match(line) or CN_HEADING.match(line)
    if m:
        if is_question(m.group(1)):
            return None
        return match_category(m.group(1), categories) or ""
    item = ITEM.match(line) or CN_ITEM.match(line)
    label = clean(item.group(1)) if item else line.strip()
    if is_question(label):
        return None
    if label.endswith((":", "：")):
        # "2. Kernel developers:" is a heading; a bare "Here are 50 questions:" intro is one
        # only when it names a requested category.
        if item:
            return match_category(label, categories) or ""
        return match_category(label, categories) if categories else None
    if item and categories and len(label) <= 30:
        return match_category(label, categories)  # "1、学生" above its questions
    return None


def match_category(name: str | None, categories: tuple[str, ...]) -> str | None:
    if not name:
        return None
    if not categories:
        return clean(name).rstrip(":：") or None
    norm = normalise(name)
    for cat in categories:
        if normalise(cat) and (normalise(cat) in norm or norm in normalise(cat)):
            return cat
    return None


DEBRIS = re.compile(r'^\s*(\d{1,3}[.)、:]|[-*•#>]|[qQ]\d+\b)|[{}\[\]"`\\]|\n|\*\*|^\s*(here are|sure)\b',
                    re.IGNORECASE)


def well_formed(text: str) -> bool:
    """A draft a person would keep as is: 6..300 characters on one line, ending in a question
    mark (or a full stop: a request such as "I need to ..."), no numbering, bullet, markup,
    JSON or preamble debris. The measure of bench/bench_structured.py and the embedded test."""
    text = text.strip()
    return (6 <= len(text) <= 300 and text.endswith(("?", "？", ".", "。"))
            and not DEBRIS.search(text) and text.count("?") + text.count("？") <= 1
            and len(re.findall(r",\s*(?:[A-Z][a-z]+|I)\b", text)) < 2)  # an echoed starter list


def is_question(text: str) -> bool:
    return clean(text).endswith(("?", "？"))


def clean(text: str) -> str:
    text = re.sub(r"\*\*|__|`", "", text).strip()
    return text.strip(" \t\"'“”‘’「」").strip()


# --- near-duplicates -----------------------------------------------------------------------


def normalise(text: str) -> str:
    """Case, width and punctuation folded away; spaces dropped (Chinese has none to compare)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in text if unicodedata.category(ch)[0] in "LN")


def similarity(a: str, b: str) -> float:
    return neardup.similarity(a, b)


def drop_near_duplicates(drafts: list[Draft], existing: list[str],
                         threshold: float) -> tuple[list[Draft], list[str]]:
    """A draft is dropped when it is empty or near-duplicates an existing question or a kept
    earlier draft (pipeline/rows/neardup.py, the measure curate applies later)."""
    n = len(existing)
    texts = [neardup.content_text(q) for q in (*existing, *(d.question for d in drafts))]
    near: dict[int, set[int]] = {}
    for p in neardup.near_pairs(texts, threshold).expanded():
        near.setdefault(p.j, set()).add(p.i)
    kept: list[Draft] = []
    dropped: list[str] = []
    kept_at: set[int] = set(range(n))
    for k, draft in enumerate(drafts, n):
        if not normalise(draft.question) or near.get(k, set()) & kept_at:
            dropped.append(draft.question)
            continue
        kept.append(draft)
        kept_at.add(k)
    return kept, dropped


# --- the command ---------------------------------------------------------------------------


def render_prompt(cfg: DraftConfig) -> tuple[str, str]:
    """The prompt text and its id: template name plus a short hash of the template."""
    if cfg.prompt not in cfg.prompts:
        raise ConfigError(f"params.yaml:questions.prompt: {cfg.prompt!r} is not one of "
                          f"{sorted(cfg.prompts)}; add it under questions.prompts or pick one")
    template = cfg.prompts[cfg.prompt]
    try:
        text = template.format(topic=cfg.topic, count=cfg.count, starters=", ".join(cfg.starters),
                               categories=", ".join(cfg.categories))
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"params.yaml:questions.prompts.{cfg.prompt}: cannot fill ({exc!r}); "
                          "placeholders are {topic} {count} {starters} {categories}") from exc
    digest = hashlib.sha256(template.encode("utf-8")).hexdigest()[:8]
    return text, f"{cfg.prompt}@{digest}"


def run(
    cfg: DraftConfig,
    seed: int,
    questions_path: Path,
    client: llm.Client | None = None,
    base: llm.BaseModel | None = None,
    dry_run: bool = False,
    *,
    near_dup_threshold: float,
    now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    sleep: Callable[[float], None] = time.sleep,
    corrections_path: Path | None = None,
) -> DraftResult:
    existing = read_jsonl(questions_path) if questions_path.exists() else []
    corrections_path = corrections_path or questions_path.with_name("corrections.jsonl")
    taken = existing + (read_jsonl(corrections_path) if corrections_path.exists() else [])
    prompt, prompt_id = render_prompt(cfg)
    client = client or llm.connect(cfg, base)
    messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [
        {"role": "user", "content": prompt}]
    sampling = llm.Sampling(cfg.temperature, cfg.seed if cfg.seed is not None else seed,
                            cfg.max_tokens)
    schema = reply_schema(cfg) if cfg.structured else None
    reply = llm.ask(client, messages, sampling, cfg, sleep=sleep, schema=schema)
    drafts = read_drafts(reply, cfg.categories)
    kept, dropped = drop_near_duplicates(
        drafts, [str(r.get("question", "")) for r in existing], near_dup_threshold)
    created = now().isoformat(timespec="seconds")
    rows = [draft_row(qid, d, client.model, prompt_id, created)
            for qid, d in zip(next_ids(taken), kept)]
    if rows and not dry_run:
        append_rows(questions_path, rows)
    note = getattr(client, "schema_fallback", None) if schema and not reply.structured else None
    return DraftResult(rows, dropped, len(drafts), prompt_id, reply.structured, note)


def reply_schema(cfg: DraftConfig) -> schemas.Schema:
    """The schema matching the template's shape: by category when it names {categories}."""
    lo, hi = cfg.question_chars
    if not 1 <= lo < hi:
        raise ConfigError(f"params.yaml:questions.question_chars: [{lo}, {hi}] is not a range "
                          "of lengths; write [min, max] with 1 <= min < max, e.g. [12, 150]")
    template = cfg.prompts[cfg.prompt]
    starters = cfg.starters if "{starters}" in template else ()
    if "{categories}" in template:
        return schemas.draft_by_category(cfg.categories, cfg.count, cfg.question_chars, starters)
    return schemas.draft_list(cfg.count, cfg.question_chars, starters)


def read_drafts(reply: llm.Reply, categories: tuple[str, ...]) -> list[Draft]:
    """A structured reply is read as JSON (also when cut short); anything else is parsed."""
    if reply.structured:
        value = schemas.loads(reply.text)
        drafts = from_json(value, categories) if value is not None else []
        if drafts:
            return drafts
    return parse_drafts(reply.text, categories)


def draft_row(qid: str, d: Draft, model: str, prompt_id: str, created: str) -> dict[str, Any]:
    row: dict[str, Any] = {"id": qid, "question": d.question, "source": "drafted"}
    if d.category:
        row["category"] = d.category
    return {**row, "model": model, "prompt_id": prompt_id, "created": created}


def next_ids(existing: list[dict[str, Any]]) -> Iterator[str]:
    """Ids above every id in use, corrections included: a correction for a deleted question
    must never apply to a new, unrelated one that inherited its id."""
    numbers = [int(m.group(1)) for r in existing
               if (m := re.fullmatch(r"q-(\d+)", str(r.get("id", ""))))]
    n = max(numbers, default=0)
    while True:
        n += 1
        yield f"q-{n:04d}"


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite atomically with the new rows at the end (a plain append could be cut short)."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    write_text(path, old + "".join(dumps(r) + "\n" for r in rows))
