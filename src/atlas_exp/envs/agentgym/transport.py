"""The HTTP calls to one AgentGym server: JSON in and out, retried where that cannot play an action twice.

A `requests` session whose adapter retries with urllib3's `Retry` (exponential backoff, Retry-After
honoured) on connection errors, timeouts and HTTP 5xx; a `/step` has its own session that retries only
connection failures, where the request surely never reached the server (a step answered 5xx, timed out or
cut off mid-request may have been applied, and playing it twice would corrupt the episode); a server that
cannot be reached at all is a `ConfigError` that names `base_url` and how to start the server. AgentGym's
servers report env-side failures as HTTP 200 with `{"error": ...}`; those, 4xx answers and 5xx after the
retries raise `AgentGymServerError`.
"""

from __future__ import annotations

import json
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from atlas_exp.envs.agentgym.dialect import AgentGymDialect
from atlas_exp.errors import AtlasError, ConfigError


class AgentGymServerError(AtlasError):
    """The server answered, but not with a usable result: `{"error": ...}`, a 4xx, or 5xx after retries."""


class Transport:
    """The API of the AgentGym server of `dialect` at `base_url` (its root, without the dialect's
    `path_prefix`). `timeout`, `retries`, `backoff`, `max_backoff`: as `AgentGymHTTPEnv` takes them."""

    def __init__(self, dialect: AgentGymDialect, base_url: str, *, timeout: float, retries: int, backoff: float,
                 max_backoff: float):
        self.dialect = dialect
        self.name = dialect.env
        self.base_url = base_url
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._session, self._once_session = self._sessions()

    def url(self, path: str) -> str:
        return f"{self.base_url}{self.dialect.path_prefix}{path}"

    def _unreachable(self, url: str, attempts: int, reason: object) -> ConfigError:
        return ConfigError(
            f"base_url={self.base_url!r}: cannot reach the AgentGym {self.name} server ({url}, {attempts} "
            f"attempts: {type(reason).__name__}); is the AgentGym {self.name} server running? start it with "
            f"`{self.dialect.launch}` ({self.dialect.server}) and pass its address as base_url"
        )

    def request(self, method: str, path: str, *, body: Any = None, params: dict | None = None,
                allow_404: bool = False, resend: bool = True) -> Any:
        """One API call: JSON result; `{"error": ...}` raised as AgentGymServerError.

        The retries are the sessions' (`_sessions`): a `/step`, or a call with `resend=False`, is re-sent
        only when it surely never reached the server (connection refused / not established).
        """
        url = self.url(path)
        once = path == "/step" or not resend
        attempts = self.retries + 1
        try:
            resp = (self._once_session if once else self._session).request(
                method, url, json=body, params=params, timeout=self.timeout
            )
        except (requests.ConnectionError, requests.Timeout) as e:
            if once and not never_sent(e):
                raise AgentGymServerError(
                    f"{method} {url} failed after the request was sent ({type(e).__name__}: {excerpt(str(e), 200)}); "
                    f"not re-sent, as the server may have applied the action (timeout={self.timeout:g}s)"
                ) from None
            raise self._unreachable(url, attempts, e) from None
        if resp.status_code >= 500 and once:
            raise AgentGymServerError(
                f"{method} {url} answered HTTP {resp.status_code} (AgentGym {self.name} server at "
                f"base_url={self.base_url!r}); not re-sent, as the server may have applied the action: "
                f"{excerpt(resp.text)}"
            )
        if resp.status_code >= 500:
            raise AgentGymServerError(
                f"{method} {url} answered HTTP {resp.status_code} {attempts} times in a row "
                f"(AgentGym {self.name} server at base_url={self.base_url!r}): {excerpt(resp.text)}"
            )
        if resp.status_code == 404 and allow_404:
            return None
        if resp.status_code == 404:
            raise ConfigError(
                f"base_url={self.base_url!r}: {method} {url} answered 404: is this the AgentGym {self.name} "
                f"server ({self.dialect.server}, started with `{self.dialect.launch}`)?"
            )
        if resp.status_code >= 400:
            raise AgentGymServerError(
                f"{method} {url} answered HTTP {resp.status_code} (the server may be an AgentGym version whose "
                f"API differs from the {self.name} dialect): {excerpt(resp.text)}"
            )
        try:
            data = resp.json()
        except ValueError:
            raise AgentGymServerError(f"{method} {url} answered non-JSON: {excerpt(resp.text)}") from None
        if isinstance(data, dict) and "error" in data:
            raise AgentGymServerError(f"AgentGym {self.name} server, {method} {url}: {data['error']}")
        return data

    def field(self, out: Any, name: str) -> Any:
        """Field `name` of an answer; an AgentGymServerError when the answer has none."""
        if not isinstance(out, dict) or name not in out:
            raise AgentGymServerError(
                f"AgentGym {self.name} server at base_url={self.base_url!r} answered without {name!r} "
                f"(a server version whose API differs from the {self.name} dialect?): {excerpt(json.dumps(out))}"
            )
        return out[name]

    def close(self) -> None:
        """Close the connections; later calls open new ones (a closed env may be reset again)."""
        self._session.close()
        self._once_session.close()
        self._session, self._once_session = self._sessions()

    def _sessions(self) -> tuple[requests.Session, requests.Session]:
        """(every call but `/step`, `/step`): urllib3 `Retry` adapters. Both retry connection failures
        (nothing was sent); only the first retries timeouts, broken responses and 5xx answers, which a step
        may have been applied behind."""
        common = dict(total=self.retries, connect=self.retries, other=0, allowed_methods=None,
                      backoff_factor=self.backoff, backoff_max=self.max_backoff, raise_on_status=False,
                      respect_retry_after_header=True)
        resend = Retry(read=self.retries, status=self.retries, status_forcelist=range(500, 600), **common)
        once = Retry(read=0, status=0, **common)
        sessions = []
        for retry in (resend, once):
            session = requests.Session()
            adapter = HTTPAdapter(max_retries=retry)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            sessions.append(session)
        return sessions[0], sessions[1]


def never_sent(e: Exception) -> bool:
    """Whether a requests failure happened before the request reached the server (nothing to double-apply)."""
    if isinstance(e, requests.ConnectTimeout):
        return True
    if not isinstance(e, requests.ConnectionError) or isinstance(e, requests.Timeout):
        return False
    reason = getattr(e.args[0], "reason", None) if e.args else None
    return isinstance(reason, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError))


def excerpt(text: str, n: int = 300) -> str:
    """`text` on one line, cut to `n` characters (for error messages quoting an answer)."""
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n] + "..."


__all__ = ["AgentGymServerError", "Transport", "excerpt", "never_sent"]
