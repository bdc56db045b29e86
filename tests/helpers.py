"""Small test helpers shared by several test files (not fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

from atlas_exp.data.trajectory import Trajectory, number_steps


def read_agentgym(path: Path, limit: int | None = None) -> list[Trajectory]:
    """Real AgentTraj-L records as canonical trajectories, converted the obvious way (independent of
    the importers under test): human->user, gpt->assistant, loss false -> not trainable."""
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            rec = json.loads(line)
            turns = [
                ("user" if c["from"] == "human" else "assistant", c["value"], c.get("loss") is not False, None)
                for c in rec["conversations"]
            ]
            src = f"{path.name}:{lineno}"
            out.append(Trajectory(id=rec["item_id"], env=rec["env"], messages=number_steps(turns, source=src), source=src))
    return out
