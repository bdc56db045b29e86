"""The selection record: what a selector decided for one trajectory (`Selection`, one `StepChoice` per step).

`selection.jsonl` has one line per trajectory, in the same order as `trajectories.jsonl`:
    {"id", "selector", "ratio", "n_steps", "steps": [{"step", "score", "selected", "category"?, "reason"?}],
     "plan"?, "meta"?, "trajectory_sha256"?}

`trajectory_sha256` (the trajectory's `content_hash`, written by the select stage) lets a later run reuse a
selection (`selector=precomputed`) only for the very trajectory it was made for. It lives next to
`Trajectory` so that selectors, training and reports all import both records downwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from atlas_exp.data.trajectory import Trajectory
from atlas_exp.errors import DataError


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
