"""The eval stage: the agent loop, batched policies, results.json, resume, and errors that name the option."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import TEST_CACHE
from test_app import app

from atlas_exp.envs.base import Env, StepResult
from atlas_exp.envs.textcraft import TextCraftEnv, sample_episode
from atlas_exp.envs.textcraft_expert import expert_turns
from atlas_exp.envs.textcraft_planner import UncraftableGoal
from atlas_exp.eval.policy import HFPolicy
from atlas_exp.eval.policy_base import NoReply, PolicyContext
from atlas_exp.eval.prefix_cache import common_prefix
from atlas_exp.eval.results import TaskInfo, summarize
from atlas_exp.eval.rollout import EnvPool, EpisodeTask, run_episodes


class ExpertPolicy:
    """Replies with the scripted TextCraft expert's turns for the episode whose first observation it sees."""

    name = "expert"

    def __init__(self, seeds: list[int], break_after: int | None = None):
        self.turns: dict[str, list[str]] = {}
        env = TextCraftEnv()
        for s in seeds:
            ep = sample_episode(s, tree=env.tree)
            self.turns[ep.first_observation()] = [t for t, _ in expert_turns(ep, random.Random(s), env)]
        self.break_after = break_after
        self.batches: list[int] = []

    def generate(self, conversations):
        self.batches.append(len(conversations))
        out = []
        for conv in conversations:
            k = sum(m["role"] == "assistant" for m in conv) - 1  # the ack is not a step
            steps = self.turns[conv[2]["content"]]
            if self.break_after is not None and k >= self.break_after:
                out.append("Thought:\nI will wander.\n\nAction:\nget 1 nothing")
            else:
                out.append(steps[k])
        return out

    def describe(self):
        return {"policy": self.name}

    def close(self):
        pass


def _solvable_seeds(n: int, start: int = 100000) -> list[int]:
    env, seeds, s = TextCraftEnv(), [], start
    while len(seeds) < n:
        try:
            expert_turns(sample_episode(s, tree=env.tree), random.Random(s), env)
            seeds.append(s)
        except UncraftableGoal:
            pass
        s += 1
    return seeds


def test_expert_policy_solves_every_episode_in_batched_rollouts():
    seeds = _solvable_seeds(6)
    policy = ExpertPolicy(seeds)
    pool = EnvPool({"textcraft": TextCraftEnv})
    results = list(run_episodes([EpisodeTask("textcraft", s) for s in seeds], pool, policy, batch_size=4, max_turns=30))
    assert len(results) == 6
    assert all(r.success and r.end == "done" and r.score == 1.0 for r in results), [(r.episode, r.end) for r in results]
    assert max(policy.batches) == 4  # episodes really were in flight together
    r = results[0]
    # the conversation has the training data's shape: instruction, ack, first observation, then step/observation
    assert [m["role"] for m in r.messages[:4]] == ["user", "assistant", "user", "assistant"]
    assert r.messages[1]["content"] == TextCraftEnv.ack
    assert r.messages[-1]["role"] == "user" and "Crafted" in r.messages[-1]["content"]
    assert r.turns == sum(m["role"] == "assistant" for m in r.messages) - 1
    assert len(pool.all) == 0  # the task's envs were closed after its last episode


def test_turn_cap_and_failed_episodes():
    seeds = _solvable_seeds(2)
    policy = ExpertPolicy(seeds, break_after=1)
    pool = EnvPool({"textcraft": lambda: TextCraftEnv(max_steps=50)})
    results = list(run_episodes([EpisodeTask("textcraft", s) for s in seeds], pool, policy, batch_size=8, max_turns=3))
    assert [(r.success, r.end, r.turns) for r in results] == [(False, "max_turns", 3)] * 2
    # the env's own step cap counts as a turn limit, not as a verdict of the game
    pool = EnvPool({"textcraft": lambda: TextCraftEnv(max_steps=2)})
    results = list(run_episodes([EpisodeTask("textcraft", seeds[0])], pool, policy, max_turns=30))
    assert (results[0].success, results[0].end, results[0].turns) == (False, "max_turns", 2)


class BrokenEnv(Env):
    name = "broken"

    def instruction(self):
        return "Play."

    def reset(self, episode):
        if episode == 1:
            raise RuntimeError("no such level")
        return "start"

    def step(self, action):
        if action == "explode":
            raise ValueError("boom")
        return StepResult("ok", 0.0, False, False, {"score": 0.25})


class EchoPolicy:
    name = "echo"

    def __init__(self, replies):
        self.replies = replies

    def generate(self, conversations):
        return [self.replies(c) for c in conversations]

    def describe(self):
        return {}

    def close(self):
        pass


def test_env_errors_and_missing_replies_end_only_their_episode():
    def replies(conv):
        if conv[2]["content"] != "start":
            return "?"
        return "Thought:\nx\n\nAction:\nexplode" if len(conv) > 3 else "no action marker here"

    pool = EnvPool({"b": BrokenEnv, "c": BrokenEnv})
    tasks = [EpisodeTask("b", 0), EpisodeTask("b", 1), EpisodeTask("c", 2)]
    results = {(r.task, r.episode): r for r in run_episodes(tasks, pool, EchoPolicy(replies), max_turns=10)}
    assert results[("b", "1")].end == "env_error" and "no such level" in results[("b", "1")].error
    r = results[("b", "0")]
    # failed, retried once from the start on a fresh env, failed again: recorded with the error
    assert r.end == "env_error" and "boom" in r.error and r.turns == 2 and r.attempts == 2
    assert r.invalid_actions == 1  # the first reply had no Action: and went to the env as its last line
    assert r.score == 0.25
    results = list(run_episodes([EpisodeTask("b", 0)], EnvPool({"b": BrokenEnv}),
                                EchoPolicy(lambda c: NoReply("no_reply", "server down")), max_turns=10))
    assert (results[0].end, results[0].error, results[0].turns) == ("no_reply", "server down", 0)


class FlakyEnv(BrokenEnv):
    """Its first instance dies on the first step (a crashed JVM); instances made after that work."""

    made = 0

    def __init__(self):
        FlakyEnv.made += 1
        self.first = FlakyEnv.made == 1

    def step(self, action):
        if self.first:
            raise ConnectionError("the JVM went away")
        return StepResult("done", 1.0, True, True)


def test_a_crashed_env_is_replaced_and_the_episode_retried_once():
    pool = EnvPool({"f": FlakyEnv})
    (r,) = run_episodes([EpisodeTask("f", 0)], pool, EchoPolicy(lambda c: "Thought:\nx\n\nAction:\ngo"), max_turns=5)
    assert (r.success, r.end, r.attempts, r.turns) == (True, "done", 2, 1)
    assert FlakyEnv.made == 2
    # the transcript is the retried episode's, not a mix of both attempts
    assert [m["role"] for m in r.messages] == ["user", "assistant", "user", "assistant", "user"]


def test_summary_is_the_papers_table_layout():
    recs = [
        {"task": "tc", "success": True, "score": 1.0, "reward": 1.0, "turns": 3, "end": "done", "invalid_actions": 0},
        {"task": "tc", "success": False, "score": 0.0, "reward": 0.0, "turns": 9, "end": "max_turns", "invalid_actions": 2},
        {"task": "sw", "success": False, "score": 0.5, "reward": 0.5, "turns": 9, "end": "max_turns", "invalid_actions": 0},
        {"task": "alf", "success": True, "score": 1.0, "reward": 1.0, "turns": 5, "end": "done", "invalid_actions": 0},
    ]
    tasks = [TaskInfo("tc", "textcraft", "held_in", "success", 2), TaskInfo("sw", "sciworld", "held_in", "score", 1),
             TaskInfo("alf", "alfworld", "held_out", "success", 1), TaskInfo("bb", "babyai", "held_out", "success", 3)]
    s = summarize(recs, tasks)
    assert s["tasks"]["tc"]["value"] == 50.0 and s["tasks"]["tc"]["ends"] == {"done": 1, "max_turns": 1}
    assert s["tasks"]["sw"]["value"] == 50.0  # ScienceWorld reports its score, not success
    assert s["splits"]["held_in"]["average"] == 50.0
    # an env with no finished episode makes the split average unknown, never a made-up 0
    assert s["tasks"]["bb"]["value"] is None and s["splits"]["held_out"]["average"] is None


# ------------------------------------------------------------------------------------------ real model


@pytest.fixture(scope="module")
def base_policy(smollm2_dir):
    ctx = PolicyContext(
        model_cfg={"name": "smollm2_135m", "name_or_path": str(Path(smollm2_dir)), "gguf_file": None},
        run_model_dir=Path("/nonexistent"), cache_dir=str(TEST_CACHE),
    )
    return HFPolicy(context=ctx, model="base", max_new_tokens=24, batch_size=8)


def test_hf_policy_batched_replies_equal_one_at_a_time(base_policy):
    env = TextCraftEnv()
    convs = []
    for s in (1, 2, 3):
        convs.append([{"role": "user", "content": env.instruction()}, {"role": "assistant", "content": env.ack},
                      {"role": "user", "content": env.reset(s)}])
    convs.append(convs[0][:1])  # a much shorter prompt in the same batch: left padding must not change it
    batched = base_policy.generate(convs)
    single = [base_policy.generate([c])[0] for c in convs]
    assert batched == single
    assert all(isinstance(r, str) and r for r in batched)
    assert base_policy.stats["completion_tokens"] > 0


def test_hf_policy_reuses_each_episodes_kv_cache_and_replies_stay_the_same(smollm2_dir):
    """Turn t+1 prefills only what turn t did not see; the replies equal a policy that prefills everything."""
    ctx = PolicyContext(model_cfg={"name": "s", "name_or_path": str(smollm2_dir), "gguf_file": None},
                        run_model_dir=Path("/nonexistent"), cache_dir=str(TEST_CACHE))
    reuse = HFPolicy(context=ctx, model="base", max_new_tokens=20, batch_size=8)
    fresh = HFPolicy(context=ctx, model="base", max_new_tokens=20, batch_size=8, reuse_kv_cache=False)
    assert fresh.prefix_cache is None and reuse.prefix_cache is not None
    env = TextCraftEnv()
    convs = [[{"role": "user", "content": env.instruction()}, {"role": "assistant", "content": env.ack},
              {"role": "user", "content": env.reset(s)}] for s in (1, 2, 3)]
    first = reuse.generate(convs)
    assert first == fresh.generate(convs)
    # round one: nothing kept yet, but the three prompts share the env's instruction: prefilled once
    ids = [reuse.encode(c) for c in convs]
    shared = min(common_prefix(ids[0], x) for x in ids[1:])
    assert shared > 100 and reuse.stats["reused_tokens"] == 0
    assert reuse.stats["prefilled_tokens"] == shared + sum(len(x) - shared for x in ids)
    reused, prefilled = reuse.stats["reused_tokens"], reuse.stats["prefilled_tokens"]
    # next round: two episodes go on (one of them with a reply that differs from what the model said:
    # only the common prefix can be reused), one ended, a new one starts
    obs = {"role": "user", "content": "Observation: Crafted 1 minecraft:stick"}
    nxt = [convs[0] + [{"role": "assistant", "content": first[0]}, obs],
           convs[1] + [{"role": "assistant", "content": "Thought: something else.\nAction: inventory"}, obs],
           [{"role": "user", "content": env.instruction()}, {"role": "assistant", "content": env.ack},
            {"role": "user", "content": env.reset(7)}]]
    second = reuse.generate(nxt)
    assert second == fresh.generate(nxt)
    new_tokens = reuse.stats["prefilled_tokens"] - prefilled
    prompt_tokens = sum(len(reuse.encode(c)) for c in nxt)
    assert reuse.stats["reused_tokens"] - reused + new_tokens == prompt_tokens
    # the continuing episode reuses all but its new observation; the new one reuses the shared instruction
    assert reuse.stats["reused_tokens"] - reused > len(reuse.encode(convs[0]))
    assert new_tokens < prompt_tokens / 2
    # only this call's sequences are kept: the ended episode's entry is gone
    assert len(reuse.prefix_cache.entries) == 3


def test_hf_policy_prefills_uneven_prompts_alone_and_replies_stay_the_same(smollm2_dir):
    """Prompts whose new parts differ a lot in length are prefilled one by one (no compute on padding), then
    decoded together: the replies equal one batched prefill's, in the first round and in the next."""
    ctx = PolicyContext(model_cfg={"name": "s", "name_or_path": str(smollm2_dir), "gguf_file": None},
                        run_model_dir=Path("/nonexistent"), cache_dir=str(TEST_CACHE))
    env = TextCraftEnv()
    convs = [[{"role": "user", "content": env.instruction()}, {"role": "assistant", "content": env.ack},
              {"role": "user", "content": env.reset(s)}] for s in (1, 2)] + [[{"role": "user", "content": "Hi."}]]
    obs = {"role": "user", "content": "Observation: Crafted 1 minecraft:stick"}
    got = {}
    for alone in (True, False):
        policy = HFPolicy(context=ctx, model="base", max_new_tokens=16, batch_size=8, separate_prefill=alone)
        first = policy.generate(convs)
        second = policy.generate([c + [{"role": "assistant", "content": r}, obs] for c, r in zip(convs, first)])
        prompt = sum(len(policy.encode(c)) for c in convs) + sum(
            len(policy.encode(c + [{"role": "assistant", "content": r}, obs])) for c, r in zip(convs, first))
        got[alone] = (first, second, policy.stats["prefilled_alone"])
        # every prompt token is either computed once in its call or reused from the call before
        assert policy.stats["prefilled_tokens"] + policy.stats["reused_tokens"] <= prompt
        policy.close()
    assert got[True][:2] == got[False][:2]
    assert got[True][2] >= 3 and got[False][2] == 0
    with pytest.raises(Exception, match="policy.separate_prefill='sometimes'"):
        HFPolicy(context=ctx, model="base", separate_prefill="sometimes")


def test_hf_policy_context_limit(smollm2_dir):
    ctx = PolicyContext(model_cfg={"name": "s", "name_or_path": str(smollm2_dir), "gguf_file": None},
                        run_model_dir=Path("/nonexistent"), cache_dir=str(TEST_CACHE))
    policy = HFPolicy(context=ctx, model="base", max_new_tokens=16, max_context=64)
    long = [{"role": "user", "content": "word " * 200}]
    short = [{"role": "user", "content": "hi"}]
    out = policy.generate([long, short])
    assert isinstance(out[0], NoReply) and out[0].reason == "context_limit"
    assert isinstance(out[1], str)


# ------------------------------------------------------------------------------------------ the app


def _eval_args(rd: Path, *extra: str) -> list[str]:
    """A small evaluation of the base model (2 episodes x 2 turns per task); `extra` overrides replace these."""
    base = [f"run_dir={rd}", "stage=eval", "policy.model=base", "logger=none", "policy.max_new_tokens=48",
            "eval.tasks.textcraft.max_turns=2", "eval.tasks.babyai.max_turns=2", "eval.tasks.sciworld.max_turns=2",
            "eval.tasks.textcraft.episodes.count=2", "eval.tasks.babyai.episodes.count=2",
            "eval.tasks.sciworld.episodes.per_task=1", "eval.tasks.sciworld.episodes.limit=1"]
    keys = {e.split("=", 1)[0] for e in extra}
    return [a for a in base if a.split("=", 1)[0] not in keys] + list(extra)


def test_eval_stage_writes_results_and_resumes(tmp_path):
    rd = tmp_path / "run"
    p = app(*_eval_args(rd))
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((rd / "eval" / "results.json").read_text())
    assert set(res["tasks"]) == {"textcraft", "babyai", "sciworld"}
    for name in ("textcraft", "babyai"):
        t = res["tasks"][name]
        assert t["n"] == t["n_planned"] == 2 and t["split"] == "held_in" and 0.0 <= t["value"] <= 100.0
    assert res["tasks"]["sciworld"]["metric"] == "score" and res["tasks"]["sciworld"]["n"] == 1
    values = [t["value"] for t in res["tasks"].values()]
    assert res["splits"]["held_in"]["average"] == pytest.approx(sum(values) / 3)
    assert res["policy"]["model"] == "base"
    files = sorted((rd / "eval").glob("*/*.json"))
    assert [f.relative_to(rd / "eval").as_posix() for f in files] == [
        "babyai/20000.json", "babyai/20001.json", "sciworld/21.json", "textcraft/100000.json", "textcraft/100001.json"]
    ep = json.loads(files[0].read_text())
    assert ep["messages"][0]["role"] == "user" and ep["end"] in ("done", "max_turns", "context_limit")
    assert ep["attempts"] == 1 and ep["fingerprint"]

    # a rerun with the same config does nothing: not even the results are rewritten
    before = {f: f.stat().st_mtime_ns for f in (rd / "eval").rglob("*.json")}
    p = app(*_eval_args(rd))
    assert p.returncode == 0 and "is up to date, skipping" in p.stdout + p.stderr
    assert before == {f: f.stat().st_mtime_ns for f in before}

    # killed mid-evaluation: one episode had not ended; the rerun plays exactly that one
    (rd / "eval" / "textcraft" / "100001.json").unlink()
    p = app(*_eval_args(rd))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "1 episode(s) to play (4 already" in p.stdout + p.stderr
    assert (rd / "eval" / "textcraft" / "100001.json").exists()
    assert before[rd / "eval" / "babyai" / "20000.json"] == (rd / "eval" / "babyai" / "20000.json").stat().st_mtime_ns

    # another config of one task replays that task only
    p = app(*_eval_args(rd, "eval.tasks.babyai.max_turns=1"))
    assert p.returncode == 0 and "2 episode(s) to play (3 already" in p.stdout + p.stderr
    res = json.loads((rd / "eval" / "results.json").read_text())
    assert res["tasks"]["babyai"]["n"] == 2 and res["tasks"]["babyai"]["mean_turns"] <= 1


@pytest.mark.parametrize(
    "override, expected",
    [
        ("eval.tasks.babyai.split=held_sideways", "eval.tasks.babyai.split='held_sideways'"),
        ("eval.tasks.babyai.metric=vibes", "eval.tasks.babyai.metric='vibes'"),
        ("eval.tasks.babyai.episodes.count=-1", "eval.tasks.babyai.episodes: count must be >= 0"),
        ("eval.tasks.textcraft.env._target_=builtins.dict", "is not an atlas_exp Env"),
        ("policy.model=run", "no trained model in"),
    ],
)
def test_eval_config_errors_name_the_option(tmp_path, override, expected):
    p = app(*_eval_args(tmp_path / "r", override))
    assert p.returncode == 2
    assert expected in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


def test_episode_specs():
    from atlas_exp.errors import ConfigError
    from atlas_exp.eval.stage import _episodes

    assert _episodes("t", {"start": 10, "count": 3, "step": 5}) == [10, 15, 20]
    assert _episodes("t", ["sciworld_1", 7]) == ["sciworld_1", 7]
    assert _episodes("t", {"_target_": "builtins.range", "_args_": [3]}) == [0, 1, 2]
    with pytest.raises(ConfigError, match=r"eval.tasks.t.episodes: the episode list has duplicates"):
        _episodes("t", [1, 1])
    with pytest.raises(ConfigError, match=r"eval.tasks.t.episodes must be"):
        _episodes("t", {"first": 1})


@pytest.mark.parametrize(
    "policy, neutral, not_neutral, has_base_model",
    [
        ("hf", ["policy.batch_size=2", "policy.reuse_kv_cache=false"], "policy.temperature=0.7", True),
        ("vllm", ["policy.gpu_memory_utilization=0.5", "policy.enable_prefix_caching=false"], "policy.max_context=2048", True),
        ("openai", ["policy.concurrency=1", "policy.cache_path=/elsewhere/replies.jsonl"], "policy.model=other", False),
    ],
)
def test_what_identifies_the_agent_is_what_its_policy_declares(tmp_path, policy, neutral, not_neutral, has_base_model):
    """Episodes already played are kept when only how replies are computed changes (batching, caching, devices:
    each policy class's `reply_neutral`), and replayed when what they are changes."""
    from atlas_exp.config import compose
    from atlas_exp.eval.stage import _model_fingerprint
    from atlas_exp.run_dir import RunDir

    def fp(*extra):
        over = [f"policy={policy}", "policy.model=base"] if policy != "openai" else ["policy=openai", "policy.model=m"]
        return _model_fingerprint(compose([*over, *extra]), RunDir(tmp_path))

    ref = fp()
    for o in neutral:
        assert fp(o) == ref, o
    assert fp(not_neutral) != ref
    assert ("base_model" in ref) == has_base_model
    if has_base_model:
        assert fp("model.name_or_path=other/model") != ref


def test_openai_policy_errors_name_the_policy_option(tmp_path, monkeypatch):
    """An endpoint that refuses the key stops the evaluation with an error naming `policy`, not the oracle's option."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from atlas_exp.errors import ConfigError
    from atlas_exp.eval.policy import OpenAIPolicy

    class Refuse(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = json.dumps({"error": {"message": "invalid api key", "type": "invalid_request_error"}}).encode()
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv("ATLAS_TEST_KEY", "sk-wrong")
    try:
        ctx = PolicyContext(model_cfg={}, run_model_dir=tmp_path, cache_dir=str(tmp_path))
        policy = OpenAIPolicy(context=ctx, model="m", base_url=f"http://127.0.0.1:{httpd.server_port}/v1",
                              api_key_env="ATLAS_TEST_KEY", max_retries=0)
        with pytest.raises(ConfigError, match=r"^policy: .* refused the key from \$ATLAS_TEST_KEY") as e:
            policy.generate([[{"role": "user", "content": "hi"}]])
        assert "sk-wrong" not in str(e.value)
        policy.close()
    finally:
        httpd.shutdown()


@pytest.mark.slow
def test_openai_policy_against_a_real_llama_cpp_server(tmp_path):
    """`policy=openai` plays through any OpenAI-compatible endpoint: here llama.cpp's server on the SmolLM2
    GGUF. A rerun of the same episodes against the same server is answered from the reply cache."""
    from atlas_exp.llm.server import LocalServer

    with LocalServer(n_ctx=4096) as server:
        args = [f"run_dir={tmp_path / 'run'}", "stage=eval", "policy=openai", f"policy.base_url={server.base_url}",
                f"policy.model={server.alias}", f"policy.cache_path={tmp_path / 'replies.jsonl'}",
                "policy.max_new_tokens=32", "policy.concurrency=2", "logger=none",
                "eval.tasks.textcraft.episodes.count=2", "eval.tasks.textcraft.max_turns=2",
                "~eval.tasks.babyai", "~eval.tasks.sciworld"]
        p = app(*args)
        assert p.returncode == 0, p.stderr[-3000:]
        res = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
        assert res["policy"]["policy"] == "openai" and res["policy"]["base_url"] == server.base_url
        assert res["tasks"]["textcraft"]["n"] == 2 and set(res["tasks"]) == {"textcraft"}
        stats = res["policy"]["stats"]
        assert stats["responses"] >= 2 and stats["completion_tokens"] > 0 and stats["cache_hits"] == 0
        ep = json.loads(next((tmp_path / "run" / "eval" / "textcraft").glob("*.json")).read_text())
        assert ep["messages"][3]["role"] == "assistant" and ep["messages"][3]["content"]
        p = app(f"run_dir={tmp_path / 'again'}", *args[1:])
        assert p.returncode == 0, p.stderr[-3000:]
        again = json.loads((tmp_path / "again" / "eval" / "results.json").read_text())["policy"]["stats"]
        assert again["cache_hits"] == stats["responses"] and again["responses"] == 0


def test_eval_preset_caps_reply_length_but_never_raises_it():
    from atlas_exp.config import compose
    from atlas_exp.eval.stage import _reply_cap

    assert _reply_cap(compose([])) == 128  # smoke caps the policy's 256
    assert _reply_cap(compose(["policy.max_new_tokens=48"])) == 48
    assert _reply_cap(compose(["eval=held_in"])) is None  # real evaluations use the policy's own length
