"""`selector=rollout_value`: a step is critical when taking it changes how likely the task is to be solved.

Why: the oracle asks a judge which steps matter and perplexity asks a language model which steps surprise it;
neither looks at the environment. Here the environment answers: from the state before each expert step we let
a policy (the untrained base model by default) finish the task several times, and the mean outcome estimates
the state's value. A step whose taking raises that value a lot is one the base model would not have found on
its own, which is what supervision should concentrate on (IPR-style step rewards, Xiong et al. 2024).

Definitions, for a trajectory of n expert steps 0..n-1 (step k answers observation k):

* State s_k (k = 0..n): the env reset to the trajectory's item and the expert's replies 0..k-1 replayed into
  it; the policy continues from the recorded conversation up to observation k (so it sees exactly the
  context the expert saw).
* V(s_k) for k < n: the mean over `rollouts` continuations (sampled at `temperature`, at most `max_turns`
  policy replies each) of the outcome, `value: success` (1/0) or `value: score` (the env's progress in
  [0, 1]; ScienceWorld's score, success elsewhere). A continuation that hits the turn cap, outgrows the
  policy's context or gets no reply scores 0 (success) or the score reached (score).
* V(s_n), after the last expert step: the expert's own outcome, from the replay of all its replies, when the
  env ended the episode there (the usual case); otherwise (a recording cut short) it is estimated by
  rollouts like the others. So a trajectory needs n restart points, n + 1 when its replay does not end.
* A recording that goes on after the env ended the episode (ScienceWorld's final "wait1" after success):
  the steps after the end cannot change the outcome, so V(s_k) there is the outcome and their advantage 0
  (meta `steps_after_end`); the env is never asked to act after its episode is over.
* Step k's score is its advantage A_k = V(s_{k+1}) - V(s_k), in [-1, 1]: the value the expert's step
  added. The top `n_to_select(n, ratio)` steps are selected; equal advantages are ordered by a seeded random
  rank (seed, trajectory id), never by position, so ties do not favour early or late steps.

Restoring (`eval/restore.py`): the episode is found from the trajectory (TextCraft's first observation, an
AgentGym item id, ALFWorld's `game_file`), and before any rollout every trajectory is replayed in full, each
observation compared with the recorded one (`observation_match`); every rollout's own replay checks them again.
A trajectory that cannot be restored (no item id, an env not configured or not installed, a differing
observation, an episode that ends before the recording does, tool-call turns) is an error naming the
trajectory and step with `on_failure: error`, else the seeded random baseline (`random`) or every step
(`all`); counted in the summary (`failed`, `fallback_*`) either way.

Cost: every restart point plays `rollouts` episodes of up to `max_turns` policy replies, each after a replay
of k expert actions (env steps are cheap; generation is the cost). All restart points of a chunk of
trajectories are in flight together through the rollout engine (`batch_size` episodes at once, one batched
policy call per round). Each finished restart point is written at once to
`<cache_dir>/rollout_values/values.jsonl`, keyed by (trajectory id and content, step, policy identity,
rollouts, seed, turn cap, env config): a rerun, a crashed run resumed, or a sweep over ratios and seeds pays
only for what is missing. Rollouts of one key are not bit-reproducible across batch layouts (sampling), which
is why the cache keeps the first answer rather than recomputing it.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from atlas_exp.artifacts import fingerprint
from atlas_exp.config import plain
from atlas_exp.data.trajectory import Trajectory
from atlas_exp.envs.base import Env, EpisodeSpec
from atlas_exp.errors import ConfigError, DataError
from atlas_exp.eval.restore import NotRestorable, Recording, describe_failure, recording, replay_recording
from atlas_exp.eval.rollout import EnvPool, EpisodeResult, EpisodeTask, run_episodes
from atlas_exp.selectors.base import Selection, Selector, StepChoice, n_to_select
from atlas_exp.selectors.random_steps import RandomSelector
from atlas_exp.selectors.rollout_policy import (
    build_policy,
    check_policy_option,
    is_config,
    policy_identity,
    token_counts,
)

log = logging.getLogger(__name__)

ON_FAILURE = ("random", "all", "error")
VALUES = ("success", "score")
#: version of the cache records; bump when what a record means changes
CACHE_VERSION = 1


# --------------------------------------------------------------------------------------------------
# the selector


@dataclass
class _Plan:
    """A restorable trajectory: its episode, recording, and the expert's replayed outcome."""

    index: int
    traj: Trajectory
    spec: EpisodeSpec
    rec: Recording
    #: V(s_n) when the expert's replay ended the episode, else None (then s_n is a restart point too)
    final: dict[str, float] | None
    last_obs: str
    #: expert steps the env played before it ended the episode (< n when the recording goes on after that)
    played: int = 0
    values: dict[int, float] = field(default_factory=dict)
    outcomes: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def points(self) -> list[int]:
        return list(range(self.played)) if self.final is not None else list(range(self.played + 1))


class RolloutValueSelector(Selector):
    """Scores each step by the value its taking adds, estimated by policy rollouts (module docstring)."""

    name = "rollout_value"

    def __init__(
        self,
        ratio: float = 0.3,
        seed: int = 0,
        policy: Any = None,
        model: Mapping[str, Any] | None = None,
        rollouts: int = 5,
        temperature: float = 0.7,
        max_turns: int | Mapping[str, int] = 20,
        value: str = "success",
        batch_size: int = 16,
        envs: Mapping[str, Any] | None = None,
        observation_match: Mapping[str, str] | None = None,
        on_failure: str = "random",
        chunk_size: int = 64,
        cache: bool = True,
        cache_dir: str = "outputs/.cache",
        progress: bool = True,
    ):
        super().__init__(ratio=ratio, seed=seed)
        self.rollouts = _int_option("rollouts", rollouts)
        self.temperature = float(temperature)
        if self.rollouts > 1 and self.temperature <= 0:
            raise ConfigError(f"selector.temperature={temperature!r} with selector.rollouts={rollouts}: greedy "
                              "continuations are all the same; set a temperature > 0 (or rollouts=1)")
        if isinstance(max_turns, Mapping):
            self.max_turns: int | dict[str, int] = {str(k): _int_option(f"max_turns.{k}", v) for k, v in max_turns.items()}
        else:
            self.max_turns = _int_option("max_turns", max_turns)
        if value not in VALUES:
            raise ConfigError(f"selector.value must be one of {VALUES}, got {value!r}")
        if on_failure not in ON_FAILURE:
            raise ConfigError(f"selector.on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
        self.value = value
        self.batch_size = _int_option("batch_size", batch_size)
        self.chunk_size = _int_option("chunk_size", chunk_size)
        self.on_failure = on_failure
        self.cache_dir = str(cache_dir)
        self.use_cache = bool(cache)
        self.progress = bool(progress)
        self.model_cfg = plain(model) if model is not None else {}
        self.envs = dict(envs or {})
        self.match = {str(k): str(v) for k, v in (observation_match or {}).items()}
        for env, m in self.match.items():
            if m not in ("exact", "unordered"):
                raise ConfigError(f"selector.observation_match.{env}={m!r}: exact or unordered")
        check_policy_option(policy)
        self._policy_spec = policy
        self._policy: Any = None if is_config(policy) else policy
        self.identity = policy_identity(policy, self.temperature, self.model_cfg)
        self._cache: Any = None
        self._fallback = RandomSelector(ratio=self.ratio, seed=self.seed)
        self._env_errors: dict[str, str] = {}
        self._counts: Counter[str] = Counter()
        self._ends: Counter[str] = Counter()
        self._tokens0: dict[str, int] | None = None
        self._tokens_at_close: dict[str, int] = {}
        self._seconds = 0.0

    # ---- cache

    def _key(self, plan: _Plan, k: int) -> str:
        env_cfg = self.envs.get(plan.traj.env)
        return fingerprint(
            "rollout-value", CACHE_VERSION, plan.traj.id, plan.traj.content_hash(), k, self.identity, self.rollouts,
            self.seed, self._turn_cap(plan.traj.env), plain(env_cfg) if is_config(env_cfg) else repr(env_cfg),
            self.match.get(plan.traj.env, "exact"),
        )

    def _open_cache(self) -> Any:
        if self._cache is None and self.use_cache:
            from atlas_exp.llm.client import ReplyCache

            self._cache = ReplyCache(Path(self.cache_dir) / "rollout_values" / "values.jsonl")
        return self._cache

    def _turn_cap(self, env: str) -> int:
        if isinstance(self.max_turns, dict):
            if env not in self.max_turns:
                raise ConfigError(f"selector.max_turns has no entry for env {env!r} (it has {', '.join(self.max_turns)})")
            return self.max_turns[env]
        return self.max_turns

    # ---- resources

    def _env_factory(self, env: str) -> Callable[[], Env]:
        spec = self.envs.get(env)
        if spec is None:
            raise NotRestorable(f"selector.envs has no entry for env {env!r} (it has {', '.join(self.envs) or 'none'})")
        if callable(spec) and not is_config(spec):
            return spec
        from atlas_exp.config import build

        return lambda: build(spec, f"selector.envs.{env}", Env)

    def policy(self) -> Any:
        """The rollout policy, built on first use (a fully cached selection never loads a model)."""
        if self._policy is None:
            self._policy = build_policy(self._policy_spec, self.model_cfg, self.cache_dir, self.seed, self.temperature)
        if self._tokens0 is None:
            self._tokens0 = token_counts(self._policy)
        return self._policy

    def close(self) -> None:
        if self._policy is not None and is_config(self._policy_spec):
            self._tokens_at_close = token_counts(self._policy)  # stats() is read after close (the select stage does)
            self._policy.close()
            self._policy = None
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    # ---- planning: replay every trajectory once, checking the env reproduces it

    def _plan(self, i: int, traj: Trajectory, pool: EnvPool, factories: dict[str, Callable[[], Env]]) -> _Plan:
        rec = recording(traj)
        if traj.env in self._env_errors:
            raise NotRestorable(self._env_errors[traj.env])
        if traj.env not in factories:
            factories[traj.env] = self._env_factory(traj.env)
        try:
            env = pool.acquire(traj.env)
        except Exception as e:
            self._env_errors[traj.env] = f"the {traj.env} env cannot be built: {type(e).__name__}: {e}"
            raise NotRestorable(self._env_errors[traj.env]) from None
        broken = False  # an env that raised is replaced; one that disagreed with the recording is still sound
        try:
            spec, results = replay_recording(env, traj, rec, self.match.get(traj.env, "exact"))
        except NotRestorable as e:
            broken = e.env_failed
            raise
        finally:
            (pool.discard if broken else pool.release)(traj.env, env)
        self._counts["env_steps_check"] += len(results)
        self._counts["steps_after_end"] += len(rec.replies) - len(results)
        last = results[-1]
        final = None
        if last.done:
            final = {"success": float(bool(last.success)),
                     "score": 1.0 if last.success else min(max(float(last.info.get("score", 0.0)), 0.0), 1.0)}
        return _Plan(i, traj, spec, rec, final, last.observation, played=len(results))

    # ---- selection

    def select(self, trajectories: Sequence[Trajectory]) -> Iterator[Selection]:
        trajs = list(trajectories)
        for a in range(0, len(trajs), self.chunk_size):
            yield from self._chunk(trajs[a : a + self.chunk_size], a)

    def select_one(self, traj: Trajectory) -> Selection:
        (sel,) = self.select([traj])
        return sel

    def _chunk(self, trajs: list[Trajectory], offset: int) -> list[Selection]:
        t0 = time.time()
        factories: dict[str, Callable[[], Env]] = {}
        pool = EnvPool(factories)
        plans: dict[int, _Plan] = {}
        failures: dict[int, str] = {}
        try:
            for j, traj in enumerate(trajs):
                try:
                    plans[j] = self._plan(offset + j, traj, pool, factories)
                except NotRestorable as e:
                    failures[j] = describe_failure(traj, e)
                    if self.on_failure == "error":
                        raise DataError(f"{failures[j]} (set selector.on_failure=random|all to fall back)",
                                        source=f"selector=rollout_value trajectory {traj.id!r}") from None
            self._roll(plans, failures, pool)
        finally:
            pool.close()
            self._seconds += time.time() - t0
        out = []
        for j, traj in enumerate(trajs):
            self._counts["trajectories"] += 1
            if j in failures:
                out.append(self._failed(traj, failures[j]))
            else:
                self._counts["ok"] += 1
                out.append(self._selection(plans[j]))
        return out

    def _roll(self, plans: dict[int, _Plan], failures: dict[int, str], pool: EnvPool) -> None:
        """Fill every plan's values: from the cache, else by rollouts (all restart points in flight)."""
        cache = self._open_cache()
        todo: list[tuple[_Plan, int]] = []
        for plan in plans.values():
            for k in plan.points:
                self._counts["restart_points"] += 1
                rec = cache.get(self._key(plan, k)) if cache is not None else None
                if rec is not None and len(rec.get("outcomes", ())) == self.rollouts:
                    plan.outcomes[k] = rec["outcomes"]
                    self._counts["points_cached"] += 1
                else:
                    todo.append((plan, k))
        if todo:
            from tqdm.auto import tqdm

            policy = self.policy()
            names = {f"{plan.index}/{k}": (plan, k) for plan, k in todo}
            tasks = [EpisodeTask(name, plan.spec, start=plan.rec.start(k, plan.last_obs, self.match.get(plan.traj.env, "exact")), pool=plan.traj.env)
                     for name, (plan, k) in names.items() for _ in range(self.rollouts)]
            pending: dict[str, list[EpisodeResult]] = {name: [] for name in names}
            caps = {name: self._turn_cap(plan.traj.env) for name, (plan, _) in names.items()}
            bar = tqdm(total=len(names), desc="rollout_value", unit="point", disable=not self.progress, leave=False)
            try:
                for res in run_episodes(tasks, pool, policy, batch_size=self.batch_size, max_turns=caps, env_retries=1):
                    self._counts["rollouts"] += 1
                    self._counts["env_steps_replay"] += res.replayed
                    self._counts["env_steps_rollout"] += res.turns
                    self._counts["policy_turns"] += res.turns
                    self._ends[res.end] += 1
                    got = pending[res.task]
                    got.append(res)
                    if len(got) < self.rollouts:
                        continue
                    plan, k = names[res.task]
                    outcomes = [{"success": r.success, "score": r.score, "turns": r.turns, "end": r.end,
                                 **({"error": r.error[:300]} if r.error else {})} for r in got]
                    plan.outcomes[k] = outcomes
                    if cache is not None and not any(o["end"] == "env_error" for o in outcomes):
                        cache.put(self._key(plan, k), {"trajectory": plan.traj.id, "step": k, "outcomes": outcomes})
                    self._counts["points_rolled"] += 1
                    bar.update(1)
                    bar.set_postfix(self.postfix(), refresh=False)
            finally:
                bar.close()
        for j, plan in list(plans.items()):
            broken = [(k, o) for k in plan.points for o in plan.outcomes[k] if o["end"] == "env_error"]
            if broken:
                k, o = broken[0]
                failures[j] = (f"trajectory {plan.traj.id!r} step {k}: a rollout's replay failed "
                               f"({o.get('error', 'env error')}): the env is not deterministic for it")
                del plans[j]
                if self.on_failure == "error":
                    raise DataError(f"{failures[j]} (set selector.on_failure=random|all to fall back)",
                                    source=f"selector=rollout_value trajectory {plan.traj.id!r}")
                continue
            for k in plan.points:
                plan.values[k] = sum(float(o[self.value]) for o in plan.outcomes[k]) / len(plan.outcomes[k])
            if plan.final is not None:  # V(s_k) for k past the episode's end: its outcome
                for k in range(plan.played, len(plan.rec.replies) + 1):
                    plan.values[k] = plan.final[self.value]

    def _selection(self, plan: _Plan) -> Selection:
        n = len(plan.rec.replies)
        v = [plan.values[k] for k in range(n + 1)]
        adv = [v[k + 1] - v[k] for k in range(n)]
        chosen = seeded_top_k(adv, n_to_select(n, self.ratio), self.seed, plan.traj.id)
        steps = [StepChoice(step=k, score=a, selected=k in chosen, reason=f"V {v[k]:.3f} -> {v[k + 1]:.3f}")
                 for k, a in enumerate(adv)]
        meta = {"value": self.value, "rollouts": self.rollouts, "values": v,
                "final": "replayed" if plan.final is not None else "rollouts"}
        if plan.played < n:
            meta["steps_after_end"] = n - plan.played
        return Selection(id=plan.traj.id, selector=self.name, ratio=self.ratio, steps=steps, meta=meta)

    def _failed(self, traj: Trajectory, error: str) -> Selection:
        self._counts["failed"] += 1
        log.warning("rollout_value: %s; falling back to %s", error, self.on_failure)
        if self.on_failure == "random":
            sel = self._fallback.select_one(traj)
            self._counts["fallback_random"] += 1
        else:
            steps = [StepChoice(step=k, score=1.0, selected=True) for k in range(traj.n_steps)]
            sel = Selection(id=traj.id, selector=self.name, ratio=self.ratio, steps=steps)
            self._counts["fallback_all"] += 1
        sel.selector = self.name
        sel.meta = {"rollout_value": "failed", "fallback": self.on_failure, "error": error[:500]}
        return sel

    # ---- reporting

    def stats(self) -> dict[str, Any]:
        c = self._counts
        tok = token_counts(self._policy) if self._policy is not None else self._tokens_at_close
        base = self._tokens0 or {}
        rolled = c["points_rolled"]
        out: dict[str, Any] = {
            "trajectories": c["trajectories"], "ok": c["ok"], "failed": c["failed"], "on_failure": self.on_failure,
            "fallback_random": c["fallback_random"], "fallback_all": c["fallback_all"],
            "restart_points": c["restart_points"], "points_cached": c["points_cached"], "points_rolled": rolled,
            "rollouts": c["rollouts"], "rollouts_per_point": self.rollouts, "policy_turns": c["policy_turns"],
            "env_steps": c["env_steps_check"] + c["env_steps_replay"] + c["env_steps_rollout"],
            "env_steps_check": c["env_steps_check"], "env_steps_replay": c["env_steps_replay"],
            "env_steps_rollout": c["env_steps_rollout"], "steps_after_end": c["steps_after_end"],
            "prompt_tokens": tok.get("prompt_tokens", 0) - base.get("prompt_tokens", 0),
            "completion_tokens": tok.get("completion_tokens", 0) - base.get("completion_tokens", 0),
            "rollout_ends": dict(self._ends.most_common()),
            "seconds": round(self._seconds, 3),
            "seconds_per_rolled_point": round(self._seconds / rolled, 3) if rolled else None,
        }
        return out

    def postfix(self) -> dict[str, Any]:
        c = self._counts
        tok = token_counts(self._policy) if self._policy is not None else {}
        return {"points": c["points_rolled"], "cached": c["points_cached"],
                "env_steps": c["env_steps_replay"] + c["env_steps_rollout"],
                "tokens": tok.get("completion_tokens", 0) - (self._tokens0 or {}).get("completion_tokens", 0)}


def seeded_top_k(scores: Sequence[float], k: int, seed: int, traj_id: str) -> set[int]:
    """The k highest scores; equal scores ordered by a random rank drawn from (seed, trajectory id), so the
    rule is reproducible yet favours no position (unlike `top_k`'s earlier-first)."""
    digest = hashlib.sha256(f"{seed}\x00rollout_value\x00{traj_id}".encode()).digest()
    rank = list(range(len(scores)))
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(rank)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], rank[i]))
    return set(order[:k])


def _int_option(option: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"selector.{option} must be an integer >= {minimum}, got {value!r}")
    return value
