"""What the loss-based selectors share: one trajectory's step scores, the scopes, and the global-scope rule.

`selector=perplexity`, `selector=perplexity_delta` (`perplexity.py`) and `selector=excess_loss` each score
every step of a trajectory, then choose either per trajectory or over the whole dataset. The scores record,
the scope names and the dataset-wide rule are theirs in common, so they live here, below both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from atlas_exp.errors import ConfigError
from atlas_exp.selectors.base import n_to_select, top_k

#: `trajectory`: the top ratio of each trajectory; `global`: the top ratio of all steps, >= 1 per trajectory
SCOPES = ("trajectory", "global")


class StepScores(NamedTuple):
    """One trajectory's scores, as a selector records them (also what the step score cache keeps)."""

    #: per step, higher = more critical
    scores: list[float]
    #: the selection's `meta` (the losses behind the scores)
    meta: dict[str, Any]
    #: per step, why its score is special (not finite, scored in a window), else None
    reasons: list[str | None]


def check_scope(scope: str) -> str:
    """`scope`, or a ConfigError naming the choices."""
    if scope not in SCOPES:
        raise ConfigError(f"selector.scope must be one of {SCOPES}, got {scope!r}")
    return scope


def positive_int(option: str, value: Any, minimum: int = 1) -> int:
    """`value` when it is an integer >= `minimum` (a bool is not), else a ConfigError naming `selector.<option>`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"selector.{option} must be an integer >= {minimum}, got {value!r}")
    return value


def select_global(scores: Sequence[Sequence[float]], ratio: float, ties: Sequence[Sequence[float]] | None = None) -> list[set[int]]:
    """The global-scope rule (`perplexity.py`'s docstring): each trajectory's best step, then the best remaining
    steps of the whole dataset until K = n_to_select(total, ratio) are chosen (total = max(K, T)).
    `ties`: per step, a rank that orders equal scores first (excess_loss: a seeded draw); without it
    ties go to the earlier trajectory, then the earlier step."""
    rank = ties if ties is not None else [[0.0] * len(steps) for steps in scores]
    chosen = [top_k(steps, 1, rank[t]) if len(steps) else set() for t, steps in enumerate(scores)]
    total = sum(len(steps) for steps in scores)
    extra = n_to_select(total, ratio) - sum(len(picked) for picked in chosen)
    if extra > 0:
        rest = sorted(
            (-score, rank[t][k], t, k)
            for t, steps in enumerate(scores) for k, score in enumerate(steps) if k not in chosen[t]
        )
        for _, _, t, k in rest[:extra]:
            chosen[t].add(k)
    return chosen
