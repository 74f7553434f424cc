"""The data checks as Great Expectations suites, defined in code (GX Core 1.x).

Each check has a name (the key of `validate.severity` in params.yaml), the frame it looks at
(validation/frames.py), one or more expectations tagged `meta={"check": name}`, and a function
that turns a failing row into a message that says what is wrong and what to do.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import great_expectations as gx

from pipeline.rows.formats import EXPECTED, LAYOUTS
from validation import expectations as custom  # registers the custom expectations first
from validation import pairs as pair_frame
from validation import patterns
from validation.frames import TRAINING_FORMATS

GX_SEVERITY = {"error": "critical", "warning": "warning"}
ROLES_DOC = "system, user, assistant"


@dataclass(frozen=True)
class Settings:
    """The knobs of the checks (from params.yaml `validate` and `train.max_seq_length`)."""

    required_fields: tuple[str, ...]
    answer_min_chars: int
    answer_max_chars: int
    max_tokens: int
    tokenizer_file: str | None  # None: the token_length check is skipped (no base model yet)
    # The curated dataset (a dataset folder, the stage) must be plain chat with id/source; any
    # other file may be in every layout mlx-lm trains on or curate imports (tools included).
    curated: bool = True

    @property
    def formats(self) -> tuple[str, ...]:
        return TRAINING_FORMATS if self.curated else LAYOUTS

    @property
    def role_regex(self) -> str:
        return "^[sua]*$" if self.curated else "^[suat]*$"

    @property
    def turn_regex(self) -> str:
        # A tool call: the assistant asks, one or more tool messages answer, the assistant goes on.
        return "^s?(?:ua)+$" if self.curated else "^s?(?:u(?:at+)*a)+$"


@dataclass(frozen=True)
class Check:
    name: str
    frame: str  # files | lines | messages
    doc: str
    expectations: Callable[[Settings], list[Any]]
    describe: Callable[[dict[str, Any], Settings], str]


def chat_schema(required: tuple[str, ...], tools: bool = False) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "object", "required": ["role", "content"],
                               "properties": {"role": {"type": "string"},
                                              "content": {"type": "string"}}}
    if tools:  # a message that calls tools may have null or no content
        message = {"type": "object", "required": ["role"], "properties": {
            "role": {"type": "string"}}, "if": {"required": ["tool_calls"]}, "then": {
            "properties": {"tool_calls": {"type": "array"},
                           "content": {"type": ["string", "null"]}}}, "else": message}
    props: dict[str, Any] = {"messages": {"type": "array", "minItems": 1, "items": message}}
    if tools:
        props["tools"] = {"type": "array"}
        return {**_schema(props, required), "required": ["messages", *required]}
    return _schema(props, required)


def _schema(props: dict[str, Any], required: tuple[str, ...]) -> dict[str, Any]:
    extra = {"id": {"type": "string", "minLength": 1}, "source": {"type": "string"}}
    return {"type": "object", "required": [*props, *required],
            "properties": {**{k: extra.get(k, {}) for k in required}, **props}}


def schemas(required: tuple[str, ...], curated: bool = True) -> dict[str, dict[str, Any]]:
    turn = {"type": "object", "required": ["from", "value"],
            "properties": {"from": {"type": "string"}, "value": {"type": "string"}}}
    return {
        "chat": chat_schema(required, tools=not curated),
        "sharegpt": _schema({"conversations": {"type": "array", "minItems": 2, "items": turn}},
                            required),
        "alpaca": {**_schema({"instruction": {"type": "string"}, "output": {"type": "string"}},
                             required),
                   "properties": {**_schema({}, required)["properties"],
                                  "instruction": {"type": "string"}, "output": {"type": "string"},
                                  "input": {"type": "string"}, "system": {"type": "string"}}},
        "completions": _schema({"prompt": {"type": "string"},
                                "completion": {"type": "string"}}, required),
        "text": _schema({"text": {"type": "string"}}, required),
    }


def row_schema(required: tuple[str, ...], curated: bool = True) -> dict[str, Any]:
    """One schema for every row: picks the format by its keys, as pipeline.rows.formats.detect does.
    Layouts the file may not hold pass here; the format check reports them."""
    parts = schemas(required, curated)
    if curated:
        parts["sharegpt"] = parts["alpaca"] = True  # the format check reports them
    return {"if": {"required": ["messages"]}, "then": parts["chat"], "else": {
        "if": {"required": ["conversations"]}, "then": parts["sharegpt"], "else": {
            "if": {"required": ["instruction", "output"]}, "then": parts["alpaca"], "else": {
                "if": {"required": ["prompt", "completion"]}, "then": parts["completions"],
                "else": {"if": {"required": ["text"]}, "then": parts["text"], "else": True}}}}}


def _schema_text(s: Settings) -> str:
    return json.dumps(row_schema(s.required_fields, s.curated), sort_keys=True)


def _schema_expectations(s: Settings) -> list[Any]:
    # `object_raw` is the line where it parsed as a JSON object, None elsewhere.
    return [custom.ExpectColumnValuesToMatchCompiledJsonSchema(column="object_raw",
                                                               schema_text=_schema_text(s))]


def _token_expectations(s: Settings) -> list[Any]:
    if s.tokenizer_file is None:
        return []
    return [custom.ExpectColumnValuesToFitTokenBudget(
        column="object_raw", tokenizer_file=s.tokenizer_file, max_tokens=s.max_tokens)]


def _describe_schema(row: dict[str, Any], s: Settings) -> str:
    why = custom.schema_error(_schema_text(s), row["object_raw"])
    if not why:
        return "does not match"
    return f"{why}; required fields: {list(s.required_fields)}" if s.required_fields else why


def _describe_format(row: dict[str, Any], s: Settings) -> str:
    fmt, first = row["format"], row["file_format"]
    if fmt not in s.formats:
        if fmt == "unknown":
            return f"no known layout: expected {EXPECTED}"
        return (f"{fmt} layout is not a training format ({', '.join(s.formats)}); put the "
                "file in data/imports/ and let `tuneline curate` convert it")
    return f"{fmt} row in a file that starts with {first} rows; keep one format per file"


def _describe_tokens(row: dict[str, Any], s: Settings) -> str:
    count = custom.token_counts(_series([row["object_raw"]]), s.tokenizer_file or "",
                                s.max_tokens)[0]
    return (f"{count} tokens > train.max_seq_length {s.max_tokens}: mlx-lm cuts the rest off; "
            "shorten the answer or raise train.max_seq_length")


def _series(values: list[Any]) -> Any:
    import pandas as pd

    return pd.Series(values)


def _clip(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


CHECKS: tuple[Check, ...] = (
    Check("splits", "files", "each file (each split of a dataset folder) exists and has rows",
          lambda s: [gx.expectations.ExpectColumnValuesToBeBetween(column="rows", min_value=1)],
          lambda r, s: "missing: run `dvc repro curate` to write it" if not r["present"]
          else "no rows: an empty split fails training; add data or change curate ratios"),
    Check("utf8", "lines", "every line is UTF-8",
          lambda s: [gx.expectations.ExpectColumnValuesToBeInSet(column="utf8",
                                                                  value_set=[True])],
          lambda r, s: "not UTF-8; re-save the file as UTF-8"),
    Check("blank_line", "lines", "no blank lines",
          lambda s: [gx.expectations.ExpectColumnValuesToBeInSet(
              column="blank", value_set=[False])],
          lambda r, s: "blank line; delete it (every line must be one JSON object)"),
    Check("json", "lines", "every line is one JSON object",
          lambda s: [gx.expectations.ExpectColumnValuesToBeInSet(
              column="is_object", value_set=[True])],
          lambda r, s: r["json_error"]),
    Check("format", "lines", "one known layout per file (the dataset: chat, completions or text)",
          lambda s: [gx.expectations.ExpectColumnValuesToBeInSet(
              column="format", value_set=list(s.formats)),
              gx.expectations.ExpectColumnPairValuesToBeEqual(
                  column_A="format", column_B="file_format",
                  ignore_row_if="either_value_is_missing")],
          _describe_format),
    Check("schema", "lines", "required fields present, messages a list of {role, content: string}",
          _schema_expectations, _describe_schema),
    Check("roles", "lines", f"roles are {ROLES_DOC} (and tool outside the curated dataset)",
          lambda s: [gx.expectations.ExpectColumnValuesToMatchRegex(column="role_seq",
                                                                    regex=s.role_regex)],
          lambda r, s: f"a role is not one of {ROLES_DOC}{'' if s.curated else ', tool'} "
                       f"(sequence {r['role_seq']!r}: s=system u=user a=assistant t=tool "
                       "x=other)"),
    Check("turn_order", "lines", "optional system, then user/assistant pairs ending with assistant",
          lambda s: [gx.expectations.ExpectColumnValuesToMatchRegex(column="turn_seq",
                                                                    regex=s.turn_regex)],
          lambda r, s: f"roles go {_roles(r['turn_seq'])}; expected an optional system message, "
                       "then user/assistant pairs, ending with assistant"),
    Check("empty_answer", "messages", "no empty or whitespace-only answers",
          lambda s: [gx.expectations.ExpectColumnValuesToBeInSet(
              column="has_text", value_set=[True])],
          lambda r, s: f"answer {r['turn'] + 1} is empty; write one or drop the question "
                       "(data/corrections.jsonl)"),
    Check("truncated", "messages", "no answers cut off at the token limit (finish_reason length)",
          lambda s: [gx.expectations.ExpectColumnValuesToNotBeInSet(
              column="finish_reason", value_set=["length"])],
          lambda r, s: f"answer {r['turn'] + 1} was cut off at the generation token limit; raise "
                       "generate's max tokens or replace it (data/corrections.jsonl)"),
    Check("unterminated", "messages", "answers end like a sentence (closing punctuation)",
          lambda s: [gx.expectations.ExpectColumnValuesToBeInSet(
              column="last_char", value_set=list(patterns.TERMINATORS))],
          lambda r, s: f"answer {r['turn'] + 1} ends without closing punctuation "
                       f"(...{r['content'][-40:]!r}): it may be cut off"),
    # All roles: follow-up questions are generated too.
    Check("refusal", "messages", "no refusal boilerplate (\"As an AI language model...\")",
          lambda s: [custom.ExpectColumnValuesToNotBeRefusals(column="content")],
          lambda r, s: f"{r['role']} message {r['msg']} is refusal boilerplate "
                       f"({_clip(r['content'])!r}); replace or drop it"),
    Check("restates_question", "messages", "no answers that only repeat their question",
          lambda s: [gx.expectations.ExpectColumnValuesToBeInSet(
              column="restates", value_set=[False])],
          lambda r, s: f"answer {r['turn'] + 1} only repeats its question "
                       f"({_clip(r['content'])!r}): it teaches nothing; write a real answer "
                       "or drop the question (data/corrections.jsonl)"),
    Check("template_markers", "messages", "no chat-template markers ([INST], </s>, <|im_start|>)",
          lambda s: [gx.expectations.ExpectColumnValuesToNotMatchRegex(
              column="content", regex=patterns.TEMPLATE_MARKER_PATTERN)],
          lambda r, s: f"{r['role']} message {r['msg']} contains the chat-template marker "
                       f"{patterns.template_marker(r['content'])!r}: the text was rendered twice "
                       "or imported without conversion"),
    Check("answer_length", "messages", "answer length within validate.answer_{min,max}_chars",
          lambda s: [gx.expectations.ExpectColumnValuesToBeBetween(
              column="text_len", min_value=s.answer_min_chars, max_value=s.answer_max_chars)],
          lambda r, s: f"answer {r['turn'] + 1} has {len(r['content'])} characters; expected "
                       f"{s.answer_min_chars}..{s.answer_max_chars} (validate.answer_*_chars)"),
    Check("duplicate_question", "lines", "each question once across all files (no leakage)",
          lambda s: [gx.expectations.ExpectColumnValuesToBeUnique(column="question_key")],
          lambda r, s: "duplicate question"),  # validate.py names the other copies
    Check("leakage", "lines", "no near-duplicate questions across files, nor between the train "
          "file and evaluate.prompts (curate.near_dup_threshold)",
          lambda s: [gx.expectations.ExpectColumnValuesToBeInSet(column="leak_free",
                                                                  value_set=[True])],
          lambda r, s: f"near duplicate of {r['leak_with']}: leakage between splits inflates "
                       "the evaluation; rerun `dvc repro curate` (it keeps near copies in one "
                       "split) or drop one (data/corrections.jsonl)"),
    Check("token_length", "lines", "rows fit train.max_seq_length tokens (base tokenizer)",
          _token_expectations, _describe_tokens),
    # validation/pairs.py: data/dataset/preference/*.jsonl and TRL preference files.
    Check("preference_pairs", "pairs", "preference pairs: both sides, chosen != rejected, prompt "
          "ends with a user turn, rejected not a truncated copy of chosen",
          lambda s: [gx.expectations.ExpectColumnValuesToBeInSet(column=flag, value_set=[True])
                     for flag in pair_frame.FLAGS],
          pair_frame.describe),
)
CHECK_NAMES = tuple(c.name for c in CHECKS)


def _roles(seq: str) -> str:
    names = {"s": "system", "u": "user", "a": "assistant", "t": "tool"}
    return ", ".join(names[c] for c in seq) or "(no messages)"


def build(severity: dict[str, str], settings: Settings) -> dict[str, gx.ExpectationSuite]:
    """One suite per frame, with the checks whose severity is not `off`."""
    chosen: dict[str, list[Any]] = {"files": [], "lines": [], "messages": [], "pairs": []}
    for check in CHECKS:
        level = severity.get(check.name, "off")
        if level == "off":
            continue
        for exp in check.expectations(settings):
            exp.meta = {"check": check.name, "severity": level}
            exp.severity = GX_SEVERITY[level]
            chosen[check.frame].append(exp)
    return {frame: gx.ExpectationSuite(name=f"tuneline_{frame}", expectations=exps)
            for frame, exps in chosen.items()}
