"""What a job will cost before it runs: rows, input tokens, the most output tokens, dollars, time.

Input tokens are counted by the provider's own token-counting endpoint on a random sample of rows
(every row when there are few) and scaled to the whole input by characters; the bound printed with
them is two standard errors of that ratio estimate. Output tokens are bounded by `max_tokens`: the
high cost assumes every answer uses it all and the input at its upper bound, the low one a single
token per answer and the input at its lower bound. With a running or
finished job of the same pipeline, the observed output per row gives the expected figure too.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path
from typing import Callable

from promptmill.config.prices import ModelPrice
from promptmill.jobs.readers import InvalidRow, iter_rows
from promptmill.jobs.spec import JobSpec
from promptmill.pipelines.render import RenderError, render_request

TokenCounter = Callable[[str | None, str], int]  # (system, user turn) -> input tokens


@dataclass(frozen=True)
class Estimate:
    rows: int
    unusable_rows: int  # rows that cannot be read or rendered: they fail without a request
    input_tokens: int
    input_tokens_error_pct: float
    rows_counted: int
    output_tokens_low: int
    output_tokens_max: int
    output_tokens_expected: int | None
    cost_usd_low: float
    cost_usd_high: float
    cost_usd_expected: float | None
    batch_discount: float | None  # through the Message Batches API, every cost figure times this
    minutes_at_limits_low: float | None
    minutes_at_limits_high: float | None

    @property
    def batch_cost_usd(self) -> tuple[float, float] | None:
        """The low and high cost through the Message Batches API (`--backend anthropic-batch`)."""
        if self.batch_discount is None:
            return None
        return round(self.cost_usd_low * self.batch_discount, 6), round(self.cost_usd_high * self.batch_discount, 6)

    def as_dict(self) -> dict:
        figures = asdict(self)
        batch = self.batch_cost_usd
        figures["batch_cost_usd_low"], figures["batch_cost_usd_high"] = batch if batch else (None, None)
        return figures


def _cost(price: ModelPrice, input_tokens: int, output_tokens: int) -> float:
    return float(price.cost_usd(input_tokens=input_tokens, output_tokens=output_tokens).quantize(Decimal("0.000001")))


def _minutes(spec: JobSpec, rows: int, input_tokens: int, output_tokens: int) -> float | None:
    limits = spec.limits
    spans = [
        amount / limit
        for amount, limit in ((rows, limits.rpm), (input_tokens, limits.input_tpm), (output_tokens, limits.output_tpm))
        if limit
    ]
    return round(max(spans), 2) if spans else None


def estimate_job(
    spec: JobSpec,
    price: ModelPrice,
    count_tokens: TokenCounter,
    sample_size: int = 100,
    output_per_row: float | None = None,
    batch_discount: Decimal | None = None,
    seed: int = 0,
) -> Estimate:
    pipeline = spec.pipeline
    system_chars = len(pipeline.system or "")
    rows = unusable = total_chars = 0
    sample: list[str] = []  # reservoir sample of user turns: even over a file streamed once
    chooser = random.Random(seed)
    for number, _, row in iter_rows(Path(spec.input_path), spec.input_format, max_row_bytes=spec.max_row_bytes):
        rows += 1
        if isinstance(row, InvalidRow):
            unusable += 1
            continue
        try:
            prompt = render_request(pipeline, number, row).prompt
        except RenderError:
            unusable += 1
            continue
        total_chars += system_chars + len(prompt)
        seen = rows - unusable
        if len(sample) < sample_size:
            sample.append(prompt)
        elif (slot := chooser.randrange(seen)) < sample_size:
            sample[slot] = prompt
    requests = rows - unusable
    counted = [(system_chars + len(prompt), count_tokens(pipeline.system, prompt)) for prompt in sample]
    input_tokens, error_pct = _scale(counted, total_chars, requests)
    output_low, output_max = requests, requests * pipeline.max_tokens
    # The cost bounds take the input's bound too, so the true cost lies between them.
    input_low = math.floor(input_tokens * (1 - error_pct / 100))
    input_high = math.ceil(input_tokens * (1 + error_pct / 100))
    expected = None if output_per_row is None else round(output_per_row * requests)
    return Estimate(
        rows=rows,
        unusable_rows=unusable,
        input_tokens=input_tokens,
        input_tokens_error_pct=error_pct,
        rows_counted=len(counted),
        output_tokens_low=output_low,
        output_tokens_max=output_max,
        output_tokens_expected=expected,
        cost_usd_low=_cost(price, input_low, output_low),
        cost_usd_high=_cost(price, input_high, output_max),
        cost_usd_expected=None if expected is None else _cost(price, input_tokens, expected),
        batch_discount=None if batch_discount is None else float(batch_discount),
        minutes_at_limits_low=_minutes(spec, requests, input_tokens, output_low),
        minutes_at_limits_high=_minutes(spec, requests, input_tokens, output_max),
    )


def _scale(counted: list[tuple[int, int]], total_chars: int, requests: int) -> tuple[int, float]:
    """Total tokens by the sample's tokens per character, and the bound on it in percent."""
    if not counted:
        return 0, 0.0
    chars = sum(c for c, _ in counted)
    tokens = sum(t for _, t in counted)
    if len(counted) >= requests:
        return tokens, 0.0  # every row was counted: exact
    ratio = tokens / chars
    n = len(counted)
    residuals = [t - ratio * c for c, t in counted]
    variance = sum(r * r for r in residuals) / max(n - 1, 1)
    mean_chars = chars / n
    # Standard error of a ratio estimator, with the finite-population correction.
    standard_error = math.sqrt(variance / n * (1 - n / requests)) / mean_chars
    return round(ratio * total_chars), round(200 * standard_error / ratio, 2)
