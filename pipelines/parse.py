"""Turns a model's text into the pipeline's output value, or says why it cannot."""

from __future__ import annotations

import re
from typing import Any

import jsonschema
import orjson

from promptmill.pipelines.spec import OutputSpec

# A "short sentence" that may name a choice: longer answers are not read for a label.
_MAX_WORDS_FOR_CHOICE = 40
_FENCE = re.compile(r"^```[a-zA-Z0-9_-]*\s*\n?(.*?)\n?```$", re.DOTALL)


class OutputParseError(ValueError):
    pass


def parse_output(spec: OutputSpec, text: str) -> Any:
    if spec.type == "text":
        return text
    if spec.type == "choice":
        assert spec.choices is not None
        return _parse_choice(spec.choices, text)
    assert spec.json_schema is not None
    return _parse_json(spec.json_schema, text)


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s-]", " ", text.lower()).split())


def _parse_choice(choices: list[str], text: str) -> str:
    answer = _normalise(text)
    if not answer:
        raise OutputParseError("the answer is empty; expected one of: " + ", ".join(choices))
    by_form = {_normalise(choice): choice for choice in choices}
    if answer in by_form:
        return by_form[answer]
    if len(answer.split()) > _MAX_WORDS_FOR_CHOICE:
        raise OutputParseError(f"the answer is too long to name a choice: {text[:80]!r}")
    # Find every choice named as whole words; a choice inside a longer named choice
    # ("positive" in "very positive") does not count on its own.
    spans: list[tuple[int, int, str]] = []
    for form, choice in by_form.items():
        for match in re.finditer(rf"(?<![\w-]){re.escape(form)}(?![\w-])", answer):
            spans.append((match.start(), match.end(), choice))
    named = {
        choice
        for start, end, choice in spans
        if not any(s <= start and end <= e and (e - s) > (end - start) for s, e, _ in spans)
    }
    if len(named) == 1:
        return named.pop()
    if not named:
        raise OutputParseError(f"the answer names none of the choices ({', '.join(choices)}): {text[:80]!r}")
    raise OutputParseError(f"the answer names more than one choice ({', '.join(sorted(named))}): {text[:80]!r}")


def _parse_json(schema: dict[str, Any], text: str) -> Any:
    candidate = text.strip()
    fenced = _FENCE.match(candidate)
    if fenced:
        candidate = fenced.group(1).strip()
    try:
        value = orjson.loads(candidate)
    except orjson.JSONDecodeError:
        # Models often wrap the object in a sentence: take the outermost {...}.
        start, end = candidate.find("{"), candidate.rfind("}")
        if start < 0 or end <= start:
            raise OutputParseError(f"the answer holds no JSON object: {text[:80]!r}") from None
        try:
            value = orjson.loads(candidate[start : end + 1])
        except orjson.JSONDecodeError as bad:
            raise OutputParseError(f"the answer is not valid JSON ({bad}): {text[:80]!r}") from None
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(value), key=lambda e: list(e.path))
    if errors:
        first = errors[0]
        where = "/".join(str(part) for part in first.path) or "(root)"
        raise OutputParseError(f"the JSON does not match the schema at {where}: {first.message}")
    return value
