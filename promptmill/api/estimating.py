"""What a job would cost before it runs, for `promptmill estimate` and `pm.estimate`: input tokens
counted (by the Anthropic API, or offline by a local model's own tokenizer) on a sample of rows,
output tokens bounded by max_tokens (or projected from a job of the pipeline), dollars and time."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Callable

from promptmill.config.prices import ModelPrice
from promptmill.config.settings import Settings
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.status import JobStatus
from promptmill.pipelines.attachments import Loaded, anthropic_content
from promptmill.reports.estimate import Estimate, estimate_job

#: The backends whose tokens an estimate can count.
ESTIMATED_BACKENDS = ("anthropic", "vllm")


def estimate_spec(
    settings: Settings, spec: JobSpec, sample: int, observed: JobStatus | None = None
) -> tuple[Estimate, dict[str, Any] | None]:
    """The job's figures, and for a local model the engine speeds they assume. `observed`, a job of
    this pipeline with answers, gives the output tokens a row (and the engine's measured speed).
    The API's own errors (anthropic.APIError) pass through."""
    prices = spec.pipeline.price_table(settings)
    local = spec.info.local
    count_document = None
    if local:
        count_tokens, price, speed = _engine_counting(spec, settings, prices.engine_hour_usd, observed)
    else:
        (count_tokens, count_document), price, speed = _api_counting(spec, settings), prices.price_for(spec.model), None
    figures = estimate_job(spec, price, count_tokens, sample, output_per_row(spec, observed),
                           None if local else prices.batch_discount, count_document=count_document)  # fmt: skip
    return figures, speed


def output_per_row(spec: JobSpec, observed: JobStatus | None) -> float | None:
    """The output tokens a row of the observed job took (None: no job observed)."""
    return None if observed is None else observed.usage.output_tokens / observed.requests_by_model[spec.model]


def _api_counting(spec: JobSpec, settings: Settings) -> tuple[Callable[[str | None, str], int], Callable[[Loaded], int]]:
    """Input tokens as the Anthropic API counts them: of a row's text, and of a document."""
    import anthropic

    client = anthropic.Anthropic(api_key=settings.api_key(), base_url=settings.anthropic_base_url)

    def count_tokens(system: str | None, prompt: str) -> int:
        extra = {"system": system} if system else {}
        messages = [{"role": "user", "content": prompt}]
        return client.messages.count_tokens(model=spec.model, messages=messages, **extra).input_tokens

    bare: list[int] = []  # a one-word turn's tokens, counted once: what a document adds is the rest

    def count_document(document: Loaded) -> int:
        if not bare:
            bare.append(count_tokens(None, "Read."))
        content = anthropic_content("Read.", [document])
        return client.messages.count_tokens(model=spec.model, messages=[{"role": "user", "content": content}]).input_tokens - bare[0]

    return count_tokens, count_document


def _engine_counting(
    spec: JobSpec, settings: Settings, hour_usd: Decimal, observed: JobStatus | None
) -> tuple[Callable[[str | None, str], int], ModelPrice, dict]:
    """A local model's tokens, counted offline by its own tokenizer and chat template; its price is
    device time: output tokens at the engine's speed (a job's measured one, else the setting's)."""
    from transformers import AutoTokenizer

    from promptmill.workers.local_model import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(spec.model, settings))

    def count_tokens(system: str | None, prompt: str) -> int:
        messages = [{"role": "system", "content": system}] if system else []
        ids = tokenizer.apply_chat_template([*messages, {"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
        return len(ids if isinstance(ids, list) else ids["input_ids"])

    speed = {"input_tokens_per_s": settings.engine_input_tokens_per_s,
             "output_tokens_per_s": settings.engine_output_tokens_per_s,
             "measured_by": "PROMPTMILL_ENGINE_INPUT_TOKENS_PER_S and PROMPTMILL_ENGINE_OUTPUT_TOKENS_PER_S"}  # fmt: skip
    if observed is not None and observed.usage.engine_us:
        # The settings' speeds, scaled to the device time that job took for its tokens.
        used = observed.usage
        predicted_s = used.prompt_tokens / speed["input_tokens_per_s"] + used.output_tokens / speed["output_tokens_per_s"]
        scale = predicted_s / (used.engine_us / 1e6)
        speed = {"input_tokens_per_s": round(speed["input_tokens_per_s"] * scale, 1),
                 "output_tokens_per_s": round(speed["output_tokens_per_s"] * scale, 1), "measured_by": f"job {observed.job_id}"}  # fmt: skip
    per_mtok = {kind: hour_usd / Decimal(3600) / Decimal(str(speed[f"{kind}_tokens_per_s"])) * 1_000_000 for kind in ("input", "output")}
    price = ModelPrice(input=per_mtok["input"], output=per_mtok["output"], cache_write_5m=per_mtok["input"],
                       cache_write_1h=per_mtok["input"], cache_read=per_mtok["input"])  # fmt: skip
    return count_tokens, price, speed
