"""`selector=precomputed`: a selection from elsewhere, by trajectory id, checked per trajectory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atlas_exp.data.trajectory import Message, Trajectory
from atlas_exp.errors import ConfigError, DataError
from atlas_exp.selectors.combine import NonCriticalSelector
from atlas_exp.selectors.precomputed import PrecomputedSelector
from atlas_exp.selectors.random_steps import RandomSelector


def toy(i: int, n_steps: int, obs: str = "ok") -> Trajectory:
    msgs = [Message("user", f"task {i}")]
    for k in range(n_steps):
        msgs += [Message("assistant", f"Thought:\nstep {k}\n\nAction:\ndo {k}", step=k), Message("user", obs)]
    return Trajectory(id=f"t{i}", env="toy", messages=msgs)


TRAJS = [toy(0, 4), toy(1, 6), toy(2, 3)]


def write(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def as_written(sels, trajs) -> list[dict]:
    """What the select stage writes: each selection with its trajectory's content fingerprint."""
    out = []
    for s, t in zip(sels, trajs):
        s.trajectory_sha256 = t.content_hash()
        out.append(s.to_dict())
    return out


def test_another_runs_selection_is_reproduced(tmp_path):
    made = list(RandomSelector(ratio=0.5, seed=7).select(TRAJS))
    path = write(tmp_path / "selection.jsonl", as_written(made, TRAJS))
    sel = PrecomputedSelector(ratio=0.5, path=path)
    got = list(sel.select(list(reversed(TRAJS))))  # matched by id, not by order
    assert {s.id: s.selected_steps for s in got} == {s.id: s.selected_steps for s in made}
    assert all(s.selector == "precomputed" and s.meta["made_by"] == "random" for s in got)
    assert sel.stats()["unverified_content"] == 0


def test_human_labels_and_step_numbers(tmp_path):
    path = write(tmp_path / "labels.jsonl", [
        {"id": "t0", "labels": [1, 0, 0, 1]},
        {"id": "t1", "selected": [2], "n_steps": 6},
        {"id": "t2", "labels": [False, True, False]},
    ])
    sel = PrecomputedSelector(ratio=0.3, path=[path])
    got = list(sel.select(TRAJS))
    assert [s.selected_steps for s in got] == [[0, 3], [2], [1]]
    assert sel.stats()["unverified_content"] == 3  # no fingerprint: only the step counts were checked


def test_top_ratio_reselects_by_the_recorded_score(tmp_path):
    rec = {"id": "t1", "steps": [{"step": k, "score": s, "selected": True} for k, s in enumerate([0.1, 0.9, 0.5, 0.8, 0.2, 0.3])]}
    sel = PrecomputedSelector(ratio=0.3, path=write(tmp_path / "s.jsonl", [rec]), mode="top_ratio")
    assert sel.select_one(TRAJS[1]).selected_steps == [1, 3]  # round(0.3 * 6) = 2 highest scores


def test_mismatches_are_errors_naming_the_trajectory(tmp_path):
    made = as_written(list(RandomSelector(ratio=0.5, seed=1).select(TRAJS)), TRAJS)
    path = write(tmp_path / "sel.jsonl", made)
    sel = PrecomputedSelector(ratio=0.5, path=path)
    with pytest.raises(DataError, match=r"sel.jsonl:2 \[steps\]: the record has 6 steps, trajectory 't1' has 5"):
        sel.select_one(toy(1, 5))
    with pytest.raises(DataError, match=r"sel.jsonl:1 \[trajectory_sha256\]: trajectory 't0' is not the one"):
        sel.select_one(toy(0, 4, obs="changed"))
    with pytest.raises(DataError, match="no record for trajectory 't9'"):
        sel.select_one(toy(9, 2))
    with pytest.raises(DataError, match=r"dup.jsonl:2 \[id\]: id 't0' also at"):
        PrecomputedSelector(path=write(tmp_path / "dup.jsonl", [made[0], made[0]]))
    with pytest.raises(DataError, match=r"\[labels\]"):
        PrecomputedSelector(path=write(tmp_path / "bad.jsonl", [{"id": "t0", "labels": [2, 0, 0, 0]}])).select_one(TRAJS[0])
    with pytest.raises(ConfigError, match="needs selector.path"):
        PrecomputedSelector()


def test_usable_as_the_base_of_non_critical(tmp_path):
    path = write(tmp_path / "labels.jsonl", [{"id": "t1", "labels": [1, 1, 0, 0, 0, 0]}])
    base = PrecomputedSelector(ratio=0.3, path=path)
    nc = NonCriticalSelector(ratio=0.3, base=base)
    s = next(iter(nc.select([TRAJS[1]])))
    assert not set(s.selected_steps) & {0, 1} and len(s.selected_steps) == 2
