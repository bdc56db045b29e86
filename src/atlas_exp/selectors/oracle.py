"""`selector=oracle`: an LLM judge marks the critical steps of each trajectory (ATLaS, arXiv 2503.02197).

The paper's method: a strong LLM (GPT-4o, temperature 0) reads each expert trajectory, writes a short
plan, and names the critical steps under four criteria (Plan Creation, Critical Observation, Critical
Action, Self Correction); training then supervises only those steps. `ratio` is the *cap*: the judge
may name at most ceil(ratio * n_steps) steps (at least one), so the achieved ratio is at most about
`ratio` and often below it, as in the paper.

What ends up in selection.jsonl per trajectory:
- `plan`: the judge's plan; each selected step has the judge's `category` and one-line `reason`;
- `score`: the judge's rank among its picks, (m - r) / m for the r-th (0-based) of m picks (1.0 for the
  first), 0 for unpicked steps; so top-k on the scores reproduces the judge's first k picks;
- `meta.judge`: `ok` or `failed`; with `attempts` (replies read, including repairs), `cached` (all
  replies came from the cache), `dropped` (valid picks beyond the cap, which we cut in the judge's
  order), and on failure `fallback` and `error`.

`judge_ratio` (default: `ratio`) is the cap the judge is asked with; the selection keeps the judge's first
`judge_cap(n, ratio)` picks (the rule applied to a judge that names too many), so a sweep over ratios asks the
judge once per trajectory, at the largest ratio, and every smaller ratio reads the same cached reply.

Replies can come from files instead of an endpoint (`batch`, see `oracle_batch.py`; `oracle_replies.py` sends
each request to the cache, the files or the endpoint): `batch.read` ingests OpenAI Batch API / vLLM
`run_batch` output files, matched to the request we would send now by its fingerprint (a stale reply is
reported as "not judged: request changed", never used); `batch.write` writes the requests of every trajectory
still without a usable reply (first requests and repairs) as a batch input file and stops the stage
(StageStopped) with how to submit it. Ingested replies enter the reply cache and are costed at batch prices.
Without `batch.live`, nothing is sent to an endpoint in these modes.

A reply is checked (`oracle_prompt.parse_reply`); an invalid one is sent back to the judge with what is
wrong, up to `max_retries` times. Still invalid (or no reply at all after the client's own retries): the
trajectory gets `on_failure` (`random`: the seeded random baseline, `all`: every step, `error`: stop
with an AtlasError naming the trajectory), and the failure is counted in `stats()`.

With no base_url and no API key the judge is an embedded llama.cpp server on SmolLM2-135M
(`oracle_client.py`): a stand-in that runs anywhere, not a judge to train on.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from atlas_exp.config import plain
from atlas_exp.data.trajectory import Trajectory
from atlas_exp.errors import AtlasError, ConfigError
from atlas_exp.llm.client import DEFAULT_PRICES, LLMError, price_for
from atlas_exp.llm.server import LocalServer
from atlas_exp.selectors.base import Selection, Selector, StepChoice, check_ratio
from atlas_exp.selectors.oracle_batch import CHANGED, read_outputs
from atlas_exp.selectors.oracle_client import CLIENT_KEYS, DEFAULT_JUDGE_MODEL, LOCAL_KEYS, open_judge_client
from atlas_exp.selectors.oracle_prompt import (
    InvalidReply,
    build_messages,
    judge_cap,
    parse_reply,
    rank_scores,
    repair_messages,
    reply_schema,
)
from atlas_exp.selectors.oracle_replies import JudgeReplies, NotJudged
from atlas_exp.selectors.random_steps import RandomSelector

log = logging.getLogger(__name__)

ON_FAILURE = ("random", "all", "error")
#: the options of `selector.batch` (module docstring)
_BATCH_KEYS = {"read", "write", "requests", "live"}
#: characters of a failure's error message kept in the selection's meta
_ERROR_CHARS = 500


def _paths(value: Any, option: str) -> list[str]:
    """A path option (`selector.batch.*`) as a list: none, one, or several; anything else is a ConfigError."""
    value = plain(value)
    if value in (None, "", []):
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(path, str) for path in value):
        return list(value)
    raise ConfigError(f"{option} must be a path or a list of paths, got {value!r}")




def _check_known(option: str, given: dict[str, Any], known: set[str]) -> None:
    """A ConfigError naming the options of `given` that are not `known`."""
    unknown = set(given) - known
    if unknown:
        raise ConfigError(f"{option}: unknown option(s) {sorted(unknown)}; known: {sorted(known)}")


class OracleSelector(Selector):
    """Critical steps chosen by an LLM judge, with concurrency, retries, a resumable cache and cost stats."""

    name = "oracle"

    def __init__(
        self,
        ratio: float = 0.3,
        seed: int = 0,
        *,
        client: dict[str, Any] | None = None,
        local: dict[str, Any] | None = None,
        concurrency: int = 4,
        max_retries: int = 3,
        on_failure: str = "random",
        max_turn_chars: int | None = None,
        cache: bool = True,
        cache_dir: str | os.PathLike | None = "outputs/.cache/oracle",
        max_consecutive_failures: int = 20,
        judge_ratio: float | None = None,
        batch: dict[str, Any] | None = None,
        retry_failed: bool = False,
    ):
        super().__init__(ratio=ratio, seed=seed)
        self.server: LocalServer | None = None
        client = dict(plain(client) or {})
        local = dict(plain(local) or {})
        batch = dict(plain(batch) or {})
        _check_known("selector.batch", batch, _BATCH_KEYS)
        self.judge_ratio = self.ratio if judge_ratio is None else check_ratio(judge_ratio)
        if self.judge_ratio < self.ratio:
            raise ConfigError(
                f"selector.judge_ratio={judge_ratio} is below ratio={self.ratio}: the judge must be asked for at "
                "least as many steps as are selected"
            )
        batch_read = _paths(batch.get("read"), "selector.batch.read")
        batch_requests = _paths(batch.get("requests"), "selector.batch.requests")
        batch_write = (_paths(batch.get("write"), "selector.batch.write") or [None])[0]
        file_mode = bool(batch_read or batch_write)
        #: whether requests may go to an endpoint (always, unless the replies come from batch files)
        self.live = not file_mode or bool(batch.get("live", False))
        batch_index = read_outputs(batch_read, batch_requests) if batch_read else None
        _check_known("selector.client", client, CLIENT_KEYS)
        _check_known("selector.local", local, LOCAL_KEYS)
        if on_failure not in ON_FAILURE:
            raise ConfigError(f"selector.on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
        if int(concurrency) < 1:
            raise ConfigError(f"selector.concurrency must be >= 1, got {concurrency!r}")
        if int(max_retries) < 0:
            raise ConfigError(f"selector.max_retries must be >= 0, got {max_retries!r}")
        self.concurrency = int(concurrency)
        self.max_retries = int(max_retries)
        self.on_failure = on_failure
        self.max_turn_chars = int(max_turn_chars) if max_turn_chars else None
        self.max_consecutive_failures = int(max_consecutive_failures)
        self.retry_failed = bool(retry_failed)
        self._fallback = RandomSelector(ratio=self.ratio, seed=self.seed)

        prices = client.get("prices")
        batch_price = price_for(str(client.get("model", DEFAULT_JUDGE_MODEL)),
                                DEFAULT_PRICES if prices is None else prices, batch=True)
        self.client, self.server = open_judge_client(
            client, local, max_retries=self.max_retries, live=self.live,
            cache_path=(Path(cache_dir).expanduser() / "replies.jsonl") if (cache and cache_dir) else None,
        )
        #: where replies come from (cache, batch files, endpoint) and what the batch ones cost
        self.replies = JudgeReplies(self.client, batch_index=batch_index, batch_write=batch_write, live=self.live,
                                    judge_ratio=self.judge_ratio, batch_price=batch_price)
        self._lock = threading.Lock()
        self._counts = {"trajectories": 0, "ok": 0, "failed": 0, "invalid_replies": 0, "over_cap": 0,
                        "dropped_picks": 0, "fallback_random": 0, "fallback_all": 0, "retried_failed": 0}
        self._consecutive_transport_failures = 0
        self._executors: set[ThreadPoolExecutor] = set()
        self._closed = False

    # --------------------------------------------------------------------------------- selection

    def select(self, trajectories: Sequence[Trajectory]) -> Iterator[Selection]:
        """Judge up to `concurrency` trajectories at once, yielding in input order.

        At most 2 x concurrency trajectories are submitted ahead of the one being yielded, so stopping
        early (close(), Ctrl-C, a crash) abandons only those; everything answered is already in the cache.
        """
        if self._closed:
            raise AtlasError("selector=oracle: select() after close()")
        executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="oracle")
        self._executors.add(executor)
        todo = iter(trajectories)
        in_flight: deque[Future[Selection]] = deque(
            executor.submit(self.select_one, traj) for traj in itertools.islice(todo, 2 * self.concurrency)
        )
        try:
            while in_flight:
                sel = in_flight.popleft().result()
                following = next(todo, None)
                if following is not None:
                    in_flight.append(executor.submit(self.select_one, following))
                yield sel
        finally:
            for future in in_flight:
                future.cancel()
            executor.shutdown(wait=True, cancel_futures=True)
            self._executors.discard(executor)
        if self.replies.has_pending:
            self.replies.write_batch([t.id for t in trajectories])
        changed = self.replies.not_judged().get(CHANGED, 0)
        if changed:
            log.warning(
                "oracle: %d of %d trajectories not judged: their replies in selector.batch.read answer other "
                "requests (prompt, judge model %r, trajectory, or the cap: asked now at judge_ratio=%s)",
                changed, len(trajectories), self.client.model, self.judge_ratio,
            )

    def select_one(self, traj: Trajectory, *, fresh: bool = False) -> Selection:
        """Judge one trajectory; `fresh` asks the judge again instead of reading cached replies (retry_failed)."""
        n = traj.n_steps
        cap = judge_cap(n, self.judge_ratio)
        keep = judge_cap(n, self.ratio)
        base = build_messages(traj, cap, max_turn_chars=self.max_turn_chars)
        schema = reply_schema(n, cap)
        messages = base
        attempts = 0
        all_cached = True
        error = ""
        transport_failure = False
        for _ in range(self.max_retries + 1):
            try:
                reply = self.replies.ask(traj.id, messages, schema, repair=attempts > 0, fresh=fresh)
            except LLMError as e:
                error = f"no reply from the judge: {e}"
                transport_failure = e.transient
                break
            except NotJudged as e:
                error = str(e)
                break
            if reply is None:  # its request went into the batch file to write
                return Selection(id=traj.id, selector=self.name, ratio=self.ratio,
                                 steps=[StepChoice(step=k, score=0.0, selected=False) for k in range(n)],
                                 meta={"judge": "pending"})
            attempts += 1
            all_cached &= reply.cached
            try:
                verdict = parse_reply(reply.text, n_steps=n, cap=cap)
            except InvalidReply as e:
                error = f"invalid reply: {e}"
                if reply.finish_reason == "length":
                    error += " (cut off at selector.client.max_tokens)"
                self._count(invalid_replies=1)
                messages = repair_messages(base, reply.text, str(e), n_steps=n, cap=cap, attempt=attempts)
                continue
            self._transport(ok=True)
            # scores rank all of the judge's picks; the selection is its first `keep` (judge_ratio >= ratio)
            scores = rank_scores(n, verdict.picks)
            pick_of_step = {pick.step: pick for pick in verdict.picks}
            chosen = {pick.step for pick in verdict.picks[:keep]}
            steps = [
                StepChoice(
                    step=k, score=scores[k], selected=k in chosen,
                    category=pick_of_step[k].category if k in pick_of_step else None,
                    reason=pick_of_step[k].reason if k in pick_of_step else None,
                )
                for k in range(n)
            ]
            meta: dict[str, Any] = {"judge": "ok", "model": self.client.model, "attempts": attempts, "cached": all_cached}
            if self.judge_ratio != self.ratio:
                meta.update(judge_ratio=self.judge_ratio, judge_picks=len(verdict.picks))
            if verdict.dropped:
                meta["dropped"] = [pick.step for pick in verdict.dropped]
                self._count(over_cap=1, dropped_picks=len(verdict.dropped))
            self._count(trajectories=1, ok=1)
            return Selection(id=traj.id, selector=self.name, ratio=self.ratio, steps=steps, plan=verdict.plan, meta=meta)
        if self.retry_failed and not fresh and all_cached and attempts and self.live:
            # a failure replayed from the cache: with retry_failed, ask the judge again (only this one)
            self._count(retried_failed=1)
            return self.select_one(traj, fresh=True)
        return self._fail(traj, error, attempts, transport_failure)

    def _fail(self, traj: Trajectory, error: str, attempts: int, transport_failure: bool) -> Selection:
        if self._closed:  # abandoned by close(): neither a judge failure nor a fallback
            raise AtlasError(f"selector=oracle: closed while judging {traj.id!r}")
        where = f"{traj.id!r}" + (f" ({traj.source})" if traj.source else "")
        self._count(trajectories=1, failed=1)
        if transport_failure:
            self._transport(ok=False, error=error)
        if self.on_failure == "error":
            raise AtlasError(
                f"selector=oracle: trajectory {where}: {error} after {attempts} judge repl(y/ies) "
                f"(selector.max_retries={self.max_retries}; set selector.on_failure=random|all to fall back)"
            )
        log.warning("oracle: trajectory %s: %s; falling back to %s", where, error, self.on_failure)
        if self.on_failure == "random":
            sel = self._fallback.select_one(traj)
            self._count(fallback_random=1)
        else:
            sel = Selection(
                id=traj.id, selector=self.name, ratio=self.ratio,
                steps=[StepChoice(step=k, score=1.0, selected=True) for k in range(traj.n_steps)],
            )
            self._count(fallback_all=1)
        sel.selector = self.name
        sel.ratio = self.ratio
        sel.meta = {"judge": "failed", "model": self.client.model, "attempts": attempts,
                    "fallback": self.on_failure, "error": error[:_ERROR_CHARS]}
        return sel

    def _transport(self, *, ok: bool, error: str = "") -> None:
        """Abort when the endpoint looks down, instead of quietly falling back on every trajectory."""
        with self._lock:
            if ok:
                self._consecutive_transport_failures = 0
                return
            self._consecutive_transport_failures += 1
            failures = self._consecutive_transport_failures
        if self.max_consecutive_failures and failures >= self.max_consecutive_failures:
            raise AtlasError(
                f"selector=oracle: {failures} trajectories in a row got no reply from "
                f"{self.client.base_url or 'the OpenAI API'} (last: {error}); stopping "
                f"(selector.max_consecutive_failures). Finished replies are cached; rerun to resume."
            )

    def _count(self, **increments: int) -> None:
        with self._lock:
            for counter, amount in increments.items():
                self._counts[counter] += amount

    # ------------------------------------------------------------------------------------ report

    def stats(self) -> dict[str, Any]:
        """Totals for the summary: trajectories judged / failed / fallen back, invalid replies, cap cuts,
        plus the client's requests, cache hits, tokens and estimated cost (USD), and in batch mode the batch
        replies' (`JudgeReplies.stats`). Never the key."""
        with self._lock:
            counts = dict(self._counts)
        out = {
            "model": self.client.model,
            "embedded_server": self.server is not None,
            "response_format": self.client.format,
            "on_failure": self.on_failure,
            "judge_ratio": self.judge_ratio,
            **counts,
            **self.client.stats.as_dict(),
        }
        if self.replies.file_mode:
            out.update(self.replies.stats())
        return out

    def postfix(self) -> dict[str, str]:
        """A short progress-bar postfix: requests sent, cache hits, tokens, cost so far, failures."""
        client = self.client.stats.as_dict()
        with self._lock:
            failed = self._counts["failed"]
        tokens = client["prompt_tokens"] + client["completion_tokens"]
        extra = {}
        if self.replies.batch_index is not None:
            extra["batch"] = str(self.replies.usage.replies)
        return {
            **extra,
            "req": str(client["requests"]),
            "hit": str(client["cache_hits"]),
            "tok": f"{tokens / 1000:.1f}k" if tokens >= 1000 else str(tokens),
            "usd": f"{client['cost_usd']:.4f}",
            "fail": str(failed),
        }

    def close(self) -> None:
        """Cancel queued work, wait for requests in flight (their replies get cached), close the cache,
        stop the embedded server, and log the totals. Idempotent; also runs on `with` exit."""
        if self._closed:
            return
        self._closed = True
        for executor in list(self._executors):
            executor.shutdown(wait=False, cancel_futures=True)
        self.client.abort()  # stop retry back-offs now
        for executor in list(self._executors):
            executor.shutdown(wait=True)
        self.client.close()
        if self.server is not None:
            self.server.stop()
        totals = self.stats()
        log.info(
            "oracle: %d trajectories (%d failed -> %s), %d requests, %d cache hits, %d+%d tokens, ~$%.4f",
            totals["trajectories"], totals["failed"], totals["on_failure"], totals["requests"], totals["cache_hits"],
            totals["prompt_tokens"], totals["completion_tokens"], totals["cost_usd"],
        )

    def __enter__(self) -> "OracleSelector":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten close() must not leave a server running
        try:
            if not self._closed and self.server is not None:
                self.server.stop()
        except Exception:
            pass
