"""The HTTP side of a chat client: the `openai` client it sends with, hooked in two places.

The `openai` package retries by itself (408/409/429/5xx, timeouts and connection errors, honouring
Retry-After up to two minutes). `Transport` sets how many times (`max_retries`), takes over the pause
between attempts (`backoff_base`, `backoff_max`: our schedule, so that `abort` can cut a wait short, which
the package's own sleep would not), and counts every attempt it sends in the client's `Stats` by wrapping
the HTTP client's `send` (the attempt number is the package's `x-stainless-retry-count` request header).
What the package gives up with is classified by the client (`client.ChatClient._send`), not here.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from typing import Any

from atlas_exp.llm.costs import Stats

log = logging.getLogger(__name__)

#: request header in which the `openai` package numbers an attempt (0 = first, k = k-th retry)
RETRY_COUNT_HEADER = "x-stainless-retry-count"


class Aborted(Exception):
    """Raised inside the `openai` package's retry loop when the client was aborted (not an OpenAIError, so
    the package passes it through instead of retrying it)."""


class Transport:
    """The `openai.OpenAI` client of one ChatClient (`client`), with the retry pause on our schedule and every
    attempt counted in `stats`; `abort` makes the retry loop give up at its next step. Thread-safe.

    `mask` hides the key in anything logged (a server may echo it); `option` names the config node in logs.
    """

    def __init__(self, openai: Any, *, base_url: str | None, api_key: str | None, timeout: float, max_retries: int,
                 backoff_base: float, backoff_max: float, stats: Stats, option: str, mask: Callable[[str], str]):
        # the HTTP package `openai` sends with (httpx2 since openai 3), for its exception types
        import httpx2

        self._httpx = httpx2
        self.max_retries = int(max_retries)
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.stats = stats
        self.option = option
        self._mask = mask
        self.aborted = threading.Event()
        self.client = _openai_client(openai, self._wait_before_retry)(
            base_url=base_url, api_key=api_key or "EMPTY", timeout=float(timeout), max_retries=self.max_retries,
            http_client=_counting_http_client(openai, self._attempt),
        )

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before retry `attempt` (0-based): min(backoff_max, backoff_base * 2^attempt) * U(0.5, 1),
        at least the server's Retry-After (capped at backoff_max)."""
        delay = min(self.backoff_max, self.backoff_base * (2**attempt)) * (0.5 + random.random() / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max))
        return delay

    def _wait_before_retry(self, attempt: int, headers: Any) -> None:
        """The pause the `openai` package takes before a retry, on our schedule; an `abort` ends it at once
        (the package would sleep through it) and the request fails with "the client was closed"."""
        delay = self.backoff(attempt, _retry_after(headers))
        log.debug("%s: retry %d/%d in %.2fs", self.option, attempt + 1, self.max_retries, delay)
        if self.aborted.wait(delay):
            raise Aborted()

    def _attempt(self, request: Any, send: Callable[[Any], Any]) -> Any:
        """Send one attempt of a request (the `openai` package's loop decides whether there is a next one)
        and count it: requests, retries (from the package's attempt header) and failures by kind (HTTP
        status, timeout, connection), logging the failure with any echo of the key masked."""
        if self.aborted.is_set():
            raise Aborted()
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
            log.debug("%s: attempt %d: connection error: %s", self.option, retry + 1, self._mask(short_error(e)))
            raise
        if response.status_code >= 400:
            self.stats.error(str(response.status_code))
            response.read()  # error bodies are small; the package reads them anyway
            log.debug("%s: attempt %d: HTTP %d: %s", self.option, retry + 1, response.status_code,
                      self._mask(short_error(response.text)))
        return response

    def abort(self) -> None:
        """Make retry loops give up now (a request already on the wire still finishes)."""
        self.aborted.set()

    def close(self) -> None:
        """Abort, and close the HTTP pool. Idempotent."""
        self.aborted.set()
        try:
            self.client.close()
        except Exception:  # pragma: no cover - closing a pool should not fail a run
            pass


def _retry_after(headers: Any) -> float | None:
    """Seconds from a Retry-After header given in seconds (an HTTP date is left to the backoff)."""
    value = headers.get("retry-after") if headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _openai_client(openai: Any, wait_before_retry: Callable[[int, Any], None]) -> type:
    """`openai.OpenAI` with its pause between retries replaced by `wait_before_retry` (`_sleep_for_retry` is
    the package's one hook for it; the pin on `openai` in pyproject.toml covers its signature)."""

    class _Client(openai.OpenAI):  # type: ignore[misc, valid-type]
        def _sleep_for_retry(self, *, retries_taken: int, max_retries: int, options: Any, response: Any) -> None:
            wait_before_retry(retries_taken, response.headers if response is not None else None)

    return _Client


def _counting_http_client(openai: Any, attempt: Callable[[Any, Callable[[Any], Any]], Any]) -> Any:
    """The package's default HTTP client (its timeouts, limits, redirects) whose `send` goes through
    `attempt`, which counts it. `send` rather than event hooks: hooks never see the attempts that fail
    before a response (timeouts, refused connections), which the stats count by kind."""

    class _Http(openai.DefaultHttpxClient):  # type: ignore[misc, valid-type]
        def send(self, request: Any, **kw: Any) -> Any:
            return attempt(request, lambda r: super(_Http, self).send(r, **kw))

    return _Http()


def short_error(err: Any, limit: int = 300) -> str:
    """A one-line, bounded description of an openai error (its message may hold a whole body)."""
    text = " ".join(str(getattr(err, "message", None) or err).split())
    return text[:limit] + ("..." if len(text) > limit else "")
