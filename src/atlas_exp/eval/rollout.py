"""The agent loop: many episodes in flight, one batched policy call per turn.

Each episode is the conversation the model was trained on: the env's instruction, the fixed
acknowledgement, the first observation, then the model's ReAct replies and the env's observations in turn.
Up to `batch_size` episodes run at once, each in its own env instance (envs are not thread-safe); every
round, the replies of all of them come from one `policy.generate` call, which is where batching pays
(issue 6 measures it). Env steps run in this thread: they are cheap next to generation.

An episode ends when the env says done, after `max_turns` replies, when its conversation no longer fits
the model (`context_limit`), when the policy cannot reply, or when the env raises. An env that raises (a
ScienceWorld JVM that died, a game file that fails to load) is closed and replaced by a fresh one, and the
episode is played again from the start, once (`env_retries`); a second failure is recorded as `env_error`
with the message: one broken episode must not take a 200-episode evaluation down with it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from atlas_exp.envs.base import Env, EpisodeSpec
from atlas_exp.eval.policy import Message, NoReply, Policy

log = logging.getLogger(__name__)

#: how an episode can end
ENDS = ("done", "max_turns", "context_limit", "no_reply", "env_error")


@dataclass(frozen=True)
class EpisodeTask:
    """One episode to play: which task (env config) and which episode of it."""

    task: str
    episode: int | str | EpisodeSpec

    @property
    def episode_id(self) -> str:
        e = self.episode
        return (e.id or repr(e)) if isinstance(e, EpisodeSpec) else str(e)


@dataclass
class EpisodeResult:
    """A played episode, as one line of `eval/episodes.jsonl`."""

    task: str
    env: str
    episode: str
    success: bool
    #: the env's own progress measure in [0, 1] (ScienceWorld's score / 100); equals success elsewhere
    score: float
    reward: float
    turns: int
    end: str
    invalid_actions: int
    seconds: float
    messages: list[Message] = field(default_factory=list)
    error: str = ""
    #: how many times the episode was started (2 after an env failure and its retry)
    attempts: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Live:
    task: EpisodeTask
    env: Env
    messages: list[Message]
    t0: float
    attempt: int = 0
    turns: int = 0
    reward: float = 0.0
    score: float = 0.0
    invalid: int = 0


class EnvPool:
    """Env instances per task, created on first use and reused across that task's episodes."""

    def __init__(self, factories: dict[str, Callable[[], Env]]):
        self.factories = factories
        self.free: dict[str, list[Env]] = {}
        self.all: dict[str, list[Env]] = {}

    def acquire(self, task: str) -> Env:
        free = self.free.setdefault(task, [])
        if free:
            return free.pop()
        env = self.factories[task]()
        self.all.setdefault(task, []).append(env)
        return env

    def release(self, task: str, env: Env) -> None:
        self.free.setdefault(task, []).append(env)

    def discard(self, task: str, env: Env) -> None:
        """Close an env that failed and forget it; the next `acquire` builds a fresh one."""
        with contextlib.suppress(Exception):
            env.close()
        envs = self.all.get(task, [])
        if env in envs:
            envs.remove(env)

    def close_task(self, task: str) -> None:
        for env in self.all.pop(task, []):
            try:
                env.close()
            except Exception as e:  # closing must not hide the results
                log.warning("eval: closing a %s env failed: %s", task, e)
        self.free.pop(task, None)

    def close(self) -> None:
        for task in list(self.all):
            self.close_task(task)


def _fallback_action(reply: str) -> str:
    """What an unparseable reply sends: its last non-empty line (the env answers that it is not valid)."""
    lines = [ln.strip() for ln in reply.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def run_episodes(
    tasks: Iterable[EpisodeTask],
    pool: EnvPool,
    policy: Policy,
    *,
    batch_size: int = 16,
    max_turns: int | dict[str, int] = 30,
    env_retries: int = 1,
) -> Iterator[EpisodeResult]:
    """Play every task's episode; yield each result as soon as its episode ends.

    Episodes start in the order given, so a task's envs are released (`pool.close_task`) as soon as its
    last episode is done and heavy envs (a JVM per ScienceWorld env) do not pile up across tasks.
    """
    pending: deque[tuple[EpisodeTask, int]] = deque((t, 0) for t in tasks)
    remaining: dict[str, int] = {}
    for t, _ in pending:
        remaining[t.task] = remaining.get(t.task, 0) + 1
    live: list[_Live] = []

    def turn_cap(task: str) -> int:
        return int(max_turns[task]) if isinstance(max_turns, dict) else int(max_turns)

    def failed(ep: _Live, error: str) -> EpisodeResult | None:
        """An env error: retry the episode on a fresh env, or give up and record it."""
        if ep.attempt < env_retries:
            log.warning("eval: %s episode %s: %s; retrying on a fresh env", ep.task.task, ep.task.episode_id, error)
            pool.discard(ep.task.task, ep.env)
            pending.appendleft((ep.task, ep.attempt + 1))
            return None
        return finish(ep, "env_error", error=error, discard=True)

    def finish(ep: _Live, end: str, success: bool = False, error: str = "", discard: bool = False) -> EpisodeResult:
        if discard:
            pool.discard(ep.task.task, ep.env)
        else:
            pool.release(ep.task.task, ep.env)
        remaining[ep.task.task] -= 1
        if remaining[ep.task.task] == 0:
            pool.close_task(ep.task.task)
        return EpisodeResult(
            task=ep.task.task, env=ep.env.name, episode=ep.task.episode_id, success=success,
            score=1.0 if success else min(max(ep.score, 0.0), 1.0), reward=ep.reward, turns=ep.turns, end=end,
            invalid_actions=ep.invalid, seconds=round(time.time() - ep.t0, 3), messages=ep.messages, error=error,
            attempts=ep.attempt + 1,
        )

    while pending or live:
        while pending and len(live) < batch_size:
            t, attempt = pending.popleft()
            env = pool.acquire(t.task)
            ep = _Live(task=t, env=env, messages=[], t0=time.time(), attempt=attempt)
            try:
                first = env.reset(t.episode)
            except Exception as e:
                res = failed(ep, f"reset: {type(e).__name__}: {e}")
                if res is not None:
                    yield res
                continue
            ep.messages = [
                {"role": "user", "content": env.instruction()},
                {"role": "assistant", "content": env.ack},
                {"role": "user", "content": first},
            ]
            live.append(ep)
        if not live:
            continue
        replies = policy.generate([ep.messages for ep in live])
        still: list[_Live] = []
        for ep, reply in zip(live, replies):
            if isinstance(reply, NoReply):
                yield finish(ep, reply.reason, error=reply.detail)
                continue
            ep.messages.append({"role": "assistant", "content": reply})
            ep.turns += 1
            action = ep.env.action_from_reply(reply)
            if action is None:
                ep.invalid += 1
                action = _fallback_action(reply)
            try:
                res = ep.env.step(action)
            except Exception as e:
                failure = failed(ep, f"step {action!r}: {type(e).__name__}: {e}")
                if failure is not None:
                    yield failure
                continue
            ep.reward += float(res.reward)
            if "score" in res.info:
                ep.score = float(res.info["score"])
            ep.messages.append({"role": "user", "content": res.observation})
            if res.done:
                # an env that stops at its own step cap is a turn limit too, not a verdict of the game
                end = "max_turns" if res.info.get("truncated") and not res.success else "done"
                yield finish(ep, end, success=bool(res.success))
            elif ep.turns >= turn_cap(ep.task.task):
                yield finish(ep, "max_turns")
            else:
                still.append(ep)
        live = still
