"""Validate: `tuneline validate data/dataset --report reports/validation.json
--docs reports/data_docs --tokenizer models/base` (the `validate` stage of dvc.yaml), or
`tuneline validate PATH... [--json]` on any JSONL files.

Great Expectations (GX Core 1.x, suites in validation/suites.py) checks every line of every file:
schema (UTF-8, one JSON object per line, no blank lines, one format per file, roles, turn order,
string content, required fields; a line counts as JSON only if Python's strict parser, which
mlx-lm loads with, takes it) and quality (empty, cut-off, unterminated or refusal answers, answers
that only repeat their question, chat-template markers, duplicate questions within and across
files, token length against `train.max_seq_length` with the base model's tokenizer, answer
length bounds, splits present and non-empty). Each check's severity comes from params.yaml `validate.severity`: `error` makes the
command exit 1 (and stops `dvc repro`), `warning` is reported, `off` skips it.
A directory argument means a dataset folder: its `validate.splits` files must all be there, in
chat, completions or text layout, with `validate.required_fields` on every row. A file argument is
any JSONL a user has: every layout mlx-lm trains on or curate imports (chat with tools,
completions, text, ShareGPT, alpaca) passes, no field is required, and the layout is reported.
Inputs are only read, never changed.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.core.errors import UserError
from pipeline.rows.jsonl import paused_gc, write_json

Level = Literal["error", "warning", "off"]


class ValidationCrash(RuntimeError):
    """A check raised inside Great Expectations: a bug to report, never a pass."""


class UsageError(UserError):
    """A path that cannot be validated at all (missing, unreadable): exit code 2."""

    exit_code = 2


@dataclass(frozen=True)
class TrainLimits:
    """The one `train` key validate checks rows against (read with `config.load_keys`)."""

    max_seq_length: int


@dataclass(frozen=True)
class Severity:
    """One entry per check in validation/suites.py (a test keeps the two in step)."""

    splits: Level
    utf8: Level
    blank_line: Level
    json: Level
    format: Level
    schema: Level
    roles: Level
    turn_order: Level
    empty_answer: Level
    truncated: Level
    unterminated: Level
    refusal: Level
    restates_question: Level
    template_markers: Level
    answer_length: Level
    duplicate_question: Level
    leakage: Level
    token_length: Level
    preference_pairs: Level


@dataclass(frozen=True)
class ValidateConfig:
    severity: Severity
    required_fields: tuple[str, ...]
    answer_min_chars: int
    answer_max_chars: int
    splits: tuple[str, ...]


@dataclass(frozen=True)
class Finding:
    file: str
    line: int | None  # 1-based; None for a whole-file finding (missing or empty file)
    id: str | None
    check: str
    severity: str
    message: str


@dataclass
class Report:
    rows: int
    findings: list[Finding]
    checks: dict[str, dict[str, Any]]
    skipped: list[str] = field(default_factory=list)
    layouts: dict[str, str] = field(default_factory=dict)  # file -> layout it was read as

    @property
    def errors(self) -> int:
        return sum(f.severity == "error" for f in self.findings)

    @property
    def warnings(self) -> int:
        return sum(f.severity == "warning" for f in self.findings)

    @property
    def ok(self) -> bool:
        return self.errors == 0

    def metrics(self) -> dict[str, Any]:
        """reports/validation.json: numbers only, no timings, so unchanged data gives an
        unchanged file (train depends on it)."""
        return {"ok": self.ok, "rows": self.rows, "errors": self.errors,
                "warnings": self.warnings, "checks": self.checks, "skipped": self.skipped}

    def to_json(self) -> dict[str, Any]:
        return {**self.metrics(), "layouts": self.layouts,
                "findings": [asdict(f) for f in self.findings]}


def inputs(paths: list[Path], splits: tuple[str, ...]) -> list[tuple[Path, bool, bool]]:
    """(file, present, curated) triples: a directory is a curated dataset folder and stands for
    its split files, which must exist; a file argument is any JSONL the user has."""
    out = []
    for path in paths:
        if path.is_dir():
            out += [(path / f"{name}.jsonl", (path / f"{name}.jsonl").is_file(), True)
                    for name in splits]
        elif path.is_file():
            if not os.access(path, os.R_OK):
                raise UsageError(f"{path}: not readable; check its permissions")
            out.append((path, True, False))
        else:
            raise UsageError(f"{path}: no such file or directory")
    return out


@dataclass(frozen=True)
class ValidatePaths:
    inputs: list[Path]  # JSONL files, or dataset folders holding the `splits` files
    tokenizer: Path | None  # tokenizer.json or a model folder (None: token_length is skipped)
    report: Path | None = None  # metrics JSON to write
    docs: Path | None = None  # GX Data Docs HTML folder to write


def run(cfg: ValidateConfig, paths: ValidatePaths, *, max_seq_length: int,
        leak: Any = None) -> Report:
    """Dataset folders get the dataset's rules (chat/completions/text, `required_fields`); other
    files any layout mlx-lm trains on or curate imports, and no required fields.
    `leak`: validation.leakage.Leakage (curate.near_dup_threshold, evaluate.prompts); None
    checks nothing for leakage."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    files = inputs(paths.inputs, cfg.splits)
    pair_files = _pair_files(paths.inputs, files, cfg.splits)
    files = [f for f in files if f[0] not in pair_files]
    tokenizer, docs = paths.tokenizer, paths.docs
    tokenizer_file = _tokenizer_file(tokenizer)
    severity = asdict(cfg.severity)
    parts = [_validate([(f, present) for f, present, c in files if c == curated], curated, cfg,
                       severity, max_seq_length, tokenizer_file, docs, leak)
             for curated in (True, False) if any(c == curated for *_, c in files)]
    if pair_files and severity["preference_pairs"] != "off":
        parts.append(_validate_pairs(pair_files, severity, docs))
    findings = sorted((f for part in parts for f in part[1]), key=_order)
    report = Report(rows=sum(part[0] for part in parts),
                    findings=findings, checks=_summary(severity, findings, tokenizer_file),
                    skipped=[] if tokenizer_file or severity["token_length"] == "off" else
                    [f"token_length: no tokenizer.json at {tokenizer}; run `dvc repro base_model`"],
                    layouts={k: v for part in parts for k, v in part[2].items()})
    if paths.report is not None:
        # Findings too (sorted, so still unchanged for unchanged data): `review serve` shows
        # them on their rows; `dvc metrics show` lists only the numbers.
        write_json(paths.report, report.to_json())
    return report


def _validate(files: list[tuple[Path, bool]], curated: bool, cfg: ValidateConfig,
              severity: dict[str, str], max_seq_length: int, tokenizer_file: str | None,
              docs: Path | None, leak: Any) -> tuple[int, list[Finding], dict[str, str]]:
    from validation import frames, leakage, suites  # GX import costs seconds: only when validating

    settings = suites.Settings(cfg.required_fields if curated else (), cfg.answer_min_chars,
                               cfg.answer_max_chars, max_seq_length, tokenizer_file, curated)
    with paused_gc():
        data = frames.build(files, tools=not curated)
        if severity["leakage"] != "off":
            data.lines = leakage.add_columns(data.lines, leak)
    results = _run_gx(suites.build(severity, settings), data, docs)
    return int(data.files["rows"].sum()), _findings(results, data, settings), _layouts(data)


def _pair_files(args: list[Path], files: list[tuple[Path, bool, bool]],
                splits: tuple[str, ...]) -> list[Path]:
    """Preference pairs: a dataset folder's preference/{split}.jsonl, and file arguments whose
    first row has chosen and rejected (validation/pairs.py)."""
    from validation.pairs import is_pair_file

    found = [d / "preference" / f"{name}.jsonl" for d in args if d.is_dir() for name in splits
             if (d / "preference" / f"{name}.jsonl").is_file()]
    return found + [f for f, present, curated in files
                    if present and not curated and is_pair_file(f)]


def _validate_pairs(files: list[Path], severity: dict[str, str], docs: Path | None
                    ) -> tuple[int, list[Finding], dict[str, str]]:
    from validation import frames, suites
    from validation import pairs as pair_frame

    settings = suites.Settings((), 0, 0, 0, None, False)
    only = {k: (v if k == "preference_pairs" else "off") for k, v in severity.items()}
    empty = frames.pd.DataFrame()
    data = frames.Frames(empty, empty, empty, pairs=pair_frame.frame(files))
    results = _run_gx(suites.build(only, settings), data, docs)
    return len(data.pairs), _findings(results, data, settings), {
        str(f): "preference" for f in files}


def _layouts(data: Any) -> dict[str, str]:
    """The layout each file was read as (its first row's), e.g. for `render`."""
    lines = data.lines.dropna(subset=["file_format"])
    return {str(k): str(v) for k, v in lines.groupby("file")["file_format"].first().items()}


def _order(f: Finding) -> tuple[str, int, int]:
    from validation.suites import CHECK_NAMES

    return (f.file, f.line or 0, CHECK_NAMES.index(f.check))


def _tokenizer_file(tokenizer: Path | None) -> str | None:
    if tokenizer is None:
        return None
    path = tokenizer / "tokenizer.json" if tokenizer.is_dir() else tokenizer
    return str(path) if path.is_file() else None


def _run_gx(suite_map: dict[str, Any], data: Any, docs: Path | None) -> dict[str, Any]:
    """Validate each frame with its suite in an in-memory GX context; Data Docs go to `docs`."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs is not None:
        context.add_data_docs_site(site_name="tuneline", site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(docs.resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}})
    source = context.data_sources.add_pandas("tuneline")
    results = {}
    for name, suite in suite_map.items():
        frame = getattr(data, name)
        if not suite.expectations or frame.empty:
            continue
        frame = frame.assign(_i=range(len(frame)))
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        definition = context.validation_definitions.add(gx.ValidationDefinition(
            name=name, data=batch, suite=context.suites.add(suite)))
        results[name] = definition.run(batch_parameters={"dataframe": frame}, result_format={
            "result_format": "COMPLETE", "unexpected_index_column_names": ["_i"],
            "partial_unexpected_count": 20})
    if docs is not None:
        context.build_data_docs(site_names=["tuneline"])  # not GX's default temp site
    return results


def _findings(results: dict[str, Any], data: Any, settings: Any) -> list[Finding]:
    from validation.suites import CHECKS

    describe = {c.name: c.describe for c in CHECKS}
    order = {c.name: i for i, c in enumerate(CHECKS)}
    found: dict[tuple[Any, ...], Finding] = {}
    for name, result in results.items():
        frame = getattr(data, name)
        for res in result.results:
            if res.success:
                continue
            check, level = res.expectation_config.meta["check"], res.expectation_config.meta[
                "severity"]
            crash = _exception(res.exception_info)
            if crash is not None:  # a check that could not run must not pass silently
                raise ValidationCrash(f"check {check} could not run on the {name} frame: {crash}")
            indices = [entry["_i"] for entry in res.result.get("unexpected_index_list") or []]
            records = frame.iloc[indices].to_dict("records")
            copies = _duplicate_places(records) if check == "duplicate_question" else {}
            for rec in records:
                key = (check, rec["file"], rec.get("line"), rec.get("msg"))
                message = describe[check](rec, settings) + copies.get(key[1:3], "")
                found.setdefault(key, Finding(rec["file"], _line(rec), _rid(rec), check, level,
                                              message))
    return sorted(found.values(), key=lambda f: (f.file, f.line or 0, order[f.check]))


def _exception(info: Any) -> str | None:
    """GX reports a failed metric either flat or keyed by metric id."""
    if not isinstance(info, dict):
        return None
    entries = [info] if "raised_exception" in info else list(info.values())
    for entry in entries:
        if isinstance(entry, dict) and entry.get("raised_exception"):
            return str(entry.get("exception_message"))
    return None


def _line(rec: dict[str, Any]) -> int | None:
    return int(rec["line"]) if "line" in rec else None


def _rid(rec: dict[str, Any]) -> str | None:
    rid = rec.get("id")
    return rid if isinstance(rid, str) else None


def _duplicate_places(records: list[dict[str, Any]]) -> dict[tuple[str, int], str]:
    """For each copy of a duplicated question, where the other copies are."""
    by_key: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for rec in records:
        by_key[rec["question_key"]].append((rec["file"], int(rec["line"])))
    out = {}
    for places in by_key.values():
        for place in places:
            others = ", ".join(f"{Path(f).name}:{n}" for f, n in places if (f, n) != place)
            out[place] = f" (also at {others}); keep one (data/corrections.jsonl drop)"
    return out


def _summary(severity: dict[str, str], findings: list[Finding],
             tokenizer_file: str | None) -> dict[str, dict[str, Any]]:
    counts: dict[str, int] = defaultdict(int)
    for f in findings:
        counts[f.check] += 1
    return {name: {"severity": level, "failed": counts[name]}
            for name, level in severity.items()
            if level != "off" and (name != "token_length" or tokenizer_file)}


_LAYOUT_NAMES = {"chat": "chat (messages)", "completions": "completions (prompt/completion)",
                 "sharegpt": "ShareGPT (conversations)", "alpaca": "alpaca (instruction/output)",
                 "unknown": "no known", "preference": "preference pairs (prompt/chosen/rejected)"}


def render(report: Report, limit: int = 50) -> str:
    """The human summary (stderr): counts, then the first `limit` findings with their place."""
    lines = [f"validated {report.rows} rows: {report.errors} errors, {report.warnings} warnings"]
    lines += [f"{file}: {_LAYOUT_NAMES.get(layout, layout)} layout"
              for file, layout in report.layouts.items()]
    for f in report.findings[:limit]:
        where = f"{f.file}:{f.line}" if f.line is not None else f.file
        rid = f" [{f.id}]" if f.id else ""
        lines.append(f"{where}{rid}: {f.severity} {f.check}: {f.message}")
    if len(report.findings) > limit:
        lines.append(f"... and {len(report.findings) - limit} more (use --json for all)")
    lines += [f"skipped {s}" for s in report.skipped]
    return "\n".join(lines)
