"""The judge `selector=oracle` talks to: the configured endpoint, or an embedded llama.cpp stand-in.

`selector.client` configures an OpenAI-compatible endpoint (`llm/client.py`: base_url, model, key, retries,
prices). With no base_url and no API key, and live requests allowed, the judge is an embedded llama.cpp
server on SmolLM2-135M (`llm/server.py`, options under `selector.local`), started here: a stand-in that
runs anywhere, not a judge to train on. Why a module of its own: choosing and opening the judge is the one
part of the oracle that knows about keys, endpoints and servers; the selector only asks it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

from atlas_exp.llm.client import ChatClient
from atlas_exp.llm.server import LocalServer

log = logging.getLogger(__name__)

#: client options that may be given under `selector.client` (besides the ones taken from the selector)
CLIENT_KEYS = {
    "base_url", "model", "api_key_env", "temperature", "max_tokens", "timeout", "backoff_base",
    "backoff_max", "response_format", "schema_bounds", "seed", "extra_body", "prices",
}
#: the embedded server's options (`selector.local`)
LOCAL_KEYS = {"model_path", "n_ctx", "n_threads", "startup_timeout", "log_path", "verbose", "extra_args"}
#: the judge model when `selector.client.model` names none (the paper's)
DEFAULT_JUDGE_MODEL = "gpt-4o"
#: the environment variable holding the API key when `selector.client.api_key_env` names none
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"


class JudgeClient(NamedTuple):
    client: ChatClient
    #: the embedded llama.cpp server the client talks to; None for a configured endpoint
    server: LocalServer | None


def open_judge_client(client: dict[str, Any], local: dict[str, Any], *, max_retries: int,
                      cache_path: Path | None, live: bool) -> JudgeClient:
    """The judge's client (`client`: the `selector.client` options, checked against CLIENT_KEYS): the
    configured endpoint, or with no base_url and no API key (and `live`) an embedded server started here."""
    client = dict(client)
    api_key_env = str(client.pop("api_key_env", None) or DEFAULT_API_KEY_ENV)
    api_key = os.environ.get(api_key_env) or None
    base_url = client.pop("base_url", None) or None
    server: LocalServer | None = None
    if base_url is None and api_key is None and live:
        # the embedded default: no endpoint and no key configured
        server = LocalServer(**local)
        log.warning(
            "selector=oracle: no selector.client.base_url and no $%s, so the judge is an embedded "
            "llama.cpp server on %s. A model this small is only a stand-in that exercises the "
            "pipeline; its selections are not the paper's. Set base_url/api key for a real judge.",
            api_key_env, Path(server.model_path).name,
        )
        base_url = server.start()
        client["model"] = server.alias  # cache entries must never pass for another model's
        client["prices"] = {}  # local compute: no bill
        if client.get("response_format", "auto") == "auto":
            # we know this server: it takes a schema only in its own json_object dialect
            client["response_format"] = "json_object_schema"
    try:
        chat = ChatClient(
            base_url=base_url,
            api_key=api_key,
            api_key_env=api_key_env,
            max_retries=max_retries,
            cache_path=cache_path,
            **{"model": DEFAULT_JUDGE_MODEL, **client},
        )
    except BaseException:
        if server is not None:
            server.stop()
        raise
    return JudgeClient(chat, server)
