"""The selection contract: a selector scores every step of every trajectory and marks which to train.

Selectors are plain classes built by Hydra from `conf/selector/<name>.yaml` (`_target_`), so a new one
plugs in by config alone (`selector=oracle`). They receive `ratio` and `seed` from the top-level config.

What a selector yields per trajectory, the `Selection` record (one `StepChoice` per step, the line format
of `selection.jsonl`), lives in `atlas_exp.data.selection`, next to `Trajectory`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

# re-exported: selectors (plugins included) written against `atlas_exp.selectors.base` keep importing the
# records from here; new code imports them from atlas_exp.data.selection
from atlas_exp.data.selection import Selection, StepChoice
from atlas_exp.data.trajectory import Trajectory
from atlas_exp.errors import ConfigError

__all__ = ["Selection", "Selector", "StepChoice", "check_ratio", "n_to_select", "summarize", "top_k"]


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


def top_k(scores: Sequence[float], k: int, ties: Sequence[float] | None = None) -> set[int]:
    """Indices of the k highest scores; ties broken by the lower `ties` rank (a selector's seeded draw), then by
    earlier step first (stable, deterministic)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], 0.0 if ties is None else ties[i], i))
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
