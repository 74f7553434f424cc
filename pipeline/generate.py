"""Generate: `tuneline generate --questions data/questions.jsonl --out data/generated/answers.jsonl
--metrics reports/generate.json --cache .tuneline/cache/generate --base-model models/base`
(the `generate` stage of dvc.yaml).

For every question an answer and a likely follow-up question; with `answer_followups`, also the
follow-up's answer (a real two-turn conversation). Requests go through `pipeline.llm.clients` (embedded
llama.cpp/mlx, Ollama or any OpenAI-compatible server) with `concurrency` in flight.

Incremental and resumable: every finished reply is appended (fsync'ed) to a cache keyed by
everything that affects it (model identity, the rendered messages: question, system prompt and
templates; sampling). The cache lives outside the DVC output (`dvc repro` deletes outputs before a
stage runs) and is gitignored; so editing k questions sends only their requests, and a kill -9
loses only the requests in flight. The output itself is `persist: true` in dvc.yaml and each row
carries its request keys: a fresh clone that pulled it re-asks nothing either.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import orjson

from pipeline.core.config import ConfigError
from pipeline.core.progress import Progress
from pipeline.llm import clients as llm
from pipeline.llm import schemas
from pipeline.rows.jsonl import VOLATILE_KEYS, DataError, read_jsonl, write_jsonl, write_metrics

CACHE_FILE = "replies.jsonl"


@dataclass(frozen=True)
class GenerateConfig(llm.LLMSettings):
    concurrency: int  # requests in flight
    temperature: float
    seed: int | None  # null = base.seed
    max_tokens: int  # per answer
    followup_max_tokens: int  # per follow-up question
    structured_followup: bool  # ask for {"followup": "..."} under a JSON schema (schemas.FOLLOWUP)
    answer_followups: bool  # also answer the follow-up (two-turn conversation)
    allow_failed: int  # questions that may end with an empty answer before the stage fails
    system: str  # system prompt for every request
    answer_template: str  # user turn; {question}
    followup_template: str  # asks for the follow-up; {question} {answer}


@dataclass(frozen=True)
class GeneratePaths:
    questions: Path
    out: Path
    metrics: Path
    cache: Path  # directory for the reply cache; not a DVC output


@dataclass(frozen=True)
class GenerateResult:
    questions: int
    generated: int  # questions that needed at least one request
    reused: int  # questions answered entirely from the cache
    failed: list[str]  # ids whose answers stayed empty
    requests: int
    retries: int
    prompt_tokens: int
    completion_tokens: int
    wall_s: float


class GenerateError(llm.LLMError):
    """Too many questions failed; the message lists them."""


# --- the reply cache -----------------------------------------------------------------------


class ReplyCache:
    """Append-only JSONL of finished replies; one fsync'ed line per reply, last line may be torn."""

    def __init__(self, path: Path):
        self.path, self.lock = path, threading.Lock()
        self.replies: dict[str, llm.Reply] = {}
        self.torn = 0
        if path.exists():
            self._load()

    def _load(self) -> None:
        for raw in self.path.read_bytes().splitlines():
            try:
                row = orjson.loads(raw)  # 20,000 lines at 10,000 questions: ~2x json.loads
                self.replies[row["key"]] = llm.Reply(row["text"], row["finish_reason"],
                                                     row["prompt_tokens"], row["completion_tokens"])
            except (ValueError, KeyError, TypeError):  # orjson's decode error is a ValueError
                self.torn += 1  # a line cut by a crash: that request is simply asked again

    def get(self, key: str) -> llm.Reply | None:
        return self.replies.get(key)

    def remember(self, key: str, reply: llm.Reply) -> None:
        """In memory only (replies seeded from the previous output)."""
        self.replies.setdefault(key, reply)

    def put(self, key: str, reply: llm.Reply) -> None:
        line = json.dumps({"key": key, **asdict(reply)}, ensure_ascii=False) + "\n"
        with self.lock:
            self.replies[key] = reply
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                if os.fstat(fd).st_size and not self._ends_with_newline():
                    os.write(fd, b"\n")  # never glue a new line onto a torn one
                os.write(fd, line.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as fh:
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"


def seed_from_output(cache: ReplyCache, out: Path) -> int:
    """Rows of a previous output (e.g. pulled with DVC) carry their request keys: reuse them."""
    if not out.exists():
        return 0
    seeded = 0
    for row in read_jsonl(out):
        for call in row.get("calls", []):
            text = row.get(call.get("role", ""))
            if isinstance(text, str) and call.get("key"):
                tokens = call.get("tokens", {})
                cache.remember(call["key"], llm.Reply(text, call.get("finish_reason", "unknown"),
                                                      tokens.get("prompt", 0),
                                                      tokens.get("completion", 0)))
                seeded += 1
    return seeded


# --- one question --------------------------------------------------------------------------


class Cancelled(Exception):
    """Another worker hit a fatal error: stop sending."""


class NotCached(Exception):
    """A cache-only pass met a request that has to be sent."""


@dataclass
class Asker:
    """Asks (or recalls) the calls of one question."""

    client: llm.Client
    cfg: GenerateConfig
    identity: str
    seed: int
    cache: ReplyCache
    tally: llm.Tally
    sleep: Callable[[float], None] = time.sleep
    stop: threading.Event = field(default_factory=threading.Event)
    cache_only: bool = False  # raise NotCached instead of sending

    def sampling(self, max_tokens: int) -> llm.Sampling:
        return llm.Sampling(self.cfg.temperature, self.seed, max_tokens)

    def call(self, role: str, messages: list[llm.Message], max_tokens: int,
             calls: list[dict[str, Any]], schema: llm.Schema | None = None) -> llm.Reply:
        sampling = self.sampling(max_tokens)
        key = llm.request_key(self.identity, messages, sampling, schema)
        reply, sent = self.cache.get(key), False
        if reply is None:
            if self.cache_only:
                raise NotCached()
            if self.stop.is_set():
                raise Cancelled()
            reply = llm.ask(self.client, messages, sampling, self.cfg, self.tally, self.sleep,
                            schema=schema)
            if role == "followup":
                reply = replace(reply, text=followup_of(reply))
            self.cache.put(key, reply)
            sent = True
        calls.append({"role": role, "key": key, "finish_reason": reply.finish_reason,
                      "tokens": {"prompt": reply.prompt_tokens,
                                 "completion": reply.completion_tokens}, "sent": sent})
        return reply

    def question(self, q: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """The output row for one question and whether any request was sent for it."""
        cfg = self.cfg
        calls: list[dict[str, Any]] = []
        system = [{"role": "system", "content": cfg.system}] if cfg.system else []
        user = {"role": "user", "content": render(cfg.answer_template, "answer_template",
                                                  question=q["question"])}
        answer = self.call("answer", system + [user], cfg.max_tokens, calls)
        followup = second = None
        if answer.finish_reason == "length":  # curate drops a cut-off answer: ask nothing on it
            sent = [c.pop("sent") for c in calls]
            return self.row(q, answer, followup, second, calls), any(sent)
        prompt = render(cfg.followup_template, "followup_template", question=q["question"],
                        answer=answer.text)
        followup = self.call("followup", system + [{"role": "user", "content": prompt}],
                             cfg.followup_max_tokens, calls,
                             schemas.FOLLOWUP if cfg.structured_followup else None)
        if cfg.answer_followups:
            turns = system + [user, {"role": "assistant", "content": answer.text},
                              {"role": "user", "content": followup.text}]
            second = self.call("followup_answer", turns, cfg.max_tokens, calls)
        sent = [c.pop("sent") for c in calls]
        return self.row(q, answer, followup, second, calls), any(sent)

    def row(self, q: dict[str, Any], answer: llm.Reply, followup: llm.Reply | None,
            second: llm.Reply | None, calls: list[dict[str, Any]]) -> dict[str, Any]:
        replies = [r for r in (answer, followup, second) if r is not None]
        return {
            "id": q["id"], "question": q["question"], "answer": answer.text,
            "followup": followup.text if followup else None,
            "followup_answer": second.text if second else None,
            "model": self.client.model, "backend": self.client.backend,
            "sampling": {"temperature": self.cfg.temperature, "seed": self.seed,
                         "max_tokens": self.cfg.max_tokens,
                         "followup_max_tokens": self.cfg.followup_max_tokens},
            "finish_reason": answer.finish_reason,
            "followup_finish_reason": second.finish_reason if second else None,
            "tokens": {"prompt": sum(r.prompt_tokens for r in replies),
                       "completion": sum(r.completion_tokens for r in replies)},
            "calls": calls,
        }


def render(template: str, name: str, **values: str) -> str:
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"params.yaml:generate.{name}: cannot fill the template ({exc!r}); "
                          f"it may use {sorted('{' + k + '}' for k in values)}; "
                          "write literal braces as {{ and }}") from exc


LABEL = re.compile(r"^\s*(\*\*)?(follow[- ]?up( question| request)?|question|q|后续问题|追问)"
                   r"\s*[:：]\s*(\*\*)?\s*", re.IGNORECASE)


def followup_of(reply: llm.Reply) -> str:
    """The follow-up text: from the JSON a structured reply holds, else the first clean line."""
    text = schemas.followup_text(reply.text) if reply.structured else None
    return clean_followup(text if text is not None else reply.text)


PREAMBLE = re.compile(r"^(sure|certainly|of course|okay|ok|here('s| is| are)|a user asked|"
                      r"they got|the user)\b", re.IGNORECASE)
TEMPLATE_MARKERS = ("<|im_start|>", "<|im_end|>", "[INST]", "</s>", "<|endoftext|>")


REQUEST = re.compile(r"^(please|show|explain|tell|give|help|list|write|describe|compare|"
                     r"i need|i want|i'd like)\b", re.IGNORECASE)


def usable_followup(text: str, question: str) -> bool:
    """A follow-up a user could send next: one line of 8..300 characters that is a question
    (ends in ?) or a request (opens like one: "Show me...", "I need..."), with no label,
    preamble, JSON or template debris, and not the original question again."""
    line = text.strip()
    asks = line.endswith(("?", "？")) or (line.endswith(tuple(".。!！")) and bool(REQUEST.match(line)))
    return (8 <= len(line) <= 300 and "\n" not in line and asks
            and not LABEL.match(line) and not PREAMBLE.match(line) and line[0] not in "{[\"'"
            and not any(m in line for m in TEMPLATE_MARKERS)
            and not re.search(r'"\w+"\s*:', line)
            and norm_words(line) != norm_words(question))


def norm_words(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.casefold()))


def clean_followup(text: str) -> str:
    """The first real line, without labels and quotes: models add 'Follow-up question:' etc."""
    for line in text.splitlines():
        line = LABEL.sub("", line).strip().strip('"“”「」').strip()
        if line:
            return line
    return text.strip()


# --- the stage -----------------------------------------------------------------------------


def run(
    cfg: GenerateConfig,
    paths: GeneratePaths,
    *,
    seed: int,
    client: llm.Client | None = None,
    base: llm.BaseModel | None = None,
    progress: TextIO | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> GenerateResult:
    check_config(cfg)
    started = time.monotonic()
    questions = load_questions(paths.questions)
    cache = ReplyCache(paths.cache / CACHE_FILE)
    seed_from_output(cache, paths.out)
    client = client or llm.connect(cfg, base)
    identity = llm.retrying(client, cfg, client.identity, None, sleep)
    sampling_seed = cfg.seed if cfg.seed is not None else seed
    asker = Asker(client, cfg, identity, sampling_seed, cache, llm.Tally(), sleep)
    rows, sent, failed = answer_all(questions, asker, cfg.concurrency,
                                    Progress(len(questions), "generate", progress))
    result = summarise(questions, rows, sent, failed, asker.tally, time.monotonic() - started)
    write_metrics(paths.metrics, metrics(result, cfg, client), VOLATILE_KEYS | RUN_COUNTS)
    if len(failed) > cfg.allow_failed:
        raise GenerateError(
            f"{len(failed)} question(s) kept getting empty answers ({', '.join(failed[:10])}); "
            f"generate.allow_failed is {cfg.allow_failed}. Rephrase them in {paths.questions}, "
            "change the sampling, or raise allow_failed; answered ones are cached")
    write_jsonl(paths.out, rows)
    return result


def check_config(cfg: GenerateConfig) -> None:
    for name in ("concurrency", "max_tokens", "followup_max_tokens"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"params.yaml:generate.{name}: must be at least 1, "
                              f"got {getattr(cfg, name)}")
    if cfg.retries < 0 or cfg.allow_failed < 0:
        raise ConfigError("params.yaml:generate: retries and allow_failed must be >= 0")


def load_questions(path: Path) -> list[dict[str, Any]]:
    rows = read_jsonl(path)
    seen: dict[str, int] = {}
    for i, row in enumerate(rows, start=1):
        qid, text = row.get("id"), row.get("question")
        if not isinstance(qid, str) or not qid:
            raise DataError(f"{path}: row {i}: field 'id' missing or not a string; "
                            "give every question a unique id like q-0001")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}: row {i} (id {qid}): field 'question' missing or empty")
        if qid in seen:
            raise DataError(f"{path}: row {i}: id {qid} already used by row {seen[qid]}; "
                            "ids must be unique")
        seen[qid] = i
    return rows


def answer_all(questions: list[dict[str, Any]], asker: Asker, concurrency: int,
               progress: Progress) -> tuple[list[dict[str, Any]], set[str], list[str]]:
    done: dict[str, dict[str, Any]] = {}
    sent: set[str] = set()
    failed: list[str] = []
    pending = _from_cache(questions, asker, done, progress)
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = {pool.submit(asker.question, q): q["id"] for q in pending}
        try:
            for fut in as_completed(futures):
                qid = futures[fut]
                try:
                    done[qid], was_sent = fut.result()
                    if was_sent:
                        sent.add(qid)
                except llm.EmptyAnswer:
                    failed.append(qid)
                progress.advance(note=f"requests {asker.tally.requests}")
        except BaseException:
            # One fatal error (server down, model missing) stops the rest; finished replies
            # are already in the cache.
            asker.stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    progress.close(note=f"requests {asker.tally.requests}")
    rows = [done[q["id"]] for q in questions if q["id"] in done]
    return rows, sent, sorted(failed)


def _from_cache(questions: list[dict[str, Any]], asker: Asker, done: dict[str, dict[str, Any]],
                progress: Progress) -> list[dict[str, Any]]:
    """Rows whose every request is cached, in this thread; returns the questions left to ask.
    A thread-pool task per cached question cost more than the rest of a one-question edit at
    10,000 questions (bench/README.md, "Generation at 10,000 questions")."""
    cached_only = replace(asker, cache_only=True)
    pending = []
    for q in questions:
        try:
            done[q["id"]], _ = cached_only.question(q)
        except NotCached:
            pending.append(q)
            continue
        progress.advance(note=f"requests {asker.tally.requests}")
    return pending


def summarise(questions: list[dict[str, Any]], rows: list[dict[str, Any]], sent: set[str],
              failed: list[str], tally: llm.Tally, wall_s: float) -> GenerateResult:
    return GenerateResult(
        questions=len(questions), generated=len(sent - set(failed)),
        reused=len(rows) - len(sent - set(failed)), failed=failed, requests=tally.requests,
        retries=tally.retries, prompt_tokens=tally.prompt_tokens,
        completion_tokens=tally.completion_tokens, wall_s=round(wall_s, 3))


# How this run got its answers (cache hits, requests sent, tokens spent) differs between a fresh
# clone and a rerun with the reply cache: with the timings in reports/generate.timings.json, so
# the tracked generate.json holds only what the answers are.
RUN_COUNTS = frozenset({"generated", "reused", "requests", "retries", "tokens"})


def metrics(r: GenerateResult, cfg: GenerateConfig, client: llm.Client) -> dict[str, Any]:
    return {
        "questions": r.questions, "generated": r.generated, "reused": r.reused,
        "failed": len(r.failed), "requests": r.requests, "retries": r.retries,
        "tokens": {"prompt": r.prompt_tokens, "completion": r.completion_tokens},
        "wall_s": r.wall_s,
        "completion_tokens_per_s": round(r.completion_tokens / r.wall_s, 2) if r.wall_s else 0.0,
        "backend": cfg.backend, "model": client.model, "concurrency": cfg.concurrency,
        "failed_ids": r.failed,
    }
