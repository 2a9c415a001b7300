"""What a job will cost before it runs: rows, input tokens, the most output tokens, dollars, time.

Input tokens are counted by the provider's own token-counting endpoint on a random sample of rows
(every row when there are few) and scaled to the whole input by characters; the bound printed with
them is two standard errors of that ratio estimate. Output tokens are bounded by `max_tokens`: the
high cost assumes every answer uses it all and the input at its upper bound, the low one a single
token per answer and the input at its lower bound. With a running or
finished job of the same pipeline, the observed output per row gives the expected figure too.

A row's images cost what the provider's rule says (Anthropic: width x height / 750 at the image's best
size), read from each image's header; its documents are counted by the token-counting endpoint on a
sample of them and scaled to them all.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path
from typing import Callable

from promptmill.config.prices import ModelPrice
from promptmill.config.settings import get_settings
from promptmill.jobs.readers import InvalidRow, iter_rows
from promptmill.jobs.spec import JobSpec
from promptmill.pipelines.attachments import AttachmentError, Loaded, image_size, image_tokens, load, open_ref
from promptmill.pipelines.items import AttachmentRef
from promptmill.pipelines.render import RenderError

TokenCounter = Callable[[str | None, str], int]  # (system, user turn) -> input tokens
DocumentCounter = Callable[[Loaded], int]  # a document -> the input tokens it adds to a request


@dataclass(frozen=True)
class Estimate:
    rows: int
    unusable_rows: int  # rows that cannot be read or rendered: they fail without a request
    input_tokens: int
    input_tokens_error_pct: float
    rows_counted: int
    image_tokens: int  # of input_tokens: the rows' images, by the provider's rule
    document_tokens: int  # of input_tokens: the rows' documents, counted on a sample and scaled
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
    count_document: DocumentCounter | None = None,
) -> Estimate:
    pipeline = spec.pipeline
    system_chars = len(pipeline.system or "")
    rows = unusable = total_chars = 0
    sample: list[str] = []  # reservoir sample of user turns: even over a file streamed once
    chooser = random.Random(seed)
    image_total = 0
    documents: list[tuple[AttachmentRef, int]] = []  # reservoir sample of documents, with their row's line
    document_count = 0
    settings = get_settings()
    for number, line, row in iter_rows(Path(spec.input_path), spec.input_format, max_row_bytes=spec.max_row_bytes):
        rows += 1
        if isinstance(row, InvalidRow):
            unusable += 1
            continue
        try:
            request = spec.render(number, row, line, settings)
            for ref in request.attachments or ():
                if ref.kind == "image":
                    image_total += _image_tokens(ref, row[ref.column])
                    continue
                document_count += 1
                if len(documents) < sample_size:
                    documents.append((ref, line))
                elif (slot := chooser.randrange(document_count)) < sample_size:
                    documents[slot] = (ref, line)
        except (RenderError, AttachmentError):
            unusable += 1
            continue
        prompt = request.prompt
        total_chars += system_chars + len(prompt)
        seen = rows - unusable
        if len(sample) < sample_size:
            sample.append(prompt)
        elif (slot := chooser.randrange(seen)) < sample_size:
            sample[slot] = prompt
    requests = rows - unusable
    counted = [(system_chars + len(prompt), count_tokens(pipeline.system, prompt)) for prompt in sample]
    text_tokens, error_pct = _scale(counted, total_chars, requests)
    document_tokens, document_pct = _documents(spec, documents, document_count, count_document)
    input_tokens = text_tokens + image_total + document_tokens
    if input_tokens:  # each part's bound, weighted by its tokens (the images' rule is exact)
        error_pct = round((error_pct * text_tokens + document_pct * document_tokens) / input_tokens, 2)
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
        image_tokens=image_total,
        document_tokens=document_tokens,
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


def _image_tokens(ref: AttachmentRef, value: object) -> int:
    """An image's tokens by the provider's rule, its size read from its header (0: a URL the provider
    fetches, or a file that cannot be read, which fails its row without a request)."""
    if ref.source.startswith(("https://", "http://")):
        return 0
    try:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return image_tokens(*image_size(bytes(value), ref))
        with open_ref(ref) as handle:
            return image_tokens(*image_size(handle, ref))
    except (AttachmentError, OSError, ValueError):
        return 0


def _documents(
    spec: JobSpec, sample: list[tuple[AttachmentRef, int]], count: int, count_document: DocumentCounter | None
) -> tuple[int, float]:
    """The documents' tokens: the sample's, counted, scaled to all of them; and the bound in percent."""
    if not sample or count_document is None:
        return 0, 0.0
    counted = []
    for ref, line in sample:
        try:
            counted.append(count_document(load(ref, spec.input_path, line, None, resize=False)))
        except AttachmentError:
            continue
    if not counted:
        return 0, 0.0
    mean = sum(counted) / len(counted)
    if len(counted) >= count:
        return round(sum(counted)), 0.0
    variance = sum((tokens - mean) ** 2 for tokens in counted) / max(len(counted) - 1, 1)
    standard_error = math.sqrt(variance / len(counted) * (1 - len(counted) / count))
    return round(mean * count), round(200 * standard_error / mean, 2) if mean else 0.0
