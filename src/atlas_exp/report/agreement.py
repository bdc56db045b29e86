"""How much two selections of the same trajectories agree: the Jaccard index of their selected step sets.

Shared by `stage=inspect` (one run against another) and the sweep report (each selector against the
oracle at the same ratio). A selection is anything with `id`, `n_steps` and `selected_steps`: a
`Selection`, or the light `SelectedSteps` the report reads straight from selection.jsonl.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from atlas_exp.artifacts import iter_jsonl
from atlas_exp.errors import AtlasError


class HasSelectedSteps(Protocol):
    id: str
    n_steps: int

    @property
    def selected_steps(self) -> Sequence[int]: ...


def jaccard(a: set[int], b: set[int]) -> float:
    """|a & b| / |a | b|; two empty selections agree fully."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


@dataclass
class Agreement:
    """How two selections of the same trajectories agree, per trajectory and on average."""

    other: str
    per_trajectory: dict[str, float]
    n_common: int

    @property
    def mean(self) -> float:
        return sum(self.per_trajectory.values()) / len(self.per_trajectory) if self.per_trajectory else 0.0


def agreement(a: Sequence[HasSelectedSteps], b: Sequence[HasSelectedSteps], other: str, *,
              where: str | None = None) -> Agreement:
    """Per trajectory in both (same id and step count), the Jaccard of the selected steps. No trajectory
    in common is an error naming `where` (default: inspect's option)."""
    by_id = {s.id: s for s in b}
    per: dict[str, float] = {}
    for s in a:
        t = by_id.get(s.id)
        if t is not None and t.n_steps == s.n_steps:
            per[s.id] = jaccard(set(s.selected_steps), set(t.selected_steps))
    if not per:
        raise AtlasError(f"{where or f'inspect.compare_to={other}'}: no trajectory in common with this run's selection")
    return Agreement(other=other, per_trajectory=per, n_common=len(per))


@dataclass(frozen=True)
class SelectedSteps:
    """One line of selection.jsonl, reduced to what agreement needs."""

    id: str
    n_steps: int
    selected_steps: tuple[int, ...]


def read_selected_steps(path: Path) -> list[SelectedSteps]:
    """selection.jsonl -> SelectedSteps per line (no Trajectory/Selection validation: the select stage did it)."""
    out = []
    for lineno, d in iter_jsonl(path):
        steps: Any = d.get("steps") if isinstance(d, dict) else None
        if not isinstance(steps, list):
            raise AtlasError(f"{path}:{lineno}: not a selection record (no steps)")
        sel = tuple(int(s["step"]) for s in steps if isinstance(s, dict) and s.get("selected") and "step" in s)
        out.append(SelectedSteps(str(d.get("id")), int(d.get("n_steps", len(steps))), sel))
    return out
