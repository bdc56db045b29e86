"""A chat client for an LLM judge behind any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp).

Why this exists instead of calling `openai` directly: a selection run sends one request per trajectory
(tens of thousands for AgentTraj-L), so it has to survive rate limits, flaky servers and crashes without
paying twice, and it has to say what it cost. This module adds, around the `openai` package:

- retries by the `openai` package itself (it retries 408/409/429/5xx, timeouts and connection errors, and
  honours Retry-After up to two minutes); we only set how many (`max_retries`), how long it waits
  (`backoff_base`, `backoff_max`: our schedule, so an `abort` can cut a wait short) and count every
  attempt it sends (`llm/transport.py`);
- structured output: the request carries a JSON-schema `response_format` where the server takes it
  (grammar-constrained on llama.cpp / vLLM, strict on OpenAI). A server that rejects it (400/422) is
  asked again with a simpler format (schema without numeric/length bounds -> llama-cpp-python's
  `json_object` + `schema` -> plain `json_object` -> plain text), and the format that worked is
  remembered for the rest of the client's life;
- a disk cache keyed by everything that determines the reply (model, messages, generation params,
  response format; never the key or the URL), as an append-only JSONL file: one fsync'ed line per reply,
  so a crash loses at most the requests in flight, and a torn last line is skipped on load
  (`llm/reply_cache.py`);
- counts of requests, cache hits, tokens and the estimated cost from a price table (`llm/costs.py`).

This module is the request logic on top of those: the response formats and their fallback, the cache
keys, what a failed request means (`LLMError`, transient or not; ConfigError for a wrong key, model or URL).

The API key is read from an environment variable by the caller and only handed to `openai`; it is never
stored in stats, cache records or error messages (any echo of it in a server's error text is masked).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from atlas_exp.errors import AtlasError, ConfigError
from atlas_exp.llm.costs import DEFAULT_PRICES, Stats, price_for
from atlas_exp.llm.reply_cache import CACHE_VERSION, ReplyCache
from atlas_exp.llm.transport import Aborted, Transport, short_error

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
#: the defaults of an endpoint's settings, for every user of an endpoint (the oracle's `selector.client`,
#: `policy=openai`): the judge and the agent read their key from the same variable and wait alike
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_MAX_RETRIES = 4


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


def api_key_from_env(api_key_env: str) -> str | None:
    """The API key in `$api_key_env`, None when it is unset or empty. The key is only handed to `openai`:
    never stored in stats, cache records or error messages."""
    return os.environ.get(api_key_env) or None


def strip_bounds(schema: Any) -> Any:
    """The schema without numeric/length limits (for servers that reject those keywords)."""
    if isinstance(schema, dict):
        return {k: strip_bounds(v) for k, v in schema.items() if k not in _BOUND_KEYWORDS}
    if isinstance(schema, list):
        return [strip_bounds(v) for v in schema]
    return schema


class ChatClient:
    """Chat completions with retries, format fallback, a disk cache and cost accounting. Thread-safe."""

    def __init__(
        self,
        *,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        api_key_env: str = DEFAULT_API_KEY_ENV,
        temperature: float = 0.0,
        max_tokens: int = 1024,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
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
            self._levels = [fmt for fmt in FORMATS if self.schema_bounds or fmt != "json_schema_bounded"]
        elif response_format == "json_schema":
            self._levels = ["json_schema_bounded" if self.schema_bounds else "json_schema"]
        elif response_format == "none":
            self._levels = ["text"]
        else:
            self._levels = [response_format]
        self._level = 0  # index into _levels; only moves down, once a plainer format has worked
        self._level_lock = threading.Lock()
        if prices is None:
            prices = DEFAULT_PRICES
        price = price_for(self.model, prices, option=option)
        if price is None and prices:
            log.warning("%s: no price for model %r in %s.prices; cost is shown as 0", option, self.model, option)
        self.stats = Stats(price)
        # the openai package retries; the HTTP client under it counts each attempt it sends
        self._transport = Transport(
            openai, base_url=base_url, api_key=api_key, timeout=float(timeout), max_retries=self.max_retries,
            backoff_base=self.backoff_base, backoff_max=self.backoff_max, stats=self.stats, option=option,
            mask=self._mask,
        )
        self.cache = ReplyCache(cache_path) if cache_path else None
        # the format an endpoint took last time, so a rerun does not probe it again with requests that
        # are sure to be rejected (keyed by URL and model: unlike replies, this is about the server)
        self._format_key = "format:" + hashlib.sha256(f"{base_url}\x00{self.model}".encode()).hexdigest()
        if self.cache is not None and response_format == "auto":
            rec = self.cache.get(self._format_key)
            if rec is not None and rec.get("format") in self._levels:
                self._level = self._levels.index(rec["format"])

    @classmethod
    def from_env(cls, *, model: str, base_url: str | None = None, api_key_env: str = DEFAULT_API_KEY_ENV,
                 needs_endpoint: str | None = None, option: str = "selector.client", **settings: Any) -> "ChatClient":
        """A client whose API key is read from `$api_key_env` (`api_key_from_env`). With `needs_endpoint`
        (what is being configured, e.g. `policy=openai`), neither a `base_url` nor a key is a ConfigError
        saying what to set; `settings` are the constructor's other options."""
        api_key = api_key_from_env(api_key_env)
        if needs_endpoint and api_key is None and not base_url:
            raise ConfigError(f"{needs_endpoint} needs {option}.base_url (a local vLLM / llama.cpp server) or an "
                              f"API key in ${api_key_env}")
        return cls(model=model, base_url=base_url, api_key=api_key, api_key_env=api_key_env, option=option, **settings)

    # ----------------------------------------------------------------------------------- helpers

    @property
    def format(self) -> str:
        """The response format currently used (after any fallback)."""
        return self._levels[self._level]

    def _mask(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _params(self, fmt: str, schema: dict[str, Any] | None, name: str) -> dict[str, Any]:
        """The generation params of a request in response format `fmt` (what the cache key covers)."""
        params: dict[str, Any] = {"temperature": self.temperature, "max_tokens": self.max_tokens}
        if self.seed is not None:
            params["seed"] = int(self.seed)
        if schema is not None and fmt in ("json_schema_bounded", "json_schema"):
            params["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": name,
                    "strict": True,
                    "schema": schema if fmt == "json_schema_bounded" else strip_bounds(schema),
                },
            }
        elif schema is not None and fmt == "json_object_schema":
            params["response_format"] = {"type": "json_object",
                                         "schema": schema if self.schema_bounds else strip_bounds(schema)}
        elif fmt != "text":
            params["response_format"] = {"type": "json_object"}
        return params

    def cache_key(self, messages: list[dict[str, str]], params: dict[str, Any]) -> str:
        """sha256 over what determines the reply. Not the URL or key: the same model behind another
        endpoint may reuse replies, and the key must never influence anything stored."""
        blob = json.dumps(
            {"v": CACHE_VERSION, "model": self.model, "messages": messages, "params": params,
             "extra_body": self.extra_body},
            sort_keys=True, ensure_ascii=False,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def _cache_record(self, fmt: str, reply: Reply, **extra: Any) -> dict[str, Any]:
        """What the cache keeps of a reply: model, format, text and token counts, never the prompt or the key."""
        return {"model": self.model, "format": fmt, "text": reply.text, "finish_reason": reply.finish_reason,
                "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens, **extra,
                "time": round(time.time(), 3)}

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
                prompt_tokens, completion_tokens = int(rec.get("prompt_tokens") or 0), int(rec.get("completion_tokens") or 0)
                self.stats.add(cache_hits=1, cached_prompt_tokens=prompt_tokens, cached_completion_tokens=completion_tokens)
                return Reply(rec["text"], rec.get("finish_reason"), prompt_tokens, completion_tokens, fmt, cached=True)
        return None

    def store(self, messages: list[dict[str, str]], reply: Reply, *, schema: dict[str, Any] | None = None,
              name: str = "reply", origin: str = "live") -> None:
        """Put a reply obtained elsewhere (a Batch API output file) into the cache under the request this
        client would send, so later runs find it without paying again."""
        if self.cache is None:
            return
        self.cache.put(self.cache_key(messages, self._params(self.format, schema, name)),
                       self._cache_record(self.format, reply, origin=origin))

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
                self.cache.put(self.cache_key(messages, params), self._cache_record(fmt, reply))
            return reply

    def _send(self, messages: list[dict[str, str]], params: dict[str, Any], fmt: str) -> Reply:
        """One request, retried by the `openai` package on transient failures; what is left after its
        retries is classified here: ConfigError (key, model or URL wrong), _Rejected (a 400/422: the format
        or the request), LLMError transient or not."""
        oa = self._openai
        if self._transport.aborted.is_set():
            raise LLMError("the client was closed", transient=True)
        tries = f"after {self.max_retries + 1} attempt(s)"
        try:
            resp = self._transport.client.chat.completions.create(
                model=self.model, messages=messages, extra_body=self.extra_body or None, **params
            )
        except Aborted:
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
            raise _Rejected(f"{e.status_code}: {self._mask(short_error(e))}") from None
        except oa.APITimeoutError:
            raise LLMError(f"no reply {tries}; last: timed out", transient=True) from None
        except oa.APIConnectionError as e:
            raise LLMError(f"no reply {tries}; last: connection error: {self._mask(short_error(e))}",
                           transient=True) from None
        except oa.APIStatusError as e:
            transient = e.status_code in _RETRY_STATUS or e.status_code >= 500
            last = f"HTTP {e.status_code}: {self._mask(short_error(e))}"
            # a Retry-After beyond the package's two minutes is not retried at all: still "come back later"
            raise LLMError(f"no reply {tries}; last: {last}" if transient else last, transient=transient) from None
        except oa.APIError as e:  # a 200 whose body is not a completion
            self.stats.error("bad_response")
            raise LLMError(f"malformed response: {self._mask(short_error(e))}", transient=True) from None
        return self._reply(resp, fmt)

    def _reply(self, resp: Any, fmt: str) -> Reply:
        choices = getattr(resp, "choices", None) or []
        msg = choices[0].message if choices else None
        text = (getattr(msg, "content", None) or "") if msg is not None else ""
        usage = getattr(resp, "usage", None)
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        self.stats.add(responses=1, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        if usage is None:
            self.stats.error("no_usage")
        return Reply(text, choices[0].finish_reason if choices else None, prompt_tokens, completion_tokens, fmt,
                     cached=False)

    def abort(self) -> None:
        """Make retry loops give up now (a request already on the wire still finishes and is cached)."""
        self._transport.abort()

    def close(self) -> None:
        """Stop retry loops, close the cache file and the HTTP pool. Idempotent."""
        self._transport.abort()
        if self.cache is not None:
            self.cache.close()
        self._transport.close()


class _Rejected(Exception):
    """A 400/422: the server refused this request (maybe only its response_format)."""
