"""Pipelines: validation that names the field, rendering, and parsing of every output type."""

from __future__ import annotations

from pathlib import Path

import pytest

from promptmill.pipelines import (
    OutputParseError,
    OutputSpec,
    PipelineError,
    RenderError,
    load_pipeline,
    parse_output,
    render_request,
)

ROOT = Path(__file__).resolve().parent.parent
CHOICE = OutputSpec(type="choice", choices=["positive", "negative", "very positive"])


@pytest.mark.parametrize(
    "text, label",
    [
        ("positive", "positive"),
        ("Negative.", "negative"),
        ("  POSITIVE!\n", "positive"),
        ("The review is negative.", "negative"),
        ("I would say: very positive", "very positive"),
    ],
)
def test_choice_answer_is_read_tolerantly(text: str, label: str) -> None:
    assert parse_output(CHOICE, text) == label


@pytest.mark.parametrize(
    "text, reason",
    [("", "empty"), ("It is mixed.", "none of the choices"), ("positive and negative", "more than one")],
)
def test_choice_answer_naming_zero_or_two_labels_fails_with_reason(text: str, reason: str) -> None:
    with pytest.raises(OutputParseError, match=reason):
        parse_output(CHOICE, text)


SCHEMA = OutputSpec(
    type="json",
    schema={"type": "object", "required": ["stars"], "properties": {"stars": {"type": "integer", "maximum": 5}}},
)


def test_json_answer_is_parsed_from_fences_and_sentences() -> None:
    assert parse_output(SCHEMA, '```json\n{"stars": 4}\n```') == {"stars": 4}
    assert parse_output(SCHEMA, 'Here it is: {"stars": 2} hope that helps') == {"stars": 2}


def test_json_answer_that_breaks_the_schema_fails_naming_the_place() -> None:
    with pytest.raises(OutputParseError, match="at stars"):
        parse_output(SCHEMA, '{"stars": 9}')
    with pytest.raises(OutputParseError, match="no JSON object"):
        parse_output(SCHEMA, "no idea")


def test_shipped_example_pipelines_load() -> None:
    assert load_pipeline(ROOT / "examples" / "sentiment.toml").output.choices == ["positive", "negative"]
    assert load_pipeline(ROOT / "examples" / "extract.toml").output.json_schema["required"][0] == "product"


def test_bad_pipeline_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nmodel = "m"\nprompt = "{text}"\nmax_tokens = 0\n[output]\ntype = "choice"\n')
    with pytest.raises(PipelineError) as raised:
        load_pipeline(bad)
    assert "max_tokens" in str(raised.value) and "choices" in str(raised.value)


def test_render_fills_columns_and_refuses_missing_ones() -> None:
    pipeline = load_pipeline(ROOT / "examples" / "sentiment.toml")
    assert "Review: great" in render_request(pipeline, 3, {"text": "great"}).prompt
    with pytest.raises(RenderError, match="no column 'text'"):
        render_request(pipeline, 0, {"body": "x"})
    with pytest.raises(RenderError, match="null"):
        render_request(pipeline, 0, {"text": None})
