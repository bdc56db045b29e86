"""`selector=oracle` (the paper's LLM judge) on real AgentTraj-L trajectories, against real HTTP servers:
the embedded llama.cpp server on SmolLM2-135M, and OpenAI-protocol servers on loopback that misbehave on
purpose (errors, rate limits, timeouts, invalid JSON, no response_format). No mocks, no patched clients.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import REPO
from helpers import read_agentgym

from atlas_exp.errors import AtlasError
from atlas_exp.llm.client import strip_bounds
from atlas_exp.llm.costs import DEFAULT_PRICES, price_for
from atlas_exp.llm.reply_cache import ReplyCache
from atlas_exp.selectors.base import Selection
from atlas_exp.selectors.oracle import OracleSelector
from atlas_exp.selectors.oracle_prompt import (
    CATEGORIES,
    InvalidReply,
    build_messages,
    extract_json,
    judge_cap,
    parse_reply,
    rank_scores,
    reply_schema,
)
from atlas_exp.selectors.random_steps import RandomSelector

SECRET = "sk-test-DO-NOT-LEAK-4f7c2b9e1d"


@pytest.fixture(scope="module")
def textcraft(agenttraj_dir):
    return read_agentgym(agenttraj_dir / "textcraft.jsonl", limit=40)


@pytest.fixture(scope="module")
def short(textcraft):
    """Short real trajectories (3-4 steps): cheap prompts for the 135M judge on a busy CPU."""
    return [t for t in textcraft if t.n_steps <= 4][:8]


@pytest.fixture(scope="module")
def longer(textcraft):
    return next(t for t in textcraft if t.n_steps >= 10)


@pytest.fixture
def no_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


# ------------------------------------------------------------------------- an OpenAI-protocol server


def completion(text: str, prompt_tokens: int = 100, completion_tokens: int = 20, finish: str = "stop") -> dict:
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()), "model": "fake",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def good_reply(body: dict) -> str:
    """What a sensible judge says: reads n and the cap from the prompt, names the last step then the first."""
    text = "\n".join(m["content"] for m in body["messages"] if m["role"] == "user")
    n = int(re.search(r"Trajectory with (\d+) steps", text).group(1))
    cap = int(re.search(r"at most (\d+) critical step", text).group(1))
    picks = [{"step": n - 1, "category": "Critical Action", "reason": "crafts the target"},
             {"step": 0, "category": "Plan Creation", "reason": "checks what is needed"}][: min(cap, n)]
    return json.dumps({"plan": "1. find ingredients 2. craft the target", "critical_steps": picks})


class Server:
    """A real HTTP server on loopback speaking /v1/chat/completions; `respond(i, body, headers)` returns
    (status, JSON object or text, extra headers, delay seconds) for the i-th request (0-based)."""

    def __init__(self, respond: Callable[[int, dict, dict], tuple[int, Any, dict, float]]):
        self.respond = respond
        self.bodies: list[dict] = []
        self.auth: list[str] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]}, {})

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                body = json.loads(raw or b"{}")
                with outer._lock:
                    i = len(outer.bodies)
                    outer.bodies.append(body)
                    outer.auth.append(self.headers.get("authorization", ""))
                status, payload, headers, delay = outer.respond(i, body, self.headers)
                if delay:
                    time.sleep(delay)
                self._send(status, payload, headers)

            def _send(self, status, payload, headers):
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> "Server":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def fake_selector(server: Server, tmp_path: Path, **kw) -> OracleSelector:
    client = {"base_url": server.base_url, "model": "gpt-4o", "backoff_base": 0.05, "backoff_max": 1.0,
              **kw.pop("client", {})}
    kw.setdefault("cache_dir", tmp_path / "cache")
    kw.setdefault("concurrency", 2)
    return OracleSelector(ratio=0.3, seed=3, client=client, **kw)


# ------------------------------------------------------------------------------- prompt and replies


def test_prompt_numbers_every_step_and_shows_observations(textcraft, longer):
    t = longer
    cap = judge_cap(t.n_steps, 0.3)
    system, user = build_messages(t, cap)
    for name in CATEGORIES:
        assert name in system["content"]
    assert '"plan"' in system["content"] and '"critical_steps"' in system["content"]
    body = user["content"]
    assert f"with {t.n_steps} steps" in body and f"at most {cap} critical steps" in body
    labels = re.findall(r"\[Step (\d+)\]", body)
    assert [int(k) for k in labels] == list(range(t.n_steps))
    for m in t.messages:  # every turn, observations included, is in the prompt
        assert m.content.strip() in body
    assert "[Agent turn, context only, not a step]" in body  # AgentTraj-L's "OK. I'll follow" turn
    # long turns can be clipped at both ends to bound the cost
    clipped = build_messages(t, cap, max_turn_chars=200)[1]["content"]
    assert len(clipped) < len(body) and "characters omitted" in clipped


def test_cap_is_ceil_of_ratio_with_at_least_one_step():
    assert judge_cap(10, 0.3) == 3
    assert judge_cap(3, 0.3) == 1
    assert judge_cap(4, 0.3) == 2  # 1.2 rounds up: the judge may name fewer
    assert judge_cap(30, 0.1) == 3  # 0.1 * 30 = 3.0000000000000004 must not become 4
    assert judge_cap(1, 0.01) == 1
    assert judge_cap(5, 1.0) == 5


def test_valid_reply_on_a_real_trajectory(longer):
    n, cap = longer.n_steps, judge_cap(longer.n_steps, 0.3)
    reply = json.dumps({
        "plan": ["get the ingredients", "craft the intermediate items", "craft the target"],
        "critical_steps": [
            {"step": n - 1, "category": "Critical Action", "reason": "crafts\nthe target"},
            {"step": 0, "category": "plan creation", "reason": "checks the inventory"},
            {"step": "2", "category": "Self-Correction", "reason": "fixes a failed get"},
        ],
    })
    v = parse_reply(reply, n_steps=n, cap=cap)
    assert [p.step for p in v.picks] == [n - 1, 0, 2][:cap]
    assert [p.category for p in v.picks][:3] == ["Critical Action", "Plan Creation", "Self Correction"][:cap]
    assert v.picks[0].reason == "crafts the target"  # one line
    assert v.plan.splitlines()[0] == "get the ingredients"
    assert rank_scores(n, v.picks)[n - 1] == 1.0


@pytest.mark.parametrize(
    "picks, match",
    [
        ([{"step": 99, "category": "Critical Action", "reason": "x"}], "outside 0..2"),
        ([{"step": -1, "category": "Critical Action", "reason": "x"}], "outside 0..2"),
        ([{"step": 1, "category": "Critical Action", "reason": "x"},
          {"step": 1, "category": "Plan Creation", "reason": "y"}], "step 1 is named more than once"),
        ([{"step": 0, "category": "Lucky Guess", "reason": "x"}], "category is 'Lucky Guess'"),
        ([{"step": True, "category": "Critical Action", "reason": "x"}], "not a step number"),
        ([{"step": "step 1", "category": "Critical Action", "reason": "x"}], "not a step number"),
        ([], "empty"),
        (None, "no \"critical_steps\" list"),
    ],
)
def test_invalid_replies_are_rejected_with_the_reason(short, picks, match):
    t = next(t for t in short if t.n_steps == 3)
    obj = {"plan": "p"} if picks is None else {"plan": "p", "critical_steps": picks}
    with pytest.raises(InvalidReply, match=re.escape(match)):
        parse_reply(json.dumps(obj), n_steps=t.n_steps, cap=3)


@pytest.mark.parametrize("text", ["", "I think step 2 matters most.", "{not json", "[1, 2]"])
def test_replies_without_a_json_object_are_rejected(text):
    with pytest.raises(InvalidReply):
        parse_reply(text, n_steps=5, cap=2)


def test_over_cap_keeps_the_judges_first_picks(longer):
    n = longer.n_steps
    order = [5, 1, 7, 0, 3]
    reply = {"plan": "p", "critical_steps": [{"step": k, "category": "Critical Action", "reason": "r"} for k in order]}
    v = parse_reply(json.dumps(reply), n_steps=n, cap=2)
    assert [p.step for p in v.picks] == [5, 1]
    assert [p.step for p in v.dropped] == [7, 0, 3]
    scores = rank_scores(n, v.picks)
    assert scores[5] == 1.0 and scores[1] == 0.5 and scores[7] == 0.0


def test_json_in_prose_and_code_fences():
    obj = {"plan": "p", "critical_steps": [{"step": 1, "category": "Critical Observation", "reason": "r"}]}
    fenced = f"Here is my analysis.\n```json\n{json.dumps(obj, indent=2)}\n```\nHope this helps."
    prose = f"Sure! The answer is {json.dumps(obj)} and that is all."
    # an example object echoed before the real one does not win
    echoed = 'The format is {"step": 0}. My answer: ' + json.dumps(obj)
    bare_fence = f"```\n{json.dumps(obj)}\n```"
    for text in (fenced, prose, echoed, bare_fence):
        v = parse_reply(text, n_steps=3, cap=1)
        assert [(p.step, p.category) for p in v.picks] == [(1, "Critical Observation")]
    assert extract_json(json.dumps(obj)) == obj


def test_schema_bounds_and_stripping():
    s = reply_schema(7, 2)
    arr = s["properties"]["critical_steps"]
    assert list(s["properties"]) == ["plan", "critical_steps"]  # the plan is written first
    assert arr["maxItems"] == 2 and arr["minItems"] == 1
    assert arr["items"]["properties"]["step"] == {"type": "integer", "minimum": 0, "maximum": 6}
    assert arr["items"]["properties"]["category"]["enum"] == list(CATEGORIES)
    loose = strip_bounds(s)
    assert "maxItems" not in json.dumps(loose) and "maximum" not in json.dumps(loose)
    assert loose["properties"]["critical_steps"]["items"]["properties"]["category"]["enum"] == list(CATEGORIES)


def test_price_table_lookup():
    from atlas_exp.config import compose

    prices = compose(["selector=oracle"]).selector.client.prices
    assert dict(prices) == DEFAULT_PRICES  # the config shows what the code assumes
    assert price_for("gpt-4o", prices) == (2.5, 10.0)
    assert price_for("gpt-4o-2024-05-13", prices) == (5.0, 15.0)  # exact entry beats the prefix
    assert price_for("gpt-4o-mini-2024-07-18", prices) == (0.15, 0.6)  # longest prefix
    assert price_for("llama-3-8b", prices) is None


def test_cache_skips_a_torn_last_line_and_keeps_appending(tmp_path):
    path = tmp_path / "replies.jsonl"
    c = ReplyCache(path)
    c.put("a", {"text": "A"})
    c.close()
    with open(path, "a") as f:
        f.write('{"v": 1, "key": "b", "text": "hal')  # a crash mid-write
    c = ReplyCache(path)
    assert c.get("a")["text"] == "A" and c.get("b") is None and c.skipped == 1
    c.put("c", {"text": "C"})  # goes on a fresh line, not glued to the torn one
    c.close()
    c = ReplyCache(path)
    assert c.get("a")["text"] == "A" and c.get("c")["text"] == "C" and c.skipped == 1
    c.close()


# ------------------------------------------------------------------------ misbehaving servers


def test_500_and_429_are_retried_with_backoff(short, tmp_path):
    t = short[0]

    def respond(i, body, headers):
        if i == 0:
            return 500, {"error": {"message": "upstream exploded"}}, {}, 0
        if i == 1:
            return 429, {"error": {"message": "slow down"}}, {"retry-after": "0.3"}, 0
        return 200, completion(good_reply(body)), {}, 0

    with Server(respond) as srv:
        sel = fake_selector(srv, tmp_path, concurrency=1)
        t0 = time.monotonic()
        [s] = list(sel.select([t]))
        elapsed = time.monotonic() - t0
        sel.close()
    assert s.meta["judge"] == "ok" and s.selected_steps == [t.n_steps - 1]
    assert s.steps[t.n_steps - 1].category == "Critical Action" and s.plan
    st = sel.stats()
    assert st["requests"] == 3 and st["retries"] == 2 and st["errors"] == {"500": 1, "429": 1}
    assert elapsed >= 0.3  # Retry-After honoured
    assert st["prompt_tokens"] == 100 and st["completion_tokens"] == 20
    assert st["cost_usd"] == pytest.approx((100 * 2.5 + 20 * 10.0) / 1e6)


def test_a_timeout_is_retried(short, tmp_path):
    def respond(i, body, headers):
        return 200, completion(good_reply(body)), {}, (3.0 if i == 0 else 0)

    with Server(respond) as srv:
        sel = fake_selector(srv, tmp_path, concurrency=1, client={"timeout": 0.5})
        [s] = list(sel.select(short[:1]))
        sel.close()
    assert s.meta["judge"] == "ok"
    st = sel.stats()
    assert st["errors"] == {"timeout": 1} and st["requests"] == 2


def test_always_invalid_json_falls_back_to_random_and_is_counted(short, tmp_path):
    def respond(i, body, headers):
        return 200, completion("Step 1 is the most important one, clearly. {oops"), {}, 0

    trajs = short[:3]
    with Server(respond) as srv:
        sel = fake_selector(srv, tmp_path, max_retries=2)
        sels = list(sel.select(trajs))
        sel.close()
    want = list(RandomSelector(ratio=0.3, seed=3).select(trajs))
    for s, w in zip(sels, want):
        assert s.selector == "oracle"
        assert s.selected_steps == w.selected_steps
        assert s.meta["judge"] == "failed" and s.meta["fallback"] == "random" and s.meta["attempts"] == 3
        assert "invalid reply" in s.meta["error"]
    st = sel.stats()
    assert st["failed"] == 3 and st["fallback_random"] == 3 and st["ok"] == 0
    assert st["invalid_replies"] == 9 and st["requests"] == 9
    # retries show the judge what was wrong (else temperature 0 would just repeat the same reply)
    repairs = [b for b in srv.bodies if len(b["messages"]) == 4]
    assert len(repairs) == 6 and "could not be used" in repairs[0]["messages"][-1]["content"]


def test_on_failure_error_names_the_trajectory(short, tmp_path):
    def respond(i, body, headers):
        return 200, completion('{"plan": "p", "critical_steps": [{"step": 99, "category": "Critical Action"}]}'), {}, 0

    with Server(respond) as srv:
        sel = fake_selector(srv, tmp_path, max_retries=1, on_failure="error")
        with pytest.raises(AtlasError, match=rf"trajectory '{short[0].id}'.*outside 0\.\.") as e:
            list(sel.select(short[:1]))
        sel.close()
    assert "on_failure" in str(e.value)


def test_a_server_without_response_format_gets_plain_text(short, tmp_path):
    def respond(i, body, headers):
        if "response_format" in body:
            return 400, {"error": {"message": "response_format is not supported"}}, {}, 0
        return 200, completion("Here you go:\n```json\n" + good_reply(body) + "\n```"), {}, 0

    def kinds(bodies):
        return [b.get("response_format", {}).get("type", "text") + ("+schema" if "schema" in b.get("response_format", {}) else "")
                for b in bodies]

    with Server(respond) as srv:
        sel = fake_selector(srv, tmp_path, concurrency=1)
        sels = list(sel.select(short[:3]))
        sel.close()
        assert all(s.meta["judge"] == "ok" for s in sels)
        # json_schema (bounded, then unbounded), llama-cpp-python's json_object+schema, json_object, then
        # plain text, remembered for the next trajectories
        assert kinds(srv.bodies) == ["json_schema", "json_schema", "json_object+schema", "json_object", "text", "text", "text"]
        assert "maxItems" in json.dumps(srv.bodies[0]["response_format"])
        assert "maxItems" not in json.dumps(srv.bodies[1]["response_format"])
        assert sel.stats()["response_format"] == "text" and sel.stats()["errors"] == {"400": 4}

        # a new run against the same endpoint remembers its format (kept in the cache folder): no probing
        sel = fake_selector(srv, tmp_path, concurrency=1)
        assert all(s.meta["judge"] == "ok" for s in sel.select(short[3:5]))
        sel.close()
        assert kinds(srv.bodies[7:]) == ["text", "text"]


def test_restart_resumes_from_the_cache_and_a_rerun_sends_nothing(short, tmp_path):
    """A stop after 2 of 6 trajectories, a resume, and a full rerun, counted at the server."""
    trajs = short[:6]

    def respond(i, body, headers):
        return 200, completion(good_reply(body)), {}, 0.05

    with Server(respond) as srv:
        sel = fake_selector(srv, tmp_path, concurrency=1)
        gen = sel.select(trajs)
        first = [next(gen), next(gen)]
        sel.close()  # "crash": abandon the rest
        n1 = len(srv.bodies)
        assert 2 <= n1 < 6 and sel.stats()["requests"] == n1

        sel2 = fake_selector(srv, tmp_path, concurrency=2)
        second = list(sel2.select(trajs))
        sel2.close()
        assert sel2.stats()["requests"] == len(srv.bodies) - n1 == 6 - n1
        assert sel2.stats()["cache_hits"] == n1
        # no request was ever sent twice
        keys = [hashlib.sha256(json.dumps(b, sort_keys=True).encode()).hexdigest() for b in srv.bodies]
        assert len(set(keys)) == len(keys) == 6

        sel3 = fake_selector(srv, tmp_path, concurrency=2)
        third = list(sel3.select(trajs))
        sel3.close()
        assert len(srv.bodies) == 6 and sel3.stats()["requests"] == 0 and sel3.stats()["cache_hits"] == 6
    assert [s.to_dict() for s in second[:2]] == [{**s.to_dict(), "meta": {**s.meta, "cached": True}} for s in first]
    assert [s.selected_steps for s in third] == [s.selected_steps for s in second]
    assert all(s.meta["cached"] for s in third)
    assert third[0].meta["cached"] and sel3.stats()["cost_usd"] == 0.0
    assert sel3.stats()["cost_usd_saved_by_cache"] == pytest.approx(6 * (100 * 2.5 + 20 * 10.0) / 1e6)


def test_no_secret_in_outputs_or_logs(short, tmp_path):
    """The full app (stage=select) with a key in the environment; the server even echoes it in an error."""
    from atlas_exp.artifacts import write_jsonl

    def respond(i, body, headers):
        if i == 0:
            return 500, {"error": {"message": f"bad auth header {headers['authorization']}"}}, {}, 0
        return 200, completion(good_reply(body)), {}, 0

    run = tmp_path / "run"
    write_jsonl(run / "trajectories.jsonl", (t.to_dict() for t in short[:2]))
    env = {**os.environ, "ATLAS_TEST_JUDGE_KEY": SECRET, "WANDB_MODE": "offline"}
    with Server(respond) as srv:
        p = subprocess.run(
            [sys.executable, "-m", "atlas_exp", "stage=select", f"run_dir={run}", f"cache_dir={tmp_path}/cache",
             "selector=oracle", f"selector.client.base_url={srv.base_url}",
             "selector.client.api_key_env=ATLAS_TEST_JUDGE_KEY", "selector.client.backoff_base=0.05",
             "hydra.verbose=true"],
            cwd=REPO, capture_output=True, text=True, env=env, timeout=120,
        )
    assert p.returncode == 0, p.stderr[-3000:]
    assert all(a == f"Bearer {SECRET}" for a in srv.auth)  # the key was used...
    sels = [json.loads(line) for line in (run / "selection.jsonl").read_text().splitlines()]
    assert [s["meta"]["judge"] for s in sels] == ["ok", "ok"]
    files = [f for f in list(run.rglob("*")) + list((tmp_path / "cache").rglob("*")) if f.is_file()]
    assert any(f.name == "selection_summary.json" for f in files) and any(f.suffix == ".log" for f in files)
    assert any(f.name == "config.yaml" for f in files)
    for f in files:  # ...and written nowhere
        assert SECRET not in f.read_text(errors="replace"), f
    assert SECRET not in p.stdout + p.stderr
    assert "bad auth header Bearer ***" in (run / "__main__.log").read_text()  # masked, not dropped
    stats = json.loads((run / "selection_summary.json").read_text())["selector_stats"]
    assert stats["requests"] == 3 and stats["errors"] == {"500": 1} and stats["ok"] == 2
    assert "ATLAS_TEST_JUDGE_KEY" in (run / ".hydra" / "config.yaml").read_text()


# ------------------------------------------------------------------ the real llama.cpp judge


def _check_selection(s: Selection, n_steps: int, ratio: float) -> None:
    cap = judge_cap(n_steps, ratio)
    assert 1 <= len(s.selected_steps) <= cap
    assert [c.step for c in s.steps] == list(range(n_steps))
    for c in s.steps:
        if c.selected:
            assert c.category in CATEGORIES and c.score > 0
        else:
            assert c.score == 0 and c.category is None


def test_embedded_llama_cpp_judge_resumes_from_its_cache(short, tmp_path, no_key):
    """The default path (no key, no base_url): a llama.cpp server on SmolLM2 with grammar-constrained
    JSON gives valid selections; a run stopped after the first trajectory, resumed, and rerun in full
    sends each request once, counted in the servers' own access logs."""
    trajs = short[:3]

    def run(tag: str, stop_after: int | None = None):
        log_path = tmp_path / f"{tag}.log"
        sel = OracleSelector(
            ratio=0.3, seed=1, cache_dir=tmp_path / "cache", concurrency=1, max_turn_chars=150,
            client={"max_tokens": 160}, local={"log_path": str(log_path)},
        )
        proc = sel.server.proc
        assert sel.server.base_url.startswith("http://127.0.0.1:")
        try:
            gen = sel.select(trajs)
            out = [next(gen) for _ in range(stop_after)] if stop_after else list(gen)
        finally:
            sel.close()
        assert proc.poll() is not None  # no orphan server
        served = log_path.read_text().count('"POST /v1/chat/completions HTTP/1.1" 200')
        assert served == sel.stats()["requests"]
        return out, sel.stats()

    _, s1 = run("first", stop_after=1)
    sels, s2 = run("resume")
    third, s3 = run("rerun")

    assert 1 <= s1["requests"] and s1["cache_hits"] == 0
    assert s2["cache_hits"] == s1["requests"]  # the resume pays only for what was missing...
    assert s3["requests"] == 0 and s3["cache_hits"] == s1["requests"] + s2["requests"]  # ...a rerun for nothing
    assert [s.to_dict()["steps"] for s in third] == [s.to_dict()["steps"] for s in sels]
    assert s2["embedded_server"] and s2["model"].startswith("local:SmolLM2") and s2["cost_usd"] == 0
    assert s2["response_format"] == "json_object_schema"  # llama-cpp-python's grammar-constrained dialect
    assert s1["prompt_tokens"] > 0
    ok = [(s, t) for s, t in zip(sels, trajs) if s.meta["judge"] == "ok"]
    assert len(ok) >= 2, [s.meta for s in sels]  # the grammar makes a 135M model's JSON valid
    for s, t in ok:
        _check_selection(s, t.n_steps, 0.3)
        assert s.plan
    for s, t in zip(sels, trajs):
        assert s.n_steps == t.n_steps and len(s.selected_steps) >= 1


def test_a_server_that_cannot_start_fails_with_its_log_tail(tmp_path, no_key):
    bad = tmp_path / "broken.gguf"
    bad.write_text("not a model")
    with pytest.raises(AtlasError, match=r"(?s)did not start.*Failed to load model"):
        OracleSelector(ratio=0.3, cache_dir=tmp_path / "cache", local={"model_path": str(bad), "startup_timeout": 120})


def test_unknown_options_are_named(tmp_path):
    from atlas_exp.errors import ConfigError

    with pytest.raises(ConfigError, match="api_key"):
        OracleSelector(client={"api_key": "sk-x"}, cache_dir=tmp_path)  # keys come from the environment only
    with pytest.raises(ConfigError, match="on_failure"):
        OracleSelector(on_failure="ignore", cache_dir=tmp_path)


def test_the_openai_packages_retries_are_counted_and_a_400_is_not_retried():
    """The `openai` package retries (429 with Retry-After, 500s); the client counts each attempt it sent."""
    from atlas_exp.llm.client import ChatClient

    plans = {"429": [(429, {"retry-after": "0.2"}), (200, {})],
             "500": [(500, {}), (500, {}), (200, {})],
             "400": [(400, {}), (200, {})]}
    for kind, plan in plans.items():
        def respond(i, body, headers, plan=plan):
            status, extra = plan[min(i, len(plan) - 1)]
            payload = completion("the reply") if status == 200 else {"error": {"message": f"status {status}"}}
            return status, payload, extra, 0

        with Server(respond) as srv:
            c = ChatClient(model="gpt-4o", base_url=srv.base_url, response_format="none", max_retries=3,
                           backoff_base=0.01, backoff_max=1.0)
            t0 = time.monotonic()
            try:
                if kind == "400":
                    with pytest.raises(AtlasError, match="rejected"):
                        c.chat([{"role": "user", "content": "hi"}])
                else:
                    assert c.chat([{"role": "user", "content": "hi"}]).text == "the reply"
            finally:
                c.close()
            st = c.stats.as_dict()
        sent = len(srv.bodies)
        if kind == "429":
            assert sent == 2 and st["requests"] == 2 and st["retries"] == 1 and st["errors"] == {"429": 1}
            assert time.monotonic() - t0 >= 0.2  # Retry-After honoured
        elif kind == "500":
            assert sent == 3 and st["requests"] == 3 and st["retries"] == 2 and st["errors"] == {"500": 2}
        else:
            assert sent == 1 and st["requests"] == 1 and st["retries"] == 0 and st["errors"] == {"400": 1}
        assert st["responses"] == (0 if kind == "400" else 1)
