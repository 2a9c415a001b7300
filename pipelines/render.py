"""Turns one input row into the text of its request."""

from __future__ import annotations

from string import Formatter
from typing import Any, Mapping

import orjson

from promptmill.pipelines.attachments import AttachmentError
from promptmill.pipelines.file_access import Access
from promptmill.pipelines.items import AttachmentRef, RenderedRequest
from promptmill.pipelines.spec import AttachmentSpec, Pipeline


#: A row whose prompt the caller's own function (the Python API's) could not make carries why here:
#: it fails as that row's render error, with the function's reason, and the job goes on.
PROMPT_ERROR_COLUMN = "_promptmill_prompt_error"
#: A row whose prompt the caller's function made as a conversation holds its turns here, as JSON.
MESSAGES_COLUMN = "_promptmill_messages"
#: A row of an OpenAI batch file holds its request's `body` here: its messages are the row's turns,
#: its sampling parameters the row's own.
BODY_COLUMN = "_promptmill_body"
#: The columns promptmill writes into an input it stages (the Python API's prompt function's).
STAGED_COLUMNS = frozenset({PROMPT_ERROR_COLUMN, MESSAGES_COLUMN})
ROLES = ("system", "user", "assistant")
_BODY_PARAMETERS = ("max_tokens", "temperature", "top_p", "stop", "seed", "response_format")


class RenderError(ValueError):
    pass


def render_request(
    pipeline: Pipeline, row_number: int, row: Mapping[str, Any], line: int = 0, access: Access | None = None,
    ours: frozenset[str] = frozenset(),
) -> RenderedRequest:
    """The row's request. Its attachments are references (`describe` reads them), each where `access`
    allows (a relative path: inside the data's folder). The reserved columns in `ours` are the ones
    promptmill itself wrote into this input (`JobSpec.own_columns`); in any other input a column of
    that name is the user's, read as any other. Raises RenderError, or AttachmentError for an
    attachment's column."""
    if PROMPT_ERROR_COLUMN in ours and row.get(PROMPT_ERROR_COLUMN):
        raise RenderError(str(row[PROMPT_ERROR_COLUMN]))
    if BODY_COLUMN in ours and row.get(BODY_COLUMN) is not None:
        return body_request(row_number, line, row[BODY_COLUMN])
    if MESSAGES_COLUMN in ours and row.get(MESSAGES_COLUMN):
        messages = conversation(orjson.loads(row[MESSAGES_COLUMN]))
        return RenderedRequest(row=row_number, line=line, prompt="\n\n".join(m["content"] for m in messages), messages=messages)
    # Each placeholder is looked up as a whole column name, never as an attribute or index path, so
    # a template cannot reach into Python objects.
    parts: list[str] = []
    attached = {spec.column: spec for spec in pipeline.attachments}
    placed: dict[str, int] = {}
    for literal, field, spec, conversion in Formatter().parse(pipeline.prompt):
        parts.append(literal)
        if field is None:
            continue
        if field in attached:  # the file goes here in the user turn, not its path as text
            placed.setdefault(field, sum(map(len, parts)))
            continue
        if field not in row:
            raise RenderError(f"row has no column {field!r} (columns: {', '.join(map(str, row)) or 'none'})")
        value = row[field]
        if value is None:
            raise RenderError(f"column {field!r} is empty (null)")
        if conversion == "r":
            value = repr(value)
        elif isinstance(value, (dict, list, tuple)):
            # Nested values (Parquet structs and lists, JSON objects) go in as JSON, which models read,
            # not as Python's repr.
            value = orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
        try:
            parts.append(format(value, spec or ""))
        except (TypeError, ValueError) as bad:
            raise RenderError(f"column {field!r}: cannot format {value!r} with {spec!r}: {bad}") from None
    if pipeline.attachments and access is None:
        raise ValueError("a pipeline with attachments renders a row only with the job's Access")
    attachments = [_attachment(spec, row, placed.get(spec.column, 0), access) for spec in pipeline.attachments]  # type: ignore[arg-type]
    return RenderedRequest(row=row_number, line=line, prompt="".join(parts), attachments=attachments or None)


def _attachment(spec: AttachmentSpec, row: Mapping[str, Any], at: int, access: Access) -> AttachmentRef:
    if spec.column not in row:
        raise RenderError(f"row has no column {spec.column!r} for its {spec.kind} (columns: {', '.join(map(str, row)) or 'none'})")
    if row[spec.column] is None:
        raise AttachmentError(f"attachment {spec.column!r} is empty (null)")
    return AttachmentRef(column=spec.column, kind=spec.kind, at=at, source=access.source(row[spec.column], spec.column))


def body_request(row_number: int, line: int, body: Any) -> RenderedRequest:
    """A chat completions `body` as the row's request: its turns (text parts joined, `developer`
    turns as system), and its sampling and `response_format` as the row's own parameters."""
    if not isinstance(body, dict):
        raise RenderError(f"the request's body must be an object, not {type(body).__name__}")
    turns = []
    for i, message in enumerate(body.get("messages") or []):
        if not isinstance(message, dict):
            raise RenderError(f"message {i}: expected an object, not {message!r:.200}")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text alone here
            kinds = {part.get("type") for part in content if isinstance(part, dict)} - {"text"}
            if kinds:
                raise RenderError(f"message {i}: only text content parts are taken, not {', '.join(sorted(map(str, kinds)))}; "
                                  "give a row's image or document as a column named in a pipeline's [[attachments]]")
            content = "".join(part.get("text", "") for part in content)
        role = "system" if message.get("role") == "developer" else message.get("role")
        turns.append({"role": role, "content": content})
    messages = conversation(turns)
    params = {name: body[name] for name in _BODY_PARAMETERS if body.get(name) is not None}
    if body.get("max_completion_tokens") is not None:
        params["max_tokens"] = body["max_completion_tokens"]
    if isinstance(params.get("stop"), str):
        params["stop"] = [params["stop"]]
    for name, kinds in (("max_tokens", int), ("temperature", (int, float)), ("top_p", (int, float)), ("seed", int),
                        ("stop", list), ("response_format", dict)):  # fmt: skip
        if name in params and (not isinstance(params[name], kinds) or isinstance(params[name], bool)):
            raise RenderError(f"the request's {name} is {params[name]!r:.100}, not a {name.replace('_', ' ')} value")
    if params.get("max_tokens", 1) < 1:
        raise RenderError(f"the request's max_tokens must be 1 or more, not {params['max_tokens']}")
    prompt = "\n\n".join(m["content"] for m in messages)
    return RenderedRequest(row=row_number, line=line, prompt=prompt, messages=messages, body=params)


def conversation(messages: Any) -> list[dict[str, str]]:
    """A list of chat turns, checked: each a {role, content} of text, and one turn at least that is
    not a system turn. Raises RenderError saying what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise RenderError("the messages must be a non-empty list of {role, content}")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise RenderError(f"message {i}: expected {{role: {'|'.join(ROLES)}, content: text}}, not {message!r:.200}")
        checked.append({"role": message["role"], "content": message["content"]})
    if all(message["role"] == "system" for message in checked):
        raise RenderError("the messages hold system turns only; add a user turn")
    return checked
