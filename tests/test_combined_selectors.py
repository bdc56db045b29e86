"""non_critical and hybrid: rules checked against their children's own selections on real AgentTraj-L
trajectories, children built from configs as the app builds them, and both selectors run through the app
with a real perplexity child (SmolLM2) on short real TextCraft records."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TEST_CACHE
from helpers import read_agentgym

from atlas_exp.data.trajectory import Trajectory
from atlas_exp.errors import ConfigError, DataError
from atlas_exp.selectors.base import Selection, n_to_select
from atlas_exp.selectors.combine import HybridSelector, NonCriticalSelector, normalized_ranks
from atlas_exp.selectors.random_steps import RandomSelector

RANDOM = "atlas_exp.selectors.random_steps.RandomSelector"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread while this module runs (restored after). On a 2-core machine shared with other
    jobs, two intra-op threads wait on each other at every op: a 140-token SmolLM2 forward took 8 s with 2
    threads and 0.55 s with 1 when another process held a core. Results do not depend on it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def app(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}  # see one_thread
    return subprocess.run(
        [sys.executable, "-m", "atlas_exp", f"cache_dir={TEST_CACHE}", "logger=none", *overrides],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=600,
    )


class ClosingRandom(RandomSelector):
    """A random selector that remembers being closed."""

    closed = 0

    def close(self) -> None:
        self.closed += 1


class Misaligned(RandomSelector):
    """Yields its selections in reverse order: a parent must notice."""

    def select(self, trajectories):
        return reversed([self.select_one(t) for t in trajectories])


def one_step(t: Trajectory) -> Trajectory:
    """A real trajectory cut right after its first action."""
    i = t.step_message_index()[0]
    return Trajectory(id=t.id + "-1step", env=t.env, messages=list(t.messages[: i + 1]), source=t.source)


@pytest.fixture(scope="module")
def trajs(agenttraj_dir):
    ts = read_agentgym(agenttraj_dir / "textcraft.jsonl", limit=25) + read_agentgym(agenttraj_dir / "sciworld.jsonl", limit=8)
    return ts + [one_step(ts[0]), one_step(ts[-1])]


def by_id(sels: list[Selection]) -> dict[str, Selection]:
    return {s.id: s for s in sels}


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_non_critical_is_the_complement_lowest_base_score_first(trajs, ratio):
    base = list(RandomSelector(ratio=ratio, seed=99).select(trajs))
    nc = NonCriticalSelector(ratio=ratio, seed=3, base={"_target_": RANDOM, "ratio": 0.9, "seed": 99})
    assert nc.base.ratio == ratio and nc.base.seed == 99  # the child runs at the parent's ratio, its own seed
    out = list(nc.select(trajs))
    nc.close()
    for t, b, s in zip(trajs, base, out):
        assert s.id == t.id and s.n_steps == t.n_steps and s.meta["base_selected"] == b.selected_steps
        n, k = t.n_steps, n_to_select(t.n_steps, ratio)
        rest = [i for i in range(n) if i not in b.selected_steps]
        if rest:
            assert not set(s.selected_steps) & set(b.selected_steps)  # never overlaps
            want = sorted(rest, key=lambda i: (b.steps[i].score, i))[:k]  # lowest base score first
            assert sorted(s.selected_steps) == sorted(want)
            assert len(s.selected_steps) == min(k, len(rest))
        else:  # n == 1: the lone step, flagged
            assert n == 1 and s.selected_steps == [0] and s.meta["overlap"] == [0] and s.steps[0].reason
        top = sorted(range(n), key=lambda i: (-s.steps[i].score, i))[: len(s.selected_steps)]
        assert sorted(top) == sorted(s.selected_steps)  # the chosen steps are the top-scored ones
        assert all(math.isfinite(c.score) for c in s.steps)


def test_non_critical_when_the_base_took_every_step(trajs):
    t = trajs[0]  # 3+ steps; ratio 1.0 leaves no candidate
    (low,) = NonCriticalSelector(ratio=1.0, base={"_target_": RANDOM}).select([t])
    (b,) = RandomSelector(ratio=1.0, seed=0).select([t])
    assert low.selected_steps == [min(range(t.n_steps), key=lambda i: (b.steps[i].score, i))]
    (none,) = NonCriticalSelector(ratio=1.0, base={"_target_": RANDOM}, on_exhausted="none").select([t])
    assert none.selected_steps == []


def test_children_are_closed_and_checked_against_their_trajectories(trajs):
    child = ClosingRandom(ratio=0.3)
    nc = NonCriticalSelector(ratio=0.3, base=child)
    list(nc.select(trajs[:3]))
    nc.close()
    assert child.closed == 1
    a, b = ClosingRandom(ratio=0.3, seed=1), ClosingRandom(ratio=0.3, seed=2)
    h = HybridSelector(ratio=0.3, a=a, b=b)
    list(h.select(trajs[:3]))
    h.close()
    assert a.closed == b.closed == 1
    with pytest.raises(ConfigError, match="ratio"):
        NonCriticalSelector(ratio=0.3, base=RandomSelector(ratio=0.5))
    with pytest.raises(DataError, match="selection is for"):
        list(NonCriticalSelector(ratio=0.3, base=Misaligned(ratio=0.3)).select(trajs[:3]))
    with pytest.raises(ConfigError, match="selector.base"):
        NonCriticalSelector(ratio=0.3, base={"ratio": 0.3})
    with pytest.raises(ConfigError, match="mode"):
        HybridSelector(ratio=0.3, a={"_target_": RANDOM}, b={"_target_": RANDOM}, mode="xor")


def test_normalized_ranks():
    assert normalized_ranks([0.2, 0.9, 0.5]) == [0.0, 1.0, 0.5]
    assert normalized_ranks([1.0, 1.0, 3.0, 0.0]) == [0.5, 0.5, 1.0, 0.0]  # ties share their average rank
    assert normalized_ranks([7.0]) == [1.0]


def _children(trajs, ratio):
    a = by_id(list(RandomSelector(ratio=ratio, seed=1).select(trajs)))
    b = by_id(list(RandomSelector(ratio=ratio, seed=2).select(trajs)))
    return a, b


def _hybrid(ratio, **kw):
    return HybridSelector(ratio=ratio, a={"_target_": RANDOM, "seed": 1}, b={"_target_": RANDOM, "seed": 2}, **kw)


def _ranks(scores):
    # independent of normalized_ranks: count how many scores are below / equal
    n = len(scores)
    if n == 1:
        return [1.0]
    return [(sum(y < x for y in scores) + (sum(y == x for y in scores) - 1) / 2) / (n - 1) for x in scores]


def test_hybrid_rank_fusion_selects_the_best_mean_normalised_rank(trajs):
    ratio = 0.3
    a, b = _children(trajs, ratio)
    out = list(_hybrid(ratio, weights=[1, 3]).select(trajs))
    for t, s in zip(trajs, out):
        sa, sb = a[t.id], b[t.id]
        fused = [
            0.25 * x + 0.75 * y
            for x, y in zip(_ranks([c.score for c in sa.steps]), _ranks([c.score for c in sb.steps]))
        ]
        assert [c.score for c in s.steps] == pytest.approx(fused)
        want = sorted(range(t.n_steps), key=lambda i: (-fused[i], i))[: n_to_select(t.n_steps, ratio)]
        assert sorted(s.selected_steps) == sorted(want)
        assert s.meta["a_selected"] == sa.selected_steps and s.meta["b_selected"] == sb.selected_steps
    assert [s.to_dict() for s in out] == [s.to_dict() for s in _hybrid(ratio, weights=[1, 3]).select(trajs)]


@pytest.mark.parametrize("mode", ["intersection", "union"])
def test_hybrid_set_modes(trajs, mode):
    ratio = 0.5
    a, b = _children(trajs, ratio)
    exact = by_id(list(_hybrid(ratio, mode=mode).select(trajs)))
    natural = by_id(list(_hybrid(ratio, mode=mode, count="natural").select(trajs)))
    other = by_id(list(_hybrid(ratio, mode="union" if mode == "intersection" else "intersection").select(trajs)))
    seen_partial_overlap = False
    for t in trajs:
        A, B = set(a[t.id].selected_steps), set(b[t.id].selected_steps)
        k = n_to_select(t.n_steps, ratio)
        e, nat = set(exact[t.id].selected_steps), set(natural[t.id].selected_steps)
        # exact: k steps, those both chose first, then those one chose
        assert len(e) == k and A & B <= e <= A | B
        # natural: the set itself (never empty)
        want = A & B if mode == "intersection" else A | B
        if want:
            assert nat == want
        else:  # disjoint children: the single best step, one of theirs
            assert mode == "intersection" and len(nat) == 1 and nat <= A | B
        # children of fixed size k: exact intersection and exact union coincide (documented)
        assert e == set(other[t.id].selected_steps)
        seen_partial_overlap |= bool(A & B) and A != B
    assert seen_partial_overlap


# ------------------------------------------------------------------------------------------------
# through the app, with a real model child


@pytest.fixture(scope="module")
def run_dir(agenttraj_dir, tmp_path_factory):
    from test_perplexity_selectors import trimmed_records, write_jsonl

    tmp = tmp_path_factory.mktemp("combine_app")
    data = write_jsonl(tmp / "textcraft.jsonl", trimmed_records(agenttraj_dir / "textcraft.jsonl", 4, 2))
    rd = tmp / "run"
    p = app(f"run_dir={rd}", "stage=data", "data=local", f"data.path={data}")
    assert p.returncode == 0, p.stderr
    return rd


def _read(rd: Path):
    sels = [json.loads(line) for line in (rd / "selection.jsonl").read_text().splitlines()]
    trajs = [json.loads(line)["id"] for line in (rd / "trajectories.jsonl").read_text().splitlines()]
    assert [s["id"] for s in sels] == trajs  # aligned with the trajectories
    return sels, json.loads((rd / "selection_summary.json").read_text())


def test_app_non_critical_with_its_default_base(run_dir):
    p = app(f"run_dir={run_dir}", "stage=select", "selector=non_critical", "ratio=0.5")
    assert p.returncode == 0, p.stderr
    sels, summary = _read(run_dir)
    assert summary["selector"] == "non_critical" and summary["achieved_ratio"] == 0.5  # 4 trajectories of 2 steps
    for s in sels:
        assert s["meta"]["base"] == "perplexity_delta" and len(s["meta"]["base_selected"]) == 1
        chosen = [c["step"] for c in s["steps"] if c["selected"]]
        assert len(chosen) == 1 and not set(chosen) & set(s["meta"]["base_selected"])


def test_app_hybrid_of_perplexity_and_random_union(run_dir):
    p = app(
        f"run_dir={run_dir}", "stage=select", "selector=hybrid", "selector@selector.a=perplexity",
        "selector@selector.b=random", "selector.mode=union", "selector.count=natural", "ratio=0.5",
    )
    assert p.returncode == 0, p.stderr
    sels, summary = _read(run_dir)
    assert summary["selector"] == "hybrid"
    for s in sels:
        assert s["meta"]["children"] == ["perplexity", "random"]
        union = set(s["meta"]["a_selected"]) | set(s["meta"]["b_selected"])
        assert {c["step"] for c in s["steps"] if c["selected"]} == union
        assert all(math.isfinite(c["score"]) for c in s["steps"])
    assert summary["n_selected"] == sum(
        len(set(s["meta"]["a_selected"]) | set(s["meta"]["b_selected"])) for s in sels
    )
