"""The selection contract and the spine's two selectors, on real AgentTraj-L trajectories."""

from __future__ import annotations

import pytest
from helpers import read_agentgym

from atlas_exp.data.trajectory import Trajectory
from atlas_exp.errors import ConfigError, DataError
from atlas_exp.selectors.all_steps import AllStepsSelector
from atlas_exp.selectors.base import Selection, n_to_select, summarize
from atlas_exp.selectors.random_steps import RandomSelector


@pytest.fixture(scope="module")
def trajs(agenttraj_dir):
    return read_agentgym(agenttraj_dir / "sciworld.jsonl", limit=40) + read_agentgym(agenttraj_dir / "textcraft.jsonl", limit=40)


def test_n_to_select_rounds_half_up_with_at_least_one_step():
    assert n_to_select(10, 0.3) == 3
    assert n_to_select(5, 0.5) == 3  # 2.5 rounds up, not to even
    assert n_to_select(5, 0.3) == 2  # 1.5 -> 2
    assert n_to_select(1, 0.1) == 1  # never zero
    assert n_to_select(3, 0.1) == 1
    assert n_to_select(4, 1.0) == 4


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, "abc"])
def test_bad_ratio_is_a_config_error_naming_ratio(ratio):
    with pytest.raises(ConfigError, match="ratio"):
        RandomSelector(ratio=ratio)


def test_all_selects_every_step(trajs):
    sels = list(AllStepsSelector(ratio=0.3).select(trajs))
    for t, s in zip(trajs, sels):
        assert s.id == t.id and s.n_steps == t.n_steps
        assert s.selected_steps == list(range(t.n_steps))
        assert s.ratio == 1.0


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_random_selects_exactly_round_ratio_n_per_trajectory(trajs, ratio):
    sels = list(RandomSelector(ratio=ratio, seed=7).select(trajs))
    for t, s in zip(trajs, sels):
        assert len(s.selected_steps) == n_to_select(t.n_steps, ratio)
        assert [c.step for c in s.steps] == list(range(t.n_steps))


def test_random_is_seeded_and_independent_of_other_trajectories(trajs):
    a = [s.selected_steps for s in RandomSelector(ratio=0.3, seed=1).select(trajs)]
    b = [s.selected_steps for s in RandomSelector(ratio=0.3, seed=1).select(trajs)]
    c = [s.selected_steps for s in RandomSelector(ratio=0.3, seed=2).select(trajs)]
    assert a == b
    assert a != c
    # dropping the first half does not change the draw for the rest
    half = len(trajs) // 2
    d = [s.selected_steps for s in RandomSelector(ratio=0.3, seed=1).select(trajs[half:])]
    assert d == a[half:]


def test_random_spreads_over_positions(trajs):
    """Not always the first steps: over many trajectories every position gets picked sometimes."""
    long = [t for t in trajs if t.n_steps >= 10]
    firsts = sum(1 for s in RandomSelector(ratio=0.3, seed=3).select(long) if 0 in s.selected_steps)
    assert 0 < firsts < len(long)


def test_selection_round_trips_and_checks_its_trajectory(trajs):
    s = next(iter(RandomSelector(ratio=0.3, seed=0).select(trajs[:1])))
    back = Selection.from_dict(s.to_dict(), source="x.jsonl:1")
    assert back == s
    s.check_matches(trajs[0], source="x")
    with pytest.raises(DataError, match="selection is for"):
        s.check_matches(trajs[1], source="x")
    # same id, one step fewer: the selection no longer describes it
    t = trajs[0]
    cut = t.step_message_index()[-1]
    shorter = Trajectory(id=t.id, env=t.env, messages=t.messages[:cut], source=t.source)
    with pytest.raises(DataError, match=f"selection has {t.n_steps} steps"):
        s.check_matches(shorter, source="x")


def test_summary_reports_achieved_ratio_per_env(trajs):
    sels = list(RandomSelector(ratio=0.3, seed=0).select(trajs))
    summ = summarize(sels, trajs)
    assert set(summ["per_env"]) == {"sciworld", "textcraft"}
    assert summ["n_steps"] == sum(t.n_steps for t in trajs)
    assert summ["n_selected"] == sum(n_to_select(t.n_steps, 0.3) for t in trajs)
    assert abs(summ["achieved_ratio"] - 0.3) < 0.05
