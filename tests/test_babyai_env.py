"""BabyAIEnv against the real AgentTraj-L BabyAI trajectories (AgentGym's text interface is the spec)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atlas_exp.envs.babyai import (
    INSTRUCTION,
    LEVELS,
    NOT_RECOGNIZED,
    BabyAIEnv,
    BabyAIEpisode,
)
from atlas_exp.errors import DataError


@pytest.fixture(scope="module")
def records(agenttraj_dir: Path) -> list[dict]:
    with open(agenttraj_dir / "babyai.jsonl") as f:
        return [json.loads(line) for line in f]


def _action(reply: str) -> str:
    """What AgentGym's BabyAI client sent: everything after the last `Action:`, stripped."""
    return reply.split("Action:")[-1].strip()


def test_replay_agenttraj_l(records):
    assert len(records) == 810
    env = BabyAIEnv(max_steps=100)  # the data's own lengths decide; the default cap is tested below
    n_success = n_first = n_obs = n_obs_equal = 0
    for rec in records:
        conv = rec["conversations"]
        assert conv[0]["value"] == INSTRUCTION
        first = env.reset(BabyAIEpisode.from_item(rec["item_id"]))
        n_first += first == conv[2]["value"]
        result = None
        for i in range(3, len(conv), 2):
            if env.done:
                break
            result = env.step(_action(conv[i]["value"]))
            if i + 1 < len(conv):
                n_obs += 1
                n_obs_equal += result.observation == conv[i + 1]["value"]
        n_success += bool(result is not None and result.success and result.done and result.reward > 0.5)
    env.close()
    n = len(records)
    print(f"\nbabyai replay: success {n_success}/{n} = {n_success / n:.3f}; first observation equal "
          f"{n_first}/{n} = {n_first / n:.3f}; step observations equal {n_obs_equal}/{n_obs} = {n_obs_equal / n_obs:.3f}")
    assert n_success / n >= 0.90
    assert n_first / n >= 0.90


def test_item_mapping_and_episode_ids():
    ep = BabyAIEpisode.from_item("babyai_41")
    assert (ep.level, ep.seed, ep.id) == (LEVELS[1], 1, "babyai_41") == ("GoToRedBall", 1, "babyai_41")
    assert BabyAIEpisode.from_item(39) == BabyAIEpisode(id="babyai_39", level="BossLevelNoUnlock", seed=0)
    assert len(LEVELS) == 40
    with pytest.raises(DataError):
        BabyAIEpisode.from_item("textcraft_3")


def test_invalid_wording_costs_a_step_and_changes_nothing():
    env = BabyAIEnv()
    first = env.reset(BabyAIEpisode(level="GoToRedBall", seed=0))
    assert first.startswith("Your goal: go to the red ball\nIn front of you in this room")
    listing = env.step("check available actions").observation
    assert listing.startswith("You can take the following actions: turn left, turn right, move forward, ")
    assert listing.endswith(", check available actions") and "go to red ball 1" in listing
    for bad in ("pick up red ball 1", "go to red ball", "go to red ball 9", "turn around", "move forward\nturn left", ""):
        res = env.step(bad)
        assert res.observation == NOT_RECOGNIZED and not res.info["recognized"] and not res.done
    assert env.steps_taken == 7
    # the state did not move: the description is the same as at the start
    assert env.describe() == first.split("\n", 1)[1]
    # case is not significant (AgentGym accepted "Toggle and go through ..." / "Move forward")
    assert env.step("Turn Left").info["recognized"]


def test_go_to_reaches_the_goal():
    env = BabyAIEnv()
    env.reset(BabyAIEpisode(level="GoToRedBall", seed=0))
    res = env.step("go to red ball 1")
    assert res.done and res.success and res.reward > 0.5
    assert "There is a red ball 1 right in front of you 1 steps away." in res.observation
    with pytest.raises(RuntimeError):
        env.step("turn left")


def test_episode_ends_at_max_steps():
    env = BabyAIEnv(max_steps=3)
    env.reset(5)
    results = [env.step("turn left") for _ in range(3)]
    assert [r.done for r in results] == [False, False, True]
    assert not results[-1].success and results[-1].info["truncated"] and results[-1].reward == 0.0
    with pytest.raises(RuntimeError):
        env.step("turn left")
    env.reset(5)  # a new episode starts afresh
    assert env.steps_taken == 0 and not env.step("turn left").done


def test_deterministic_per_seed():
    actions = ["turn left", "move forward", "check available actions", "turn right", "move forward"]

    def play(ep):
        env = BabyAIEnv()
        return [env.reset(ep)] + [env.step(a).observation for a in actions]

    ep = BabyAIEpisode(level="PickupLoc", seed=3)
    assert play(ep) == play(ep)
    env = BabyAIEnv()
    assert env.reset(BabyAIEpisode.from_item(18)) != env.reset(BabyAIEpisode.from_item(58))  # same level, seeds 0, 1


def test_reset_rejects_other_specs():
    env = BabyAIEnv()
    with pytest.raises(TypeError):
        env.reset("babyai_3")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):
        BabyAIEnv().step("turn left")
    with pytest.raises(ValueError):
        BabyAIEnv(max_steps=0)
