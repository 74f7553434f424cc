"""Custom Great Expectations (GX Core 1.x) expectations for JSONL training data.

Import this module before building or loading any suite that uses them: GX drops unknown
expectation types from a saved suite without an error. (tuneline builds its suites in code on
every run, see validation/suites.py, so nothing is loaded from disk.)

- ExpectColumnValuesToMatchCompiledJsonSchema: each value is a JSON text that must match a schema.
  GX's built-in ExpectColumnValuesToMatchJsonSchema rebuilds a validator for every row; this one
  compiles the schema once (fastjsonschema) and reuses it: see bench/README.md, "Validation".
- ExpectColumnValuesToNotBeRefusals: no value is refusal boilerplate ("As an AI language model").
- ExpectColumnValuesToFitTokenBudget: each value is a JSON chat/completions/text row whose
  rendered text must fit `max_tokens` tokens of a `tokenizers` tokenizer.json.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import fastjsonschema
import orjson
import pandas as pd
from great_expectations.execution_engine import PandasExecutionEngine
from great_expectations.expectations.expectation import ColumnMapExpectation
from great_expectations.expectations.metrics import (
    ColumnMapMetricProvider,
    column_condition_partial,
)

from validation import patterns


@lru_cache(maxsize=32)
def compiled_schema(schema_text: str) -> Callable[[Any], Any]:
    """One compiled validator per schema for the whole process."""
    return fastjsonschema.compile(json.loads(schema_text))


def schema_error(schema_text: str, raw: str) -> str | None:
    """Why `raw` does not match (fastjsonschema's message, e.g. "data.messages[1].content must
    be string"), or None when it matches."""
    try:
        compiled_schema(schema_text)(orjson.loads(raw))
    except fastjsonschema.JsonSchemaValueException as exc:
        return exc.message
    except ValueError as exc:
        return f"not valid JSON ({exc})"
    return None


class ColumnValuesMatchCompiledJsonSchema(ColumnMapMetricProvider):
    condition_metric_name = "column_values.match_compiled_json_schema"
    condition_value_keys = ("schema_text",)

    @column_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column: pd.Series, schema_text: str, **kwargs: Any) -> pd.Series:
        validate = compiled_schema(schema_text)
        loads, failure = orjson.loads, (fastjsonschema.JsonSchemaValueException, ValueError)

        def matches(raw: str) -> bool:
            try:
                validate(loads(raw))
            except failure:
                return False
            return True

        return column.map(matches)


class ExpectColumnValuesToMatchCompiledJsonSchema(ColumnMapExpectation):
    """Expect each value (a JSON text) to match a JSON schema, compiled once per process."""

    schema_text: str  # the schema as JSON text: hashable, so the compiled validator is cached

    map_metric = "column_values.match_compiled_json_schema"
    success_keys = ("schema_text", "mostly")
    args_keys = ("column", "schema_text")


class ColumnValuesAreNotRefusals(ColumnMapMetricProvider):
    condition_metric_name = "column_values.not_refusal"

    @column_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column: pd.Series, **kwargs: Any) -> pd.Series:
        return ~column.map(patterns.is_refusal).astype(bool)


class ExpectColumnValuesToNotBeRefusals(ColumnMapExpectation):
    """Expect no value to be refusal boilerplate (validation/patterns.py). One pass with a cheap
    literal pre-filter: GX's regex-list expectation runs each case-insensitive pattern over
    every answer, the slowest check of all at 100k rows."""

    map_metric = "column_values.not_refusal"
    success_keys = ("mostly",)
    args_keys = ("column",)


TOKEN_CHUNK = 2048


@lru_cache(maxsize=4)
def load_tokenizer(path: str) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def render_for_count(row: dict[str, Any]) -> str:
    """The text the trainer sees, in ChatML (SmolLM2's template). For other templates this is
    within a few tokens per message of the real count: good enough for a length warning."""
    if isinstance(row.get("messages"), list):
        return "".join(f"<|im_start|>{m.get('role')}\n{m.get('content')}<|im_end|>\n"
                       for m in row["messages"] if isinstance(m, dict))
    if "prompt" in row and "completion" in row:
        return f"{row['prompt']}{row['completion']}"
    return str(row.get("text", ""))


def token_counts(raws: pd.Series, tokenizer_file: str, max_tokens: int) -> pd.Series:
    """Token count per JSON row; rows that cannot exceed `max_tokens` are not tokenized.

    A byte-level (or byte-fallback) BPE token covers at least one byte, so a text of at most
    `max_tokens` UTF-8 bytes fits; only longer ones pay for the tokenizer. Those rows report
    their real count; the short ones report their byte length (an upper bound).
    """
    texts = [_render_raw(raw) for raw in raws]
    sizes = [len(t.encode("utf-8")) for t in texts]
    long_rows = [i for i, n in enumerate(sizes) if n > max_tokens]
    tokenizer = load_tokenizer(tokenizer_file) if long_rows else None
    for start in range(0, len(long_rows), TOKEN_CHUNK):  # chunks: Encodings are large objects
        chunk = long_rows[start:start + TOKEN_CHUNK]
        encoded = tokenizer.encode_batch_fast([texts[i] for i in chunk],
                                              add_special_tokens=False)
        for i, enc in zip(chunk, encoded):
            sizes[i] = len(enc.ids)
    return pd.Series(sizes, index=raws.index)


def _render_raw(raw: str) -> str:
    try:
        row = orjson.loads(raw)
    except ValueError:
        return ""
    return render_for_count(row) if isinstance(row, dict) else ""


class ColumnValuesFitTokenBudget(ColumnMapMetricProvider):
    condition_metric_name = "column_values.fit_token_budget"
    condition_value_keys = ("tokenizer_file", "max_tokens")

    @column_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column: pd.Series, tokenizer_file: str, max_tokens: int,
                **kwargs: Any) -> pd.Series:
        return token_counts(column, tokenizer_file, max_tokens) <= max_tokens


class ExpectColumnValuesToFitTokenBudget(ColumnMapExpectation):
    """Expect each value (a JSON training row) to fit `max_tokens` tokens once rendered."""

    tokenizer_file: str
    max_tokens: int

    map_metric = "column_values.fit_token_budget"
    success_keys = ("tokenizer_file", "max_tokens", "mostly")
    args_keys = ("column", "tokenizer_file", "max_tokens")
