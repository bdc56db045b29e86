"""SciWorldEnv against the real AgentTraj-L ScienceWorld trajectories (AgentGym's text interface is the spec).

ScienceWorld lists a room's objects in hash-set order, which AgentGym's JVM randomised; our JVM fixes it
(`deterministic=True`) but cannot reproduce AgentGym's draws. So besides exact equality the replay counts
observations equal *up to order*: the same lines in any order, each line holding the same words in any
order (`_unordered`). That tolerates the reordered object lists ("On the table is: a, b, c" included) and
nothing that changes which objects, states or numbers are shown.
"""

from __future__ import annotations

import json
import re
import socket
from collections import Counter
from pathlib import Path

import pytest

from atlas_exp.envs.sciworld import DEFAULT_ENV_STEP_LIMIT, DEFAULT_MAX_STEPS, INSTRUCTION, NO_KNOWN_ACTION, SciWorldEnv
from atlas_exp.envs.sciworld_items import TASKS, SciWorldEpisode, item_space, n_items, task_split
from atlas_exp.errors import ConfigError, DataError

#: replay every 15th record of each task (in item order): 149 of the 2,120 trajectories, all 22 tasks
SAMPLE_STRIDE = 15


@pytest.fixture(scope="module")
def records(agenttraj_dir: Path) -> list[dict]:
    with open(agenttraj_dir / "sciworld.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def env():
    """One JVM for the module (starting one is the slow part)."""
    e = SciWorldEnv()
    yield e
    e.close()


def _unordered(text: str) -> list[tuple[str, ...]]:
    """Lines in any order, words within a line in any order (see the module docstring)."""
    return sorted(tuple(sorted(re.findall(r"[^\s,.()]+", line))) for line in text.split("\n"))


def _replay(env: SciWorldEnv, rec: dict):
    """Play a record's actions until the env is done; yields (observation, data observation or None)."""
    conv = rec["conversations"]
    yield env.reset(SciWorldEpisode.from_item(rec["item_id"])), conv[2]["value"]
    for i in range(3, len(conv), 2):
        if env.done:  # the data often go on after the task is complete (a final "wait1")
            return
        result = env.step(env.action_from_reply(conv[i]["value"]))
        yield result, (conv[i + 1]["value"] if i + 1 < len(conv) else None)


@pytest.mark.slow
def test_replay_agenttraj_l(records, env):
    assert len(records) == 2120
    by_task: dict[str, list[dict]] = {}
    for rec in sorted(records, key=lambda r: int(r["item_id"].split("_")[1])):
        by_task.setdefault(SciWorldEpisode.from_item(rec["item_id"]).task, []).append(rec)
    sample = [rec for recs in by_task.values() for rec in recs[::SAMPLE_STRIDE]]
    assert len(sample) >= 100
    n_success = n_first = n_first_unordered = n_obs = n_obs_equal = n_obs_unordered = 0
    tasks = set()
    for rec in sample:
        assert rec["conversations"][0]["value"] == INSTRUCTION
        steps = _replay(env, rec)
        first, data_first = next(steps)
        n_first += first == data_first
        n_first_unordered += _unordered(first) == _unordered(data_first)
        result = None
        for result, data_obs in steps:
            if data_obs is not None:
                n_obs += 1
                n_obs_equal += result.observation == data_obs
                n_obs_unordered += _unordered(result.observation) == _unordered(data_obs)
        tasks.add(env.episode.task)
        ok = result is not None and result.done and result.success
        n_success += ok
        if ok:
            assert result.info["score"] == 1.0 and result.info["raw_score"] == 100
    n = len(sample)
    print(f"\nsciworld replay ({n} trajectories, {len(tasks)} tasks): success {n_success}/{n} = {n_success / n:.3f}; "
          f"first observation equal {n_first / n:.3f}, equal up to object order {n_first_unordered}/{n} = "
          f"{n_first_unordered / n:.3f}; step observations equal {n_obs_equal}/{n_obs} = {n_obs_equal / n_obs:.3f}, "
          f"up to object order {n_obs_unordered}/{n_obs} = {n_obs_unordered / n_obs:.3f}")
    assert len(tasks) == len(TASKS)
    assert n_success / n >= 0.90
    assert n_first_unordered / n >= 0.90
    assert n_obs_unordered / n_obs >= 0.95


def test_item_mapping_and_item_space(records):
    assert n_items() == len(item_space()) == 4339
    assert SciWorldEpisode.from_item("sciworld_0") == SciWorldEpisode(id="sciworld_0", task="task-1-boil", variation=0)
    assert SciWorldEpisode.from_item(30) == SciWorldEpisode(id="sciworld_30", task="task-1-melt", variation=0)
    last = SciWorldEpisode.from_item(4338)
    assert (last.task, last.variation, last.split) == ("task-7-identify-life-stages-2", 9, "test")
    assert SciWorldEpisode(task="3-3", variation=7).task == "task-2a-test-conductivity"  # AgentGym's key works too
    items = item_space()
    assert [it.index for it in items] == list(range(4339))
    assert items[1234].id == "sciworld_1234" and SciWorldEpisode.from_item(1234).task == items[1234].task
    # ScienceWorld's own split: AgentTraj-L holds train variations only, so dev/test items are held out
    splits = Counter(it.split for it in items)
    assert splits == {"train": 2162, "dev": 1081, "test": 1096}
    assert len(item_space("test")) == 1096 and {it.split for it in item_space("dev")} == {"dev"}
    data_items = {int(r["item_id"].split("_")[1]) for r in records}
    assert all(items[i].split == "train" for i in data_items)
    assert not data_items & {it.index for it in item_space("test")}
    assert task_split("task-1-boil", 13) == "train" and task_split("task-1-boil", 14) == "dev"
    assert task_split("task-1-boil", 21) == "test"


def test_task_table_matches_the_jar(env):
    """TASKS (hard-coded so that items map without a JVM) agrees with the 1.0.2 jar."""
    gw = env._gateway()
    jar_tasks = set(gw.getTaskNames())
    assert {t.name for t in TASKS} <= jar_tasks and len(jar_tasks) == 30
    for t in TASKS:
        gw.load(t.name, 0, env.simplifications, False)
        assert gw.getTaskMaxVariations(t.name) == t.n_variations, t.name
        assert list(gw.getVariationsTrain()) == list(range(t.n_train)), t.name
        assert list(gw.getVariationsDev()) == list(range(t.n_train, t.n_train + t.n_dev)), t.name
        assert list(gw.getVariationsTest()) == list(range(t.n_train + t.n_dev, t.n_variations)), t.name


def test_short_episode_scores_and_rewards(records, env):
    # a lifespan trajectory: a handful of focus actions to score 100
    rec = next(r for r in records if SciWorldEpisode.from_item(r["item_id"]).task.startswith("task-6-lifespan"))
    results = [r for r, _ in list(_replay(env, rec))[1:]]
    assert results[-1].done and results[-1].success and not results[-1].info["truncated"]
    assert results[-1].info["completed"] and results[-1].info["score"] == 1.0
    assert sum(r.reward for r in results) == pytest.approx(1.0)
    assert all(not r.done for r in results[:-1])
    with pytest.raises(RuntimeError):
        env.step("look around")


def test_same_episode_same_text(records, env):
    """With deterministic=True an episode's text depends only on (task, variation, actions), not on what the
    JVM played before, so evaluations are repeatable."""
    actions = ["look around", "go to kitchen", "look around", "open fridge", "look around", "inventory"]

    def play(item):
        return [env.reset(item)] + [env.step(a).observation for a in actions]

    first = play(0)
    play(1234)
    assert play(0) == first
    assert first[0].startswith("Your task is to boil water.") and "\nThis room is called the hallway." in first[0]
    assert first[2] == "You move to the kitchen."


def test_episode_ends_at_max_steps(env):
    env.max_steps = 3
    try:
        env.reset(SciWorldEpisode(task="task-1-boil", variation=3))
        results = [env.step(a) for a in ("look around", "flap wings", "inventory")]
        assert [r.done for r in results] == [False, False, True]
        assert results[1].observation == NO_KNOWN_ACTION and not results[1].info["recognized"]
        last = results[-1]
        assert last.info["truncated"] and not last.success and last.reward == 0.0 and last.info["steps"] == 3
        with pytest.raises(RuntimeError):
            env.step("look around")
        env.reset(5)  # a new episode starts afresh
        assert env.steps_taken == 0 and not env.step("look around").done
    finally:
        env.max_steps = DEFAULT_MAX_STEPS


def test_episode_ends_after_env_step_limit_moves(env):
    """AgentGym's server stops past 100 ScienceWorld moves (clock ticks: looking costs none, "wait" 11)."""
    env.env_step_limit = 12
    try:
        env.reset(SciWorldEpisode(task="task-1-boil", variation=3))
        assert [env.step("look around").info["moves"], env.step("inventory").info["moves"]] == [0, 0]
        first = env.step("wait")
        assert first.info["moves"] == 11 and not first.done
        last = env.step("wait1")
        assert last.info["moves"] == 13 and last.done and last.info["truncated"] and not last.success
        assert last.info["steps"] == 4
    finally:
        env.env_step_limit = DEFAULT_ENV_STEP_LIMIT


def test_failing_the_task_ends_the_episode(env):
    """Focusing on a wrong object fails a task: ScienceWorld's score -100, episode over, score reported as 0."""
    env.reset(SciWorldEpisode(task="task-1-boil", variation=0))
    res = env.step("focus on picture")
    assert res.done and not res.success and res.info["failed"] and res.info["raw_score"] < 0
    assert res.info["score"] == 0.0 and not res.info["truncated"]


def test_action_from_reply():
    env = SciWorldEnv()  # no JVM until reset
    assert env.action_from_reply("Thought:\nI go.\n\nAction:\ngo to kitchen") == "go to kitchen"
    assert env.action_from_reply("Thought:\nx\n\nAction:\nopen door to kitchen</s>") == "open door to kitchen"
    # AgentGym's client keeps the text between the first and a second "Action:"
    assert env.action_from_reply("Action: look around\nAction: inventory") == "look around"
    assert env.action_from_reply("Thought:\nno action here") is None
    assert env.action_from_reply("Action:\n  ") is None


def test_errors(monkeypatch):
    with pytest.raises(DataError, match="0..4338"):
        SciWorldEpisode.from_item(4339)
    with pytest.raises(DataError, match="0..4338"):
        SciWorldEpisode.from_item("sciworld_99999")
    with pytest.raises(DataError, match="sciworld_<i>"):
        SciWorldEpisode.from_item("babyai_3")
    with pytest.raises(ConfigError, match="unknown ScienceWorld task 'task-99-fly'"):
        SciWorldEpisode(task="task-99-fly")
    with pytest.raises(ConfigError, match="0..29"):
        SciWorldEpisode(task="task-1-boil", variation=30)
    with pytest.raises(ConfigError, match="split"):
        item_space("validation")
    with pytest.raises(ConfigError, match="max_steps"):
        SciWorldEnv(max_steps=0)
    with pytest.raises(ConfigError, match="simplifications: unknown fastForward"):
        SciWorldEnv(simplifications="openDoors,fastForward")
    with pytest.raises(TypeError):
        SciWorldEnv().reset("sciworld_3")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):
        SciWorldEnv().step("look around")
    with pytest.raises(ConfigError, match="Java 17"):
        SciWorldEnv(java="no-such-java-binary").reset(0)
    with socket.socket() as busy:  # a port someone else listens on is refused, not talked to
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ConfigError, match="in use"):
            SciWorldEnv(port=busy.getsockname()[1]).reset(0)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match="Java 17"):
        SciWorldEnv().reset(0)


def test_close_stops_the_jvm():
    env = SciWorldEnv()
    env.reset(SciWorldEpisode(task="task-6-lifespan-(longest-lived)", variation=0))
    proc = env._server.proc
    assert proc.poll() is None
    env.close()
    assert proc.poll() is not None
    env.close()  # twice is fine
