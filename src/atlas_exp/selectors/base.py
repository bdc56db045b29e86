"""The selection contract: a selector scores every step of every trajectory and marks which to train.

Selectors are plain classes built by Hydra from `conf/selector/<name>.yaml` (`_target_`), so a new one
plugs in by config alone (`selector=oracle`). They receive `ratio` and `seed` from the top-level config.

`selection.jsonl` has one line per trajectory, in the same order as `trajectories.jsonl`:
    {"id", "selector", "ratio", "n_steps", "steps": [{"step", "score", "selected", "category"?, "reason"?}],
     "plan"?, "meta"?, "trajectory_sha256"?}

`trajectory_sha256` (the trajectory's `content_hash`, written by the select stage) lets a later run reuse a
selection (`selector=precomputed`) only for the very trajectory it was made for.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from atlas_exp.data.trajectory import Trajectory
from atlas_exp.errors import ConfigError, DataError


@dataclass
class StepChoice:
    """The verdict on one step: a score (higher = more critical), whether it is trained, and why."""

    step: int
    score: float
    selected: bool
    category: str | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"step": self.step, "score": self.score, "selected": self.selected}
        if self.category is not None:
            d["category"] = self.category
        if self.reason is not None:
            d["reason"] = self.reason
        return d


@dataclass
class Selection:
    """All step verdicts for one trajectory."""

    id: str
    selector: str
    ratio: float
    steps: list[StepChoice]
    plan: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    trajectory_sha256: str | None = None

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    @property
    def selected_steps(self) -> list[int]:
        return [s.step for s in self.steps if s.selected]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "selector": self.selector,
            "ratio": self.ratio,
            "n_steps": self.n_steps,
            "steps": [s.to_dict() for s in self.steps],
        }
        if self.plan is not None:
            d["plan"] = self.plan
        if self.meta:
            d["meta"] = self.meta
        if self.trajectory_sha256 is not None:
            d["trajectory_sha256"] = self.trajectory_sha256
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str) -> "Selection":
        for key in ("id", "selector", "ratio", "steps"):
            if key not in d:
                raise DataError("missing field", source=source, field=key)
        steps = []
        for i, s in enumerate(d["steps"]):
            try:
                steps.append(
                    StepChoice(
                        step=int(s["step"]),
                        score=float(s["score"]),
                        selected=bool(s["selected"]),
                        category=s.get("category"),
                        reason=s.get("reason"),
                    )
                )
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"bad step verdict: {e!r}", source=source, field=f"steps[{i}]") from None
        if [s.step for s in steps] != list(range(len(steps))):
            raise DataError("steps must be numbered 0..n-1 in order", source=source, field="steps")
        return cls(
            id=str(d["id"]),
            selector=str(d["selector"]),
            ratio=float(d["ratio"]),
            steps=steps,
            plan=d.get("plan"),
            meta=dict(d.get("meta") or {}),
            trajectory_sha256=d.get("trajectory_sha256"),
        )

    def check_matches(self, traj: Trajectory, *, source: str) -> None:
        """A selection must describe exactly the steps of its trajectory."""
        if self.id != traj.id:
            raise DataError(f"selection is for {self.id!r} but the trajectory is {traj.id!r}", source=source, field="id")
        if self.n_steps != traj.n_steps:
            raise DataError(
                f"selection has {self.n_steps} steps, trajectory {traj.id!r} has {traj.n_steps}",
                source=source,
                field="steps",
            )


def n_to_select(n_steps: int, ratio: float) -> int:
    """How many steps a fixed-ratio selector marks: round-half-up of ratio*n, at least 1, at most n.

    Round-half-up (not Python's banker's rounding) so that 0.5 * 5 gives 3, as a reader expects.
    """
    if n_steps <= 0:
        return 0
    k = math.floor(ratio * n_steps + 0.5)
    return max(1, min(n_steps, k))


def check_ratio(ratio: float) -> float:
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise ConfigError(f"ratio must be a number in (0, 1], got {ratio!r}") from None
    if not (0.0 < r <= 1.0):
        raise ConfigError(f"ratio must be in (0, 1], got {ratio!r}")
    return r


def top_k(scores: Sequence[float], k: int) -> set[int]:
    """Indices of the k highest scores; ties broken by earlier step first (stable, deterministic)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return set(order[:k])


class Selector(ABC):
    """Scores and selects steps. Subclasses implement `select_one` or override `select` for batching."""

    #: name written into selection.jsonl
    name: str = "base"

    def __init__(self, ratio: float = 0.3, seed: int = 0):
        self.ratio = check_ratio(ratio)
        self.seed = int(seed)

    def select(self, trajectories: Sequence[Trajectory]) -> Iterable[Selection]:
        """Yield one Selection per trajectory, in order. Override to batch or parallelise."""
        for t in trajectories:
            yield self.select_one(t)

    @abstractmethod
    def select_one(self, traj: Trajectory) -> Selection:
        """Select steps of one trajectory."""

    def stats(self) -> dict[str, Any]:
        """What the selection cost and how it went (requests, tokens, USD, fallbacks, seconds...).

        Written under `selector_stats` in selection_summary.json; empty for selectors that cost nothing.
        """
        return {}

    def postfix(self) -> dict[str, Any]:
        """A few running figures for the progress bar (e.g. requests, tokens, USD so far)."""
        return {}

    def close(self) -> None:
        """Release resources (servers, models). Called once after `select`."""


def summarize(selections: Sequence[Selection], trajectories: Sequence[Trajectory]) -> dict[str, Any]:
    """Achieved ratio overall and per env, and category counts: what `selection_summary.json` reports."""
    per_env: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    cats: Counter[str] = Counter()
    for sel, traj in zip(selections, trajectories):
        per_env[traj.env][0] += len(sel.selected_steps)
        per_env[traj.env][1] += sel.n_steps
        for s in sel.steps:
            if s.selected and s.category:
                cats[s.category] += 1
    sel_total = sum(v[0] for v in per_env.values())
    all_total = sum(v[1] for v in per_env.values())
    return {
        "n_trajectories": len(selections),
        "n_steps": all_total,
        "n_selected": sel_total,
        "achieved_ratio": sel_total / all_total if all_total else 0.0,
        "per_env": {
            env: {"n_steps": v[1], "n_selected": v[0], "achieved_ratio": v[0] / v[1] if v[1] else 0.0}
            for env, v in sorted(per_env.items())
        },
        "categories": dict(cats.most_common()),
    }
