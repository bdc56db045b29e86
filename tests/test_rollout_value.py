"""selector=rollout_value: restoring envs from expert prefixes, advantages by hand, cache, failures, config."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_alfworld_env import alfworld_data  # noqa: F401 (a fixture: the valid splits, unpacked once)

from atlas_exp.data.importers import from_agentgym
from atlas_exp.data.trajectory import Message, Trajectory
from atlas_exp.envs.base import Env, EpisodeSpec, StepResult
from atlas_exp.errors import ConfigError, DataError
from atlas_exp.eval.restore import episode_for, recording
from atlas_exp.eval.rollout import EnvPool, EpisodeStart, EpisodeTask, PrefixMismatch, replay, run_episodes
from atlas_exp.selectors.base import n_to_select
from atlas_exp.selectors.rollout_value import RolloutValueSelector, seeded_top_k

# ------------------------------------------------------------------------------------------ a tiny env


@dataclass(frozen=True)
class LineEpisode(EpisodeSpec):
    start: int = 0


class LineEnv(Env):
    """A walk on the integers: `up`, `down`, `stay`; reaching 2 wins. Deterministic by construction."""

    name = "line"

    def __init__(self, max_steps: int = 50):
        self.max_steps = max_steps
        self.x = 0
        self.n = 0

    def instruction(self) -> str:
        return "Reach 2."

    def reset(self, episode) -> str:
        self.x, self.n = episode.start, 0
        return f"You are at {self.x}."

    def step(self, action: str) -> StepResult:
        self.x += {"up": 1, "down": -1}.get(action, 0)
        self.n += 1
        won = self.x == 2
        return StepResult(f"You are at {self.x}.", float(won), won or self.n >= self.max_steps, won,
                          {"truncated": not won and self.n >= self.max_steps})

    def episode_for_trajectory(self, traj_id: str, first: str, meta: dict) -> EpisodeSpec:
        return LineEpisode(id=traj_id, start=int(first.split()[-1].rstrip(".")))


class StatePolicy:
    """A scripted policy: below 1 it walks down (never wins), from 1 up (wins). Counts its calls."""

    name = "scripted"
    reply_neutral = ()
    loads_base_model = False

    def __init__(self, crash_after: int | None = None):
        self.calls = 0
        self.crash_after = crash_after
        self.stats = {"prompt_tokens": 0, "completion_tokens": 0}

    def generate(self, conversations):
        self.calls += 1
        if self.crash_after is not None and self.calls > self.crash_after:
            raise RuntimeError("crash")
        out = []
        for conv in conversations:
            x = int(conv[-1]["content"].split()[-1].rstrip("."))
            out.append("Thought:\nclimb\n\nAction:\n" + ("up" if x >= 1 else "down"))
            self.stats["prompt_tokens"] += len(conv)
            self.stats["completion_tokens"] += 1
        return out

    def describe(self):
        return {"policy": "scripted-by-state"}

    def close(self):
        pass


def line_traj(actions: list[str], id: str = "line_0", start: int = 0) -> Trajectory:
    msgs = [Message("user", "Reach 2."), Message("assistant", "OK.", trainable=False), Message("user", f"You are at {start}.")]
    x = start
    for k, a in enumerate(actions):
        msgs.append(Message("assistant", f"Thought:\nstep {k}\n\nAction:\n{a}", step=k))
        x += {"up": 1, "down": -1}.get(a, 0)
        msgs.append(Message("user", f"You are at {x}."))
    return Trajectory(id=id, env="line", messages=msgs)


def selector(tmp_path: Path, policy=None, **kw) -> RolloutValueSelector:
    opts = dict(ratio=0.5, seed=0, policy=policy or StatePolicy(), rollouts=2, temperature=0.7, max_turns=3,
                envs={"line": LineEnv}, cache_dir=str(tmp_path), progress=False, batch_size=4)
    opts.update(kw)
    return RolloutValueSelector(**opts)


# ------------------------------------------------------------------------------------------ hand computation


def test_advantages_equal_a_hand_computation(tmp_path):
    """Expert: stay (0), up (0->1), stay (1), up (1->2, wins). The policy wins from x >= 1 only, so
    V(s_0..s_3) = 0, 0, 1, 1 and V(s_4) = the expert's replayed win = 1: advantages 0, 1, 0, 0."""
    traj = line_traj(["stay", "up", "stay", "up"])
    sel = selector(tmp_path)
    (s,) = sel.select([traj])
    assert [c.score for c in s.steps] == [0.0, 1.0, 0.0, 0.0]
    assert s.meta["values"] == [0.0, 0.0, 1.0, 1.0, 1.0] and s.meta["final"] == "replayed"
    # top ratio: 2 of 4; step 1 for sure, the other from the ties {0, 2, 3} by the seeded rank
    assert len(s.selected_steps) == n_to_select(4, 0.5) == 2 and 1 in s.selected_steps
    assert set(s.selected_steps) == seeded_top_k([0.0, 1.0, 0.0, 0.0], 2, 0, "line_0")
    st = sel.stats()
    assert st["restart_points"] == 4 and st["points_rolled"] == 4 and st["rollouts"] == 8
    assert st["failed"] == 0 and st["completion_tokens"] > 0
    # env steps: the check replay (4), the rollouts' replays (0+1+2+3 per rollout, 2 rollouts), their turns
    assert st["env_steps_check"] == 4 and st["env_steps_replay"] == 2 * (0 + 1 + 2 + 3)
    assert st["env_steps"] == 4 + 12 + st["env_steps_rollout"]
    assert st["rollout_ends"] == {"max_turns": 4, "done": 4}
    sel.close()


def test_seeded_tie_break_is_reproducible_and_not_positional():
    ties = [0.5] * 10
    a = seeded_top_k(ties, 3, 7, "t")
    assert a == seeded_top_k(ties, 3, 7, "t")
    picks = {frozenset(seeded_top_k(ties, 3, s, "t")) for s in range(20)}
    assert len(picks) > 5  # the seed decides, not the position
    assert seeded_top_k([0.0, 0.9, 0.1], 1, 3, "t") == {1}  # scores first


def test_unfinished_recording_estimates_the_last_state_by_rollouts(tmp_path):
    """A recording that stops at x=1 (not done): V(s_2) comes from rollouts (the policy wins from 1)."""
    traj = line_traj(["stay", "up"])
    sel = selector(tmp_path)
    (s,) = sel.select([traj])
    assert s.meta["values"] == [0.0, 0.0, 1.0] and s.meta["final"] == "rollouts"
    assert [c.score for c in s.steps] == [0.0, 1.0]
    assert sel.stats()["restart_points"] == 3


def test_greedy_with_several_rollouts_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="temperature"):
        selector(tmp_path, temperature=0.0, rollouts=3)
    with pytest.raises(ConfigError, match="policy.model=run"):
        selector(tmp_path, policy={"_target_": "atlas_exp.eval.policy.HFPolicy", "model": "run"})


# ------------------------------------------------------------------------------------------ cache and resume


def test_cache_second_run_rolls_nothing_and_a_crash_resumes(tmp_path):
    trajs = [line_traj(["stay", "up", "stay", "up"], id=f"line_{i}") for i in range(3)]
    first = selector(tmp_path / "a")
    want = [s.to_dict() for s in first.select(trajs)]
    first.close()
    again_policy = StatePolicy()
    again = selector(tmp_path / "a", policy=again_policy)
    assert [s.to_dict() for s in again.select(trajs)] == want
    assert again_policy.calls == 0 and again.stats()["points_rolled"] == 0 and again.stats()["points_cached"] == 12
    again.close()

    # a crash part-way: the finished restart points are on disk, the rerun plays only the others
    crashing = selector(tmp_path / "b", policy=StatePolicy(crash_after=4), batch_size=1, rollouts=1)
    with pytest.raises(RuntimeError, match="crash"):
        list(crashing.select(trajs))
    crashing.close()
    lines = (tmp_path / "b" / "rollout_values" / "values.jsonl").read_text().splitlines()
    m = len(lines)
    assert 0 < m < 12
    resumed = selector(tmp_path / "b", batch_size=1, rollouts=1)
    out = list(resumed.select(trajs))
    st = resumed.stats()
    assert st["points_cached"] == m and st["points_rolled"] == 12 - m
    assert [c.score for c in out[0].steps] == [0.0, 1.0, 0.0, 0.0]
    resumed.close()


# ------------------------------------------------------------------------------------------ not restorable


def test_a_changed_observation_is_an_error_naming_trajectory_and_step(tmp_path):
    traj = line_traj(["stay", "up", "stay", "up"], id="line_bad")
    traj.messages[6] = Message("user", "You are at 5.")  # the observation after step 1
    with pytest.raises(DataError, match=r"'line_bad'.*step 1"):
        list(selector(tmp_path, on_failure="error").select([traj]))
    sel = selector(tmp_path, on_failure="all")
    (s,) = sel.select([traj, ][:1])
    assert s.selected_steps == [0, 1, 2, 3] and s.meta["rollout_value"] == "failed"
    assert "step 1" in s.meta["error"]
    st = sel.stats()
    assert st["failed"] == 1 and st["fallback_all"] == 1 and st["rollouts"] == 0


def test_no_item_id_and_unknown_env_fall_back_counted(tmp_path):
    t = line_traj(["up", "up"], id="imported_7")
    no_id = Trajectory(id="imported_7", env="babyai", messages=t.messages)
    other = Trajectory(id="x_1", env="webshop", messages=t.messages)
    sel = selector(tmp_path, envs={"line": LineEnv, "babyai": {"_target_": "atlas_exp.envs.babyai.BabyAIEnv"}})
    out = list(sel.select([no_id, other, line_traj(["up", "up"])]))
    assert out[0].meta["rollout_value"] == "failed" and "imported_7" in out[0].meta["error"]
    assert "babyai" in out[0].meta["error"]
    assert "selector.envs has no entry for env 'webshop'" in out[1].meta["error"]
    assert "rollout_value" not in out[2].meta
    st = sel.stats()
    assert (st["failed"], st["fallback_random"], st["ok"]) == (2, 2, 1)
    with pytest.raises(DataError, match="imported_7"):
        list(selector(tmp_path, on_failure="error",
                      envs={"babyai": {"_target_": "atlas_exp.envs.babyai.BabyAIEnv"}}).select([no_id]))


# ------------------------------------------------------------------------------------------ real AgentTraj-L items


def _records(agenttraj_dir: Path, env: str, n: int) -> list[Trajectory]:
    out = []
    with open(agenttraj_dir / f"{env}.jsonl") as f:
        for i, line in enumerate(f):
            if len(out) == n:
                break
            out.append(from_agentgym(json.loads(line), where=f"{env}.jsonl:{i + 1}"))
    return out


class ExpertPolicy:
    """Continues a recorded trajectory: the reply is the expert's next one (found by the turns so far)."""

    name = "expert"

    def __init__(self, traj: Trajectory):
        self.replies = [s.content for s in traj.steps]
        self.n_prompt = traj.step_message_index()[0]

    def generate(self, conversations):
        return [self.replies[(len(c) - self.n_prompt) // 2] for c in conversations]

    def describe(self):
        return {}

    def close(self):
        pass


ENVS = {
    "textcraft": lambda: __import__("atlas_exp.envs.textcraft", fromlist=["x"]).TextCraftEnv(max_steps=100),
    "babyai": lambda: __import__("atlas_exp.envs.babyai", fromlist=["x"]).BabyAIEnv(max_steps=100),
}


@pytest.mark.parametrize("env_name", ["textcraft", "babyai"])
def test_prefix_replay_reproduces_recorded_observations_of_real_items(agenttraj_dir, env_name):
    """Every observation of real items is reproduced by replaying the expert's earlier replies, and the
    rollout engine, restarted at every step k with the expert as the policy, ends in the expert's success."""
    trajs = _records(agenttraj_dir, env_name, 4)
    env = ENVS[env_name]()
    for traj in trajs:
        rec = recording(traj)
        spec = episode_for(traj, rec.observations[0], env)
        results = replay(env, env.reset(spec), EpisodeStart((), tuple(rec.replies), tuple(rec.observations)))
        assert len(results) == traj.n_steps and results[-1].done and results[-1].success, traj.id
        for k in range(traj.n_steps):  # each prefix alone, as a restart point replays it
            prefix = EpisodeStart((), tuple(rec.replies[:k]), tuple(rec.observations[: k + 1]))
            replay(env, env.reset(spec), prefix)
        tasks = [EpisodeTask(f"{traj.id}/{k}", spec, pool=env_name,
                             start=EpisodeStart(rec.history(k), tuple(rec.replies[:k]), tuple(rec.observations[: k + 1])))
                 for k in range(traj.n_steps)]
        pool = EnvPool({env_name: ENVS[env_name]})
        res = list(run_episodes(tasks, pool, ExpertPolicy(traj), batch_size=8, max_turns=40))
        pool.close()
        assert all(r.success and r.end == "done" for r in res), [(r.task, r.end, r.error) for r in res if not r.success]
        assert sorted(r.replayed + r.turns for r in res) == [traj.n_steps] * traj.n_steps
    env.close()


def test_prefix_replay_of_real_sciworld_items(agenttraj_dir):
    """ScienceWorld items replay with every observation equal up to object order (the selector's default
    `observation_match.sciworld: unordered`); exact text differs already at reset (AgentGym's random order)."""
    pytest.importorskip("scienceworld", reason="the scienceworld package is not installed")
    import shutil

    if shutil.which("java") is None:
        pytest.skip("ScienceWorld needs java on PATH")
    from atlas_exp.envs.sciworld import SciWorldEnv

    trajs = _records(agenttraj_dir, "sciworld", 3)
    n_ok = 0
    with SciWorldEnv(max_steps=200) as env:
        for traj in trajs:
            rec = recording(traj)
            spec = episode_for(traj, rec.observations[0], env)
            try:
                res = replay(env, env.reset(spec), EpisodeStart((), tuple(rec.replies), tuple(rec.observations), "unordered"),
                             stop_at_done=True)
                n_ok += res[-1].done and res[-1].success
            except PrefixMismatch as e:
                print(f"{traj.id}: step {e.step}: {e}")
    print(f"\nsciworld prefix replay: {n_ok}/{len(trajs)} restorable")
    assert n_ok == len(trajs)  # measured 3/3 (each recording goes on 1-3 steps after the success)


def _alfworld_expert_trajectory(data_dir: Path, split: str, game: str) -> Trajectory:
    """ALFWorld's handcoded expert playing one game, recorded as a ReAct trajectory in AgentGym's interface,
    its game named the way ALFWorld's expert data names it (meta `game_file`)."""
    from atlas_exp.envs.alfworld import AlfworldEnv

    env = AlfworldEnv(data_dir, split=split, expert=True, max_steps=30)
    (ep,) = [e for e in env.episodes() if e.game.startswith(game + "/")]
    msgs = [Message("user", env.instruction()), Message("assistant", env.ack, trainable=False),
            Message("user", env.reset(ep))]
    while not env.done:
        action = env.expert_action()
        msgs.append(Message("assistant", f"Thought:\nThe plan says {action}.\n\nAction:\n{action}", step=len(msgs) // 2 - 1))
        msgs.append(Message("user", env.step(action).observation))
    assert env.won, ep.id
    env.close()
    return Trajectory(id=f"alfworld_{game}", env="alfworld", messages=msgs,
                      meta={"game_file": f"json_2.1.1/{split}/{ep.game}"})


def test_prefix_replay_of_a_real_alfworld_game(alfworld_data, tmp_path):  # noqa: F811 (the imported fixture)
    """A valid_seen game played by the handcoded expert restores from its `game_file` with
    `selector.envs.alfworld.split=valid_seen` (conf/selector/rollout_value.yaml): every replayed observation
    equals the recorded one, and the expert, restarted at every step, wins each time (V = 1 everywhere).
    A trajectory whose game file does not exist falls back (on_failure), counted, with a message naming it."""
    from atlas_exp.config import compose

    traj = _alfworld_expert_trajectory(alfworld_data, "valid_seen", "look_at_obj_in_light-AlarmClock-None-DeskLamp-323")
    n = traj.n_steps
    assert n == 5
    cfg = compose(["selector=rollout_value", "selector.envs.alfworld.split=valid_seen",
                   f"selector.envs.alfworld.data_dir={alfworld_data}"]).selector
    sel = RolloutValueSelector(ratio=0.4, seed=0, policy=ExpertPolicy(traj), rollouts=1, max_turns=n, batch_size=1,
                               envs=cfg.envs, observation_match=cfg.observation_match, cache=False,
                               cache_dir=str(tmp_path), progress=False)
    missing = Trajectory(id="alfworld_missing", env="alfworld", messages=traj.messages,
                         meta={"game_file": "json_2.1.1/valid_seen/look_at_obj_in_light-AlarmClock-None-DeskLamp-999/"
                                            "trial_T20190909_000000_000000/game.tw-pddl"})
    ok, failed = sel.select([traj, missing])
    sel.close()
    assert ok.meta["values"] == [1.0] * (n + 1) and ok.meta["final"] == "replayed"
    assert [c.score for c in ok.steps] == [0.0] * n and len(ok.selected_steps) == n_to_select(n, 0.4)
    st = sel.stats()
    assert (st["ok"], st["failed"], st["fallback_random"]) == (1, 1, 1)
    assert st["env_steps_check"] == n and st["rollout_ends"] == {"done": n}
    assert st["env_steps_replay"] == sum(range(n)) and st["env_steps_rollout"] == sum(range(1, n + 1))
    assert failed.meta["rollout_value"] == "failed" and failed.meta["fallback"] == "random"
    assert "'alfworld_missing' (alfworld) cannot be restored" in failed.meta["error"]
    assert "no such ALFWorld game file" in failed.meta["error"] and "DeskLamp-999" in failed.meta["error"]
    assert len(failed.selected_steps) == n_to_select(n, 0.4)


# ------------------------------------------------------------------------------------------ config


def test_selector_rollout_value_composes():
    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose("config", overrides=["selector=rollout_value", "selector.rollouts=3"])
    s = cfg.selector
    assert s._target_ == "atlas_exp.selectors.rollout_value.RolloutValueSelector"
    assert s.policy._target_ == "atlas_exp.eval.policy.HFPolicy" and s.policy.model == "base"
    assert s.rollouts == 3 and s.ratio == cfg.ratio and s.seed == cfg.seed and s.model.name == cfg.model.name
    from atlas_exp.selectors.stage import build_selector

    sel = build_selector(cfg)  # no model is loaded before a rollout is needed
    assert isinstance(sel, RolloutValueSelector) and sel._policy is None
    assert sel.identity["policy"]["temperature"] == 0.7 and "base_model" in sel.identity
    assert "batch_size" not in sel.identity["policy"]  # reply-neutral options do not invalidate the cache


def test_steps_after_the_episode_ended_get_the_outcome(tmp_path):
    """Expert: up, up (wins at step 1), stay: the env never plays step 2; V(s_2) = V(s_3) = the win."""
    traj = line_traj(["up", "up", "stay"])
    sel = selector(tmp_path, ratio=0.3)
    (s,) = sel.select([traj])
    assert s.meta["values"] == [0.0, 1.0, 1.0, 1.0] and s.meta["steps_after_end"] == 1
    assert [c.score for c in s.steps] == [1.0, 0.0, 0.0] and s.selected_steps == [0]
    assert sel.stats()["restart_points"] == 2 and sel.stats()["steps_after_end"] == 1


# ------------------------------------------------------------------------------------------ the app, a real policy


def test_app_select_stage_reports_the_tokens_the_policy_built_from_config_counted(smollm2_dir, tmp_path, monkeypatch):
    """The app's select stage with `selector=rollout_value` and its default `policy: hf` (conf/policy/hf.yaml,
    model=base: SmolLM2-135M, built by the selector from that config), the line env built from
    `selector.envs.line`: two trajectories, 2 + 3 restart points, 1 rollout of 1 turn each. The stage reads the
    selector's stats after closing it, so the summary's token counts must be the ones the policy held when it
    was closed (they were 0 before the selector kept them across close())."""
    from conftest import TEST_CACHE

    from atlas_exp.artifacts import write_jsonl
    from atlas_exp.config import compose
    from atlas_exp.eval.policy import HFPolicy
    from atlas_exp.run_dir import RunDir
    from atlas_exp.selectors.stage import run_select_stage

    trajs = [line_traj(["up", "up"], id="line_won"), line_traj(["stay", "up"], id="line_unfinished")]
    rd = tmp_path / "run"
    write_jsonl(rd / "trajectories.jsonl", (t.to_dict() for t in trajs))
    counted: list[dict[str, int]] = []
    close = HFPolicy.close

    def counting_close(self):
        counted.append({k: self.stats[k] for k in ("replies", "prompt_tokens", "completion_tokens")})
        close(self)

    monkeypatch.setattr(HFPolicy, "close", counting_close)
    cfg = compose([f"run_dir={rd}", f"cache_dir={TEST_CACHE}", "logger=none", "selector=rollout_value",
                   f"+selector.envs.line._target_={__name__}.LineEnv", "selector.rollouts=1", "selector.max_turns=1",
                   "selector.cache=false", "selector.progress=false", "selector.policy.max_new_tokens=8"])
    assert cfg.selector.policy._target_ == "atlas_exp.eval.policy.HFPolicy" and cfg.selector.policy.model == "base"
    run_select_stage(cfg, RunDir(rd))

    summary = json.loads((rd / "selection_summary.json").read_text())
    st = summary["selector_stats"]
    assert summary["selector"] == "rollout_value" and summary["n_trajectories"] == 2
    assert (st["ok"], st["failed"], st["restart_points"], st["points_rolled"], st["rollouts"]) == (2, 0, 5, 5, 5)
    assert counted == [{"replies": 5, "prompt_tokens": counted[0]["prompt_tokens"],
                        "completion_tokens": counted[0]["completion_tokens"]}]  # built once, closed once
    assert st["prompt_tokens"] == counted[0]["prompt_tokens"] > 0
    assert st["completion_tokens"] == counted[0]["completion_tokens"] > 0
    assert st["completion_tokens"] <= 5 * 8 and st["policy_turns"] == 5  # 5 replies of at most max_new_tokens
