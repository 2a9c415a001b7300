"""The model price table: the one place that turns token counts into US dollars.

Prices are exact decimals per million tokens, read from `prices.toml` beside this file and, model by
model, from the user's `prices_file`. An unknown model raises `UnknownModelError`, so a job is refused
before it runs rather than costed at $0.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path

from promptmill.config.settings import Settings

SHIPPED_TABLE = Path(__file__).with_name("prices.toml")
_DATE_SUFFIX = re.compile(r"-\d{8}$")
_MILLION = Decimal(1_000_000)


class UnknownModelError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


LONG = "@long"  # the ledger's suffix for a model's requests billed at its long-context rates
BATCH = "@batch"  # the ledger's suffix for requests sent through the Message Batches API (after any @long)


@dataclass(frozen=True)
class ModelPrice:
    """USD per million tokens of each kind; `long` the rates of a request over `above_prompt_tokens`."""

    input: Decimal
    output: Decimal
    cache_write_5m: Decimal
    cache_write_1h: Decimal
    cache_read: Decimal
    above_prompt_tokens: int | None = None
    long: "ModelPrice | None" = None

    def cost_usd(
        self,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cache_creation_input_tokens: int = 0,
        cache_read_input_tokens: int = 0,
        cache_creation_1h_input_tokens: int = 0,
    ) -> Decimal:
        """Cache writes are 5-minute ones but for `cache_creation_1h_input_tokens` of them."""
        total = (
            self.input * input_tokens
            + self.output * output_tokens
            + self.cache_write_5m * (cache_creation_input_tokens - cache_creation_1h_input_tokens)
            + self.cache_write_1h * cache_creation_1h_input_tokens
            + self.cache_read * cache_read_input_tokens
        )
        return total / _MILLION

    def discounted(self, share: Decimal | None) -> "ModelPrice":
        """Every rate times `share` (the Message Batches API's); a table without one has no batch price."""
        if share is None:
            raise UnknownModelError("the price table has no batch_discount: it cannot price Message Batches")
        rates = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")
        return replace(self, long=None, **{name: getattr(self, name) * share for name in rates})


def _rates(path: Path, name: str, row: dict) -> ModelPrice:
    try:
        return ModelPrice(
            input=Decimal(str(row["input"])),
            output=Decimal(str(row["output"])),
            cache_write_5m=Decimal(str(row.get("cache_write_5m", row["input"]))),
            cache_write_1h=Decimal(str(row.get("cache_write_1h", row["input"]))),
            cache_read=Decimal(str(row.get("cache_read", row["input"]))),
        )
    except KeyError as missing:
        raise ValueError(f"{path}: model {name!r} has no {missing.args[0]!r} price") from None


def _parse_table(path: Path) -> tuple[dict[str, ModelPrice], Decimal | None]:
    with path.open("rb") as handle:
        raw = tomllib.load(handle)
    table: dict[str, ModelPrice] = {}
    for name, row in raw.get("models", {}).items():
        price = _rates(path, name, row)
        if "long_context" in row:
            band = row["long_context"]
            if "above_prompt_tokens" not in band:
                raise ValueError(f"{path}: model {name!r}: long_context needs above_prompt_tokens")
            long = _rates(path, name + LONG, band)
            price = replace(price, above_prompt_tokens=int(band["above_prompt_tokens"]), long=long)
        for alias in [name, *row.get("aliases", [])]:
            table[alias] = price
    discount = raw.get("batch_discount")
    return table, None if discount is None else Decimal(str(discount))


class PriceTable:
    def __init__(
        self,
        prices: dict[str, ModelPrice],
        engine_hour_usd: Decimal = Decimal(0),
        comparison_model: str | None = None,
        batch_discount: Decimal | None = None,
    ):
        self._prices = prices
        self.engine_hour_usd = engine_hour_usd  # one device-hour of the local engine
        self.comparison_model = comparison_model  # the API model a local job is compared with
        self.batch_discount = batch_discount  # the Message Batches API's share of the price

    @classmethod
    def load(cls, settings: Settings) -> "PriceTable":
        prices, discount = _parse_table(SHIPPED_TABLE)
        if settings.prices_file is not None:
            overrides, their_discount = _parse_table(settings.prices_file)
            prices.update(overrides)
            discount = their_discount if their_discount is not None else discount
        return cls(prices, Decimal(str(settings.gpu_hour_usd)), settings.api_model_for_comparison, discount)

    def with_model(self, model: str, price: ModelPrice) -> "PriceTable":
        """This table with `model` priced at `price` (a pipeline's own `[price]`)."""
        prices = {**self._prices, model: price}
        return PriceTable(prices, self.engine_hour_usd, self.comparison_model, self.batch_discount)

    def ledger_model(self, model: str, prompt_tokens: int) -> str:
        """The name a request's usage is kept under: `model`, or `model@long` over its band."""
        price = self.price_for(model)
        if price.above_prompt_tokens is not None and prompt_tokens > price.above_prompt_tokens:
            return model + LONG
        return model

    def engine_cost_usd(self, engine_us: int) -> Decimal:
        return self.engine_hour_usd * engine_us / Decimal(3_600_000_000)

    def price_for(self, model: str) -> ModelPrice:
        """A model's rates; `model@long` (a ledger name) its long-context rates, `...@batch` those
        rates at the Message Batches API's discount (cache writes and reads included)."""
        base, batch = (model[: -len(BATCH)], True) if model.endswith(BATCH) else (model, False)
        base, long = (base[: -len(LONG)], True) if base.endswith(LONG) else (base, False)
        for candidate in (base, _DATE_SUFFIX.sub("", base)):
            if candidate in self._prices:
                price = self._prices[candidate]
                price = price.long if long and price.long is not None else price
                return price.discounted(self.batch_discount) if batch else price
        raise UnknownModelError(
            f"model {model!r} has no price in the price table ({SHIPPED_TABLE}); "
            "add it there, in the file named by PROMPTMILL_PRICES_FILE, or as a [price] table in the pipeline"
        )

    def models(self) -> list[str]:
        return sorted(self._prices)
