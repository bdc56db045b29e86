"""Filters and the train/validation split, on real AgentTraj-L trajectories.

Read as the spec: every filter keeps input order, reports how many it dropped, and is deterministic;
duplicates and id clashes in the real maze file are handled as documented; the split is seeded,
stratified per env, and stable when data is added.
"""

from __future__ import annotations

from collections import Counter

import pytest
from omegaconf import OmegaConf

from atlas_exp.config import CONF_DIR
from atlas_exp.data.filters import (
    FilterConfig,
    apply_filters,
    cap_per_env,
    dedupe,
    filter_envs,
    filter_steps,
    make_ids_unique,
    split_train_val,
)
from atlas_exp.data.sources import LocalFiles, load_trajectories
from atlas_exp.data.trajectory import Trajectory
from atlas_exp.errors import ConfigError

ENVS = ["babyai", "maze", "movie", "sciworld", "sqlgym", "textcraft", "todo", "weather", "webshop", "wordle"]


@pytest.fixture(scope="module")
def sample(agenttraj_dir) -> list[Trajectory]:
    """The first 40 trajectories of every env, in file order, ids made unique (maze repeats ids)."""
    src = LocalFiles([str(agenttraj_dir / f"{e}.jsonl") for e in ENVS], limit=40)
    return make_ids_unique(load_trajectories(src, progress=False).trajectories)[0]


@pytest.fixture(scope="module")
def maze(agenttraj_dir) -> list[Trajectory]:
    return load_trajectories(LocalFiles(str(agenttraj_dir / "maze.jsonl")), progress=False).trajectories


@pytest.fixture(scope="module")
def sciworld(agenttraj_dir) -> list[Trajectory]:
    return load_trajectories(LocalFiles(str(agenttraj_dir / "sciworld.jsonl"), limit=600), progress=False).trajectories


def ids(trajs):
    return [t.id for t in trajs]


def test_filter_envs_keeps_the_listed_envs_in_order(sample):
    kept, dropped = filter_envs(sample, ["maze", "wordle"])
    assert ids(kept) == [t.id for t in sample if t.env in ("maze", "wordle")]
    assert len(kept) == 80 and dropped == len(sample) - 80
    assert filter_envs(sample, None) == (sample, 0)
    with pytest.raises(ConfigError, match="data.envs is empty"):
        filter_envs(sample, [])


def test_filter_steps_bounds(sample):
    kept, dropped = filter_steps(sample, min_steps=2, max_steps=10)
    assert all(2 <= t.n_steps <= 10 for t in kept)
    assert dropped == sum(not 2 <= t.n_steps <= 10 for t in sample) and dropped > 0
    # sqlgym trajectories are single-step: min_steps=2 drops exactly them (and short others)
    assert not any(t.env == "sqlgym" for t in kept)
    with pytest.raises(ConfigError, match="data.max_steps=1 is below data.min_steps=2"):
        filter_steps(sample, 2, 1)


def test_maze_has_unique_contents_but_only_11_ids(maze):
    assert len(maze) == 215
    assert dedupe(maze) == (maze, 0)
    counts = Counter(ids(maze))
    assert len(counts) == 11 and counts["lmrlgym_maze_17"] == 74


def test_dedupe_drops_exact_repeats_keeping_the_first(maze, agenttraj_dir):
    again = load_trajectories(LocalFiles(str(agenttraj_dir / "maze.jsonl")), progress=False).trajectories
    kept, dropped = dedupe(maze + again)
    assert dropped == 215 and [t.source for t in kept] == [t.source for t in maze]


def test_dedupe_on_alfworld_drops_repeated_trials_of_the_same_game(shared_data):
    path = shared_data / "alfworld" / "alfworld_train_expert_gt.jsonl"
    trajs = load_trajectories(LocalFiles(str(path)), progress=False).trajectories
    kept, dropped = dedupe(trajs)
    # six trials of a game repeat an earlier trial's turns exactly (the ids differ only by trial)
    assert len(trajs) == 3554 and dropped == 6
    kept_ids = set(ids(kept))
    gone = [t.id for t in trajs if t.id not in kept_ids]
    assert all(g.startswith("pick_cool_then_place_in_recep-Pot-") for g in gone)


def test_make_ids_unique_renames_later_clashes(maze):
    out, renamed = make_ids_unique(maze)
    assert renamed == 215 - 11 and len(set(ids(out))) == 215
    # the first trajectory with an id keeps it, later ones count up in input order
    firsts = {}
    for t in maze:
        firsts.setdefault(t.id, t.source)
    seventeen = [t for t in out if t.meta.get("original_id", t.id) == "lmrlgym_maze_17"]
    assert ids(seventeen) == ["lmrlgym_maze_17"] + [f"lmrlgym_maze_17#{k}" for k in range(2, 75)]
    assert seventeen[0].source == firsts["lmrlgym_maze_17"]
    assert [t.content_hash() for t in out] == [t.content_hash() for t in maze]
    assert ids(maze).count("lmrlgym_maze_17") == 74  # the input is untouched


def test_make_ids_unique_skips_suffixes_already_taken(maze):
    trajs = [Trajectory(i, t.env, t.messages) for i, t in zip(["x", "x#2", "x"], maze)]
    out, renamed = make_ids_unique(trajs)
    assert ids(out) == ["x", "x#2", "x#3"] and renamed == 1


def test_cap_per_env_is_seeded_and_independent_of_input_order(sample):
    kept, dropped = cap_per_env(sample, 7, seed=1)
    assert Counter(t.env for t in kept) == {e: 7 for e in ENVS} and dropped == len(sample) - 70
    # input order kept; the same choice whatever the input order
    kept_ids = set(ids(kept))
    assert ids(kept) == [t.id for t in sample if t.id in kept_ids]
    rev, _ = cap_per_env(list(reversed(sample)), 7, seed=1)
    assert set(ids(rev)) == set(ids(kept))
    assert cap_per_env(sample, 7, seed=1) == (kept, dropped)
    other, _ = cap_per_env(sample, 7, seed=2)
    assert set(ids(other)) != set(ids(kept))
    # not simply the first N of the file
    assert set(ids(kept)) != {t.id for e in ENVS for t in [s for s in sample if s.env == e][:7]}
    assert cap_per_env(sample, None) == (sample, 0)


def test_split_is_seeded_stratified_and_complete(sample):
    train, val = split_train_val(sample, val_fraction=0.2, seed=3)
    assert Counter(t.env for t in val) == {e: 8 for e in ENVS}  # round(0.2 * 40) of each env
    assert sorted(ids(train) + ids(val)) == sorted(ids(sample)) and not set(ids(train)) & set(ids(val))
    train_ids = set(ids(train))
    assert ids(train) == [t.id for t in sample if t.id in train_ids]  # input order
    assert split_train_val(sample, val_fraction=0.2, seed=3) == (train, val)
    assert set(ids(split_train_val(sample, val_fraction=0.2, seed=4)[1])) != set(ids(val))
    assert split_train_val(sample) == (sample, [])


def test_split_by_size_shares_it_out_by_env_size(sample, maze):
    trajs = sample + make_ids_unique(maze)[0][40:]  # maze: 215, every other env: 40
    train, val = split_train_val(trajs, val_size=30, seed=0)
    # exact shares 30*215/575 = 11.22 and 30*40/575 = 2.09: floors 11 + 9*2 = 29, the one left goes to
    # the largest remainder (maze's .22)
    assert Counter(t.env for t in val) == {"maze": 12, **{e: 2 for e in ENVS if e != "maze"}}
    assert len(train) == len(trajs) - 30
    _, flat = split_train_val(trajs, val_size=30, seed=0, stratify=False)
    assert len(flat) == 30


def test_split_is_stable_when_data_is_added(sciworld):
    base, added = sciworld[:595], sciworld[595:]
    _, val_before = split_train_val(base, val_fraction=0.2, seed=0)
    _, val_after = split_train_val(base + added, val_fraction=0.2, seed=0)
    before, after = set(ids(val_before)), {i for i in ids(val_after) if i in set(ids(base))}
    # only boundary trajectories move: at most one per added trajectory, plus one for the larger quota
    assert len(before ^ after) <= len(added) + 1


def test_split_rejects_bad_options(sample):
    with pytest.raises(ConfigError, match="data.val_fraction"):
        split_train_val(sample, val_fraction=1.5)
    with pytest.raises(ConfigError, match="not both"):
        split_train_val(sample, val_fraction=0.1, val_size=3)
    with pytest.raises(ConfigError, match="leaves no training data"):
        split_train_val(sample[:5], val_size=5)


def test_apply_filters_reports_every_drop(sample, maze):
    trajs = sample + maze  # maze's first 40 appear twice
    cfg = FilterConfig(envs=["maze", "sciworld", "sqlgym", "mazee"], min_steps=2, max_steps=30,
                       max_per_env=100, seed=0)
    kept, report = apply_filters(trajs, cfg)
    d = report["dropped"]
    assert report["n_in"] == len(trajs) and report["n_out"] == len(kept)
    assert sum(d.values()) == len(trajs) - len(kept)
    listed = [t for t in trajs if t.env in ("maze", "sciworld", "sqlgym")]
    assert d["env"] == 7 * 40
    # all 40 sqlgym trajectories are single-step; some maze ones too
    assert d["min_steps"] == sum(t.n_steps < 2 for t in listed) > 40
    assert d["max_steps"] == sum(t.n_steps > 30 for t in listed) > 0
    assert d["duplicate"] == sum(1 for t in sample if t.env == "maze" and 2 <= t.n_steps <= 30)
    assert report["envs_not_found"] == ["mazee"]
    assert report["per_env"] == dict(Counter(t.env for t in kept))
    assert report["per_env"]["maze"] == 100 and d["max_per_env"] > 0
    assert len(set(ids(kept))) == len(kept) and report["renamed_ids"] > 0


def test_filter_config_from_the_real_data_config():
    data_cfg = OmegaConf.load(CONF_DIR / "data" / "agenttraj_l.yaml")
    cfg = FilterConfig.from_mapping(data_cfg, seed=42)
    assert cfg == FilterConfig(envs=None, min_steps=1, max_steps=None, dedupe=True, max_per_env=None, seed=42)
    data_cfg.envs = ["webshop", "maze"]
    assert FilterConfig.from_mapping(data_cfg).envs == ["maze", "webshop"]
