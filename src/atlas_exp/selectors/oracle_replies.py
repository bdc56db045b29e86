"""Where `selector=oracle`'s judge replies come from, and what the ones read from batch files cost.

One request (a trajectory's first request, or a repair) is answered, in this order, by the reply cache, the
batch output files (`selector.batch.read`, matched by the fingerprint of the request we would send now, see
`oracle_batch.py`), or the endpoint when live requests are allowed. Without any of those it is queued for the
batch input file (`selector.batch.write`) or reported as not judged, with why. Replies read from the files
enter the reply cache and are costed at batch prices, from the files' token counts or, where the files have
none, estimated from the characters.

Why a module of its own: the selector (`oracle.py`) decides what to ask and what a reply means; this only
fetches replies and counts what they cost, the one part of the oracle that knows about batch files.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, NoReturn

from atlas_exp.errors import StageStopped
from atlas_exp.llm.client import ChatClient, Reply
from atlas_exp.selectors.oracle_batch import (
    CHANGED,
    BatchIndex,
    BatchReply,
    request_fingerprint,
    request_line,
    split_custom_id,
    submit_hint,
    write_requests,
)

#: a reply file without token counts is costed at this many characters per token (OpenAI's rule of thumb)
CHARS_PER_TOKEN = 4
#: the name of the judge's reply schema in the request (`response_format`'s json_schema name)
SCHEMA_NAME = "critical_steps"
#: prices are in USD per this many tokens
PRICE_UNIT_TOKENS = 1_000_000


class NotJudged(Exception):
    """No usable reply in the batch files for the request made now (and no live endpoint to ask)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        #: why (`oracle_batch`'s MISSING, ERRORED, CHANGED, UNVERIFIED)
        self.kind = kind


class BatchUsage:
    """The replies read from batch files, their tokens, and their cost at batch prices (thread-safe)."""

    def __init__(self, price: tuple[float, float] | None):
        #: (USD per 1M prompt tokens, per 1M completion tokens) at batch prices; None: unknown model
        self.price = price
        self._lock = threading.Lock()
        self._counts = {"replies": 0, "prompt_tokens": 0, "completion_tokens": 0, "estimated_token_counts": 0}

    @property
    def replies(self) -> int:
        with self._lock:
            return self._counts["replies"]

    def reply(self, found: BatchReply, messages: list[dict[str, str]]) -> Reply:
        """A batch reply as a Reply, counted (token counts estimated when the file has none)."""
        prompt_tokens, completion_tokens = found.prompt_tokens, found.completion_tokens
        estimated = prompt_tokens is None or completion_tokens is None
        if prompt_tokens is None:
            prompt_tokens = sum(len(m["content"]) for m in messages) // CHARS_PER_TOKEN
        if completion_tokens is None:
            completion_tokens = len(found.text) // CHARS_PER_TOKEN
        with self._lock:
            self._counts["replies"] += 1
            self._counts["prompt_tokens"] += prompt_tokens
            self._counts["completion_tokens"] += completion_tokens
            self._counts["estimated_token_counts"] += int(estimated)
        return Reply(found.text, found.finish_reason, prompt_tokens, completion_tokens, format="batch", cached=False)

    def summary(self) -> dict[str, Any]:
        """The counts, the estimated cost (USD) and the prices it used, and whether token counts are estimates."""
        with self._lock:
            out: dict[str, Any] = dict(self._counts)
        if self.price:
            prompt_price, completion_price = self.price
            cost = out["prompt_tokens"] * prompt_price + out["completion_tokens"] * completion_price
            out["cost_usd_estimate"] = round(cost / PRICE_UNIT_TOKENS, 6)
            out["price_usd_per_1m"] = {"prompt": prompt_price, "completion": completion_price}
        else:
            out["cost_usd_estimate"] = 0.0
            out["price_usd_per_1m"] = None
        if out["estimated_token_counts"]:
            out["token_counts"] = f"estimated at {CHARS_PER_TOKEN} characters per token (the files have no usage)"
        return out


class JudgeReplies:
    """The judge's reply to each request: from the cache, the batch files, or the endpoint (module docstring)."""

    def __init__(self, client: ChatClient, *, batch_index: BatchIndex | None, batch_write: str | None, live: bool,
                 judge_ratio: float, batch_price: tuple[float, float] | None):
        self.client = client
        #: the replies of `selector.batch.read`, by request fingerprint; None without it
        self.batch_index = batch_index
        #: where `selector.batch.write` writes the requests still without a reply; None without it
        self.batch_write = batch_write
        #: whether requests may go to the endpoint
        self.live = live
        #: named in the message of a reply that answers another request
        self.judge_ratio = judge_ratio
        self.usage = BatchUsage(batch_price)
        self._lock = threading.Lock()
        self._pending: list[dict[str, Any]] = []
        self._pending_ids: set[str] = set()
        self._not_judged: dict[str, int] = {}

    @property
    def file_mode(self) -> bool:
        """Whether replies come from batch files or go to one (`selector.batch.read` or `.write`)."""
        return self.batch_index is not None or bool(self.batch_write)

    @property
    def has_pending(self) -> bool:
        """Whether requests wait to be written as a batch input file."""
        with self._lock:
            return bool(self._pending)

    def not_judged(self) -> dict[str, int]:
        """How many trajectories were not judged, by why."""
        with self._lock:
            return dict(self._not_judged)

    def ask(self, traj_id: str, messages: list[dict[str, str]], schema: dict[str, Any], *, repair: bool,
            fresh: bool = False) -> Reply | None:
        """The judge's reply to one request: from the cache, the batch files, or the endpoint (when live).

        Returns None when the request was queued for the batch file to write; raises NotJudged when the
        files have no reply to it and nothing may be sent.
        """
        if self.batch_index is not None or not self.live:
            cached = self.client.lookup(messages, schema=schema, name=SCHEMA_NAME)
            if cached is not None:
                return cached
        if self.batch_index is not None:
            body = self.client.request_body(messages, schema=schema, name=SCHEMA_NAME)
            found = self.batch_index.get(request_fingerprint(body))
            if found is not None:
                reply = self.usage.reply(found, messages)
                self.client.store(messages, reply, schema=schema, name=SCHEMA_NAME, origin="batch")
                return reply
        if self.live:
            return self.client.chat(messages, schema=schema, name=SCHEMA_NAME, fresh=fresh)
        if self.batch_write:
            line = request_line(traj_id, self.client.request_body(messages, schema=schema, name=SCHEMA_NAME))
            with self._lock:
                self._pending.append(line)
                self._pending_ids.add(traj_id)
            return None
        if self.batch_index is None:  # pragma: no cover - file mode means read or write
            raise self._not_judged_error("missing", "not judged")
        kind, message = self.batch_index.why_missing(traj_id, repair=repair)
        if kind == CHANGED:
            message += f"; asked now at judge_ratio={self.judge_ratio} with judge model {self.client.model!r}"
        raise self._not_judged_error(kind, message + " (selector.batch.write=PATH writes the missing requests; "
                                                     "selector.batch.live=true sends them)")

    def _not_judged_error(self, kind: str, message: str) -> NotJudged:
        with self._lock:
            self._not_judged[kind] = self._not_judged.get(kind, 0) + 1
        return NotJudged(kind, message)

    def write_batch(self, ids: Sequence[str]) -> NoReturn:
        """Write the queued requests as a batch input file and stop the stage, saying what to do next.

        Lines follow the trajectories' input order (threads queue them in the order they finish), so the
        same selection writes the same file.
        """
        assert self.batch_write is not None
        n_trajectories = len(ids)
        order = {traj_id: i for i, traj_id in enumerate(ids)}

        def input_order(line: dict[str, Any]) -> int:
            traj_id, _ = split_custom_id(line["custom_id"])
            return order.get(traj_id, n_trajectories)

        with self._lock:
            self._pending.sort(key=input_order)
            lines = list(self._pending)
            n_waiting = len(self._pending_ids)
        path = write_requests(self.batch_write, lines)
        raise StageStopped(submit_hint(path, len(lines), n_waiting, n_trajectories - n_waiting, self.client.model))

    def stats(self) -> dict[str, Any]:
        """The batch part of the selector's summary (only in file mode): the replies read and their cost, the
        files and their lines, the trajectories not judged, whether live requests were allowed."""
        batch = self.usage.summary()
        if self.batch_index is not None:
            batch["files"] = list(self.batch_index.files)
            batch["lines"] = dict(self.batch_index.counts)
        return {"batch": batch, "not_judged": self.not_judged(), "live_requests_allowed": self.live}
