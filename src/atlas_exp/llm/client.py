"""A chat client for an LLM judge behind any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp).

Why this exists instead of calling `openai` directly: a selection run sends one request per trajectory
(tens of thousands for AgentTraj-L), so it has to survive rate limits, flaky servers and crashes without
paying twice, and it has to say what it cost. This module adds, around the `openai` package:

- retries by the `openai` package itself (it retries 408/409/429/5xx, timeouts and connection errors, and
  honours Retry-After up to two minutes); we only set how many (`max_retries`), how long it waits
  (`backoff_base`, `backoff_max`: our schedule, so an `abort` can cut a wait short) and count every
  attempt it sends, by wrapping the HTTP client's `send` (the attempt number is the package's
  `x-stainless-retry-count` request header);
- structured output: the request carries a JSON-schema `response_format` where the server takes it
  (grammar-constrained on llama.cpp / vLLM, strict on OpenAI). A server that rejects it (400/422) is
  asked again with a simpler format (schema without numeric/length bounds -> llama-cpp-python's
  `json_object` + `schema` -> plain `json_object` -> plain text), and the format that worked is
  remembered for the rest of the client's life;
- a disk cache keyed by everything that determines the reply (model, messages, generation params,
  response format; never the key or the URL), as an append-only JSONL file: one fsync'ed line per reply,
  so a crash loses at most the requests in flight, and a torn last line is skipped on load;
- counts of requests, cache hits, tokens and the estimated cost from a price table.

The API key is read from an environment variable by the caller and only handed to `openai`; it is never
stored in stats, cache records or error messages (any echo of it in a server's error text is masked).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlas_exp.errors import AtlasError, ConfigError

log = logging.getLogger(__name__)

#: response formats from richest to plainest; `auto` starts at the first and steps down on rejection.
#: `json_object_schema` is `{"type": "json_object", "schema": ...}`, the dialect of llama-cpp-python's
#: server (which rejects `json_schema` with a 422 but turns this one into a grammar)
FORMATS = ("json_schema_bounded", "json_schema", "json_object_schema", "json_object", "text")
#: user-facing values of `selector.client.response_format`; all but `auto` are used as they are
FORMAT_OPTIONS = ("auto", "json_schema", "json_object_schema", "json_object", "none")
#: keywords removed from a schema for servers that do not take numeric/length limits (OpenAI strict mode
#: historically rejected them)
_BOUND_KEYWORDS = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems",
                   "minLength", "maxLength", "uniqueItems"}
#: statuses the `openai` package retries (its `_should_retry`: 408, 409, 429 and >= 500); an error with
#: one of them after the retries means "unavailable now", any other 4xx means "this request is refused"
_RETRY_STATUS = {408, 409, 429}
#: request header in which the `openai` package numbers an attempt (0 = first, k = k-th retry)
RETRY_COUNT_HEADER = "x-stainless-retry-count"
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
#: bump when the cache record or key layout changes, so old records are not misread
CACHE_VERSION = 1


class LLMError(AtlasError):
    """No usable HTTP reply: retries exhausted, or the server rejected the request itself."""

    def __init__(self, message: str, *, transient: bool):
        super().__init__(message)
        #: True when the server seemed unavailable (worth trying again later), False when it refused
        #: this particular request (too long, malformed)
        self.transient = transient


@dataclass
class Reply:
    """One completion, fresh or from the cache."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    format: str
    cached: bool


def strip_bounds(schema: Any) -> Any:
    """The schema without numeric/length limits (for servers that reject those keywords)."""
    if isinstance(schema, dict):
        return {k: strip_bounds(v) for k, v in schema.items() if k not in _BOUND_KEYWORDS}
    if isinstance(schema, list):
        return [strip_bounds(v) for v in schema]
    return schema


def _price_entry(model: str, prices: dict[str, Any]) -> Any:
    """The table entry of a model: its exact name, else the longest entry it starts with (so
    `gpt-4o-mini-2024-07-18` finds `gpt-4o-mini`); None if unknown."""
    if not prices:
        return None
    entry = prices.get(model)
    if entry is None:
        keys = [k for k in prices if model.startswith(k + "-")]
        if keys:
            entry = prices[max(keys, key=len)]
    return entry


def price_for(model: str, prices: dict[str, Any], option: str = "selector.client", *, batch: bool = False) -> tuple[float, float] | None:
    """(USD per 1M prompt tokens, per 1M completion tokens) of a model, None if unknown; with `batch`, at
    Batch API prices (the entry's `batch_discount`, 0 if it has none)."""
    entry = _price_entry(model, prices)
    if entry is None:
        return None
    try:
        price = float(entry["prompt"]), float(entry["completion"])
        discount = float(entry.get("batch_discount") or 0.0) if batch else 0.0
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ConfigError(
            f"{option}.prices[{model!r}] must be {{prompt: USD per 1M tokens, completion: USD per 1M tokens"
            f", batch_discount: share off in the Batch API (optional)}}"
        ) from None
    return price[0] * (1 - discount), price[1] * (1 - discount)


class ReplyCache:
    """Append-only JSONL of replies, loaded whole at start (a reply is ~1 KB; 100k of them fit easily).

    Each record is written with one `write` + flush + fsync under a lock, so concurrent threads never
    interleave and a crash can only tear the very last line, which `load` skips. Records carry the
    model name and token counts (to report what the cache saved), never the prompt or the key.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, Any]] = {}
        self.skipped = 0
        if self.path.exists():
            self._load()
        self._f = open(self.path, "a", encoding="utf-8")
        # after a torn last line, start on a fresh line so the next record stays parseable
        if self.path.stat().st_size and not self._ends_with_newline():
            self._f.write("\n")
            self._f.flush()

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def _load(self) -> None:
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    if rec.get("v") == CACHE_VERSION:
                        self._data[rec["key"]] = rec
                except (json.JSONDecodeError, KeyError, AttributeError):
                    self.skipped += 1  # a torn line from a crash, or a foreign one: ignore it
        if self.skipped:
            log.warning("oracle cache %s: skipped %d unreadable line(s)", self.path, self.skipped)

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._data.get(key)

    def put(self, key: str, record: dict[str, Any]) -> None:
        rec = {"v": CACHE_VERSION, "key": key, **record}
        line = json.dumps(rec, ensure_ascii=False) + "\n"
        with self._lock:
            self._data[key] = rec
            if self._f.closed:
                return  # a request that finished after close(): keep it in memory only
            self._f.write(line)
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        with self._lock:
            if not self._f.closed:
                self._f.close()


class Stats:
    """Thread-safe running totals for one client (requests actually sent, cache hits, tokens, cost)."""

    def __init__(self, price: tuple[float, float] | None):
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

    def add(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1

    def _cost(self, p: int, c: int) -> float:
        if self.price is None:
            return 0.0
        return (p * self.price[0] + c * self.price[1]) / 1e6

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
                    {"prompt": self.price[0], "completion": self.price[1]} if self.price else None
                ),
            }


class ChatClient:
    """Chat completions with retries, format fallback, a disk cache and cost accounting. Thread-safe."""

    def __init__(
        self,
        *,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float = 0.0,
        max_tokens: int = 1024,
        timeout: float = 120.0,
        max_retries: int = 4,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        response_format: str = "auto",
        schema_bounds: bool = True,
        seed: int | None = None,
        extra_body: dict[str, Any] | None = None,
        prices: dict[str, Any] | None = None,
        cache_path: str | os.PathLike | None = None,
        option: str = "selector.client",
    ):
        #: the config node these settings come from, named in every error (the oracle's or policy=openai's)
        self.option = option
        try:
            import openai
        except ImportError:  # pragma: no cover - openai is a requirement
            raise ConfigError(f"{option} needs the `openai` package: pip install openai") from None
        if response_format not in FORMAT_OPTIONS:
            raise ConfigError(
                f"{option}.response_format must be one of {FORMAT_OPTIONS}, got {response_format!r}"
            )
        if max_retries < 0 or timeout <= 0 or backoff_base < 0:
            raise ConfigError(f"{option}: max_retries >= 0, timeout > 0 and backoff_base >= 0 are required")
        self._openai = openai
        # the HTTP package `openai` sends with (httpx2 since openai 3), for its exception types
        import httpx2

        self._httpx = httpx2
        self.model = str(model)
        self.base_url = base_url
        self.api_key_env = api_key_env
        self._secret = api_key or ""
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.max_retries = int(max_retries)
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.seed = seed
        self.extra_body = dict(extra_body or {})
        self.schema_bounds = bool(schema_bounds)
        self.response_format = response_format
        if response_format == "auto":
            self._levels = [f for f in FORMATS if self.schema_bounds or f != "json_schema_bounded"]
        elif response_format == "json_schema":
            self._levels = ["json_schema_bounded" if self.schema_bounds else "json_schema"]
        elif response_format == "none":
            self._levels = ["text"]
        else:
            self._levels = [response_format]
        self._level = 0  # index into _levels; only moves down, once a plainer format has worked
        self._level_lock = threading.Lock()
        self._closed = threading.Event()
        if prices is None:
            prices = DEFAULT_PRICES
        price = price_for(self.model, prices, option=option)
        if price is None and prices:
            log.warning("%s: no price for model %r in %s.prices; cost is shown as 0", option, self.model, option)
        self.stats = Stats(price)
        # the openai package retries; the HTTP client under it counts each attempt it sends
        self._client = _openai_client(self)(
            base_url=base_url, api_key=api_key or "EMPTY", timeout=float(timeout), max_retries=self.max_retries,
            http_client=_counting_http_client(self),
        )
        self.cache = ReplyCache(cache_path) if cache_path else None
        # the format an endpoint took last time, so a rerun does not probe it again with requests that
        # are sure to be rejected (keyed by URL and model: unlike replies, this is about the server)
        self._format_key = "format:" + hashlib.sha256(f"{base_url}\x00{self.model}".encode()).hexdigest()
        if self.cache is not None and response_format == "auto":
            rec = self.cache.get(self._format_key)
            if rec is not None and rec.get("format") in self._levels:
                self._level = self._levels.index(rec["format"])

    # ----------------------------------------------------------------------------------- helpers

    @property
    def format(self) -> str:
        """The response format currently used (after any fallback)."""
        return self._levels[self._level]

    def _mask(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _params(self, fmt: str, schema: dict[str, Any] | None, name: str) -> dict[str, Any]:
        p: dict[str, Any] = {"temperature": self.temperature, "max_tokens": self.max_tokens}
        if self.seed is not None:
            p["seed"] = int(self.seed)
        if schema is not None and fmt in ("json_schema_bounded", "json_schema"):
            p["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": name,
                    "strict": True,
                    "schema": schema if fmt == "json_schema_bounded" else strip_bounds(schema),
                },
            }
        elif schema is not None and fmt == "json_object_schema":
            p["response_format"] = {"type": "json_object", "schema": schema if self.schema_bounds else strip_bounds(schema)}
        elif fmt != "text":
            p["response_format"] = {"type": "json_object"}
        return p

    def cache_key(self, messages: list[dict[str, str]], params: dict[str, Any]) -> str:
        """sha256 over what determines the reply. Not the URL or key: the same model behind another
        endpoint may reuse replies, and the key must never influence anything stored."""
        blob = json.dumps(
            {"v": CACHE_VERSION, "model": self.model, "messages": messages, "params": params,
             "extra_body": self.extra_body},
            sort_keys=True, ensure_ascii=False,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before retry `attempt` (0-based): min(backoff_max, backoff_base * 2^attempt) * U(0.5, 1),
        at least the server's Retry-After (capped at backoff_max)."""
        delay = min(self.backoff_max, self.backoff_base * (2**attempt)) * (0.5 + random.random() / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max))
        return delay

    def _wait_before_retry(self, attempt: int, headers: Any) -> None:
        """The pause the `openai` package takes before a retry, on our schedule; an `abort` ends it at once
        (the package would sleep through it) and the request fails with "the client was closed"."""
        delay = self._backoff(attempt, _retry_after(headers))
        log.debug("%s: retry %d/%d in %.2fs", self.option, attempt + 1, self.max_retries, delay)
        if self._closed.wait(delay):
            raise _Closed()

    def _attempt(self, request: Any, send: Any) -> Any:
        """Send one attempt of a request (the `openai` package's loop decides whether there is a next one)
        and count it: requests, retries (from the package's attempt header) and failures by kind (HTTP
        status, timeout, connection), logging the failure with any echo of the key masked."""
        if self._closed.is_set():
            raise _Closed()
        retry = int(request.headers.get(RETRY_COUNT_HEADER) or 0)
        self.stats.add(requests=1, retries=1 if retry else 0)
        try:
            response = send(request)
        except self._httpx.TimeoutException:
            self.stats.error("timeout")
            log.debug("%s: attempt %d timed out", self.option, retry + 1)
            raise
        except self._httpx.TransportError as e:
            self.stats.error("connection")
            log.debug("%s: attempt %d: connection error: %s", self.option, retry + 1, self._mask(_short(e)))
            raise
        if response.status_code >= 400:
            self.stats.error(str(response.status_code))
            response.read()  # error bodies are small; the package reads them anyway
            log.debug("%s: attempt %d: HTTP %d: %s", self.option, retry + 1, response.status_code,
                      self._mask(_short(response.text)))
        return response

    # -------------------------------------------------------------------------------------- chat

    def request_body(self, messages: list[dict[str, str]], *, schema: dict[str, Any] | None = None, name: str = "reply") -> dict[str, Any]:
        """The chat request body this client would send now (for Batch API files): model, messages,
        generation params in the current response format, and `extra_body`."""
        return {"model": self.model, "messages": messages, **self._params(self.format, schema, name), **self.extra_body}

    def lookup(self, messages: list[dict[str, str]], *, schema: dict[str, Any] | None = None, name: str = "reply") -> Reply | None:
        """The cached reply to this request under any format we could still use, or None; sends nothing."""
        if self.cache is None:
            return None
        for fmt in self._levels[self._level:]:
            rec = self.cache.get(self.cache_key(messages, self._params(fmt, schema, name)))
            if rec is not None:
                p, c = int(rec.get("prompt_tokens") or 0), int(rec.get("completion_tokens") or 0)
                self.stats.add(cache_hits=1, cached_prompt_tokens=p, cached_completion_tokens=c)
                return Reply(rec["text"], rec.get("finish_reason"), p, c, fmt, cached=True)
        return None

    def store(self, messages: list[dict[str, str]], reply: Reply, *, schema: dict[str, Any] | None = None,
              name: str = "reply", origin: str = "live") -> None:
        """Put a reply obtained elsewhere (a Batch API output file) into the cache under the request this
        client would send, so later runs find it without paying again."""
        if self.cache is None:
            return
        self.cache.put(
            self.cache_key(messages, self._params(self.format, schema, name)),
            {"model": self.model, "format": self.format, "text": reply.text, "finish_reason": reply.finish_reason,
             "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
             "origin": origin, "time": round(time.time(), 3)},
        )

    def chat(self, messages: list[dict[str, str]], *, schema: dict[str, Any] | None = None, name: str = "reply",
             fresh: bool = False) -> Reply:
        """One completion for `messages`, from the cache if any format's reply is there, else the server.

        `fresh` skips the cache lookup (the new reply replaces the cached one). Raises LLMError when retries are exhausted or every format is refused, ConfigError when the
        server refuses us (401/403/404: key, model name or URL is wrong).
        """
        level = self._level
        # a reply cached under any format we could still use counts: a rerun starts at the richest
        # format again, and must not pay for a request that the last run had already downgraded
        hit = None if fresh else self.lookup(messages, schema=schema, name=name)
        if hit is not None:
            return hit
        while True:
            fmt = self._levels[level]
            params = self._params(fmt, schema, name)
            try:
                reply = self._send(messages, params, fmt)
            except _Rejected as e:
                if level + 1 < len(self._levels):
                    log.info("oracle: server rejected response_format %s (%s); trying %s", fmt, e, self._levels[level + 1])
                    level += 1
                    continue
                raise LLMError(f"the server rejected the request: {e}", transient=False) from None
            with self._level_lock:
                if level > self._level:
                    log.warning("oracle: %s does not take response_format %s; using %s from now on",
                                self.base_url or "the server", self._levels[self._level], fmt)
                    self._level = level
                    if self.cache is not None:
                        self.cache.put(self._format_key, {"format": fmt})
            if self.cache is not None:
                self.cache.put(
                    self.cache_key(messages, params),
                    {"model": self.model, "format": fmt, "text": reply.text, "finish_reason": reply.finish_reason,
                     "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                     "time": round(time.time(), 3)},
                )
            return reply

    def _send(self, messages: list[dict[str, str]], params: dict[str, Any], fmt: str) -> Reply:
        """One request, retried by the `openai` package on transient failures; what is left after its
        retries is classified here: ConfigError (key, model or URL wrong), _Rejected (a 400/422: the format
        or the request), LLMError transient or not."""
        oa = self._openai
        if self._closed.is_set():
            raise LLMError("the client was closed", transient=True)
        tries = f"after {self.max_retries + 1} attempt(s)"
        try:
            resp = self._client.chat.completions.create(
                model=self.model, messages=messages, extra_body=self.extra_body or None, **params
            )
        except _Closed:
            raise LLMError("the client was closed", transient=True) from None
        except (oa.AuthenticationError, oa.PermissionDeniedError) as e:
            raise ConfigError(
                f"{self.option}: {self.base_url or 'the OpenAI API'} refused the key from "
                f"${self.api_key_env} ({e.status_code}); check the key and base_url"
            ) from None
        except oa.NotFoundError:
            raise ConfigError(
                f"{self.option}: model {self.model!r} or the chat endpoint was not found at "
                f"{self.base_url or 'the OpenAI API'} (404); check model and base_url"
            ) from None
        except (oa.BadRequestError, oa.UnprocessableEntityError) as e:
            raise _Rejected(f"{e.status_code}: {self._mask(_short(e))}") from None
        except oa.APITimeoutError:
            raise LLMError(f"no reply {tries}; last: timed out", transient=True) from None
        except oa.APIConnectionError as e:
            raise LLMError(f"no reply {tries}; last: connection error: {self._mask(_short(e))}",
                           transient=True) from None
        except oa.APIStatusError as e:
            transient = e.status_code in _RETRY_STATUS or e.status_code >= 500
            last = f"HTTP {e.status_code}: {self._mask(_short(e))}"
            # a Retry-After beyond the package's two minutes is not retried at all: still "come back later"
            raise LLMError(f"no reply {tries}; last: {last}" if transient else last, transient=transient) from None
        except oa.APIError as e:  # a 200 whose body is not a completion
            self.stats.error("bad_response")
            raise LLMError(f"malformed response: {self._mask(_short(e))}", transient=True) from None
        return self._reply(resp, fmt)

    def _reply(self, resp: Any, fmt: str) -> Reply:
        choices = getattr(resp, "choices", None) or []
        msg = choices[0].message if choices else None
        text = (getattr(msg, "content", None) or "") if msg is not None else ""
        usage = getattr(resp, "usage", None)
        p = int(getattr(usage, "prompt_tokens", 0) or 0)
        c = int(getattr(usage, "completion_tokens", 0) or 0)
        self.stats.add(responses=1, prompt_tokens=p, completion_tokens=c)
        if usage is None:
            self.stats.error("no_usage")
        return Reply(text, choices[0].finish_reason if choices else None, p, c, fmt, cached=False)

    def abort(self) -> None:
        """Make retry loops give up now (a request already on the wire still finishes and is cached)."""
        self._closed.set()

    def close(self) -> None:
        """Stop retry loops, close the cache file and the HTTP pool. Idempotent."""
        self._closed.set()
        if self.cache is not None:
            self.cache.close()
        try:
            self._client.close()
        except Exception:  # pragma: no cover - closing a pool should not fail a run
            pass


class _Rejected(Exception):
    """A 400/422: the server refused this request (maybe only its response_format)."""


class _Closed(Exception):
    """Raised inside the `openai` package's retry loop when the client was aborted (not an OpenAIError, so
    the package passes it through instead of retrying it)."""


def _retry_after(headers: Any) -> float | None:
    """Seconds from a Retry-After header given in seconds (an HTTP date is left to the backoff)."""
    value = headers.get("retry-after") if headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _openai_client(owner: ChatClient) -> type:
    """`openai.OpenAI` with its pause between retries on the owner's schedule (`_sleep_for_retry` is the
    package's one hook for it; the pin on `openai` in pyproject.toml covers its signature)."""
    oa = owner._openai

    class _Client(oa.OpenAI):  # type: ignore[misc, valid-type]
        def _sleep_for_retry(self, *, retries_taken: int, max_retries: int, options: Any, response: Any) -> None:
            owner._wait_before_retry(retries_taken, response.headers if response is not None else None)

    return _Client


def _counting_http_client(owner: ChatClient) -> Any:
    """The package's default HTTP client (its timeouts, limits, redirects) whose `send` counts each
    attempt. `send` rather than event hooks: hooks never see the attempts that fail before a response
    (timeouts, refused connections), which the stats count by kind."""
    oa = owner._openai

    class _Http(oa.DefaultHttpxClient):  # type: ignore[misc, valid-type]
        def send(self, request: Any, **kw: Any) -> Any:
            return owner._attempt(request, lambda r: super(_Http, self).send(r, **kw))

    return _Http()


def _short(err: Any, limit: int = 300) -> str:
    """A one-line, bounded description of an openai error (its message may hold a whole body)."""
    text = " ".join(str(getattr(err, "message", None) or err).split())
    return text[:limit] + ("..." if len(text) > limit else "")
