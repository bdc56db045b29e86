"""MazeEnv against the real AgentTraj-L Maze trajectories (AgentGym's LMRL-Gym wording is the spec)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atlas_exp.envs.base import Env
from atlas_exp.envs.maze import (
    FAILURE,
    GOAL,
    INSTRUCTION,
    LAYOUT,
    PREAMBLE,
    STARTS,
    SUCCESS,
    MazeEnv,
    MazeEpisode,
    describe,
)
from atlas_exp.errors import DataError


@pytest.fixture(scope="module")
def records(agenttraj_dir: Path) -> list[dict]:
    with open(agenttraj_dir / "maze.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_replay_agenttraj_l(records):
    """Every trajectory: the same prompts, every observation identical, the goal at exactly the last action."""
    assert len(records) == 215
    env = MazeEnv()
    assert isinstance(env, Env) and env.name == "maze"
    n_first = n_obs = n_equal = n_goal = 0
    for rec in records:
        conv = rec["conversations"]
        assert conv[0]["value"] == env.instruction() == INSTRUCTION and conv[1]["value"] == env.ack
        n_first += env.reset(MazeEpisode.from_item(rec["item_id"])) == conv[2]["value"]
        result, i = None, 3
        for i in range(3, len(conv), 2):
            action = env.action_from_reply(conv[i]["value"])
            assert action is not None
            result = env.step(action)
            if i + 1 < len(conv):
                n_obs += 1
                n_equal += result.observation == conv[i + 1]["value"]
            if result.done:
                break
        n_goal += bool(result and result.success and result.done and i == len(conv) - 1)
    print(f"\nmaze replay: first observations {n_first}/215, step observations {n_equal}/{n_obs}, goal {n_goal}/215")
    assert (n_first, n_equal, n_obs, n_goal) == (215, 700, 700, 215)


def test_layout_and_items():
    assert len(LAYOUT) == 10 and {len(row) for row in LAYOUT} == {13}
    free = {(r, c) for r, row in enumerate(LAYOUT) for c, ch in enumerate(row) if ch == "."}
    assert len(free) == 26 == len(STARTS) and set(STARTS) == free and STARTS[-1] == GOAL
    ep = MazeEpisode.from_item("lmrlgym_maze_13")
    assert (ep.id, ep.start) == ("lmrlgym_maze_13", (5, 3)) == (MazeEpisode.from_item(13).id, STARTS[13])
    assert MazeEpisode.from_item("maze_0").start == (1, 1)
    for bad in (26, -1, "lmrlgym_maze_x", "wordle_3"):
        with pytest.raises(DataError):
            MazeEpisode.from_item(bad)
    with pytest.raises(DataError, match="free cell"):
        MazeEpisode(start=(0, 0))
    with pytest.raises(TypeError):
        MazeEnv().reset("lmrlgym_maze_3")  # type: ignore[arg-type]


def test_observation_wording():
    assert describe((5, 4)) == ("The goal is at position 8, 6. Your current position is at position 5, 4. "
                                "There are walls above you, below you.\n")
    assert describe((5, 6)).endswith("There is a wall above you.\n")
    assert describe((1, 3)).endswith("There is a wall above you.\n")
    assert describe((8, 6)).endswith("There are walls to your right, to your left, below you.\n")
    assert describe((1, 10)).startswith("The goal is at position 8, 6. Your current position is at position 1, 10.")
    env = MazeEnv()
    assert env.reset(17) == PREAMBLE + "\n" + describe((6, 6))


def test_walls_invalid_actions_and_success():
    env = MazeEnv()
    env.reset(MazeEpisode(start=(6, 6)))
    res = env.step("move left")  # a wall: no move, the normal observation, a step
    assert res.observation == describe((6, 6)) and not res.done and res.reward == 0.0 and res.info["recognized"]
    res = env.step("Move down")  # case matters, as in LMRL-Gym's action table
    assert res.observation == describe((6, 6)) and not res.info["recognized"] and env.steps_taken == 2
    res = env.step("move down")
    assert res.observation == describe((7, 6)) and not res.done
    res = env.step("move down")
    assert (res.observation, res.reward, res.done, res.success) == (SUCCESS, 1.0, True, True)
    with pytest.raises(RuntimeError):
        env.step("move up")
    # item 25 starts on the goal (the data hold 39 such episodes): a blocked first move is already a success
    env.reset(25)
    assert env.step("move down").success


def test_step_cap_answers_failure_after_max_steps():
    env = MazeEnv(max_steps=3)
    env.reset(0)
    for _ in range(3):
        res = env.step("move up")
        assert not res.done and res.observation == describe((1, 1))
    res = env.step("move right")  # the call after the cap: Failure, before moving
    assert (res.observation, res.reward, res.done, res.success) == (FAILURE, -1.0, True, False)
    assert res.info["truncated"] and res.info["position"] == (1, 1)


def test_action_from_reply_follows_the_data_client():
    env = MazeEnv()
    assert env.action_from_reply("Thought:\nx\n\nAction:\nmove right\n") == "move right"
    assert env.action_from_reply("Action: move up</s>") == "move up"
    assert env.action_from_reply("Action:\nmove up\nAction:\nmove down") == "move up"
    assert env.action_from_reply("Action:\nmove up\n\nThen down.") == "move up\n\nThen down."  # as sent in 2024
    assert env.action_from_reply("move up") is None and env.action_from_reply("Action:\n  ") is None
