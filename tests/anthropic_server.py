"""A local HTTP server that speaks the Anthropic Messages and OpenAI chat completions wire protocols,
for real-SDK tests and benches.

    python tests/anthropic_server.py --port 0 --key test-key     (prints "listening on URL")

POST /v1/messages/count_tokens counts as the API bills. POST /v1/messages answers like the API: a message with `usage` (cache fields included), the
`anthropic-ratelimit-*` headers and `request-id`; 400/401/429/500/529 bodies in the API's error shape,
with `retry-after` on 429 and 529. Replies are deterministic: `[[reply:TEXT]]` in the user turn makes
the answer TEXT (`[[reply@MODEL:TEXT]]` for that model only, over it; without either, the configured
`reply`), `[[status:400]]` fails that request with 400 (any status; `[[status@MODEL:404]]` for that
model only), `[[spend_limit]]` with
the 429 of an exhausted spend limit; otherwise the answer is "ok".
Images and documents: `image` and `document` blocks (base64 or url sources), and chat completions'
`image_url` (data URLs or URLs) and `file` parts (`file_data` data URLs), are checked as the APIs
check them (media type, base64, an image over 5 MB or a PDF over 100 pages: 400) and logged as
`files` (type, media_type, sha256 and size of the decoded bytes, or the url, and tokens). An image
bills Anthropic's rule, width x height / 750 at its best size (within 1,568 px and 1.15 megapixels);
a PDF bills 1,500 tokens a page; a URL is not fetched and bills 1,000.
Usage: tokens are words, counted block by block. Text up to a block sent with `cache_control` (a
breakpoint: the system prompt, or a prefix of the user turn) is a cache write the first time (5m or
1h, by its ttl) and a cache read until it expires; the rest is input_tokens; output_tokens = words
of the answer.

Rate limits, when configured, are enforced as the API does: one token bucket per budget (requests,
input tokens = uncached input + cache writes, output tokens charged at `max_tokens` on arrival and
corrected when the answer is known), refilled continuously, holding `burst_s` seconds of the limit.
A request that does not fit is answered 429 with `retry-after` in whole seconds, as the API does.

POST /v1/chat/completions answers as OpenAI does, from the same replies, faults, log and buckets:
`usage` with `prompt_tokens_details.cached_tokens` (a system message seen in the last 5 minutes is
cached), `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` headers (the token budget is
`input_tpm`, charged the prompt plus `max_tokens`), 429s with `retry-after` and `retry-after-ms`,
`[[insufficient_quota]]` for an account out of credit, and a choice schema's reply as JSON.

Message Batches: POST /v1/messages/batches (custom_id unique, 1 to 64 characters; over 100,000
requests: 413), GET /v1/messages/batches (newest first, paged by `limit` and `after_id`), GET .../{id},
POST .../{id}/cancel, GET .../{id}/results (JSONL in random order).
A batch ends `batch_delay_s` after it was created (or at the first look after a cancel: its
requests not yet processed are canceled). Each request is answered as POST /v1/messages would
(usage, caching, `[[reply:]]`), except `[[batch_error:TYPE]]` (errored every time),
`[[batch_error_once:TYPE]]` and `[[batch_expire_once]]` (errored or expired the first time the prompt
comes in a batch, answered after). Every batch request is in the log (`route` batch, its `batch_id`
and `custom_id`; `status` queued, then 200, errored, expired or canceled); GET /_batches lists the
batches with how often each was retrieved.

The OpenAI Batch API (/v1/files, /v1/batches): tests/openai_batches.py; GET /_openai_batches lists its batches.

Control: POST /_config with any of
    p429 p500 p529 p_timeout p_drop    share of requests given each fault (random, not enforced)
    p_stream_drop p_stream_cut         share of streamed answers whose connection drops after the first
                                       word (status stream_dropped), or that end cleanly there with no
                                       message_stop / finish_reason (stream_cut). What was generated up to
                                       then is billed (its log entry's usage): the input, and the output
                                       the last usage event sent said (Anthropic's message_start: 1)
    latency_ms, latency_per_token_ms   answer latency = latency_ms + per token x output tokens; a streamed
                                       answer (`"stream": true`, either API) sends its first token after
                                       latency_ms and the rest per token after it (its log entry's `first`)
    retry_after                        seconds sent with injected 429/529
    rpm input_tpm output_tpm burst_s   enforced limits (0 = none); setting any refills the buckets
    hide_limits                        send no anthropic-ratelimit-* headers
    batch_delay_s                      seconds from a batch's creation to its end
    batch_expire_next                  OpenAI batches: so many of the next ones expire half answered
    reply                              the answer to a prompt that names none ("ok")
    down                               {model: status}: every request for the model fails so (529, 404)
    error_message                      the message of an injected 5xx (or a `down` status it has none for)
    batch_create_fault                 the next batch create is made, then its answer lost: "drop" drops the
                                       connection, "kill" SIGKILLs the process that sent it (once each)
GET /_log (every request: t arrived and, when answered, done, on the monotonic clock; prompt,
status, usage, request_id, the sender's port), POST /_reset. `[[kill_worker]]` in a prompt SIGKILLs the local process that sent it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import io
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone

from aiohttp import web

try:
    from tests.openai_batches import OpenAIBatches
except ImportError:  # run as a script: tests/ is the path's first folder
    from openai_batches import OpenAIBatches

_REPLY = re.compile(r"\[\[reply(?:@([^:\]]+))?:(.*?)\]\]", re.DOTALL)
_STATUS = re.compile(r"\[\[status(?:@([^:\]]+))?:(\d{3})\]\]")
_DEFAULTS = {
    "p429": 0.0,
    "p500": 0.0,
    "p529": 0.0,
    "p_timeout": 0.0,
    "p_drop": 0.0,
    "p_stream_drop": 0.0,
    "p_stream_cut": 0.0,
    "latency_ms": 0.0,
    "latency_per_token_ms": 0.0,
    "retry_after": 0.05,
    "rpm": 0,
    "input_tpm": 0,
    "output_tpm": 0,
    "burst_s": 60.0,
    "hide_limits": False,
    "batch_delay_s": 0.0,
    "batch_expire_next": 0,
    "reply": "ok",
    "down": {},
    "batch_create_fault": "",
    "error_message": "",
}
_TIMEOUT_HANG_S = 600.0  # a "timed out" request is never answered; the client's timeout ends it


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"type": "error", "error": {"type": kind, "message": message}, "request_id": f"req_{uuid.uuid4().hex[:12]}"}
    return web.json_response(body, status=status, headers={"x-should-retry": "false", **(headers or {})})


def _openai_error(
    status: int, kind: str, message: str, code: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status, headers={"x-request-id": f"req_{uuid.uuid4().hex[:12]}", **(headers or {})})


def _reply(prompt: str, model: str, default: str) -> str:
    """The answer the prompt asks for: its `[[reply@MODEL:TEXT]]` for this model, else its
    `[[reply:TEXT]]`, else the configured `reply`."""
    replies = {for_model: text for for_model, text in _REPLY.findall(prompt)}
    return replies.get(model, replies.get("", default))


def _text(content) -> str:
    """A turn's text: its text blocks one after another, as the model reads them."""
    if isinstance(content, str):
        return content
    return "".join(block.get("text", "") for block in content if isinstance(block, dict))


IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
PDF_TOKENS_PER_PAGE = 1500
URL_TOKENS = 1000


class BadFile(ValueError):
    """A file block the API would refuse with 400."""


def _file_entry(kind: str, media_type: str | None, data: str | None, url: str | None) -> dict:
    """A decoded file as the log keeps it, with the tokens it bills."""
    if url is not None:
        return {"type": kind, "url": url, "tokens": URL_TOKENS}
    if kind == "image" and media_type not in IMAGE_TYPES:
        raise BadFile(f"image: media_type {media_type!r} is not one of {', '.join(IMAGE_TYPES)}")
    if kind == "document" and media_type != "application/pdf":
        raise BadFile(f"document: media_type {media_type!r} is not application/pdf")
    try:
        raw = base64.b64decode(data or "", validate=True)
    except binascii.Error:
        raise BadFile(f"{kind}: the data is not valid base64") from None
    entry = {"type": kind, "media_type": media_type, "sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}
    if kind == "image":
        if len(raw) > 5 * 1024 * 1024:
            raise BadFile("image exceeds 5 MB maximum")
        from PIL import Image

        with Image.open(io.BytesIO(raw)) as image:
            width, height = image.size
        scale = min(1.0, 1568 / max(width, height), math.sqrt(1_150_000 / (width * height)))
        entry |= {"width": width, "height": height,
                  "tokens": math.ceil(max(1, int(width * scale)) * max(1, int(height * scale)) / 750)}  # fmt: skip
    else:
        from pypdf import PdfReader

        pages = len(PdfReader(io.BytesIO(raw)).pages)
        if pages > 100:
            raise BadFile(f"document: a PDF of {pages} pages is over the maximum of 100")
        entry |= {"pages": pages, "tokens": pages * PDF_TOKENS_PER_PAGE}
    return entry


def _files(content) -> list[dict]:
    """The image and document blocks of a Messages API turn, decoded (BadFile: a block the API refuses)."""
    files = []
    for block in content if isinstance(content, list) else ():
        if isinstance(block, dict) and block.get("type") in ("image", "document"):
            source = block.get("source") or {}
            if source.get("type") == "url":
                files.append(_file_entry(block["type"], None, None, source.get("url")))
            elif source.get("type") == "base64":
                files.append(_file_entry(block["type"], source.get("media_type"), source.get("data"), None))
            else:
                raise BadFile(f"{block['type']}.source.type: {source.get('type')!r} is not base64 or url")
    return files


def _block_kinds(content) -> list[dict]:
    """A turn's blocks in order, each its type (and a text block's text): where the files went."""
    return [{"type": block.get("type"), **({"text": block["text"]} if "text" in block else {})}
            for block in content if isinstance(block, dict)]  # fmt: skip


def _chat_files(content) -> list[dict]:
    """The `image_url` and `file` parts of a chat completions turn, decoded."""
    files = []
    for part in content if isinstance(content, list) else ():
        if not isinstance(part, dict):
            continue
        if part.get("type") == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            match = re.match(r"data:([^;]+);base64,(.*)$", url, re.S)
            files.append(_file_entry("image", match.group(1), match.group(2), None) if match else _file_entry("image", None, None, url))
        elif part.get("type") == "file":
            match = re.match(r"data:([^;]+);base64,(.*)$", (part.get("file") or {}).get("file_data", ""), re.S)
            if not match:
                raise BadFile("file.file_data must be a base64 data URL")
            files.append(_file_entry("document", match.group(1), match.group(2), None))
    return files


def _blocks(body: dict) -> list[tuple[str, dict | None]]:
    """The request's text in order (system, then the user turn), block by block, with each block's
    cache_control: a cache breakpoint caches everything up to and including its block."""
    blocks: list[tuple[str, dict | None]] = []
    for content in (body.get("system"), body["messages"][-1]["content"]):
        if isinstance(content, str):
            blocks.append((content, None))
        elif content:
            blocks += [(b.get("text", ""), b.get("cache_control")) for b in content if isinstance(b, dict)]
    return blocks


def _prefix(blocks: list[tuple[str, dict | None]], last: int) -> str:
    return "\x00".join(text for text, _ in blocks[: last + 1])


class Bucket:
    """A per-minute limit as a continuously refilled token bucket holding `burst_s` of it."""

    def __init__(self, per_minute: float, burst_s: float):
        self.per_minute = per_minute
        self.capacity = max(1.0, per_minute * burst_s / 60)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.per_minute / 60)
        self.stamp = now

    def wait_s(self, cost: float) -> float:
        """0 when `cost` fits now, else the seconds until it will."""
        self._refill()
        need = min(cost, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) * 60 / self.per_minute

    def take(self, cost: float) -> None:
        self.level -= cost

    def give(self, amount: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level + amount)

    def openai_headers(self, name: str) -> dict[str, str]:
        self._refill()
        full_in = max(0.0, (self.capacity - self.level) * 60 / self.per_minute)
        return {
            f"x-ratelimit-limit-{name}": str(int(self.per_minute)),
            f"x-ratelimit-remaining-{name}": str(max(0, int(self.level))),
            f"x-ratelimit-reset-{name}": _duration(full_in),
        }

    def headers(self, name: str) -> dict[str, str]:
        self._refill()
        full_in = max(0.0, (self.capacity - self.level) * 60 / self.per_minute)
        reset = datetime.now(timezone.utc) + timedelta(seconds=full_in)
        return {
            f"anthropic-ratelimit-{name}-limit": str(int(self.per_minute)),
            f"anthropic-ratelimit-{name}-remaining": str(max(0, int(self.level))),
            f"anthropic-ratelimit-{name}-reset": reset.isoformat(timespec="seconds").replace("+00:00", "Z"),
        }


def _duration(seconds: float) -> str:
    """OpenAI's reset format: `6m0s`, `1.5s`, `120ms`."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.3g}s" if minutes else f"{rest:.3g}s"


def _client_port(request: web.Request) -> int | None:
    """The sender's local port: with the ports a process held, it tells which process sent a request."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return peer[1] if peer else None


def _kill_client(request: web.Request) -> None:
    """SIGKILL the local process that sent this request: a row that kills its worker (as an
    out-of-memory kill would), for the poison-row tests. Both ends must be on this machine."""
    import psutil

    port = _client_port(request)
    if port is None:
        return
    for connection in psutil.net_connections(kind="tcp"):
        if connection.laddr and connection.laddr.port == port and connection.pid:
            os.kill(connection.pid, signal.SIGKILL)
            return


class FakeAnthropic:
    def __init__(self, key: str):
        self.key = key
        self.config = dict(_DEFAULTS)
        self.log: list[dict] = []
        self.seen_prefixes: dict[str, float] = {}  # cached prefix (blocks up to a breakpoint) -> when it expires
        self.buckets: dict[str, Bucket] = {}
        self.batches: dict[str, dict] = {}
        self.failed_once: set[str] = set()  # prompts whose one batch failure (_once markers) happened
        self.openai_batches = OpenAIBatches(self, _reply, _kill_client, _chat_files)

    def _authorised(self, request: web.Request) -> bool:
        bearer = request.headers.get("authorization", "")
        return bearer == f"Bearer {self.key}" or request.headers.get("x-api-key") == self.key

    def _limit_headers(self) -> dict[str, str]:
        if self.config["hide_limits"]:
            return {}
        headers: dict[str, str] = {}
        for budget, name in (("rpm", "requests"), ("input_tpm", "input-tokens"), ("output_tpm", "output-tokens")):
            bucket = self.buckets.get(budget)
            if bucket is not None:
                headers.update(bucket.headers(name))
        return headers

    def _enforce(self, input_cost: int, output_reserve: int) -> float:
        """Take the request's costs from every bucket, or return the seconds until they fit."""
        costs = {"rpm": 1, "input_tpm": input_cost, "output_tpm": output_reserve}
        wait = max((self.buckets[b].wait_s(costs[b]) for b in self.buckets), default=0.0)
        if wait == 0:
            for budget, bucket in self.buckets.items():
                bucket.take(costs[budget])
        return wait

    def _roll_fault(self, prompt: str, model: str) -> int | str | None:
        if model in self.config["down"]:
            return int(self.config["down"][model])
        roll = random.random()
        for fault, share in (
            (429, "p429"),
            (500, "p500"),
            (529, "p529"),
            ("timeout", "p_timeout"),
            ("drop", "p_drop"),
        ):
            if roll < self.config[share]:
                return fault
            roll -= self.config[share]
        if "[[spend_limit]]" in prompt:
            return "spend_limit"
        if "[[kill_worker]]" in prompt:
            return "kill_worker"
        forced = {for_model: int(status) for for_model, status in _STATUS.findall(prompt)}
        return forced.get(model, forced.get(""))

    def _roll_stream_fault(self) -> str | None:
        """A streamed answer's fault, rolled apart from the request's: it breaks off after the first word."""
        roll = random.random()
        if roll < self.config["p_stream_drop"]:
            return "stream_dropped"
        if roll < self.config["p_stream_drop"] + self.config["p_stream_cut"]:
            return "stream_cut"
        return None

    def _usage(self, body: dict, reply: str, commit_cache: bool) -> dict:
        """Input tokens as the API splits them: up to the last cache breakpoint, a cache read of the
        longest prefix cached at one of the breakpoints and a write of the rest (for the ttl of the last
        breakpoint, 5m unless "1h"); after it, plain input. Without a breakpoint, all plain input."""
        blocks = _blocks(body)
        words = [len(text.split()) for text, _ in blocks]
        breakpoints = [i for i, (_, cache_control) in enumerate(blocks) if cache_control]
        now = time.monotonic()
        cache_read = cache_write = 0
        ttl = None
        if breakpoints:
            last = breakpoints[-1]
            ttl = blocks[last][1].get("ttl", "5m")
            hit = next((i for i in reversed(breakpoints) if self.seen_prefixes.get(_prefix(blocks, i), 0) > now), None)
            cache_read = 0 if hit is None else sum(words[: hit + 1])
            cache_write = sum(words[: last + 1]) - cache_read
            if commit_cache:
                for i in breakpoints:  # each breakpoint's prefix is cached, or its life renewed, on use
                    self.seen_prefixes[_prefix(blocks, i)] = now + (3600 if blocks[i][1].get("ttl") == "1h" else 300)
        plain = sum(words) - cache_read - cache_write
        plain += sum(file["tokens"] for file in _files(body["messages"][-1]["content"]))
        return {
            "input_tokens": plain,
            "output_tokens": max(1, len(reply.split())),
            "cache_creation_input_tokens": cache_write,
            "cache_read_input_tokens": cache_read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": cache_write if ttl != "1h" else 0,
                "ephemeral_1h_input_tokens": cache_write if ttl == "1h" else 0,
            },
        }

    async def count_tokens(self, request: web.Request) -> web.Response:
        """The API's token counter: the words of the system prompt and the user turn, as billed."""
        if not self._authorised(request):
            return _error(401, "authentication_error", "invalid x-api-key")
        body = await request.json()
        try:
            files = sum(file["tokens"] for file in _files(body["messages"][-1]["content"]))
        except BadFile as bad:
            return _error(400, "invalid_request_error", str(bad))
        return web.json_response({"input_tokens": files + sum(len(text.split()) for text, _ in _blocks(body))})

    async def messages(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        if not self._authorised(request):
            self.log.append({"t": arrived, "prompt": None, "status": 401, "usage": None})
            return _error(401, "authentication_error", "invalid x-api-key")
        body = await request.json()
        missing = [name for name in ("model", "max_tokens", "messages") if name not in body]
        if missing:
            return _error(400, "invalid_request_error", f"{missing[0]}: Field required")
        prompt = _text(body["messages"][-1]["content"])
        try:
            files = _files(body["messages"][-1]["content"])
        except BadFile as bad:
            self.log.append({"t": arrived, "prompt": prompt, "status": 400, "usage": None, "error": str(bad)})
            return _error(400, "invalid_request_error", str(bad))
        reply = _reply(prompt, body["model"], self.config["reply"])
        # An answer longer than max_tokens (a word a token) is cut there, as the API cuts it.
        stop_reason = "max_tokens" if len(reply.split()) > int(body["max_tokens"]) else "end_turn"
        if stop_reason == "max_tokens":
            reply = " ".join(reply.split()[: int(body["max_tokens"])])
        usage = self._usage(body, reply, commit_cache=False)
        entry = {"t": arrived, "prompt": prompt, "status": 200, "usage": None, "port": _client_port(request),
                 "model": body["model"], "params": {k: v for k, v in body.items() if k != "messages"}}  # fmt: skip
        if files:
            entry["files"] = files
            entry["blocks"] = _block_kinds(body["messages"][-1]["content"])
        self.log.append(entry)

        input_cost = usage["input_tokens"] + usage["cache_creation_input_tokens"]
        wait = self._enforce(input_cost, int(body["max_tokens"]))
        if wait > 0:
            entry["status"] = 429
            headers = {"retry-after": str(max(1, math.ceil(wait))), **self._limit_headers()}
            return _error(429, "rate_limit_error", "This request would exceed your rate limit", headers)

        fault = self._roll_fault(prompt, body["model"])
        if fault == "timeout":
            entry["status"] = "timeout"
            await asyncio.sleep(_TIMEOUT_HANG_S)
            return web.Response(status=504)  # the client gave up long ago
        if fault == "kill_worker":
            entry["status"] = "killed_worker"
            _kill_client(request)
            await asyncio.sleep(_TIMEOUT_HANG_S)
            return web.Response(status=504)
        if fault == "drop":
            entry["status"] = "dropped"
            request.transport.abort()
            return web.Response(status=500)  # never reaches the client: the connection is gone
        latency = (self.config["latency_ms"] + self.config["latency_per_token_ms"] * usage["output_tokens"]) / 1000
        streamed = bool(body.get("stream"))
        to_first = self.config["latency_ms"] / 1000 if streamed else latency
        if to_first:
            await asyncio.sleep(to_first)
        if fault is not None:
            entry["status"] = fault
            self._refund_output(int(body["max_tokens"]))
            retry = {"retry-after": str(self.config["retry_after"]), **self._limit_headers()}
            if fault == 429:
                return _error(429, "rate_limit_error", "Number of requests has exceeded your rate limit", retry)
            if fault == 529:
                return _error(529, "overloaded_error", "Overloaded", retry)
            if fault == 400:
                return _error(400, "invalid_request_error", "prompt is poisoned for this test")
            if fault == 404:
                return _error(404, "not_found_error", f"model: {body['model']}")
            if fault == 413:
                return _error(413, "request_too_large", "Request exceeds the maximum allowed number of bytes")
            if fault == "spend_limit":
                body = {
                    "type": "error",
                    "error": {
                        "type": "rate_limit_error",
                        "message": "You have reached your specified workspace API usage limits",
                        "error_code": "enforced_spend_limit_reached",
                    },
                }
                return web.json_response(body, status=429, headers={"retry-after": "60"})
            return _error(fault, "api_error", self.config["error_message"] or "Internal server error", self._limit_headers())

        usage = self._usage(body, reply, commit_cache=True)
        self._refund_output(int(body["max_tokens"]) - usage["output_tokens"])
        entry["usage"] = usage
        entry["done"] = time.monotonic()
        message = {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [{"type": "text", "text": reply}],
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": usage,
        }
        entry["request_id"] = f"req_{uuid.uuid4().hex[:12]}"
        headers = {"request-id": entry["request_id"], **self._limit_headers()}
        if not self.buckets and not self.config["hide_limits"]:
            headers.update(
                {
                    "anthropic-ratelimit-requests-limit": "100000",
                    "anthropic-ratelimit-requests-remaining": "99999",
                }
            )
        if streamed:
            return await self._stream_message(request, message, headers, entry, latency - to_first)
        return web.json_response(message, headers=headers)

    async def _stream_message(
        self, request: web.Request, message: dict, headers: dict[str, str], entry: dict, rest_s: float
    ) -> web.StreamResponse:
        """The Messages API's server-sent events: the first word, then the rest after `rest_s`; or, for
        a stream fault, nothing after the first word (what was sent so far is what is billed)."""
        response = web.StreamResponse(headers={**headers, "content-type": "text/event-stream"})
        await response.prepare(request)

        async def send(kind: str, data: dict) -> None:
            await response.write(f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode())

        text = message["content"][0]["text"]
        words = text.split(" ")
        usage = message["usage"]
        started = {**usage, "output_tokens": 1}
        await send("message_start", {"message": {**message, "content": [], "stop_reason": None, "usage": started}})
        await send("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        await send("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": words[0]}})
        entry["first"] = time.monotonic()
        fault = self._roll_stream_fault()
        if fault is not None:
            return await self._break_stream(request, response, fault, entry, started)
        if rest_s > 0:
            await asyncio.sleep(rest_s)
        if len(words) > 1:
            rest = " " + " ".join(words[1:])
            await send("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": rest}})
        await send("content_block_stop", {"index": 0})
        await send("message_delta", {"delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                                     "usage": {"output_tokens": usage["output_tokens"]}})  # fmt: skip
        await send("message_stop", {})
        await response.write_eof()
        return response

    @staticmethod
    async def _break_stream(
        request: web.Request, response: web.StreamResponse, fault: str, entry: dict, billed: dict
    ) -> web.StreamResponse:
        """End a streamed answer after its first word: the connection dropped, or closed cleanly with
        no end of message. The provider bills what it generated up to then."""
        await asyncio.sleep(0.05)  # what was sent reaches the client before the connection goes
        entry.update(status=fault, usage=billed)
        if fault == "stream_dropped":
            if request.transport is not None:  # None: the client went first
                request.transport.abort()
        else:
            await response.write_eof()
        return response

    # -- OpenAI's chat completions ---------------------------------------------------------------

    def _openai_limit_headers(self) -> dict[str, str]:
        if self.config["hide_limits"]:
            return {}
        headers: dict[str, str] = {}
        for budget, name in (("rpm", "requests"), ("input_tpm", "tokens")):
            bucket = self.buckets.get(budget)
            if bucket is not None:
                headers.update(bucket.openai_headers(name))
        return headers

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's chat completions: the same replies, faults and log as /v1/messages, in OpenAI's
        shapes. A system message seen before (within 5 minutes) is a cached prompt; limits are one
        request bucket and one token bucket charged the prompt plus `max_tokens` (never refunded)."""
        arrived = time.monotonic()
        if not self._authorised(request):
            self.log.append({"t": arrived, "prompt": None, "status": 401, "usage": None})
            return _openai_error(401, "invalid_request_error", "Incorrect API key provided", "invalid_api_key")
        body = await request.json()
        missing = [name for name in ("model", "messages") if name not in body]
        if missing:
            return _openai_error(400, "invalid_request_error", f"Missing required parameter: '{missing[0]}'.")
        system = " ".join(_text(m["content"]) for m in body["messages"] if m.get("role") in ("system", "developer"))
        prompt = _text(body["messages"][-1]["content"])
        try:
            files = _chat_files(body["messages"][-1]["content"])
        except BadFile as bad:
            self.log.append({"t": arrived, "prompt": prompt, "status": 400, "usage": None, "route": "chat", "error": str(bad)})
            return _openai_error(400, "invalid_request_error", str(bad))
        reply = _reply(prompt, body["model"], self.config["reply"])
        params = {key: value for key, value in body.items() if key != "messages"}
        entry = {"t": arrived, "prompt": prompt, "status": 200, "usage": None, "port": _client_port(request),
                 "route": "chat", "model": body["model"], "params": params, "system": system or None}  # fmt: skip
        if files:
            entry["files"] = files
        self.log.append(entry)
        max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        prompt_tokens = len(system.split()) + len(prompt.split()) + sum(file["tokens"] for file in files)

        costs = {"rpm": 1, "input_tpm": prompt_tokens + max_tokens, "output_tpm": 0}
        wait = max((self.buckets[b].wait_s(costs[b]) for b in self.buckets), default=0.0)
        if wait > 0:
            entry["status"] = 429
            headers = {"retry-after": str(math.ceil(wait)), "retry-after-ms": str(math.ceil(wait * 1000))}
            return _openai_error(429, "requests", "Rate limit reached", "rate_limit_exceeded",
                                 {**headers, **self._openai_limit_headers()})  # fmt: skip
        for budget, bucket in self.buckets.items():
            bucket.take(costs[budget])

        fault = "insufficient_quota" if "[[insufficient_quota]]" in prompt else self._roll_fault(prompt, body["model"])
        if fault == "timeout":
            entry["status"] = "timeout"
            await asyncio.sleep(_TIMEOUT_HANG_S)
            return web.Response(status=504)
        if fault == "drop":
            entry["status"] = "dropped"
            request.transport.abort()
            return web.Response(status=500)
        latency = (self.config["latency_ms"] + self.config["latency_per_token_ms"] * len(reply.split())) / 1000
        streamed = bool(body.get("stream"))
        to_first = self.config["latency_ms"] / 1000 if streamed else latency
        if to_first:
            await asyncio.sleep(to_first)
        if fault is not None:
            entry["status"] = fault
            retry = {"retry-after": str(self.config["retry_after"]), **self._openai_limit_headers()}
            if fault == "insufficient_quota":
                message = "You exceeded your current quota, please check your plan and billing details."
                return _openai_error(429, "insufficient_quota", message, "insufficient_quota")
            if fault == 429:
                return _openai_error(429, "requests", "Rate limit reached", "rate_limit_exceeded", retry)
            if fault == 404:
                message = f"The model `{body['model']}` does not exist or you do not have access to it."
                return _openai_error(404, "invalid_request_error", message, "model_not_found")
            if fault in (400, 413):
                return _openai_error(fault, "invalid_request_error", "prompt is poisoned for this test")
            message = self.config["error_message"] or "The server had an error"
            return _openai_error(int(fault) if isinstance(fault, int) else 500, "server_error", message, None, retry)

        now = time.monotonic()
        cached = len(system.split()) if system and self.seen_prefixes.get("chat\x00" + system, 0) > now else 0
        if system:
            self.seen_prefixes["chat\x00" + system] = now + 300
        completion_tokens = max(1, len(reply.split()))
        text = reply
        if isinstance(body.get("response_format"), dict) and body["response_format"].get("type") == "json_schema":
            schema = body["response_format"]["json_schema"].get("schema", {})
            if schema.get("enum"):  # a constrained choice: the reply as a JSON string
                text = json.dumps(reply)
            elif schema.get("properties", {}).get("answer", {}).get("enum"):  # OpenAI's strict form
                text = json.dumps({"answer": reply})
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        entry["usage"] = usage
        entry["done"] = time.monotonic()
        entry["request_id"] = f"req_{uuid.uuid4().hex[:12]}"
        completion = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop", "logprobs": None}
            ],
            "usage": usage,
        }
        headers = {"x-request-id": entry["request_id"], **self._openai_limit_headers()}
        if streamed:
            with_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return await self._stream_completion(request, completion, headers, entry, latency - to_first, with_usage)
        return web.json_response(completion, headers=headers)

    async def _stream_completion(
        self, request: web.Request, completion: dict, headers: dict[str, str], entry: dict, rest_s: float,
        with_usage: bool,
    ) -> web.StreamResponse:
        """Chat completion chunks as server-sent events: the first word, the rest after `rest_s`, the
        finish reason, the usage (when `stream_options.include_usage` asks), then [DONE]. A stream
        fault ends it after the first word: the client never sees the usage, which OpenAI sends last."""
        response = web.StreamResponse(headers={**headers, "content-type": "text/event-stream"})
        await response.prepare(request)
        base = {key: completion[key] for key in ("id", "created", "model")} | {"object": "chat.completion.chunk"}

        async def send(choices: list, **extra: object) -> None:
            await response.write(f"data: {json.dumps({**base, 'choices': choices, **extra})}\n\n".encode())

        def delta(content: dict, finish: str | None = None) -> list:
            return [{"index": 0, "delta": content, "finish_reason": finish, "logprobs": None}]

        text = completion["choices"][0]["message"]["content"]
        head, space, tail = text.partition(" ")
        await send(delta({"role": "assistant", "content": head}))
        entry["first"] = time.monotonic()
        fault = self._roll_stream_fault()
        if fault is not None:
            usage = completion["usage"]
            billed = {**usage, "completion_tokens": 1, "total_tokens": usage["prompt_tokens"] + 1}
            return await self._break_stream(request, response, fault, entry, billed)
        if rest_s > 0:
            await asyncio.sleep(rest_s)
        if tail:
            await send(delta({"content": space + tail}))
        await send(delta({}, "stop"))
        if with_usage:
            await send([], usage=completion["usage"])
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    # -- Message Batches -------------------------------------------------------------------------

    def _batch_view(self, batch: dict, request: web.Request) -> dict:
        counts = {name: 0 for name in ("processing", "succeeded", "errored", "canceled", "expired")}
        for entry in batch["entries"]:
            counts["processing" if entry["status"] == "queued" else
                   "succeeded" if entry["status"] == 200 else entry["status"]] += 1  # fmt: skip
        ended = batch["status"] == "ended"
        origin = f"{request.scheme}://{request.host}"
        return {
            "id": batch["id"],
            "type": "message_batch",
            "processing_status": batch["status"],
            "request_counts": counts,
            "created_at": batch["created_at"],
            "expires_at": batch["expires_at"],
            "ended_at": batch.get("ended_at"),
            "cancel_initiated_at": batch.get("cancel_initiated_at"),
            "archived_at": None,
            "results_url": f"{origin}/v1/messages/batches/{batch['id']}/results" if ended else None,
        }

    def _answer_in_batch(self, entry: dict, params: dict) -> dict:
        prompt = entry["prompt"]
        error = re.search(r"\[\[batch_error(_once)?:(\w+)\]\]", prompt)
        expire = "[[batch_expire_once]]" in prompt
        if (error and (not error.group(1) or prompt not in self.failed_once)) or (expire and prompt not in self.failed_once):
            self.failed_once.add(prompt)
            if expire:
                entry["status"] = "expired"
                return {"type": "expired"}
            entry["status"] = "errored"
            kind = error.group(2)
            return {"type": "errored", "error": {"type": "error", "error": {"type": kind, "message": f"{kind} for this test"}}}
        reply = _reply(prompt, params["model"], self.config["reply"])
        usage = self._usage(params, reply, commit_cache=True)
        if files := _files(params["messages"][-1]["content"]):
            entry["files"] = files
        entry.update(status=200, usage=usage, done=time.monotonic(), request_id=f"msg_{uuid.uuid4().hex[:24]}")
        message = {
            "id": entry["request_id"],
            "type": "message",
            "role": "assistant",
            "model": params["model"],
            "content": [{"type": "text", "text": reply}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }
        return {"type": "succeeded", "message": message}

    def _advance(self, batch: dict) -> None:
        """A batch past its delay ends with every request answered; a cancelled one with the rest canceled."""
        now = time.monotonic()
        if batch["status"] == "in_progress" and now - batch["t"] >= self.config["batch_delay_s"]:
            batch["results"] = [
                {"custom_id": entry["custom_id"], "result": self._answer_in_batch(entry, params)}
                for entry, params in zip(batch["entries"], batch["params"])
            ]
        elif batch["status"] == "canceling":
            for entry in batch["entries"]:
                entry["status"] = "canceled"
            batch["results"] = [{"custom_id": e["custom_id"], "result": {"type": "canceled"}} for e in batch["entries"]]
        else:
            return
        batch["status"] = "ended"
        batch["ended_at"] = datetime.now(timezone.utc).isoformat()

    def _batch(self, request: web.Request) -> dict | None:
        return self.batches.get(request.match_info["batch_id"])

    async def create_batch(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return _error(401, "authentication_error", "invalid x-api-key")
        body = await request.json()
        requests = body.get("requests") or []
        if not requests:
            return _error(400, "invalid_request_error", "requests: at least one request is required")
        if len(requests) > 100_000:
            return _error(413, "request_too_large", "a batch holds at most 100,000 requests")
        ids = [item.get("custom_id", "") for item in requests]
        if len(set(ids)) != len(ids) or not all(1 <= len(str(i)) <= 64 for i in ids):
            return _error(400, "invalid_request_error", "custom_id must be unique within a batch, 1 to 64 characters")
        now = datetime.now(timezone.utc)
        batch_id = f"msgbatch_{uuid.uuid4().hex[:24]}"
        entries = []
        for item in requests:
            params = item["params"]
            entry = {"t": time.monotonic(), "route": "batch", "batch_id": batch_id, "custom_id": item["custom_id"],
                     "prompt": _text(params["messages"][-1]["content"]), "status": "queued", "usage": None}  # fmt: skip
            entries.append(entry)
            self.log.append(entry)
        self.batches[batch_id] = {
            "id": batch_id, "t": time.monotonic(), "status": "in_progress", "entries": entries,
            "params": [item["params"] for item in requests], "created_at": now.isoformat(),
            "expires_at": (now + timedelta(hours=24)).isoformat(), "retrieved": 0,
        }  # fmt: skip
        fault, self.config["batch_create_fault"] = self.config["batch_create_fault"], ""
        if fault == "kill":
            _kill_client(request)
            await asyncio.sleep(_TIMEOUT_HANG_S)
        if fault:
            request.transport.abort()  # made, and its answer lost
        return web.json_response(self._batch_view(self.batches[batch_id], request))

    async def list_provider_batches(self, request: web.Request) -> web.Response:
        """The API's list of batches: newest first, `limit` a page, `after_id` the one before the page."""
        if not self._authorised(request):
            return _error(401, "authentication_error", "invalid x-api-key")
        ordered = sorted(self.batches.values(), key=lambda b: b["t"], reverse=True)
        after = request.query.get("after_id")
        if after is not None:
            ids = [b["id"] for b in ordered]
            ordered = ordered[ids.index(after) + 1 :] if after in ids else []
        limit = int(request.query.get("limit", 20))
        for batch in ordered[:limit]:
            self._advance(batch)
        page = [self._batch_view(batch, request) for batch in ordered[:limit]]
        return web.json_response({"data": page, "has_more": len(ordered) > limit,
                                  "first_id": page[0]["id"] if page else None,
                                  "last_id": page[-1]["id"] if page else None})  # fmt: skip

    async def retrieve_batch(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return _error(401, "authentication_error", "invalid x-api-key")
        batch = self._batch(request)
        if batch is None:
            return _error(404, "not_found_error", "no such batch")
        batch["retrieved"] += 1
        self._advance(batch)
        return web.json_response(self._batch_view(batch, request))

    async def cancel_batch(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return _error(401, "authentication_error", "invalid x-api-key")
        batch = self._batch(request)
        if batch is None:
            return _error(404, "not_found_error", "no such batch")
        if batch["status"] == "in_progress":
            batch["status"] = "canceling"
            batch["cancel_initiated_at"] = datetime.now(timezone.utc).isoformat()
        return web.json_response(self._batch_view(batch, request))

    async def batch_results(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return _error(401, "authentication_error", "invalid x-api-key")
        batch = self._batch(request)
        if batch is None or batch["status"] != "ended":
            return _error(404, "not_found_error", "no results for this batch (yet)")
        lines = [json.dumps(result) for result in batch["results"]]
        random.shuffle(lines)  # the API promises no order
        return web.Response(body=("\n".join(lines) + "\n").encode(), content_type="application/binary")

    async def list_batches(self, request: web.Request) -> web.Response:
        return web.json_response(
            [{"id": b["id"], "status": b["status"], "requests": len(b["entries"]), "retrieved": b["retrieved"]}
             for b in self.batches.values()]  # fmt: skip
        )

    def _refund_output(self, tokens: int) -> None:
        bucket = self.buckets.get("output_tpm")
        if bucket is not None and tokens > 0:
            bucket.give(tokens)

    async def set_config(self, request: web.Request) -> web.Response:
        update = await request.json()
        unknown = set(update) - set(_DEFAULTS)
        if unknown:
            return web.json_response({"error": f"unknown settings {sorted(unknown)}"}, status=400)
        self.config.update(update)
        if {"rpm", "input_tpm", "output_tpm", "burst_s"} & set(update):
            self._rebuild_buckets()
        return web.json_response(self.config)

    def _rebuild_buckets(self) -> None:
        burst = float(self.config["burst_s"])
        self.buckets = {
            budget: Bucket(float(self.config[budget]), burst)
            for budget in ("rpm", "input_tpm", "output_tpm")
            if self.config[budget]
        }

    async def get_log(self, request: web.Request) -> web.Response:
        return web.json_response(self.log)

    async def reset(self, request: web.Request) -> web.Response:
        self.log.clear()
        self.seen_prefixes.clear()
        self.config = dict(_DEFAULTS)
        self.buckets = {}
        self.batches.clear()
        self.openai_batches.reset()
        self.failed_once.clear()
        return web.json_response({"ok": True})

    def app(self) -> web.Application:
        application = web.Application(client_max_size=64 * 1024 * 1024)
        application.router.add_post("/v1/messages", self.messages)
        application.router.add_post("/v1/messages/count_tokens", self.count_tokens)
        application.router.add_post("/v1/chat/completions", self.chat_completions)
        application.router.add_post("/v1/messages/batches", self.create_batch)
        application.router.add_get("/v1/messages/batches", self.list_provider_batches)
        application.router.add_get("/v1/messages/batches/{batch_id}", self.retrieve_batch)
        application.router.add_post("/v1/messages/batches/{batch_id}/cancel", self.cancel_batch)
        application.router.add_get("/v1/messages/batches/{batch_id}/results", self.batch_results)
        application.router.add_get("/_batches", self.list_batches)
        application.router.add_get("/_openai_batches", lambda _: web.json_response(self.openai_batches.summary()))
        self.openai_batches.routes(application)
        application.router.add_post("/_config", self.set_config)
        application.router.add_get("/_log", self.get_log)
        application.router.add_post("/_reset", self.reset)
        return application


class ServerControl:
    """The control side of a running server, for tests and benches in other processes."""

    def __init__(self, url: str, process: subprocess.Popen | None = None):
        self.url = url
        self.process = process

    @classmethod
    def start(cls, key: str) -> "ServerControl":
        process = subprocess.Popen(
            [sys.executable, __file__, "--port", "0", "--key", key], stdout=subprocess.PIPE, text=True
        )
        line = process.stdout.readline()  # type: ignore[union-attr]
        if not line.startswith("listening on "):
            process.kill()
            raise RuntimeError(f"the local Anthropic server did not start: {line!r}")
        return cls(line.split()[-1], process)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def _call(self, path: str, payload: dict | None = None):
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, method="GET" if data is None else "POST")
        request.add_header("content-type", "application/json")
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def configure(self, **settings: float) -> None:
        self._call("/_config", settings)

    def log(self) -> list[dict]:
        return self._call("/_log")

    def config(self) -> dict:
        return self._call("/_config", {})

    def reset(self) -> None:
        self._call("/_reset", {})

    def batches(self) -> list[dict]:
        return self._call("/_batches")

    def openai_batches(self) -> list[dict]:
        return self._call("/_openai_batches")


async def _serve(port: int, key: str) -> None:
    runner = web.AppRunner(FakeAnthropic(key).app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"listening on http://127.0.0.1:{bound}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--key", default="test-key")
    options = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve(options.port, options.key))
