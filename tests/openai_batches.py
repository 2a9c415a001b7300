"""The OpenAI Batch API for the local server (tests/anthropic_server.py): `/v1/files` and `/v1/batches`.

POST /v1/files (multipart, `purpose` batch) keeps the file; GET /v1/files/{id}/content gives it back;
GET /v1/files lists them, DELETE /v1/files/{id} deletes one.
POST /v1/batches checks each line (`url` must be the batch's endpoint, `custom_id` unique: otherwise
the batch is `failed`, its `errors.data` naming the lines), then holds it `in_progress` for
`batch_delay_s` after which it is `completed`: an output file of the answers (as POST
/v1/chat/completions would give them: `[[reply:]]`, a choice schema's JSON) and an error file of the
requests that failed (`[[batch_error:TYPE]]` every time, `[[batch_error_once:TYPE]]` the first time:
the status of TYPE and OpenAI's error body). `batch_expire_next` (config) makes that many of the next
batches expire: their first half answered, the rest `batch_expired` in the error file. A cancel
makes the batch `cancelling`, then `cancelled` at the next look, its first half answered by then: the
rest goes in the error file as `batch_cancelled`. GET /v1/batches lists newest first (`limit`, `after`).
`batch_create_fault` (config) loses the next create's answer as for Message Batches ("drop", "kill").

Every request of a batch is in the log (`route` openai_batch, its `batch_id` and `custom_id`,
`status` queued then 200, errored, expired or cancelled, and its `usage` when answered).
"""

from __future__ import annotations

import json
import re
import time
import uuid
import asyncio
from typing import TYPE_CHECKING, Callable

from aiohttp import web

if TYPE_CHECKING:
    from tests.anthropic_server import FakeAnthropic

_STATUS_OF_TYPE = {"invalid_request_error": 400, "rate_limit_error": 429, "api_error": 500, "overloaded_error": 503}
_OVER = ("completed", "failed", "expired", "cancelled")


def _openai_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}},
                             status=status)  # fmt: skip


class OpenAIBatches:
    def __init__(self, server: "FakeAnthropic", reply: Callable[[str, str, str], str], kill_client: Callable,
                 files: Callable[[object], list[dict]]):  # fmt: skip
        self.server = server
        self.reply = reply  # the server's: the answer to a prompt for a model
        self.files_of = files  # the server's: a turn's images and documents, decoded, with their tokens
        self.kill_client = kill_client
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}

    def reset(self) -> None:
        self.files.clear()
        self.batches.clear()

    def routes(self, application: web.Application) -> None:
        application.router.add_post("/v1/files", self.upload)
        application.router.add_get("/v1/files/{file_id}/content", self.content)
        application.router.add_get("/v1/files", self.list_files)
        application.router.add_delete("/v1/files/{file_id}", self.delete_file)
        application.router.add_post("/v1/batches", self.create)
        application.router.add_get("/v1/batches", self.list)
        application.router.add_get("/v1/batches/{batch_id}", self.retrieve)
        application.router.add_post("/v1/batches/{batch_id}/cancel", self.cancel)

    def _file(self, content: bytes, purpose: str, filename: str) -> dict:
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                               "filename": filename, "purpose": purpose, "content": content}  # fmt: skip
        return self.files[file_id]

    @staticmethod
    def _file_view(file: dict) -> dict:
        return {key: value for key, value in file.items() if key != "content"}

    async def upload(self, request: web.Request) -> web.Response:
        if not self.server._authorised(request):
            return _openai_error(401, "Incorrect API key provided")
        form = await request.post()
        upload = form.get("file")
        if upload is None or form.get("purpose") != "batch":
            return _openai_error(400, "a file with purpose 'batch' is required")
        content = upload.file.read()
        return web.json_response(self._file_view(self._file(content, "batch", upload.filename)))

    async def content(self, request: web.Request) -> web.Response:
        if not self.server._authorised(request):
            return _openai_error(401, "Incorrect API key provided")
        file = self.files.get(request.match_info["file_id"])
        if file is None:
            return _openai_error(404, "No such File object")
        return web.Response(body=file["content"], content_type="application/octet-stream")

    async def list_files(self, request: web.Request) -> web.Response:
        if not self.server._authorised(request):
            return _openai_error(401, "Incorrect API key provided")
        files = [self._file_view(file) for file in self.files.values()]
        return web.json_response({"object": "list", "data": files, "has_more": False})

    async def delete_file(self, request: web.Request) -> web.Response:
        if not self.server._authorised(request):
            return _openai_error(401, "Incorrect API key provided")
        file_id = request.match_info["file_id"]
        if self.files.pop(file_id, None) is None:
            return _openai_error(404, "No such File object")
        return web.json_response({"id": file_id, "object": "file", "deleted": True})

    # -- batches ---------------------------------------------------------------------------------

    def _view(self, batch: dict) -> dict:
        counts = {"total": len(batch["entries"]), "completed": 0, "failed": 0}
        for entry in batch["entries"]:
            if entry["status"] == 200:
                counts["completed"] += 1
            elif entry["status"] == "errored":
                counts["failed"] += 1
        return {
            "id": batch["id"], "object": "batch", "endpoint": batch["endpoint"], "errors": batch.get("errors"),
            "input_file_id": batch["input_file_id"], "completion_window": "24h", "status": batch["status"],
            "output_file_id": batch.get("output_file_id"), "error_file_id": batch.get("error_file_id"),
            "created_at": batch["created_at"], "in_progress_at": batch["created_at"], "expires_at": batch["created_at"] + 86400,
            "completed_at": batch.get("completed_at"), "cancelled_at": batch.get("cancelled_at"),
            "request_counts": counts, "metadata": batch["metadata"],
        }  # fmt: skip

    async def create(self, request: web.Request) -> web.Response:
        if not self.server._authorised(request):
            return _openai_error(401, "Incorrect API key provided")
        body = await request.json()
        file = self.files.get(body.get("input_file_id", ""))
        if file is None:
            return _openai_error(400, "input_file_id names no file")
        if body.get("completion_window") != "24h" or body.get("endpoint") != "/v1/chat/completions":
            return _openai_error(400, "endpoint must be /v1/chat/completions and completion_window 24h")
        lines = [json.loads(line) for line in file["content"].splitlines() if line.strip()]
        if len(lines) > 50_000:
            return _openai_error(400, "a batch holds at most 50,000 requests")
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        batch = {"id": batch_id, "t": time.monotonic(), "status": "in_progress", "endpoint": body["endpoint"],
                 "input_file_id": file["id"], "created_at": int(time.time()), "metadata": body.get("metadata") or {},
                 "entries": [], "bodies": [], "retrieved": 0,
                 "expire": self.server.config["batch_expire_next"] > 0}  # fmt: skip
        if batch["expire"]:
            self.server.config["batch_expire_next"] -= 1
        seen: set[str] = set()
        errors = []
        for number, line in enumerate(lines, 1):
            custom_id = line.get("custom_id")
            if line.get("url") != body["endpoint"] or custom_id in seen or not isinstance(line.get("body"), dict):
                errors.append({"code": "invalid_request", "line": number, "message": f"line {number} is not a valid request"})
            seen.add(custom_id)
        if errors:
            batch.update(status="failed", errors={"object": "list", "data": errors})
        else:
            for line in lines:
                messages = line["body"].get("messages") or [{"content": ""}]
                entry = {"t": time.monotonic(), "route": "openai_batch", "batch_id": batch_id, "custom_id": line["custom_id"],
                         "prompt": _text(messages[-1].get("content")), "status": "queued", "usage": None}  # fmt: skip
                batch["entries"].append(entry)
                batch["bodies"].append(line["body"])
                self.server.log.append(entry)
        self.batches[batch_id] = batch
        fault, self.server.config["batch_create_fault"] = self.server.config["batch_create_fault"], ""
        if fault == "kill":
            self.kill_client(request)
            await asyncio.sleep(600)
        if fault:
            request.transport.abort()  # made, and its answer lost
        return web.json_response(self._view(batch))

    def _answer(self, entry: dict, body: dict) -> tuple[dict | None, dict | None]:
        """A request of the batch answered: (its output line's response, or None and its error line's)."""
        prompt = entry["prompt"]
        error = re.search(r"\[\[batch_error(_once)?:(\w+)\]\]", prompt)
        if error and (not error.group(1) or prompt not in self.server.failed_once):
            self.server.failed_once.add(prompt)
            entry["status"] = "errored"
            status = _STATUS_OF_TYPE.get(error.group(2), 500)
            said = {"error": {"message": f"{error.group(2)} for this test", "type": error.group(2), "code": error.group(2)}}
            return None, {"status_code": status, "request_id": f"req_{uuid.uuid4().hex[:12]}", "body": said}
        reply = self.reply(prompt, body["model"], self.server.config["reply"])
        text = reply
        response_format = body.get("response_format")
        if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
            schema = response_format["json_schema"].get("schema", {})
            if schema.get("enum"):
                text = json.dumps(reply)
            elif schema.get("properties", {}).get("answer", {}).get("enum"):
                text = json.dumps({"answer": reply})
        prompt_tokens = sum(len(_text(m.get("content")).split()) for m in body["messages"])
        if files := self.files_of(body["messages"][-1].get("content")):
            entry["files"] = files
            prompt_tokens += sum(file["tokens"] for file in files)
        completion_tokens = max(1, len(reply.split()))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip
        entry.update(status=200, usage=usage, done=time.monotonic(), request_id=f"req_{uuid.uuid4().hex[:12]}")
        completion = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": body["model"], "usage": usage,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop", "logprobs": None}],
        }  # fmt: skip
        return {"status_code": 200, "request_id": entry["request_id"], "body": completion}, None

    def _advance(self, batch: dict) -> None:
        """A batch past its delay completes (or expires, half answered); a cancelled one keeps what it answered."""
        if batch["status"] in _OVER:
            return
        done = batch["status"] == "in_progress" and time.monotonic() - batch["t"] >= self.server.config["batch_delay_s"]
        if not done and batch["status"] != "cancelling":
            return
        outputs, errors = [], []
        # An expiring batch, and a cancelled one, answered the first half of its requests by then.
        half = len(batch["entries"]) // 2 if batch["expire"] or batch["status"] == "cancelling" else len(batch["entries"])
        for number, (entry, body) in enumerate(zip(batch["entries"], batch["bodies"])):
            line = {"id": f"batch_req_{uuid.uuid4().hex[:16]}", "custom_id": entry["custom_id"]}
            if number >= half:
                code = "batch_cancelled" if batch["status"] == "cancelling" else "batch_expired"
                entry["status"] = "cancelled" if code == "batch_cancelled" else "expired"
                errors.append({**line, "response": None, "error": {"code": code, "message": f"{code} for this test"}})
                continue
            response, failed = self._answer(entry, body)
            if response is not None:
                outputs.append({**line, "response": response, "error": None})
            else:
                errors.append({**line, "response": failed, "error": None})
        for kind, lines in (("output", outputs), ("error", errors)):
            if lines:
                content = "".join(json.dumps(line) + "\n" for line in reversed(lines)).encode()  # in no order of ours
                batch[f"{kind}_file_id"] = self._file(content, f"batch_{kind}", f"{batch['id']}_{kind}.jsonl")["id"]
        status = "cancelled" if batch["status"] == "cancelling" else "expired" if batch["expire"] else "completed"
        batch["status"] = status
        batch["cancelled_at" if status == "cancelled" else "completed_at"] = int(time.time())

    async def retrieve(self, request: web.Request) -> web.Response:
        if not self.server._authorised(request):
            return _openai_error(401, "Incorrect API key provided")
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return _openai_error(404, "No such batch")
        batch["retrieved"] += 1
        self._advance(batch)
        return web.json_response(self._view(batch))

    async def cancel(self, request: web.Request) -> web.Response:
        if not self.server._authorised(request):
            return _openai_error(401, "Incorrect API key provided")
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return _openai_error(404, "No such batch")
        if batch["status"] in ("validating", "in_progress", "finalizing"):
            batch["status"] = "cancelling"
        return web.json_response(self._view(batch))

    async def list(self, request: web.Request) -> web.Response:
        if not self.server._authorised(request):
            return _openai_error(401, "Incorrect API key provided")
        ordered = sorted(self.batches.values(), key=lambda b: b["t"], reverse=True)
        after = request.query.get("after")
        if after is not None:
            ids = [b["id"] for b in ordered]
            ordered = ordered[ids.index(after) + 1 :] if after in ids else []
        limit = int(request.query.get("limit", 20))
        page = [self._view(batch) for batch in ordered[:limit]]
        return web.json_response({"object": "list", "data": page, "has_more": len(ordered) > limit,
                                  "first_id": page[0]["id"] if page else None,
                                  "last_id": page[-1]["id"] if page else None})  # fmt: skip

    def summary(self) -> list[dict]:
        return [{"id": b["id"], "status": b["status"], "requests": len(b["entries"]), "retrieved": b["retrieved"],
                 "metadata": b["metadata"], "input_file_id": b["input_file_id"]}
                for b in self.batches.values()]  # fmt: skip


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""
