"""Judge replies as researchers get them: OpenAI Batch API / vLLM `run_batch` files, `judge_ratio`, and the
prompt the shared frontier-judge replies answered (../shared/data/judge).

The shared files are real: a frontier judge answered exactly our oracle prompt for AgentTraj-L TextCraft
and BabyAI and for cpu_small's recorded trajectories. These tests keep our prompt equal to theirs, build
selections from them without sending a request, and show that a reply to any other request (one changed
observation, one changed prompt word) is never used.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from conftest import REPO, TEST_CACHE

from atlas_exp.artifacts import iter_jsonl
from atlas_exp.data.trajectory import Message, Trajectory
from atlas_exp.errors import ConfigError, StageStopped
from atlas_exp.llm.server import LocalServer
from atlas_exp.selectors import oracle_prompt
from atlas_exp.selectors.oracle import OracleSelector
from atlas_exp.selectors.oracle_batch import read_outputs, request_fingerprint, split_custom_id
from atlas_exp.selectors.oracle_prompt import build_messages, judge_cap

#: the shared files and the data-stage overrides that import the trajectories they judged
JUDGED = {
    "textcraft": ["data=local", "data.path={agenttraj}/textcraft.jsonl"],
    "babyai": ["data=local", "data.path={agenttraj}/babyai.jsonl"],
    "cpu_small": ["experiment=cpu_small", "hydra.mode=RUN"],
}


def data_stage(tmp_path: Path, name: str, agenttraj: Path) -> list[Trajectory]:
    """The trajectories a preset's data stage imports, as every run would (subprocess, real app)."""
    run_dir = tmp_path / f"data_{name}"
    overrides = [o.format(agenttraj=agenttraj) for o in JUDGED[name]]
    proc = subprocess.run(
        [sys.executable, "-m", "atlas_exp", "stage=data", f"run_dir={run_dir}", f"hydra.run.dir={run_dir}",
         f"cache_dir={TEST_CACHE}", "logger=none", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [Trajectory.from_dict(d) for _, d in iter_jsonl(run_dir / "trajectories.jsonl")]


@pytest.fixture(scope="module")
def judge_dir(shared_data) -> Path:
    return shared_data / "judge"


@pytest.fixture(scope="module")
def textcraft_trajs(tmp_path_factory, agenttraj_dir) -> list[Trajectory]:
    return data_stage(tmp_path_factory.mktemp("tc"), "textcraft", agenttraj_dir)


def offline_selector(tmp_path: Path, **kw) -> OracleSelector:
    """An oracle that reads files and may send nothing (batch mode without `live`)."""
    kw.setdefault("cache_dir", tmp_path / "cache")
    kw.setdefault("concurrency", 2)
    return OracleSelector(**{"ratio": 0.3, "seed": 1, **kw})


# ----------------------------------------------------------------------------------- the prompt kept


@pytest.mark.parametrize("name", sorted(JUDGED))
def test_our_requests_are_the_ones_the_shared_judge_answered(name, tmp_path, agenttraj_dir, judge_dir):
    """Every message we would send for the judged trajectories (as the data stage imports them, at
    judge_ratio 0.5) equals the shared file's body.messages, character for character."""
    trajs = {t.id: t for t in data_stage(tmp_path, name, agenttraj_dir)}
    lines = [d for _, d in iter_jsonl(judge_dir / f"{name}.batch_input.jsonl")]
    assert len(lines) == len(trajs)
    for line in lines:
        t = trajs[line["custom_id"]]
        assert build_messages(t, judge_cap(t.n_steps, 0.5)) == line["body"]["messages"], t.id
        # and the fingerprint our oracle looks replies up by is the file's
        body = {"model": "gpt-4o", "temperature": 0.0, "messages": build_messages(t, judge_cap(t.n_steps, 0.5)),
                "max_tokens": 1024, "response_format": {"type": "json_object"}}
        assert request_fingerprint(body) == request_fingerprint(line["body"])


# ------------------------------------------------------------------------------ reading shared replies


def test_shared_replies_build_a_selection_with_no_request_sent(textcraft_trajs, judge_dir, tmp_path):
    sel = offline_selector(tmp_path, judge_ratio=0.5, batch={"read": [str(judge_dir / "textcraft.batch_output.jsonl")]})
    assert sel.server is None  # no embedded judge started: nothing will be asked
    with sel:
        out = list(sel.select(textcraft_trajs))
    stats = sel.stats()
    assert stats["requests"] == 0 and stats["ok"] == len(textcraft_trajs) == 374 and stats["failed"] == 0
    assert stats["batch"]["replies"] == 374 and stats["batch"]["cost_usd_estimate"] > 0
    assert stats["batch"]["price_usd_per_1m"] == {"prompt": 1.25, "completion": 5.0}  # gpt-4o at half price
    assert "estimated" in stats["batch"]["token_counts"]  # the files have no usage: labelled as estimates
    outputs = {d["custom_id"]: d for _, d in iter_jsonl(judge_dir / "textcraft.batch_output.jsonl")}
    for s, t in zip(out, textcraft_trajs):
        judged = json.loads(outputs[t.id]["response"]["body"]["choices"][0]["message"]["content"])["critical_steps"]
        keep = judge_cap(t.n_steps, 0.3)
        # ratio 0.3 keeps the judge's first judge_cap(n, 0.3) picks of those it named at the 0.5 cap
        assert s.selected_steps == sorted(p["step"] for p in judged[:keep])
        assert all(s.steps[p["step"]].category == p["category"] for p in judged[:keep])
        assert s.meta["judge"] == "ok" and s.meta["judge_ratio"] == 0.5 and s.plan

    # ingested replies entered the reply cache: the same run without the files, live, pays nothing
    again = offline_selector(tmp_path, judge_ratio=0.5, client={"base_url": "http://127.0.0.1:9/v1"})
    with again:
        out2 = list(again.select(textcraft_trajs[:20]))
    assert again.stats()["requests"] == 0 and again.stats()["cache_hits"] == 20
    assert [s.selected_steps for s in out2] == [s.selected_steps for s in out[:20]]


def test_a_changed_trajectory_or_prompt_word_is_not_judged(textcraft_trajs, judge_dir, tmp_path, monkeypatch):
    """A reply answers the request it was made for: one changed observation, or one changed word of the
    prompt, makes the stored reply stale; it is reported as `request changed` and never used."""
    out_file = str(judge_dir / "textcraft.batch_output.jsonl")
    trajs = textcraft_trajs[:6]
    t0 = trajs[0]
    i = next(k for k, m in enumerate(t0.messages) if m.role == "user" and k > 2)
    changed = Trajectory(id=t0.id, env=t0.env, source=t0.source, messages=[
        Message(m.role, m.content + (" (changed)" if k == i else ""), trainable=m.trainable, step=m.step)
        for k, m in enumerate(t0.messages)])
    with offline_selector(tmp_path, judge_ratio=0.5, batch={"read": [out_file]}, cache=False) as sel:
        out = list(sel.select([changed, *trajs[1:]]))
    assert out[0].meta["judge"] == "failed" and "request changed" in out[0].meta["error"]
    assert out[0].meta["fallback"] == "random"
    assert [s.meta["judge"] for s in out[1:]] == ["ok"] * 5
    assert sel.stats()["not_judged"] == {"request changed": 1} and sel.stats()["fallback_random"] == 1

    monkeypatch.setattr(oracle_prompt, "SYSTEM_PROMPT", oracle_prompt.SYSTEM_PROMPT.replace("Routine", "Ordinary", 1))
    with offline_selector(tmp_path, judge_ratio=0.5, batch={"read": [out_file]}, cache=False, on_failure="all") as sel:
        out = list(sel.select(trajs))
    assert all(s.meta["judge"] == "failed" and "request changed" in s.meta["error"] for s in out)
    assert sel.stats()["not_judged"] == {"request changed": 6} and sel.stats()["requests"] == 0


def test_without_its_input_file_an_output_line_is_unverified(textcraft_trajs, judge_dir, tmp_path):
    """Plain custom_ids (the trajectory id only) cannot be checked without the request lines: unused."""
    lone = tmp_path / "outputs.jsonl"  # no sibling input file
    lone.write_text((judge_dir / "textcraft.batch_output.jsonl").read_text())
    index = read_outputs([lone])
    assert not index.replies and index.counts["unverified"] == 374
    with offline_selector(tmp_path, judge_ratio=0.5, batch={"read": [str(lone)]}, cache=False) as sel:
        s = next(iter(sel.select(textcraft_trajs[:1])))
    assert "has no request to check it against" in s.meta["error"]
    # the input file named explicitly makes them usable
    index = read_outputs([lone], [judge_dir / "textcraft.batch_input.jsonl"])
    assert len(index.replies) == 374


# ------------------------------------------------------------- write -> answer -> read, a real server


def answer_batch(input_file: Path, output_file: Path, base_url: str) -> int:
    """What the Batch API (or vLLM run_batch) does with an input file, done against a real server."""
    n = 0
    with open(output_file, "w") as out:
        for k, line in iter_jsonl(input_file):
            r = requests.post(base_url + line["url"].removeprefix("/v1"), json=line["body"], timeout=300)
            out.write(json.dumps({"id": f"batch_req_{k}", "custom_id": line["custom_id"],
                                  "response": {"status_code": r.status_code, "request_id": f"req_{k}", "body": r.json()},
                                  "error": None}) + "\n")
            n += 1
    return n


def test_batch_write_then_read_round_trips_through_a_real_llama_cpp_server(tmp_path, smollm2_dir):
    trajs = [
        Trajectory(id=f"toy_{i}", env="textcraft", messages=[
            Message("user", f"Goal: craft item {i}."),
            Message("assistant", "Thought:\nI check.\n\nAction:\ninventory", step=0),
            Message("user", "Inventory: 2 planks."),
            Message("assistant", f"Thought:\nCraft it.\n\nAction:\ncraft item {i}", step=1),
            Message("user", "Crafted."),
        ])
        for i in range(3)
    ]
    opts = {"judge_ratio": 0.5, "max_retries": 1, "max_turn_chars": 200, "cache_dir": tmp_path / "cache",
            "client": {"response_format": "json_object_schema", "max_tokens": 160}}
    first = tmp_path / "round1.batch_input.jsonl"
    with pytest.raises(StageStopped, match="wrote 3 request"):
        with OracleSelector(**opts, batch={"write": str(first)}) as sel:
            assert sel.server is None
            list(sel.select(trajs))
    lines = [d for _, d in iter_jsonl(first)]
    assert [split_custom_id(d["custom_id"])[0] for d in lines] == ["toy_0", "toy_1", "toy_2"]
    assert all(d["method"] == "POST" and d["url"] == "/v1/chat/completions" for d in lines)

    reads = [str(tmp_path / "round1.batch_output.jsonl")]
    with LocalServer(n_ctx=2048) as server:
        answer_batch(first, Path(reads[0]), server.base_url)
        # invalid replies get repair requests: written as a follow-up batch, answered, read back
        for r in range(2, 4):
            follow = tmp_path / f"round{r}.batch_input.jsonl"
            try:
                with OracleSelector(**opts, batch={"read": reads, "write": str(follow)}) as sel:
                    out = list(sel.select(trajs))
                break
            except StageStopped as e:  # some replies were invalid: their repair requests were written
                assert str(follow) in str(e) and len(list(iter_jsonl(follow))) >= 1
                reads.append(str(tmp_path / f"round{r}.batch_output.jsonl"))
                answer_batch(follow, Path(reads[-1]), server.base_url)
        else:
            with OracleSelector(**opts, batch={"read": reads}) as sel:
                out = list(sel.select(trajs))
    stats = sel.stats()
    assert stats["requests"] == 0  # every reply came from the files
    assert [s.id for s in out] == ["toy_0", "toy_1", "toy_2"]
    assert stats["ok"] + stats["failed"] == 3 and stats["ok"] >= 1, [s.meta for s in out]
    for s in out:
        assert 1 <= len(s.selected_steps) <= judge_cap(2, 0.3)


def test_batch_file_lines_follow_the_input_order_whatever_thread_finishes_first(tmp_path, monkeypatch):
    """Judging threads queue requests in the order they finish; the file is written in input order, so
    the same selection always writes the same file."""
    import time

    trajs = [
        Trajectory(id=f"toy_{i}", env="textcraft", messages=[
            Message("user", f"Goal: craft item {i}."),
            Message("assistant", "Thought:\nI check.\n\nAction:\ninventory", step=0),
            Message("user", "Inventory: 2 planks."),
        ])
        for i in range(6)
    ]
    real = oracle_prompt.build_messages

    def slow_for_the_first(traj, *a, **kw):
        if traj.id in ("toy_0", "toy_1"):
            time.sleep(0.3)  # the first trajectories finish last
        return real(traj, *a, **kw)

    monkeypatch.setattr("atlas_exp.selectors.oracle.build_messages", slow_for_the_first)
    out = tmp_path / "b.batch_input.jsonl"
    with pytest.raises(StageStopped, match="wrote 6 request"):
        with offline_selector(tmp_path, concurrency=4, batch={"write": str(out)}) as sel:
            list(sel.select(trajs))
    assert [split_custom_id(d["custom_id"])[0] for _, d in iter_jsonl(out)] == [t.id for t in trajs]


def test_batch_options_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="selector.batch: unknown option"):
        OracleSelector(cache_dir=tmp_path, batch={"reed": ["x"]})
    with pytest.raises(ConfigError, match="judge_ratio=0.1 is below ratio=0.3"):
        OracleSelector(cache_dir=tmp_path, judge_ratio=0.1, batch={"write": str(tmp_path / "b.jsonl")})
    with pytest.raises(ConfigError, match="is not a file"):
        OracleSelector(cache_dir=tmp_path, batch={"read": [str(tmp_path / "missing.jsonl")]})


# ------------------------------------------------------------------------------------ retry_failed


def test_retry_failed_asks_again_only_for_the_trajectories_that_fell_back(tmp_path, caplog):
    from test_oracle import Server, completion, good_reply

    trajs = [Trajectory(id=f"r{i}", env="toy", messages=[
        Message("user", f"task {i}"), Message("assistant", "Thought:\na\n\nAction:\nx", step=0),
        Message("user", "ok"), Message("assistant", "Thought:\nb\n\nAction:\ny", step=1)]) for i in range(4)]
    broken = {"on": True}

    def respond(i, body, headers):
        text = body["messages"][1]["content"]
        if broken["on"] and ("task 1" in text or "task 3" in text):
            return 200, completion("no json here"), {}, 0
        return 200, completion(good_reply(body)), {}, 0

    with Server(respond) as server:
        opts = {"ratio": 0.5, "seed": 1, "cache_dir": tmp_path / "cache", "max_retries": 1, "concurrency": 1,
                "client": {"base_url": server.base_url, "model": "gpt-4o", "response_format": "none"}}
        with OracleSelector(**opts) as sel:
            first = list(sel.select(trajs))
        assert [s.meta["judge"] for s in first] == ["ok", "failed", "ok", "failed"]
        sent_first = sel.stats()["requests"]
        broken["on"] = False
        with OracleSelector(**opts) as sel:  # a plain rerun replays the same failures from the cache
            assert [s.meta["judge"] for s in sel.select(trajs)] == ["ok", "failed", "ok", "failed"]
            assert sel.stats()["requests"] == 0
        with OracleSelector(**opts, retry_failed=True) as sel:
            again = list(sel.select(trajs))
        assert [s.meta["judge"] for s in again] == ["ok"] * 4
        assert sel.stats()["requests"] == 2 and sel.stats()["retried_failed"] == 2  # one fresh ask each
        assert len(server.bodies) == sent_first + 2

    from atlas_exp.selectors.stage import _warn_fallbacks

    with caplog.at_level("WARNING"):
        _warn_fallbacks({"selector_stats": {"failed": 2, "on_failure": "random"}})
    assert "2 trajectories fell back to random; rerun with selector.retry_failed=true" in caplog.text
