"""`selector=all`: every step is trained (standard agent tuning, the paper's "all steps" row)."""

from __future__ import annotations

from atlas_exp.data.trajectory import Trajectory
from atlas_exp.selectors.base import Selection, Selector, StepChoice


class AllStepsSelector(Selector):
    name = "all"

    def __init__(self, ratio: float = 1.0, seed: int = 0):
        # ratio is accepted so that the top-level `ratio` wires in uniformly, but it does not apply.
        super().__init__(ratio=1.0, seed=seed)

    def select_one(self, traj: Trajectory) -> Selection:
        steps = [StepChoice(step=k, score=1.0, selected=True) for k in range(traj.n_steps)]
        return Selection(id=traj.id, selector=self.name, ratio=1.0, steps=steps)
