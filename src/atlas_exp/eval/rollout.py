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

An episode can also start part-way through a recorded one (`EpisodeTask.start`, an `EpisodeStart`): the env
is reset to the recorded item, the recorded replies are replayed (each recorded observation checked, whitespace
aside, so a non-deterministic env is caught rather than silently continued from another state), and the
policy continues from the recorded conversation so far. This is how `selector=rollout_value` estimates the
value of the states of an expert trajectory; `turns` and `max_turns` count the policy's own replies only.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from atlas_exp.envs.base import Env, EpisodeSpec, StepResult
from atlas_exp.eval.policy_base import Message, NoReply, Policy

log = logging.getLogger(__name__)

#: how an episode can end
ENDS = ("done", "max_turns", "context_limit", "no_reply", "env_error")


def same_text(a: str, b: str, match: str = "exact") -> bool:
    """Whether two observations are the same text up to whitespace (runs of blanks, line breaks, ends).

    `match="unordered"` also ignores the order of lines and of the words within each line (punctuation aside):
    ScienceWorld lists objects in hash-set order, which AgentGym's JVM randomised, so its recordings show the
    same objects, states and numbers in another order (tests/test_sciworld_env.py measures it).
    """
    if match == "unordered":
        def bag(text: str) -> list[tuple[str, ...]]:
            return sorted(tuple(sorted(re.findall(r"[^\s,.()]+", line))) for line in text.split("\n") if line.strip())

        return bag(a) == bag(b)
    if match != "exact":
        raise ValueError(f"observation match must be exact or unordered, got {match!r}")
    return a.split() == b.split()


class PrefixMismatch(RuntimeError):
    """Replaying recorded replies did not reproduce the recorded observations (or ended the episode early).

    `step` is the recorded step whose observation differs (-1: the first observation, after reset)."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


@dataclass(frozen=True, eq=False)
class EpisodeStart:
    """Start an episode after the first replies of a recorded one instead of at the env's reset.

    `history`: the conversation the policy continues (the recorded messages up to the state, ending with the
    observation it answers). `replies`: the recorded assistant replies to replay into the env, in order (the env
    extracts each action as it does for the policy's replies). `observations`: what the recording shows after
    reset and after each reply (`len(replies) + 1` texts), checked during the replay; empty: not checked.
    """

    history: tuple[Message, ...]
    replies: tuple[str, ...] = ()
    observations: tuple[str, ...] = ()
    #: how observations are compared (`same_text`): exact (whitespace aside) | unordered
    match: str = "exact"


def env_action(env: Env, reply: str) -> tuple[str, bool]:
    """The action a reply sends to `env` and whether the reply had one (else its last line is sent)."""
    action = env.action_from_reply(reply)
    if action is None:
        return _fallback_action(reply), False
    return action, True


def replay(env: Env, first: str, start: EpisodeStart, *, stop_at_done: bool = False) -> list[StepResult]:
    """Replay `start.replies` into `env`, just reset (its first observation `first`); the step results.

    Raises PrefixMismatch when an observation differs from `start.observations` or the env ends the episode
    before the last reply, unless `stop_at_done`: then the results end there (some recordings go on after the
    task is complete, e.g. ScienceWorld's final "wait1"; what follows cannot change the outcome).
    """
    obs = start.observations
    if obs and not same_text(first, obs[0], start.match):
        raise PrefixMismatch(-1, f"the first observation differs from the recorded one: {first[:200]!r} vs {obs[0][:200]!r}")
    results = []
    for i, reply in enumerate(start.replies):
        res = env.step(env_action(env, reply)[0])
        results.append(res)
        if obs and i + 1 < len(obs) and not same_text(res.observation, obs[i + 1], start.match):
            raise PrefixMismatch(i, f"the observation after step {i} differs from the recorded one: "
                                    f"{res.observation[:200]!r} vs {obs[i + 1][:200]!r}")
        if res.done and i + 1 < len(start.replies):
            if stop_at_done:
                return results
            raise PrefixMismatch(i, f"the env ended the episode at step {i}, but {len(start.replies) - i - 1} "
                                    "recorded step(s) follow")
    return results


@dataclass(frozen=True)
class EpisodeTask:
    """One episode to play: which task (env config) and which episode of it.

    `start`: continue a recorded episode part-way (see `EpisodeStart`); None: play from the env's reset.
    `pool`: the `EnvPool` entry whose envs play it (default: `task`), so that many tasks of one env (a
    selector's restart points) share its instances.
    """

    task: str
    episode: int | str | EpisodeSpec
    start: EpisodeStart | None = None
    pool: str | None = None

    @property
    def pool_key(self) -> str:
        return self.pool or self.task

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
    #: recorded replies replayed before the policy's first turn (`EpisodeTask.start`); env steps = this + turns
    replayed: int = 0

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
    remaining: dict[str, int] = {}  # per env pool
    for t, _ in pending:
        remaining[t.pool_key] = remaining.get(t.pool_key, 0) + 1
    live: list[_Live] = []

    def turn_cap(task: str) -> int:
        return int(max_turns[task]) if isinstance(max_turns, dict) else int(max_turns)

    def failed(ep: _Live, error: str) -> EpisodeResult | None:
        """An env error: retry the episode on a fresh env, or give up and record it."""
        if ep.attempt < env_retries:
            log.warning("eval: %s episode %s: %s; retrying on a fresh env", ep.task.task, ep.task.episode_id, error)
            pool.discard(ep.task.pool_key, ep.env)
            pending.appendleft((ep.task, ep.attempt + 1))
            return None
        return finish(ep, "env_error", error=error, discard=True)

    def finish(ep: _Live, end: str, success: bool = False, error: str = "", discard: bool = False) -> EpisodeResult:
        key = ep.task.pool_key
        if discard:
            pool.discard(key, ep.env)
        else:
            pool.release(key, ep.env)
        remaining[key] -= 1
        if remaining[key] == 0:
            pool.close_task(key)
        return EpisodeResult(
            task=ep.task.task, env=ep.env.name, episode=ep.task.episode_id, success=success,
            score=1.0 if success else min(max(ep.score, 0.0), 1.0), reward=ep.reward, turns=ep.turns, end=end,
            invalid_actions=ep.invalid, seconds=round(time.time() - ep.t0, 3), messages=ep.messages, error=error,
            attempts=ep.attempt + 1, replayed=len(ep.task.start.replies) if ep.task.start else 0,
        )

    while pending or live:
        while pending and len(live) < batch_size:
            t, attempt = pending.popleft()
            env = pool.acquire(t.pool_key)
            ep = _Live(task=t, env=env, messages=[], t0=time.time(), attempt=attempt)
            try:
                first = env.reset(t.episode)
            except Exception as e:
                res = failed(ep, f"reset: {type(e).__name__}: {e}")
                if res is not None:
                    yield res
                continue
            if t.start is None:
                ep.messages = [
                    {"role": "user", "content": env.instruction()},
                    {"role": "assistant", "content": env.ack},
                    {"role": "user", "content": first},
                ]
            else:
                try:
                    replayed = replay(env, first, t.start)
                except Exception as e:
                    res = failed(ep, f"prefix replay: {type(e).__name__}: {e}")
                    if res is not None:
                        yield res
                    continue
                for r in replayed:
                    ep.reward += float(r.reward)
                    if "score" in r.info:
                        ep.score = float(r.info["score"])
                if replayed and replayed[-1].done:  # the recording's last step ended it: nothing to continue
                    yield finish(ep, "done", success=bool(replayed[-1].success))
                    continue
                ep.messages = [dict(m) for m in t.start.history]
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
            action, valid = env_action(ep.env, reply)
            ep.invalid += not valid
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
