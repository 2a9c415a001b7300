"""The model price table: the one place that turns token counts into US dollars.

Prices are exact decimals per million tokens, read from `prices.toml` beside this file and, model by
model, from the user's `prices_file`. An unknown model raises `UnknownModelError`, so a job is refused
before it runs rather than costed at $0.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from config.settings import Settings

SHIPPED_TABLE = Path(__file__).with_name("prices.toml")
_DATE_SUFFIX = re.compile(r"-\d{8}$")
_MILLION = Decimal(1_000_000)


class UnknownModelError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class ModelPrice:
    """USD per million tokens of each kind."""

    input: Decimal
    output: Decimal
    cache_write_5m: Decimal
    cache_write_1h: Decimal
    cache_read: Decimal

    def cost_usd(
        self,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cache_creation_input_tokens: int = 0,
        cache_read_input_tokens: int = 0,
    ) -> Decimal:
        # Anthropic's default cache lifetime is 5 minutes; 1-hour writes are priced by issue #6's ledger.
        total = (
            self.input * input_tokens
            + self.output * output_tokens
            + self.cache_write_5m * cache_creation_input_tokens
            + self.cache_read * cache_read_input_tokens
        )
        return total / _MILLION


def _parse_table(path: Path) -> dict[str, ModelPrice]:
    with path.open("rb") as handle:
        raw = tomllib.load(handle)
    table: dict[str, ModelPrice] = {}
    for name, row in raw.get("models", {}).items():
        try:
            price = ModelPrice(
                input=Decimal(str(row["input"])),
                output=Decimal(str(row["output"])),
                cache_write_5m=Decimal(str(row.get("cache_write_5m", row["input"]))),
                cache_write_1h=Decimal(str(row.get("cache_write_1h", row["input"]))),
                cache_read=Decimal(str(row.get("cache_read", row["input"]))),
            )
        except KeyError as missing:
            raise ValueError(f"{path}: model {name!r} has no {missing.args[0]!r} price") from None
        for alias in [name, *row.get("aliases", [])]:
            table[alias] = price
    return table


class PriceTable:
    def __init__(self, prices: dict[str, ModelPrice]):
        self._prices = prices

    @classmethod
    def load(cls, settings: Settings) -> "PriceTable":
        prices = _parse_table(SHIPPED_TABLE)
        if settings.prices_file is not None:
            prices.update(_parse_table(settings.prices_file))
        return cls(prices)

    def price_for(self, model: str) -> ModelPrice:
        for candidate in (model, _DATE_SUFFIX.sub("", model)):
            if candidate in self._prices:
                return self._prices[candidate]
        raise UnknownModelError(
            f"model {model!r} has no price in the price table ({SHIPPED_TABLE}); "
            "add it there or in the file named by PROMPTMILL_PRICES_FILE"
        )

    def models(self) -> list[str]:
        return sorted(self._prices)
