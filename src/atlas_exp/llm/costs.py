"""What a client's requests cost: the price table of the paper's judge family, a model's price in it, and
the thread-safe running totals of one client (requests sent, cache hits, retries, errors by kind, tokens,
USD) that a selection or evaluation reports in its summary."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any, NamedTuple

from atlas_exp.errors import ConfigError

#: USD per 1M tokens, OpenAI list prices for the paper's judge family (standard tier, no cached-input
#: discount); `batch_discount` is the Batch API's (half price), applied to replies read from batch files.
#: `conf/selector/oracle.yaml` repeats them so a run's config shows what it assumed
DEFAULT_PRICES: dict[str, dict[str, float]] = {
    "gpt-4o": {"prompt": 2.50, "completion": 10.00, "batch_discount": 0.5},
    "gpt-4o-2024-11-20": {"prompt": 2.50, "completion": 10.00, "batch_discount": 0.5},
    "gpt-4o-2024-08-06": {"prompt": 2.50, "completion": 10.00, "batch_discount": 0.5},
    "gpt-4o-2024-05-13": {"prompt": 5.00, "completion": 15.00, "batch_discount": 0.5},
    "gpt-4o-mini": {"prompt": 0.15, "completion": 0.60, "batch_discount": 0.5},
}


class Price(NamedTuple):
    """USD per 1M tokens of a model."""

    prompt: float
    completion: float


def _price_entry(model: str, prices: dict[str, Any]) -> Any:
    """The table entry of a model: its exact name, else the longest entry it starts with (so
    `gpt-4o-mini-2024-07-18` finds `gpt-4o-mini`); None if unknown."""
    if not prices:
        return None
    entry = prices.get(model)
    if entry is None:
        keys = [key for key in prices if model.startswith(key + "-")]
        if keys:
            entry = prices[max(keys, key=len)]
    return entry


def price_for(model: str, prices: dict[str, Any], option: str = "selector.client", *, batch: bool = False) -> Price | None:
    """(USD per 1M prompt tokens, per 1M completion tokens) of a model, None if unknown; with `batch`, at
    Batch API prices (the entry's `batch_discount`, 0 if it has none)."""
    entry = _price_entry(model, prices)
    if entry is None:
        return None
    try:
        price = Price(float(entry["prompt"]), float(entry["completion"]))
        discount = float(entry.get("batch_discount") or 0.0) if batch else 0.0
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ConfigError(
            f"{option}.prices[{model!r}] must be {{prompt: USD per 1M tokens, completion: USD per 1M tokens"
            f", batch_discount: share off in the Batch API (optional)}}"
        ) from None
    return Price(price.prompt * (1 - discount), price.completion * (1 - discount))


class Stats:
    """Thread-safe running totals for one client (requests actually sent, cache hits, tokens, cost)."""

    def __init__(self, price: Price | None):
        self._lock = threading.Lock()
        self.price = price
        self.requests = 0
        self.responses = 0
        self.cache_hits = 0
        self.retries = 0
        self.errors: Counter[str] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_prompt_tokens = 0
        self.cached_completion_tokens = 0

    def add(self, **counts: int) -> None:
        """Add to the named totals (`add(requests=1, retries=1)`)."""
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1

    def _cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        if self.price is None:
            return 0.0
        return (prompt_tokens * self.price.prompt + completion_tokens * self.price.completion) / 1e6

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self.requests,
                "responses": self.responses,
                "cache_hits": self.cache_hits,
                "retries": self.retries,
                "errors": dict(self.errors),
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "cost_usd": round(self._cost(self.prompt_tokens, self.completion_tokens), 6),
                # what the cached replies would have cost again: the saving from resuming
                "cached_prompt_tokens": self.cached_prompt_tokens,
                "cached_completion_tokens": self.cached_completion_tokens,
                "cost_usd_saved_by_cache": round(
                    self._cost(self.cached_prompt_tokens, self.cached_completion_tokens), 6
                ),
                "price_usd_per_1m": (
                    {"prompt": self.price.prompt, "completion": self.price.completion} if self.price else None
                ),
            }
