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

Replies can come from files instead of an endpoint (`batch`, see `oracle_batch.py`): `batch.read` ingests
OpenAI Batch API / vLLM `run_batch` output files, matched to the request we would send now by its
fingerprint (a stale reply is reported as "not judged: request changed", never used); `batch.write` writes
the requests of every trajectory still without a usable reply (first requests and repairs) as a batch input
file and stops the stage (StageStopped) with how to submit it. Ingested replies enter the reply cache and are
costed at batch prices. Without `batch.live`, nothing is sent to an endpoint in these modes.

A reply is checked (`oracle_prompt.parse_reply`); an invalid one is sent back to the judge with what is
wrong, up to `max_retries` times. Still invalid (or no reply at all after the client's own retries): the
trajectory gets `on_failure` (`random`: the seeded random baseline, `all`: every step, `error`: stop
with an AtlasError naming the trajectory), and the failure is counted in `stats()`.

With no base_url and no API key the judge is an embedded llama.cpp server on SmolLM2-135M: a stand-in
that runs anywhere, not a judge to train on.
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

from atlas_exp.data.trajectory import Trajectory
from atlas_exp.errors import AtlasError, ConfigError, StageStopped
from atlas_exp.llm.client import DEFAULT_PRICES, ChatClient, LLMError, Reply, price_for
from atlas_exp.llm.server import LocalServer
from atlas_exp.selectors.base import Selection, Selector, StepChoice, check_ratio
from atlas_exp.selectors.oracle_batch import (
    CHANGED,
    BatchReply,
    read_outputs,
    request_fingerprint,
    request_line,
    split_custom_id,
    submit_hint,
    write_requests,
)
from atlas_exp.selectors.oracle_prompt import (
    InvalidReply,
    build_messages,
    judge_cap,
    parse_reply,
    rank_scores,
    repair_messages,
    reply_schema,
)
from atlas_exp.selectors.random_steps import RandomSelector

log = logging.getLogger(__name__)

ON_FAILURE = ("random", "all", "error")
#: client options that may be given under `selector.client` (besides the ones taken from the selector)
_CLIENT_KEYS = {
    "base_url", "model", "api_key_env", "temperature", "max_tokens", "timeout", "backoff_base",
    "backoff_max", "response_format", "schema_bounds", "seed", "extra_body", "prices",
}
_LOCAL_KEYS = {"model_path", "n_ctx", "n_threads", "startup_timeout", "log_path", "verbose", "extra_args"}
_BATCH_KEYS = {"read", "write", "requests", "live"}
#: a reply file without token counts is costed at this many characters per token (OpenAI's rule of thumb)
CHARS_PER_TOKEN = 4


class _NotJudged(Exception):
    """No usable reply in the batch files for the request made now (and no live endpoint to ask)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _paths(value: Any, option: str) -> list[str]:
    value = _plain(value)
    if value in (None, "", []):
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{option} must be a path or a list of paths, got {value!r}")


def _plain(x: Any) -> Any:
    """Hydra hands nested options over as DictConfig; the client wants plain dicts."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(x, (DictConfig, ListConfig)):
            return OmegaConf.to_container(x, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return x


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
        client = dict(_plain(client) or {})
        local = dict(_plain(local) or {})
        batch = dict(_plain(batch) or {})
        unknown = set(batch) - _BATCH_KEYS
        if unknown:
            raise ConfigError(f"selector.batch: unknown option(s) {sorted(unknown)}; known: {sorted(_BATCH_KEYS)}")
        self.judge_ratio = self.ratio if judge_ratio is None else check_ratio(judge_ratio)
        if self.judge_ratio < self.ratio:
            raise ConfigError(
                f"selector.judge_ratio={judge_ratio} is below ratio={self.ratio}: the judge must be asked for at "
                "least as many steps as are selected"
            )
        batch_read = _paths(batch.get("read"), "selector.batch.read")
        batch_requests = _paths(batch.get("requests"), "selector.batch.requests")
        self.batch_write = (_paths(batch.get("write"), "selector.batch.write") or [None])[0]
        file_mode = bool(batch_read or self.batch_write)
        #: whether requests may go to an endpoint (always, unless the replies come from batch files)
        self.live = not file_mode or bool(batch.get("live", False))
        self.batch_index = read_outputs(batch_read, batch_requests) if batch_read else None
        self._pending: list[dict[str, Any]] = []
        self._pending_ids: set[str] = set()
        unknown = set(client) - _CLIENT_KEYS
        if unknown:
            raise ConfigError(f"selector.client: unknown option(s) {sorted(unknown)}; known: {sorted(_CLIENT_KEYS)}")
        unknown = set(local) - _LOCAL_KEYS
        if unknown:
            raise ConfigError(f"selector.local: unknown option(s) {sorted(unknown)}; known: {sorted(_LOCAL_KEYS)}")
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

        api_key_env = str(client.pop("api_key_env", None) or "OPENAI_API_KEY")
        api_key = os.environ.get(api_key_env) or None
        base_url = client.pop("base_url", None) or None
        self.server: LocalServer | None = None
        prices = client.get("prices")
        self._batch_price = price_for(str(client.get("model", "gpt-4o")), DEFAULT_PRICES if prices is None else prices,
                                      batch=True)
        if base_url is None and api_key is None and self.live:
            # the embedded default: no endpoint and no key configured
            self.server = LocalServer(**local)
            log.warning(
                "selector=oracle: no selector.client.base_url and no $%s, so the judge is an embedded "
                "llama.cpp server on %s. A model this small is only a stand-in that exercises the "
                "pipeline; its selections are not the paper's. Set base_url/api key for a real judge.",
                api_key_env, Path(self.server.model_path).name,
            )
            base_url = self.server.start()
            client["model"] = self.server.alias  # cache entries must never pass for another model's
            client["prices"] = {}  # local compute: no bill
            if client.get("response_format", "auto") == "auto":
                # we know this server: it takes a schema only in its own json_object dialect
                client["response_format"] = "json_object_schema"
        try:
            self.client = ChatClient(
                base_url=base_url,
                api_key=api_key,
                api_key_env=api_key_env,
                max_retries=self.max_retries,
                cache_path=(Path(cache_dir).expanduser() / "replies.jsonl") if (cache and cache_dir) else None,
                **{"model": "gpt-4o", **client},
            )
        except BaseException:
            if self.server is not None:
                self.server.stop()
            raise
        self._lock = threading.Lock()
        self._counts = {"trajectories": 0, "ok": 0, "failed": 0, "invalid_replies": 0, "over_cap": 0,
                        "dropped_picks": 0, "fallback_random": 0, "fallback_all": 0, "retried_failed": 0}
        self._batch_counts = {"replies": 0, "prompt_tokens": 0, "completion_tokens": 0, "estimated_token_counts": 0}
        self._not_judged: dict[str, int] = {}
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
        ex = ThreadPoolExecutor(self.concurrency, thread_name_prefix="oracle")
        self._executors.add(ex)
        it = iter(trajectories)
        pending: deque[Future[Selection]] = deque(ex.submit(self.select_one, t) for t in itertools.islice(it, 2 * self.concurrency))
        try:
            while pending:
                sel = pending.popleft().result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(ex.submit(self.select_one, nxt))
                yield sel
        finally:
            for f in pending:
                f.cancel()
            ex.shutdown(wait=True, cancel_futures=True)
            self._executors.discard(ex)
        if self._pending:
            self._write_batch([t.id for t in trajectories])
        changed = self._not_judged.get(CHANGED, 0)
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
                reply = self._ask(traj, messages, schema, repair=attempts > 0, fresh=fresh)
            except LLMError as e:
                error = f"no reply from the judge: {e}"
                transport_failure = e.transient
                break
            except _NotJudged as e:
                error = str(e)
                with self._lock:
                    self._not_judged[e.kind] = self._not_judged.get(e.kind, 0) + 1
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
            by_step = {p.step: p for p in verdict.picks}
            chosen = {p.step for p in verdict.picks[:keep]}
            steps = [
                StepChoice(
                    step=k, score=scores[k], selected=k in chosen,
                    category=by_step[k].category if k in by_step else None,
                    reason=by_step[k].reason if k in by_step else None,
                )
                for k in range(n)
            ]
            meta: dict[str, Any] = {"judge": "ok", "model": self.client.model, "attempts": attempts, "cached": all_cached}
            if self.judge_ratio != self.ratio:
                meta.update(judge_ratio=self.judge_ratio, judge_picks=len(verdict.picks))
            if verdict.dropped:
                meta["dropped"] = [p.step for p in verdict.dropped]
                self._count(over_cap=1, dropped_picks=len(verdict.dropped))
            self._count(trajectories=1, ok=1)
            return Selection(id=traj.id, selector=self.name, ratio=self.ratio, steps=steps, plan=verdict.plan, meta=meta)
        if self.retry_failed and not fresh and all_cached and attempts and self.live:
            # a failure replayed from the cache: with retry_failed, ask the judge again (only this one)
            with self._lock:
                self._counts["retried_failed"] += 1
            return self.select_one(traj, fresh=True)
        return self._fail(traj, error, attempts, transport_failure)

    def _ask(self, traj: Trajectory, messages: list[dict[str, str]], schema: dict[str, Any], *, repair: bool,
             fresh: bool = False) -> Reply | None:
        """The judge's reply to one request: from the cache, the batch files, or the endpoint (when live).

        Returns None when the request was queued for the batch file to write; raises _NotJudged when the
        files have no reply to it and nothing may be sent.
        """
        name = "critical_steps"
        if self.batch_index is not None or not self.live:
            hit = self.client.lookup(messages, schema=schema, name=name)
            if hit is not None:
                return hit
        if self.batch_index is not None:
            body = self.client.request_body(messages, schema=schema, name=name)
            found = self.batch_index.get(request_fingerprint(body))
            if found is not None:
                reply = self._from_batch(found, messages)
                self.client.store(messages, reply, schema=schema, name=name, origin="batch")
                return reply
        if self.live:
            return self.client.chat(messages, schema=schema, name=name, fresh=fresh)
        if self.batch_write:
            line = request_line(traj.id, self.client.request_body(messages, schema=schema, name=name))
            with self._lock:
                self._pending.append(line)
                self._pending_ids.add(traj.id)
            return None
        if self.batch_index is None:  # pragma: no cover - file mode means read or write
            raise _NotJudged("missing", "not judged")
        kind, message = self.batch_index.why_missing(traj.id, repair=repair)
        if kind == CHANGED:
            message += f"; asked now at judge_ratio={self.judge_ratio} with judge model {self.client.model!r}"
        raise _NotJudged(kind, message + " (selector.batch.write=PATH writes the missing requests; "
                                         "selector.batch.live=true sends them)")

    def _from_batch(self, found: BatchReply, messages: list[dict[str, str]]) -> Reply:
        """A batch reply as a Reply, counted at batch prices (token counts estimated when the file has none)."""
        p, c = found.prompt_tokens, found.completion_tokens
        estimated = p is None or c is None
        if p is None:
            p = sum(len(m["content"]) for m in messages) // CHARS_PER_TOKEN
        if c is None:
            c = len(found.text) // CHARS_PER_TOKEN
        with self._lock:
            self._batch_counts["replies"] += 1
            self._batch_counts["prompt_tokens"] += p
            self._batch_counts["completion_tokens"] += c
            self._batch_counts["estimated_token_counts"] += int(estimated)
        return Reply(found.text, found.finish_reason, p, c, format="batch", cached=False)

    def _write_batch(self, ids: Sequence[str]) -> None:
        """Write the queued requests as a batch input file and stop the stage, saying what to do next.

        Lines follow the trajectories' input order (threads queue them in the order they finish), so the
        same selection writes the same file.
        """
        assert self.batch_write is not None
        n_trajectories = len(ids)
        order = {tid: i for i, tid in enumerate(ids)}
        self._pending.sort(key=lambda line: order.get(split_custom_id(line["custom_id"])[0], n_trajectories))
        path = write_requests(self.batch_write, self._pending)
        n_waiting = len(self._pending_ids)
        raise StageStopped(submit_hint(path, len(self._pending), n_waiting, n_trajectories - n_waiting, self.client.model))

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
                    "fallback": self.on_failure, "error": error[:500]}
        return sel

    def _transport(self, *, ok: bool, error: str = "") -> None:
        """Abort when the endpoint looks down, instead of quietly falling back on every trajectory."""
        with self._lock:
            if ok:
                self._consecutive_transport_failures = 0
                return
            self._consecutive_transport_failures += 1
            n = self._consecutive_transport_failures
        if self.max_consecutive_failures and n >= self.max_consecutive_failures:
            raise AtlasError(
                f"selector=oracle: {n} trajectories in a row got no reply from "
                f"{self.client.base_url or 'the OpenAI API'} (last: {error}); stopping "
                f"(selector.max_consecutive_failures). Finished replies are cached; rerun to resume."
            )

    def _count(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                self._counts[k] += v

    # ------------------------------------------------------------------------------------ report

    def stats(self) -> dict[str, Any]:
        """Totals for the summary: trajectories judged / failed / fallen back, invalid replies, cap cuts,
        plus the client's requests, cache hits, tokens and estimated cost (USD). Never the key."""
        with self._lock:
            counts = dict(self._counts)
            batch = dict(self._batch_counts)
            not_judged = dict(self._not_judged)
        out = {
            "model": self.client.model,
            "embedded_server": self.server is not None,
            "response_format": self.client.format,
            "on_failure": self.on_failure,
            "judge_ratio": self.judge_ratio,
            **counts,
            **self.client.stats.as_dict(),
        }
        if self.batch_index is not None or self.batch_write:
            price = self._batch_price
            batch["cost_usd_estimate"] = (
                round((batch["prompt_tokens"] * price[0] + batch["completion_tokens"] * price[1]) / 1e6, 6)
                if price else 0.0
            )
            batch["price_usd_per_1m"] = {"prompt": price[0], "completion": price[1]} if price else None
            if batch["estimated_token_counts"]:
                batch["token_counts"] = f"estimated at {CHARS_PER_TOKEN} characters per token (the files have no usage)"
            if self.batch_index is not None:
                batch["files"] = list(self.batch_index.files)
                batch["lines"] = dict(self.batch_index.counts)
            out["batch"] = batch
            out["not_judged"] = not_judged
            out["live_requests_allowed"] = self.live
        return out

    def postfix(self) -> dict[str, str]:
        """A short progress-bar postfix: requests sent, cache hits, tokens, cost so far, failures."""
        s = self.client.stats.as_dict()
        with self._lock:
            failed = self._counts["failed"]
        tok = s["prompt_tokens"] + s["completion_tokens"]
        extra = {}
        if self.batch_index is not None:
            with self._lock:
                extra["batch"] = str(self._batch_counts["replies"])
        return {
            **extra,
            "req": str(s["requests"]),
            "hit": str(s["cache_hits"]),
            "tok": f"{tok / 1000:.1f}k" if tok >= 1000 else str(tok),
            "usd": f"{s['cost_usd']:.4f}",
            "fail": str(failed),
        }

    def close(self) -> None:
        """Cancel queued work, wait for requests in flight (their replies get cached), close the cache,
        stop the embedded server, and log the totals. Idempotent; also runs on `with` exit."""
        if self._closed:
            return
        self._closed = True
        for ex in list(self._executors):
            ex.shutdown(wait=False, cancel_futures=True)
        self.client.abort()  # stop retry back-offs now
        for ex in list(self._executors):
            ex.shutdown(wait=True)
        self.client.close()
        if self.server is not None:
            self.server.stop()
        s = self.stats()
        log.info(
            "oracle: %d trajectories (%d failed -> %s), %d requests, %d cache hits, %d+%d tokens, ~$%.4f",
            s["trajectories"], s["failed"], s["on_failure"], s["requests"], s["cache_hits"],
            s["prompt_tokens"], s["completion_tokens"], s["cost_usd"],
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
