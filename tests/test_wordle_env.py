"""WordleEnv against the real AgentTraj-L Wordle trajectories (AgentGym's LMRL-Gym wording is the spec)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from atlas_exp.envs.base import Env
from atlas_exp.envs.wordle import (
    INSTRUCTION,
    INVALID,
    VOCAB_FILE,
    WordleEnv,
    WordleEpisode,
    feedback,
    first_observation,
    read_vocabulary,
    target_for,
    vocabulary,
)
from atlas_exp.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def records(agenttraj_dir: Path) -> list[dict]:
    with open(agenttraj_dir / "wordle.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_replay_agenttraj_l(records):
    """Hidden word = the final guess (no item rule reproduces the data's words): every feedback string and
    prompt identical, every trajectory solved exactly at its last guess."""
    assert len(records) == 955
    env = WordleEnv()
    assert isinstance(env, Env) and env.name == "wordle"
    n_first = n_obs = n_equal = n_solved = 0
    for rec in records:
        conv = rec["conversations"]
        assert conv[0]["value"] == env.instruction() == INSTRUCTION and conv[1]["value"] == env.ack
        answer = env.action_from_reply(conv[-1]["value"]).replace(" ", "")
        n_first += env.reset(WordleEpisode(id=rec["item_id"], target=answer)) == conv[2]["value"]
        result, i = None, 3
        for i in range(3, len(conv), 2):
            result = env.step(env.action_from_reply(conv[i]["value"]))
            if i + 1 < len(conv):
                n_obs += 1
                n_equal += result.observation == conv[i + 1]["value"]
            if result.done:
                break
        n_solved += bool(result and result.success and result.reward == 1.0 and i == len(conv) - 1)
    print(f"\nwordle replay: prompts {n_first}/955, feedback {n_equal}/{n_obs}, solved {n_solved}/955")
    assert (n_first, n_equal, n_obs, n_solved) == (955, 3100, 3100, 955)


def test_vocabulary_is_the_data_prompts_list(records):
    words = vocabulary()
    assert len(words) == 431 == len(set(words)) and words[0] == "elect" and words[-1] == "motto"
    assert first_observation() == records[0]["conversations"][2]["value"]
    header = [ln for ln in VOCAB_FILE.read_text(encoding="utf-8").splitlines() if ln.startswith("#")]
    assert any("MIT" in ln for ln in header) and any("AgentTraj-L" in ln for ln in header)


def test_feedback_does_not_count_letters():
    assert feedback("could", "audio") == "b y y b y\n"
    assert feedback("atoll", "audio") == "g b y b b\n"
    # a repeated letter is "y" wherever the word has it elsewhere, even once (standard Wordle: "b" for extras)
    assert feedback("llama", "flake") == "y g g b y\n"
    assert feedback("audio", "audio") == "g g g g g\n"


def test_invalid_words_use_an_attempt_and_the_game_ends_after_six():
    env = WordleEnv()
    env.reset(WordleEpisode(target="audio"))
    for k, guess in enumerate(["x y z z y", "C O U L D", "abc", "zzzzz", "c o u l d"], 1):
        res = env.step(guess)
        assert res.info["steps"] == k and not res.done
    assert [r for r in (env.guesses,)] == [["xyzzy", "COULD", "abc", "zzzzz", "could"]]
    res = env.step("a t o l l")
    assert res.done and not res.success and res.reward == 0.0 and res.observation == "g b y b b\n"
    env.reset(WordleEpisode(target="audio"))
    assert env.step("COULD").observation == INVALID  # lowercase only, as LMRL-Gym's letter table
    res = env.step(" a u d i o ")
    assert res.success and res.done and res.reward == 1.0 and res.observation == "g g g g g\n"
    with pytest.raises(RuntimeError):
        env.step("audio")


def test_seeded_targets_for_items():
    ep = WordleEpisode.from_item("lmrlgym_wordle_7")
    assert ep.id == "lmrlgym_wordle_7" and ep.target == target_for(7) == random.Random(7).choice(vocabulary())
    assert WordleEpisode.from_item(7) == ep and WordleEnv().reset(7) == first_observation()
    targets = {target_for(n) for n in range(25)}
    assert targets <= set(vocabulary()) and len(targets) > 20
    for bad in ("maze_3", -2, "lmrlgym_wordle_"):
        with pytest.raises(DataError):
            WordleEpisode.from_item(bad)
    with pytest.raises(DataError):
        WordleEpisode(target="Audio")
    with pytest.raises(DataError, match="not in the vocabulary"):
        WordleEnv().reset(WordleEpisode(target="qqqqq"))


def test_own_vocabulary_file(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("# mine\nabout\n\nhello\n", encoding="utf-8")
    env = WordleEnv(vocab_file=path)
    assert env.vocab == ("about", "hello") and "about\nhello\n```" in env.reset(WordleEpisode(target="hello"))
    assert env.step("a u d i o").observation == INVALID
    path.write_text("toolong\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="5-letter"):
        read_vocabulary(path)


def test_action_from_reply_follows_the_data_client():
    env = WordleEnv()
    assert env.action_from_reply("Thought:\nx\n\nAction:\nc o u l d\n") == "c o u l d"
    assert env.action_from_reply("no action") is None
