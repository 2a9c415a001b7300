"""OpenAI batch JSONL, in and out: the files teams already hold for the Batch API and `vllm run-batch`.

In: each line `{"custom_id", "method", "url", "body"}` is a row (jobs/readers.py reads it as its
`custom_id` and its `body`); a file that names another endpoint, repeats a `custom_id` or holds a
body that is not an object is refused before anything is sent (`check_batch_file`). Out: a job's
records as the Batch API's output lines (`{"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error"}`), each answer a `chat.completion` whatever the backend that gave
it, in OpenAI's files (answers in `output.jsonl`, failures in `errors.jsonl`) or in `vllm run-batch`'s
one file.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import orjson

from promptmill.jobs.readers import json_lines
from promptmill.pipelines.spec import Pipeline

ENDPOINT = "/v1/chat/completions"
ID_COLUMN = "custom_id"
_SHOWN = 10  # the bad lines an error names
# Answers' stop reasons as chat completions say them (Anthropic's; OpenAI's and vLLM's are already so).
_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
           "refusal": "content_filter", "pause_turn": "stop"}  # fmt: skip
_STATUS_OF_KIND = {"render_error": 400, "invalid_request": 400, "prompt_too_long": 400, "model_not_found": 404,
                   "rate_limited": 429, "unparseable_output": 422}  # fmt: skip
Style = Literal["openai", "vllm"]


class BatchFileError(ValueError):
    """The file is not a batch file promptmill can run; the message names its bad lines."""


@dataclass(frozen=True)
class BatchFile:
    requests: int
    model: str | None  # the first model a request names
    max_tokens: int | None  # the first max_tokens (or max_completion_tokens) a request names


def check_batch_file(path: Path, max_row_bytes: int) -> BatchFile:
    """Read the whole file once: every line a chat completions request with an object body and a
    `custom_id` of its own, or a `BatchFileError` naming the lines that are not (10 of them, and the
    count). A line over `max_row_bytes` is never held whole: it is one of those named."""
    seen: set[str] = set()
    bad: list[str] = []
    model = max_tokens = None
    requests = 0
    for line_number, row, _ in json_lines(path, limit=max_row_bytes):
        requests += 1
        problem = _problem(row, seen)
        if problem:
            bad.append(f"line {line_number}: {problem}")
            continue
        body = row["body"]
        if model is None and isinstance(body.get("model"), str):
            model = body["model"]
        if max_tokens is None:
            max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if bad:
        shown = "; ".join(bad[:_SHOWN]) + (f"; and {len(bad) - _SHOWN:,} more" if len(bad) > _SHOWN else "")
        raise BatchFileError(f"INPUT: {len(bad):,} of {requests:,} lines are not batch requests: {shown}")
    if not requests:
        raise BatchFileError(f"INPUT: {path} holds no request")
    return BatchFile(requests, model, max_tokens if isinstance(max_tokens, int) else None)


def _problem(row: Any, seen: set[str]) -> str | None:
    if row is None:
        return "over PROMPTMILL_MAX_ROW_BYTES"
    if not isinstance(row, dict):
        return row.reason.split(": ", 1)[-1]  # an InvalidRow: not JSON, not an object
    if row.get("url") != ENDPOINT:
        return f"url is {row.get('url')!r}, not {ENDPOINT!r}"
    custom_id = row.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "custom_id must be a non-empty string"
    if custom_id in seen:
        return f"custom_id {custom_id!r} is used twice"
    seen.add(custom_id)
    if not isinstance(row.get("body"), dict):
        return "body is not an object"
    return None


def default_pipeline(model: str, max_tokens: int | None) -> Pipeline:
    """What runs a batch file given no pipeline: each line's own request, its model unless told another."""
    return Pipeline(name="batch-file", model=model, prompt="{custom_id}", max_tokens=max_tokens or 1024, id_column=ID_COLUMN)


# -- out ---------------------------------------------------------------------------------------------


def _epoch(iso: str | None) -> int:
    return int(datetime.fromisoformat(iso).timestamp()) if iso else 0


def _content(record: dict[str, Any]) -> str:
    if record.get("text") is not None:
        return record["text"]
    output = record.get("output")
    return output if isinstance(output, str) else orjson.dumps(output).decode()


def completion(record: dict[str, Any], model: str) -> dict[str, Any]:
    """A record's answer as a `chat.completion`, whichever backend gave it."""
    usage = record.get("usage") or {}
    prompt = sum(usage.get(name) or 0 for name in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"))
    completion_tokens = usage.get("output_tokens") or 0
    reason = record.get("finish_reason")
    return {
        "id": f"chatcmpl-{record.get('request_id') or uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": _epoch(record.get("finished_at")),
        "model": record.get("model") or model,
        "choices": [{
            "index": 0, "message": {"role": "assistant", "content": _content(record)},
            "finish_reason": _FINISH.get(reason, reason or "stop"), "logprobs": None,
        }],
        "usage": {
            "prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.get("cache_read_input_tokens") or 0},
        },
    }  # fmt: skip


def _status(record: dict[str, Any]) -> int:
    for attempt in reversed(record.get("errors") or []):
        if isinstance(attempt.get("status"), int):
            return attempt["status"]
    return _STATUS_OF_KIND.get((record.get("error") or {}).get("kind"), 500)


def batch_line(record: dict[str, Any], model: str, style: Style) -> dict[str, Any]:
    """A record as the Batch API's output line (`style` openai) or `vllm run-batch`'s (vllm)."""
    line_id = f"batch_req_{uuid.uuid4().hex[:24]}" if style == "openai" else f"vllm-{uuid.uuid4().hex}"
    request_id = record.get("request_id") or f"req_{uuid.uuid4().hex[:24]}"
    custom_id = str(record.get(ID_COLUMN) if record.get(ID_COLUMN) is not None else record["row"])
    if record["status"] == "ok":
        response = {"status_code": 200, "request_id": request_id, "body": completion(record, model)}
        return {"id": line_id, "custom_id": custom_id, "response": response, "error": None}
    error = record.get("error") or {}
    message, kind = error.get("message") or "failed", error.get("kind") or "error"
    if style == "vllm":  # vLLM's error lines: the status alone in the response, the message as `error`
        return {"id": line_id, "custom_id": custom_id,
                "response": {"status_code": _status(record), "request_id": request_id, "body": None}, "error": message}  # fmt: skip
    body = {"error": {"message": message, "type": kind, "param": None, "code": kind}}
    return {"id": line_id, "custom_id": custom_id,
            "response": {"status_code": _status(record), "request_id": request_id, "body": body}, "error": None}  # fmt: skip


def batch_lines(records: Iterable[dict[str, Any]], model: str, style: Style) -> Iterator[tuple[bool, bytes]]:
    """(answered, the line as JSONL bytes) for each record."""
    for record in records:
        yield record["status"] == "ok", orjson.dumps(batch_line(record, model, style)) + b"\n"
