"""TextCraft speaks AgentGym's text exactly, replays the real AgentTraj-L data, and its expert always wins."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from atlas_exp.data.trajectory import Trajectory
from atlas_exp.envs import Env, StepResult, parse_action
from atlas_exp.envs.textcraft import (
    INSTRUCTION,
    MAX_DISTRACTORS,
    TextCraftEnv,
    TextCraftEpisode,
    clean_action,
    crafting_tree,
    episode_for_goal,
    goal_pool,
    sample_episode,
)
from atlas_exp.envs.textcraft_expert import ACK, RecordStats, expert_turns, record_expert_trajectories
from atlas_exp.errors import DataError


@pytest.fixture(scope="module")
def records(agenttraj_dir: Path) -> list[dict]:
    with open(agenttraj_dir / "textcraft.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def expert_200() -> list[Trajectory]:
    return record_expert_trajectories(200, seed=7, progress=False)


# ----------------------------------------------------------------------------------------- real-data replay


def test_replaying_all_agenttraj_l_trajectories_reaches_their_goals(records):
    """Every AgentTraj-L TextCraft trajectory, replayed action by action, shows the same text and succeeds."""
    assert len(records) == 374
    env = TextCraftEnv()
    successes = same_obs = n_obs = 0
    for rec in records:
        conv = rec["conversations"]
        assert env.instruction() == conv[0]["value"]
        episode = TextCraftEpisode.from_observation(conv[2]["value"], id=rec["item_id"])
        assert env.reset(episode) == conv[2]["value"]
        result = None
        for i in range(3, len(conv), 2):
            assert conv[i]["from"] == "gpt"
            result = env.step(env.action_from_reply(conv[i]["value"]))
            if i + 1 < len(conv):
                n_obs += 1
                same_obs += result.observation == conv[i + 1]["value"]
            if result.done:
                break
        # success exactly on the trajectory's last action, as the data end there
        successes += bool(result and result.success and i == len(conv) - 1)
    rate, obs_rate = successes / len(records), same_obs / n_obs
    print(f"\nTextCraft replay: {successes}/{len(records)} reach the goal ({rate:.1%}); "
          f"step observations equal to the data: {same_obs}/{n_obs} ({obs_rate:.2%})")
    assert rate >= 0.95  # measured 374/374
    # measured 2616/2618: the two others come from AgentGym's server mutating its shared recipe lists
    assert obs_rate >= 0.99


def test_a_reply_without_action_is_sent_whole_like_agentgym(records):
    """AgentGym's client sends the cleaned-up whole reply when there is no `Action:`; the data show it."""
    env = TextCraftEnv()
    reply = ("Thought:\n4 strings are not available in the environment. I need them to craft white wool. "
             "Thus, this task cannot be completed currently.")
    assert parse_action(reply) is None
    sent = env.action_from_reply(reply)
    assert sent.startswith("Thought4 strings are not available in the environment I need")
    seen = [c for r in records for c in r["conversations"] if c["value"] == "Instruction:\nCould not execute " + sent]
    assert len(seen) == 1
    env.reset(0)
    assert env.step(sent).observation == "Instruction:\nCould not execute " + sent


def test_expert_solves_every_data_episode_within_the_limit(records):
    """The planner also handles AgentGym's own command lists (generic ingredients, alternatives, distractors)."""
    env = TextCraftEnv()
    lengths = []
    for rec in records:
        episode = TextCraftEpisode.from_observation(rec["conversations"][2]["value"], id=rec["item_id"])
        lengths.append(len(expert_turns(episode, random.Random(0), env)))
    assert max(lengths) <= env.max_steps
    print(f"\nexpert on the 374 data episodes: {sum(lengths) / len(lengths):.2f} actions on average")


# ------------------------------------------------------------------------------------------ env behaviour


def test_env_implements_the_protocol():
    env = TextCraftEnv()
    assert isinstance(env, Env) and env.name == "textcraft"
    assert env.instruction() == INSTRUCTION
    first = env.reset(3)
    assert first.startswith("Instruction:\nCrafting commands:\n") and first.endswith(".")
    result = env.step("inventory")
    assert isinstance(result, StepResult)
    assert result.observation == "Instruction:\nInventory: You are not carrying anything."
    assert (result.reward, result.done, result.success) == (0.0, False, False)


def test_observations_use_the_data_wording():
    env = TextCraftEnv()
    env.reset(TextCraftEpisode(goal="iron bars", commands=("craft 16 iron bars using 6 iron ingot",)))
    assert env.step("get 6 iron ingot").observation == "Instruction:\nGot 6 iron ingot"
    assert env.step("get 1 iron bars").observation == "Instruction:\nCould not find iron bars"
    assert env.step("inventory").observation == "Instruction:\nInventory: [iron ingot] (6)"  # no trailing space
    bad = env.step("craft 16 iron bars using 7 iron ingot")
    assert bad.observation == "Instruction:\nCould not find enough items to craft minecraft:iron_bars"
    done = env.step("craft 16 iron bars using 6 iron ingot")
    assert done.observation == "Instruction:\nCrafted 16 minecraft:iron_bars"
    assert (done.reward, done.done, done.success) == (1.0, True, True)
    with pytest.raises(RuntimeError):
        env.step("inventory")


def test_getting_the_goal_item_counts_as_success_like_agentgym():
    """AgentGym rewards `get <goal>` (the PyPI fork does not); iron ingot is fetchable by the data's load order."""
    env = TextCraftEnv()
    env.reset(TextCraftEpisode(goal="iron ingot", commands=()))
    result = env.step("get 2 iron ingot")
    assert result.observation == "Instruction:\nGot 2 iron ingot"
    assert result.success and result.done and result.reward == 1.0
    tree = crafting_tree()
    assert not tree.is_craftable("minecraft:iron_ingot") and tree.is_craftable("minecraft:honey_bottle")


def test_an_invalid_action_gets_the_usual_error_and_costs_a_step():
    env = TextCraftEnv(max_steps=5)
    env.reset(11)
    result = env.step("dance around the table")
    assert result.observation == "Instruction:\nCould not execute dance around the table"
    assert not result.done and env.steps_taken == 1
    # AgentGym's client cleans punctuation before the game sees the action
    assert env.step("Inventory.").observation == "Instruction:\nCould not execute Inventory"
    assert clean_action("get 1 jack o'lantern!\n") == "get 1 jack olantern"


def test_the_episode_ends_at_max_steps():
    env = TextCraftEnv(max_steps=3)
    env.reset(5)
    results = [env.step("inventory") for _ in range(3)]
    assert [r.done for r in results] == [False, False, True]
    assert not results[-1].success and results[-1].info["truncated"]
    with pytest.raises(RuntimeError):
        env.step("inventory")
    env.reset(5)  # a reset starts over
    assert not env.step("inventory").done


def test_episode_parsing_round_trips_and_rejects_other_text():
    episode = sample_episode(42)
    assert TextCraftEpisode.from_observation(episode.first_observation()) == TextCraftEpisode(
        goal=episode.goal, commands=episode.commands
    )
    with pytest.raises(DataError):
        TextCraftEpisode.from_observation("Instruction:\nGot 6 iron ingot")


def test_new_episodes_follow_the_documented_sampling_rule():
    pool = goal_pool()
    assert len(pool) == 544  # items with recipe depth >= 1, as in AgentGym
    assert sample_episode(9) == sample_episode(9)
    goals = {sample_episode(s).goal for s in range(300)}
    assert goals <= set(pool) and len(goals) > 150
    tree = crafting_tree()
    for seed in range(50):
        ep = sample_episode(seed)
        needed = {r.recipe_str for r in tree.itemid_recipes[ep.goal]}
        assert needed <= set(ep.commands)
        assert len(set(ep.commands)) == len(ep.commands)
    # at most 10 distractors: the commands beyond the goal's recipe closure
    ep = episode_for_goal("minecraft:powered_rail", random.Random(0))
    assert len(ep.commands) <= 12 + MAX_DISTRACTORS and "craft 6 powered rail using 1 redstone, 1 stick, 6 gold ingot" in ep.commands


# ------------------------------------------------------------------------------------------ parse helper


@pytest.mark.parametrize(
    "reply, action",
    [
        ("Thought:\nI need sticks.\n\nAction:\nget 2 bamboo", "get 2 bamboo"),
        ("Thought:\nok\n\nAction:\n  craft 4 stick using 2 bamboo  \n", "craft 4 stick using 2 bamboo"),
        ("Thought: check\nAction: inventory", "inventory"),
        ("Thought:\nx\n\nAction :\n\n\ninventory\n", "inventory"),
        ("Thought:\na\nAction:\nget 1 stone\nThought:\nno, wait\nAction:\nget 2 stone", "get 2 stone"),
        ("Thought:\nx\n\nAction:\nget 1 stone\nObservation: Got 1 stone", "get 1 stone"),
        ("Thought:\nI am stuck.", None),
        ("Thought:\nx\n\nAction:\n   \n", None),
        ("", None),
    ],
)
def test_parse_action(reply, action):
    assert parse_action(reply) == action


# -------------------------------------------------------------------------------------------------- expert


def test_every_expert_trajectory_reaches_the_goal_in_a_fresh_env(expert_200):
    assert len(expert_200) == 200
    for traj in expert_200:
        env = TextCraftEnv()
        msgs = traj.messages
        assert env.reset(TextCraftEpisode.from_observation(msgs[2].content)) == msgs[2].content
        result = None
        for k, m in enumerate(msgs[3:], start=3):
            if m.role == "assistant":
                action = parse_action(m.content)
                assert action is not None and env.action_from_reply(m.content) == action
                result = env.step(action)
                if k + 1 < len(msgs):
                    assert result.observation == msgs[k + 1].content
        assert result is not None and result.success and result.done, traj.id


def test_expert_trajectories_have_the_agenttraj_l_shape(expert_200):
    for i, traj in enumerate(expert_200):
        assert traj.id == f"textcraft_expert_7_{i}" and traj.env == "textcraft"
        assert traj.source == f"textcraft_expert:seed=7:{i}"
        roles = [m.role for m in traj.messages]
        assert roles[:3] == ["user", "assistant", "user"] and roles[-1] == "assistant"
        assert all(a != b for a, b in zip(roles, roles[1:]))
        assert traj.messages[0].content == INSTRUCTION
        assert traj.messages[1].content == ACK and not traj.messages[1].trainable and traj.messages[1].step is None
        assert all(m.content.startswith("Thought:\n") and "\n\nAction:\n" in m.content for m in traj.steps)
        assert all(m.content.startswith("Instruction:\n") for m in traj.messages[2::2])
        assert 1 <= traj.n_steps <= 20
        assert Trajectory.from_dict(json.loads(traj.to_json())).to_dict() == traj.to_dict()
    assert len({t.content_hash() for t in expert_200}) == 200


def test_the_same_seed_gives_identical_trajectories(expert_200):
    again = record_expert_trajectories(200, seed=7, progress=False)
    assert [t.to_dict() for t in again] == [t.to_dict() for t in expert_200]
    other = record_expert_trajectories(20, seed=8, progress=False)
    assert [t.content_hash() for t in other] != [t.content_hash() for t in expert_200[:20]]


def test_episodes_too_long_for_the_step_limit_are_resampled_and_counted():
    stats = RecordStats()
    trajs = record_expert_trajectories(60, seed=3, max_steps=4, progress=False, stats=stats)
    assert len(trajs) == stats.recorded == 60
    assert all(t.n_steps <= 4 for t in trajs)
    assert stats.over_budget > 0 and stats.uncraftable == 0
    assert sum(t.meta["attempt"] for t in trajs) == stats.dropped
