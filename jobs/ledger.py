"""The cost ledger: what a job has spent, model by model, from the token usage committed in Redis.

Every figure is computed from committed state only, so it is the same after a crash and a resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from config.prices import PriceTable
from jobs.spec import JobSpec
from jobs.store import JobStatus
from pipelines.items import Usage


@dataclass(frozen=True)
class ModelCost:
    model: str
    requests: int
    usage: Usage
    cost_usd: Decimal


@dataclass(frozen=True)
class CostReport:
    job_id: str
    backend: str
    models: list[ModelCost]

    @property
    def cost_usd(self) -> Decimal:
        return sum((model.cost_usd for model in self.models), Decimal(0))

    def as_dict(self) -> dict:
        return {
            "job_id": self.job_id,
            "backend": self.backend,
            "cost_usd": float(self.cost_usd),
            "models": [
                {"model": m.model, "requests": m.requests, **m.usage.model_dump(), "cost_usd": float(m.cost_usd)}
                for m in self.models
            ],
        }


def cost_report(spec: JobSpec, status: JobStatus, prices: PriceTable) -> CostReport:
    models = []
    for model, usage in sorted(status.usage_by_model.items()):
        if spec.backend == "anthropic":
            cost = prices.price_for(model).cost_usd(**usage.model_dump())
        else:
            cost = Decimal(0)  # the local engine: no per-token price
        models.append(ModelCost(model, status.requests_by_model.get(model, 0), usage, cost))
    return CostReport(spec.job_id, spec.backend, models)
