"""`selector=precomputed`: a selection made elsewhere, matched to the trajectories by id and checked.

For selections that already exist: another run's `selection.jsonl` (to train a new model on an old
judgment without asking again), human annotations, a selector run outside this framework. Each line of
`path` (one file or a list) describes one trajectory by `id`, in one of these shapes:

    {"id": "textcraft_7", "steps": [{"step": 0, "score": 0.5, "selected": true}, ...]}   # a selection.jsonl line
    {"id": "textcraft_7", "labels": [1, 0, 0, 1]}                                        # per-step labels (0/1)
    {"id": "textcraft_7", "selected": [0, 3], "n_steps": 4}                              # step numbers

Every record is checked against the trajectory it is used for: the step count must be equal, and when the
record carries `trajectory_sha256` (our selection.jsonl does) the trajectory's content must be the one it
was made for; a mismatch is an error naming the id, never a silent misalignment. Records without a content
fingerprint are counted (`unverified_content`) and logged.

`mode=as_is` (default) keeps the recorded choice; `mode=top_ratio` re-selects the top `ratio` steps by the
recorded score (labels score 1/0), e.g. to take an oracle's ranked picks at a smaller ratio. A trajectory
without a record stops the stage with an error naming it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from atlas_exp.artifacts import iter_jsonl
from atlas_exp.data.trajectory import Trajectory
from atlas_exp.errors import ConfigError, DataError
from atlas_exp.selectors.base import Selection, Selector, StepChoice, n_to_select, top_k

log = logging.getLogger(__name__)

MODES = ("as_is", "top_ratio")


def _steps_of(rec: dict[str, Any], where: str) -> list[StepChoice]:
    """The step verdicts of one record, whatever its shape (see the module docstring)."""
    if "steps" in rec:
        return Selection.from_dict({"selector": "precomputed", "ratio": 1.0, **rec}, source=where).steps
    if "labels" in rec:
        labels = rec["labels"]
        if not isinstance(labels, list) or not all(v in (0, 1, True, False) for v in labels):
            raise DataError("labels must be a list of 0/1 (or true/false), one per step", source=where, field="labels")
        return [StepChoice(step=k, score=float(v), selected=bool(v)) for k, v in enumerate(labels)]
    if "selected" in rec:
        n, chosen = rec.get("n_steps"), rec["selected"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DataError("a record with `selected` step numbers needs n_steps (an integer >= 1)", source=where, field="n_steps")
        if not isinstance(chosen, list) or not all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k < n for k in chosen):
            raise DataError(f"selected must be a list of step numbers in 0..{n - 1}", source=where, field="selected")
        return [StepChoice(step=k, score=float(k in chosen), selected=k in chosen) for k in range(n)]
    raise DataError("a record needs `steps` (a selection.jsonl line), `labels` or `selected`", source=where, field="steps")


class PrecomputedSelector(Selector):
    """A selection read from files, by trajectory id, with step count and content checked per trajectory."""

    name = "precomputed"

    def __init__(self, ratio: float = 0.3, seed: int = 0, *, path: Any = None, mode: str = "as_is"):
        super().__init__(ratio=ratio, seed=seed)
        if mode not in MODES:
            raise ConfigError(f"selector.mode must be one of {MODES}, got {mode!r}")
        paths = [path] if isinstance(path, (str, Path)) else list(path or [])
        if not paths:
            raise ConfigError("selector=precomputed needs selector.path (a selection.jsonl or a labels file, or a list)")
        self.mode = mode
        self.records: dict[str, tuple[dict[str, Any], str]] = {}
        for p in paths:
            p = Path(p).expanduser()
            if not p.is_file():
                raise ConfigError(f"selector.path: {p} is not a file")
            for n, rec in iter_jsonl(p):
                where = f"{p}:{n}"
                if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
                    raise DataError("a record needs a string id", source=where, field="id")
                if rec["id"] in self.records:
                    raise DataError(f"id {rec['id']!r} also at {self.records[rec['id']][1]}", source=where, field="id")
                self.records[rec["id"]] = (rec, where)
        self.paths = [str(p) for p in paths]
        self._unverified = 0

    def select_one(self, traj: Trajectory) -> Selection:
        if traj.id not in self.records:
            raise DataError(f"no record for trajectory {traj.id!r} in {', '.join(self.paths)}", source=traj.source, field="id")
        rec, where = self.records[traj.id]
        steps = _steps_of(rec, where)
        if len(steps) != traj.n_steps:
            raise DataError(f"the record has {len(steps)} steps, trajectory {traj.id!r} has {traj.n_steps}",
                            source=where, field="steps")
        sha = rec.get("trajectory_sha256")
        if sha is not None and sha != traj.content_hash():
            raise DataError(f"trajectory {traj.id!r} is not the one this record was made for (content changed: "
                            f"trajectory_sha256 {sha} != {traj.content_hash()})", source=where, field="trajectory_sha256")
        if sha is None:
            self._unverified += 1
        if self.mode == "top_ratio":
            chosen = top_k([s.score for s in steps], n_to_select(len(steps), self.ratio))
            steps = [StepChoice(s.step, s.score, s.step in chosen, s.category, s.reason) for s in steps]
        meta = {"source": where}
        if rec.get("selector"):
            meta["made_by"] = rec["selector"]
        return Selection(id=traj.id, selector=self.name, ratio=self.ratio, steps=steps, plan=rec.get("plan"), meta=meta)

    def select(self, trajectories: Sequence[Trajectory]):
        yield from super().select(trajectories)
        if self._unverified:
            log.warning("precomputed: %d of %d records carry no trajectory_sha256; only their step counts were checked",
                        self._unverified, len(trajectories))

    def stats(self) -> dict[str, Any]:
        return {"files": self.paths, "records": len(self.records), "mode": self.mode, "unverified_content": self._unverified}
