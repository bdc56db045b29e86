"""`selector=random`: a seeded random `ratio` of each trajectory's steps (the paper's random baseline).

Exactly `n_to_select(n_steps, ratio)` steps per trajectory (round-half-up, at least one). The draw for a
trajectory depends only on the seed and the trajectory id, so it does not change when other
trajectories are added, removed or reordered.
"""

from __future__ import annotations

import hashlib
import random

from atlas_exp.data.trajectory import Trajectory
from atlas_exp.selectors.base import Selection, Selector, StepChoice, n_to_select, top_k


class RandomSelector(Selector):
    name = "random"

    def select_one(self, traj: Trajectory) -> Selection:
        digest = hashlib.sha256(f"{self.seed}\x00{traj.id}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        scores = [rng.random() for _ in range(traj.n_steps)]
        chosen = top_k(scores, n_to_select(traj.n_steps, self.ratio))
        steps = [StepChoice(step=k, score=s, selected=k in chosen) for k, s in enumerate(scores)]
        return Selection(id=traj.id, selector=self.name, ratio=self.ratio, steps=steps)
