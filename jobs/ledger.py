"""The cost ledger: what a job has spent, model by model, from the token usage committed in Redis.

Every figure is computed from committed state only, so it is the same after a crash and a resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator
from decimal import Decimal

from promptmill.config.prices import PriceTable
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.status import JobStatus
from promptmill.pipelines.items import Usage


@dataclass(frozen=True)
class ModelCost:
    model: str
    requests: int
    usage: Usage
    cost_usd: Decimal
    api_equivalent_usd: Decimal | None = None  # a local job: the same tokens at the comparison model's prices
    failed_attempts: int = 0  # answered with an error (not billed) or broken off mid-answer (billed in `usage`)
    caching_saved_usd: Decimal = Decimal(0)  # the cached tokens as plain input, less what they cost


@dataclass(frozen=True)
class CostReport:
    job_id: str
    backend: str
    models: list[ModelCost]
    comparison_model: str | None = None
    # Answers for rows already done (a chunk run twice at once): paid, never committed. The bill is
    # cost_usd + paid_twice_usd.
    paid_twice: dict[str, dict[str, int]] = field(default_factory=dict)
    paid_twice_usd: Decimal = Decimal(0)

    @property
    def cost_usd(self) -> Decimal:
        return sum((model.cost_usd for model in self.models), Decimal(0))

    @property
    def caching_saved_usd(self) -> Decimal:
        return sum((model.caching_saved_usd for model in self.models), Decimal(0))

    @property
    def api_equivalent_usd(self) -> Decimal | None:
        if self.comparison_model is None:
            return None
        return sum((model.api_equivalent_usd or Decimal(0) for model in self.models), Decimal(0))

    def as_dict(self) -> dict:
        report = {
            "job_id": self.job_id,
            "backend": self.backend,
            "cost_usd": float(self.cost_usd),
            "caching_saved_usd": float(self.caching_saved_usd),
            "paid_twice": {"models": self.paid_twice, "cost_usd": float(self.paid_twice_usd)},
            "models": [
                {"model": m.model, "requests": m.requests, "failed_attempts": m.failed_attempts, **m.usage.model_dump(),
                 "cost_usd": float(m.cost_usd)}
                for m in self.models
            ],
        }
        if self.comparison_model is not None:
            report["engine_hours"] = sum(m.usage.engine_us for m in self.models) / 3_600_000_000
            report["api_equivalent"] = {"model": self.comparison_model, "cost_usd": float(self.api_equivalent_usd or 0)}
        return report


_CACHE_FIELDS = ("cache_creation_input_tokens", "cache_creation_1h_input_tokens", "cache_read_input_tokens")


def cost_report(spec: JobSpec, status: JobStatus, prices: PriceTable) -> CostReport:
    models = []
    # A local engine's model costs its device time: the job's own, or one of its fallback chain.
    engines = {link.model for link in spec.links() if not link.info.billed_per_token}
    # A model that only failed (a fallback chain's model that was down) is shown too: its failed attempts.
    for model in sorted(set(status.usage_by_model) | set(status.failed_attempts_by_model)):
        usage = status.usage_by_model.get(model, Usage())
        requests = status.requests_by_model.get(model, 0)
        failed = status.failed_attempts_by_model.get(model, 0)
        if model not in engines:
            price = prices.price_for(model)
            cached = {name: getattr(usage, name) for name in _CACHE_FIELDS}
            as_plain_input = price.cost_usd(input_tokens=usage.cache_creation_input_tokens + usage.cache_read_input_tokens)
            saved = as_plain_input - price.cost_usd(**cached)
            cost = price.cost_usd(**usage.token_counts())
            models.append(ModelCost(model, requests, usage, cost, failed_attempts=failed, caching_saved_usd=saved))
            continue
        # The local engine costs its device time. The API would have billed every prompt token as
        # input: it caches only prompts marked for caching, which a local pipeline does not mark.
        as_sent = Usage(input_tokens=usage.input_tokens + usage.cache_read_input_tokens, output_tokens=usage.output_tokens)
        api_cost = prices.price_for(prices.comparison_model).cost_usd(**as_sent.token_counts()) if prices.comparison_model else None
        models.append(ModelCost(model, requests, usage, prices.engine_cost_usd(usage.engine_us), api_cost, failed))
    twice = status.paid_twice
    twice_usd = sum(
        (
            prices.engine_cost_usd(usage.engine_us) if model in engines
            else prices.price_for(model).cost_usd(**usage.token_counts())
            for model, usage in twice.usage_by_model.items()
        ),
        Decimal(0),
    )
    return CostReport(
        spec.job_id, spec.backend, models, prices.comparison_model if not spec.info.billed_per_token else None, twice.as_dict(),
        twice_usd,
    )


def row_costs(spec: JobSpec, prices: PriceTable, records: Iterable[dict[str, Any]]) -> Iterator[Decimal]:
    """What each row's answering request cost (its record as exported): its tokens at its model's
    price, or its share of the local engine's time."""
    links = {link.model: link for link in spec.links()}
    for record in records:
        usage = Usage(**record["usage"])
        model = record["model"]
        if model is None or not usage.answered:
            yield Decimal(0)
            continue
        link = links.get(model, spec)
        if not link.info.billed_per_token:
            yield prices.engine_cost_usd(usage.engine_us)
        else:  # as the ledger priced it (a deadline's batch and real-time rows share a model's name)
            priced = record.get("priced_as") or model + link.info.ledger_suffix
            yield prices.price_for(priced).cost_usd(**usage.token_counts())
