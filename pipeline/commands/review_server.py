"""Review in the browser: `tuneline review serve [--port 8765] [--open] [--host 127.0.0.1]`.

A local page over the current dataset and its sources (Starlette + uvicorn, one static page of
plain JavaScript shipped in pipeline/commands/review_static/, no CDN, no build step). Each conversation shows
its turns, source and origin, split, the validate stage's findings and, for test rows, the base
and tuned answers from reports/eval.json. Saves go through `review.save_edits`, the same code path
as `tuneline review apply`, and carry the sha256 of data/corrections.jsonl they were made against:
a save against an older file is refused (409), never merged blindly. An edit whose text changed
since the page showed it (another tab saved first) is refused too, with both texts (409
"conflicts"): the page lets the expert choose. Who may read and write: review_guard.py (Host and
Origin allow-lists; saves carry the session token of the page this server served).

The page shows the dataset as curate will build it next: the last curated rows with
data/corrections.jsonl applied on top, so a saved edit is visible before `dvc repro` runs.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.commands import review
from pipeline.commands.review_guard import (
    TOKEN_HEADER,
    TOKEN_SLOT,
    TooLarge,
    allowed_names,
    bare,
    guard,
    url_host,
)
from pipeline.core.errors import UserError
from pipeline.rows import corrections as corr_mod
from pipeline.rows.formats import Conversation
from pipeline.rows.jsonl import read_jsonl

STATIC = Path(__file__).with_name("review_static")
PAGE_MAX = 200            # rows per page at most: the page stays fast at any dataset size
BODY_MAX = 8 * 2**20      # bytes in one save
TEXT_MAX = 200_000        # characters in one cell
EDIT_KEYS = {"id", "action", "question", "answer", "followup", "followup_answer", "base",
             "reviewed"}


class ServeError(UserError):
    """`review serve` cannot start as asked (paths outside the project, missing page files)."""


@dataclass(frozen=True)
class ServePaths:
    root: Path          # the project: every write stays inside root/data
    dataset: Path
    corrections: Path
    questions: Path
    validation: Path
    evaluation: Path

    def check(self) -> None:
        data = (self.root / "data").resolve()
        target = self.corrections.resolve()
        if data not in target.parents:
            raise ServeError(f"{self.corrections}: review serve writes only inside {data}; "
                             "run it from the project folder or pass --corrections data/...")


# ---------------------------------------------------------------- the view (what the page shows)

def _cells(messages: list[dict[str, str]]) -> tuple[dict[str, str], list[str]]:
    turns = review._turns(messages)
    padded = turns + [""] * 4
    return dict(zip(review.EDITABLE, padded[:4])), turns[4:]


def _dataset(paths: ServePaths) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, int], str]]:
    rows, places = {}, {}
    for split in review.SPLITS:
        path = paths.dataset / f"{split}.jsonl"
        if not path.exists():
            continue
        for line, row in enumerate(read_jsonl(path), 1):
            rows[row["id"]] = {**row, "split": split}
            places[(str(path), line)] = row["id"]
            places[(f"{split}.jsonl", line)] = row["id"]
    return rows, places


def _conversation(row: dict[str, Any]) -> Conversation:
    meta = {"turn_sources": row.get("turn_sources") or [],
            "finish_reasons": row.get("finish_reasons") or []}
    return Conversation(id=row["id"], messages=tuple(row["messages"]),
                        source=row.get("source", ""), origin=tuple(row.get("origin") or ()),
                        meta=meta)


def _findings(paths: ServePaths, places: dict[tuple[str, int], str]) -> dict[str, list[dict]]:
    """Findings of the validate stage's report, by row id (by file:line where a finding has no
    id); a report without findings (validate not run, or clean) shows none."""
    out: dict[str, list[dict]] = {}
    report = _json(paths.validation)
    for f in report.get("findings") or []:
        rid = f.get("id") or places.get((str(f.get("file")), f.get("line") or 0)) or places.get(
            (Path(str(f.get("file"))).name, f.get("line") or 0))
        if rid:
            out.setdefault(rid, []).append({k: f.get(k) for k in ("check", "severity",
                                                                  "message")})
    return out


def _eval_answers(paths: ServePaths) -> dict[str, dict[str, str]]:
    report, out = _json(paths.evaluation), {}
    for side in ("base", "tuned"):
        for a in (report.get(side) or {}).get("answers") or []:
            if isinstance(a, dict) and isinstance(a.get("id"), str):
                out.setdefault(a["id"], {})[side] = str(a.get("answer", ""))
    return out


def _pairs(paths: ServePaths) -> dict[str, list[dict]]:
    """data/dataset/preference/*.jsonl by conversation: what its corrections teach DPO/ORPO."""
    out: dict[str, list[dict]] = {}
    for split in review.SPLITS:
        path = paths.dataset / "preference" / f"{split}.jsonl"
        for row in read_jsonl(path) if path.exists() else []:
            if isinstance(row.get("conversation"), str):
                out.setdefault(row["conversation"], []).append({
                    "id": row.get("id"), "chosen": row["chosen"][-1]["content"],
                    "rejected": row["rejected"][-1]["content"],
                    "generated": (row.get("provenance") or {}).get("generated")})
    return out


def _json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ServeError(f"{path}: not valid JSON ({exc}); rerun the stage that writes it "
                         "(dvc repro)") from None
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class Sources:
    """What changes rarely (dataset, questions, reports): parsed once per change, so a save
    (which changes only data/corrections.jsonl) rebuilds just the rows it touches."""

    curated: dict[str, dict[str, Any]]
    questions: dict[str, str]
    convs: dict[str, Conversation]
    findings: dict[str, list[dict]]
    answers: dict[str, dict[str, str]]
    plain: dict[str, dict[str, Any]]  # id -> the row as shown without corrections
    pairs: dict[str, list[dict]]  # conversation id -> its preference pairs (curated)


def load_sources(paths: ServePaths) -> Sources:
    curated, places = _dataset(paths)
    questions = {}
    if paths.questions.exists():
        questions = {r["id"]: r.get("question", "") for r in read_jsonl(paths.questions)}
    convs = {rid: _conversation(row) for rid, row in curated.items()}
    findings, answers = _findings(paths, places), _eval_answers(paths)
    plain = {rid: _row(conv, curated[rid], None, findings.get(rid, []), answers.get(rid, {}))
             for rid, conv in convs.items()}
    return Sources(curated, questions, convs, findings, answers, plain, _pairs(paths))


def build_view(paths: ServePaths, src: Sources | None = None) -> list[dict[str, Any]]:
    """Every conversation as the page shows it, sorted by id; dropped ones included."""
    src = src or load_sources(paths)
    corrs = corr_mod.load(paths.corrections)
    merged, applied = corr_mod.apply(src.convs, src.questions, corrs, str(paths.corrections))
    marks = {c.id: c.row.get("digest") for c in corrs if c.action == "reviewed"}
    view = []
    for rid, conv in merged.items():
        if conv is src.convs.get(rid):  # no correction touched it
            row = src.plain[rid]
            if rid in marks:
                row = {**row, "reviewed": row["by_expert"] or marks[rid] == row["digest"]}
        else:
            row = _row(conv, src.curated.get(rid), marks.get(rid), src.findings.get(rid, []),
                       src.answers.get(rid, {}))
        view.append({**row, "pairs": src.pairs.get(rid, [])})
    view += [_dropped(rid, src.curated.get(rid), src.questions, corrs) for rid in applied.dropped]
    # Questions with no conversation: never answered, answer dropped by curate, or restored
    # since the last `dvc repro`. An expert answer written here stands in for a generated one.
    known = set(merged) | set(applied.dropped)
    view += [_unanswered(rid, q, paths.questions) for rid, q in src.questions.items()
             if rid not in known]
    return sorted(view, key=lambda r: r["id"])


def _unanswered(rid: str, question: str, origin: Path) -> dict[str, Any]:
    cells = {"question": question, "answer": "", "followup": "", "followup_answer": ""}
    return {"id": rid, "split": "unanswered", "source": "", "origin": [str(origin)], **cells,
            "more_turns": [], "findings": [], "base_answer": None, "tuned_answer": None,
            "by_expert": False, "reviewed": False, "digest": "", "dropped": False,
            "pending": False, "base": {k: review.digest(v) for k, v in cells.items()}}


def _row(conv: Conversation, curated: dict[str, Any] | None, mark: str | None,
         findings: list[dict], answers: dict[str, str]) -> dict[str, Any]:
    cells, more = _cells(list(conv.messages))
    sources, _ = corr_mod.turn_meta(conv)
    shown = review.conversation_digest(cells)
    by_expert = bool(sources) and all(s == "expert" for s in sources)
    then = _cells(curated["messages"])[0] if curated else None
    return {
        "id": conv.id, "split": curated["split"] if curated else "new", "source": conv.source,
        "origin": list(curated.get("origin") or []) if curated else list(conv.origin),
        **cells, "more_turns": more, "findings": findings,
        "base_answer": answers.get("base"), "tuned_answer": answers.get("tuned"),
        # An expert wrote every answer, or an expert vouched for exactly this text.
        "by_expert": by_expert, "reviewed": by_expert or mark == shown, "digest": shown,
        "dropped": False, "pending": then != cells,
        "base": {k: review.digest(v) for k, v in cells.items()},
    }


def _dropped(rid: str, curated: dict[str, Any] | None, questions: dict[str, str],
             corrs: list[corr_mod.Correction]) -> dict[str, Any]:
    said = next((c.row.get("question") for c in corrs if c.id == rid and c.action == "drop"), "")
    cells, _ = _cells(curated["messages"]) if curated else ({}, [])
    question = cells.get("question") or questions.get(rid) or said or ""
    return {"id": rid, "split": "dropped", "source": curated.get("source", "") if curated else "",
            "origin": list(curated.get("origin") or []) if curated else [],
            "question": question, "answer": cells.get("answer", ""), "followup": "",
            "followup_answer": "", "more_turns": [], "findings": [], "base_answer": None,
            "tuned_answer": None, "by_expert": False, "reviewed": True, "digest": "",
            "dropped": True,
            "pending": curated is not None, "base": {"drop": True}}


class Views:
    """build_view, redone only when one of its files changed (size or mtime)."""

    def __init__(self, paths: ServePaths) -> None:
        self.paths = paths
        self._src_key: Any = None
        self._key: Any = None
        self._src: Sources | None = None
        self._rows: list[dict[str, Any]] = []

    @staticmethod
    def _signature(files: list[Path]) -> tuple[Any, ...]:
        # The inode too: an atomic replace within one mtime tick still shows.
        return tuple((str(f), f.stat().st_ino, f.stat().st_mtime_ns, f.stat().st_size)
                     if f.exists() else (str(f),) for f in files)

    def shown_cells(self, ids: Any) -> dict[str, dict[str, str]]:
        """These rows' text as the page shows it now (review notes edits made on an older one)."""
        wanted = set(ids)
        return {r["id"]: {k: r[k] for k in review.EDITABLE} for r in self.rows()
                if r["id"] in wanted}

    def rows(self) -> list[dict[str, Any]]:
        p = self.paths
        src_key = self._signature([p.dataset / f"{s}.jsonl" for s in review.SPLITS] + [
            p.questions, p.validation, p.evaluation])
        key = (src_key, self._signature([p.corrections]))
        if src_key != self._src_key or self._src is None:
            self._src, self._src_key = load_sources(p), src_key
        if key != self._key:
            self._rows, self._key = build_view(p, self._src), key
        return self._rows


def select(rows: list[dict[str, Any]], query: dict[str, str]) -> list[dict[str, Any]]:
    """The filters of the page: split, source, has findings, not reviewed, text search."""
    split, source = query.get("split", ""), query.get("source", "")
    text = query.get("q", "").strip().casefold()
    out = []
    for r in rows:
        if (split and r["split"] != split) or (source and r["source"] != source):
            continue
        if query.get("findings") == "1" and not r["findings"]:
            continue
        if query.get("unreviewed") == "1" and r["reviewed"]:
            continue
        if text and text not in _haystack(r):
            continue
        out.append(r)
    return out


def _haystack(r: dict[str, Any]) -> str:
    return "\n".join([r["id"], *(r[k] for k in review.EDITABLE), *r["more_turns"]]).casefold()


# ---------------------------------------------------------------- saves

class BadRequest(ValueError):
    """A malformed save body: 400, nothing written."""


async def read_body(request: Any) -> bytes:
    """The body, cut off once it passes BODY_MAX (a chunked upload has no Content-Length)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > BODY_MAX:
            raise TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def parse_save(body: bytes, known: set[str]) -> tuple[str, list[review.Edit]]:
    if len(body) > BODY_MAX:
        raise BadRequest(f"body is {len(body)} bytes; at most {BODY_MAX} per save")
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise BadRequest(f"body is not JSON: {exc}") from None
    if not isinstance(data, dict) or set(data) != {"version", "edits"}:
        raise BadRequest('body must be {"version": "<sha256>", "edits": [...]}')
    version, edits = data["version"], data["edits"]
    if not isinstance(version, str) or len(version) != 64:
        raise BadRequest('"version" must be the sha256 the page was loaded with')
    if not isinstance(edits, list) or not edits:
        raise BadRequest('"edits" must be a non-empty list')
    return version, [_edit(n, e, known) for n, e in enumerate(edits, 1)]


def _edit(n: int, e: Any, known: set[str]) -> review.Edit:
    where = f"edit {n}"
    if not isinstance(e, dict):
        raise BadRequest(f"{where}: must be an object")
    unknown = sorted(set(e) - EDIT_KEYS)
    if unknown:
        raise BadRequest(f"{where}: unknown key(s) {unknown}; allowed: {sorted(EDIT_KEYS)}")
    cells = {"id": e.get("id", ""), "action": e.get("action", "")}
    cells.update({k: e.get(k, "") for k in review.EDITABLE})
    for k, v in cells.items():
        if not isinstance(v, str) or len(v) > TEXT_MAX:
            raise BadRequest(f"{where}: {k!r} must be a string of at most {TEXT_MAX} characters")
    if cells["id"] and cells["id"] not in known:
        raise BadRequest(f"{where}: no conversation has id {cells['id']!r}; reload the page")
    if cells["action"] not in ("", "drop"):
        raise BadRequest(f"{where}: action {cells['action']!r}: use \"drop\" or \"\"")
    base, reviewed = e.get("base", {}), e.get("reviewed")
    if not isinstance(base, dict) or not all(isinstance(v, (str, bool)) for v in base.values()):
        raise BadRequest(f"{where}: 'base' must be the row's base object as the page got it")
    if reviewed is not None and not isinstance(reviewed, bool):
        raise BadRequest(f"{where}: 'reviewed' must be true, false or null")
    return review.Edit(where, {k: review._norm(v) for k, v in cells.items()}, base, reviewed)


# ---------------------------------------------------------------- the app

def create_app(paths: ServePaths, host: str = "127.0.0.1") -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    paths.check()
    if not (STATIC / "index.html").exists():
        raise ServeError(f"{STATIC}: the page files are missing; reinstall tuneline")
    views = Views(paths)
    # Writes need this session's token: the page carries it (nothing else prints it), and only a
    # page this server served, under a name it was started for, can read the page.
    token = secrets.token_urlsafe(32)
    page = (STATIC / "index.html").read_text(encoding="utf-8").replace(TOKEN_SLOT, token)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def rows(request: Request) -> Response:
        try:
            everything = views.rows()
        except UserError as exc:
            return error(500, str(exc))
        query = dict(request.query_params)
        try:
            offset = max(0, int(query.get("offset", 0)))
            limit = min(PAGE_MAX, max(1, int(query.get("limit", 50))))
        except ValueError:
            return error(400, "offset and limit must be whole numbers")
        hits = select(everything, query)
        return JSONResponse({
            "version": review.version(paths.corrections), "total": len(everything),
            "reviewed": sum(r["reviewed"] for r in everything), "matched": len(hits),
            "pending": sum(r["pending"] for r in everything), "offset": offset,
            "rows": hits[offset:offset + limit],
            "sources": sorted({r["source"] for r in everything if r["source"]}),
            "corrections": str(paths.corrections)})

    async def save(request: Request) -> Response:
        if not secrets.compare_digest(request.headers.get(TOKEN_HEADER, ""), token):
            return error(403, "this save does not carry the page's session token; reload the "
                              "page (the server was restarted?) and save again")
        # A JSON content type makes a cross-site form post impossible (the browser would need
        # a CORS preflight, which this server never answers).
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return error(415, "send the save as application/json")
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > BODY_MAX:  # refused before it is read into memory
            return error(413, f"a save is at most {BODY_MAX} bytes; save more often")
        try:
            body = await read_body(request)
            everything = views.rows()
            version, edits = parse_save(body, {r["id"] for r in everything})
            result = review.save_edits(edits, paths.corrections, paths.dataset, version,
                                       views.shown_cells(e.cells["id"] for e in edits),
                                       refuse_stale=True)
        except TooLarge:
            return error(413, f"a save is at most {BODY_MAX} bytes; save more often")
        except BadRequest as exc:
            return error(400, str(exc))
        except review.ConflictError as exc:
            return JSONResponse({"error": str(exc), "conflicts": exc.conflicts},
                                status_code=409)
        except review.StaleError as exc:
            return error(409, str(exc))
        except UserError as exc:
            return error(422, str(exc))
        return JSONResponse({"version": review.version(paths.corrections),
                             "changed": result.changed, "notes": result.notes})

    inner = Starlette(routes=[
        Route("/", index), Route("/favicon.ico", lambda request: Response(status_code=204)),
        Route("/api/rows", rows), Route("/api/save", save, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static")])
    return guard(inner, allowed_names(host))


def serve(paths: ServePaths, host: str, port: int, open_browser: bool) -> None:
    import threading
    import webbrowser

    import uvicorn

    app = create_app(paths, host)
    url = f"http://{url_host(host)}:{port}/"
    print(f"review page: {url}  (Ctrl+C to stop; saves go to {paths.corrections})", flush=True)
    if open_browser:
        threading.Timer(1.0, webbrowser.open, args=(url,)).start()
    uvicorn.run(app, host=bare(host), port=port, log_level="warning")
