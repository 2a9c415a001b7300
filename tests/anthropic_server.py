"""A local HTTP server that speaks the Anthropic Messages wire protocol, for real-SDK tests.

    python tests/anthropic_server.py --port 0 --key test-key     (prints "listening on URL")

POST /v1/messages answers like the API: a message with `usage` (cache fields included), the
`anthropic-ratelimit-*` headers and `request-id`; 400/401/429/500/529 bodies in the API's error shape,
with `retry-after` on 429 and 529. Replies are deterministic: `[[reply:TEXT]]` in the user turn makes
the answer TEXT, `[[status:400]]` fails that request with 400; otherwise the answer is "ok".
Usage: input_tokens = words of the user turn; the system prompt is a cache write the first time the
server sees it and a cache read after; output_tokens = words of the answer.
Control: POST /_config {"p429": 0.1, "p500": 0.05, "p529": 0.0, "latency_ms": 0, "retry_after": 0.05},
GET /_log (every request: prompt, status, usage), POST /_reset.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import uuid

from aiohttp import web

_REPLY = re.compile(r"\[\[reply:(.*?)\]\]", re.DOTALL)
_STATUS = re.compile(r"\[\[status:(\d{3})\]\]")


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"type": "error", "error": {"type": kind, "message": message}, "request_id": f"req_{uuid.uuid4().hex[:12]}"}
    return web.json_response(body, status=status, headers={"x-should-retry": "false", **(headers or {})})


def _text(content) -> str:
    if isinstance(content, str):
        return content
    return " ".join(block.get("text", "") for block in content if isinstance(block, dict))


class FakeAnthropic:
    def __init__(self, key: str):
        self.key = key
        self.config = {"p429": 0.0, "p500": 0.0, "p529": 0.0, "latency_ms": 0, "retry_after": 0.05}
        self.log: list[dict] = []
        self.seen_systems: set[str] = set()

    def _authorised(self, request: web.Request) -> bool:
        bearer = request.headers.get("authorization", "")
        return bearer == f"Bearer {self.key}" or request.headers.get("x-api-key") == self.key

    async def messages(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            self.log.append({"prompt": None, "status": 401, "usage": None})
            return _error(401, "authentication_error", "invalid x-api-key")
        body = await request.json()
        missing = [name for name in ("model", "max_tokens", "messages") if name not in body]
        if missing:
            return _error(400, "invalid_request_error", f"{missing[0]}: Field required")
        prompt = _text(body["messages"][-1]["content"])
        latency = self.config["latency_ms"] / 1000
        roll = random.random()
        fault = None
        if roll < self.config["p429"]:
            fault = 429
        elif roll < self.config["p429"] + self.config["p500"]:
            fault = 500
        elif roll < self.config["p429"] + self.config["p500"] + self.config["p529"]:
            fault = 529
        forced = _STATUS.search(prompt)
        if forced and fault is None:
            fault = int(forced.group(1))
        if latency:
            await asyncio.sleep(latency)
        if fault is not None:
            self.log.append({"prompt": prompt, "status": fault, "usage": None})
            retry = {"retry-after": str(self.config["retry_after"])}
            if fault == 429:
                return _error(429, "rate_limit_error", "Number of requests has exceeded your rate limit", retry)
            if fault == 529:
                return _error(529, "overloaded_error", "Overloaded", retry)
            if fault == 400:
                return _error(400, "invalid_request_error", "prompt is poisoned for this test")
            return _error(fault, "api_error", "Internal server error")
        reply_match = _REPLY.search(prompt)
        reply = reply_match.group(1) if reply_match else "ok"
        system = body.get("system")
        system_text = _text(system) if system else ""
        system_words = len(system_text.split())
        cache_write = cache_read = 0
        if system_words:
            if system_text in self.seen_systems:
                cache_read = system_words
            else:
                self.seen_systems.add(system_text)
                cache_write = system_words
        usage = {
            "input_tokens": len(prompt.split()),
            "output_tokens": max(1, len(reply.split())),
            "cache_creation_input_tokens": cache_write,
            "cache_read_input_tokens": cache_read,
        }
        self.log.append({"prompt": prompt, "status": 200, "usage": usage})
        message = {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [{"type": "text", "text": reply}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }
        headers = {
            "request-id": f"req_{uuid.uuid4().hex[:12]}",
            "anthropic-ratelimit-requests-limit": "100000",
            "anthropic-ratelimit-requests-remaining": "99999",
            "anthropic-ratelimit-input-tokens-remaining": "10000000",
            "anthropic-ratelimit-output-tokens-remaining": "10000000",
        }
        return web.json_response(message, headers=headers)

    async def set_config(self, request: web.Request) -> web.Response:
        self.config.update(await request.json())
        return web.json_response(self.config)

    async def get_log(self, request: web.Request) -> web.Response:
        return web.json_response(self.log)

    async def reset(self, request: web.Request) -> web.Response:
        self.log.clear()
        self.seen_systems.clear()
        self.config.update({"p429": 0.0, "p500": 0.0, "p529": 0.0, "latency_ms": 0, "retry_after": 0.05})
        return web.json_response({"ok": True})

    def app(self) -> web.Application:
        application = web.Application(client_max_size=64 * 1024 * 1024)
        application.router.add_post("/v1/messages", self.messages)
        application.router.add_post("/_config", self.set_config)
        application.router.add_get("/_log", self.get_log)
        application.router.add_post("/_reset", self.reset)
        return application


async def _serve(port: int, key: str) -> None:
    runner = web.AppRunner(FakeAnthropic(key).app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"listening on http://127.0.0.1:{bound}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--key", default="test-key")
    options = parser.parse_args()
    asyncio.run(_serve(options.port, options.key))
