"""AgentGymHTTPEnv against real HTTP servers on loopback.

The TextCraft server here speaks AgentGym's TextCraft API (agentenv-textcraft: `/create`, `/reset` with
`id` + `data_idx`, `/step` with `id` + `action`, `/observation?id=`, errors as HTTP 200 `{"error": ...}`,
raw observations without the data's `Instruction:` prefix) and is backed by our in-process `TextCraftEnv`;
real AgentTraj-L trajectories are replayed through it. Other dialects are checked on scripted servers that
answer in their server's response shapes with a real data record's text.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from atlas_exp.envs.agentgym_http import (
    DIALECTS,
    AgentGymHTTPEnv,
    AgentGymItem,
    AgentGymServerError,
    action_from_reply,
    item_index,
)
from atlas_exp.envs.base import Env, EpisodeSpec
from atlas_exp.envs.textcraft import OBS_PREFIX, TextCraftEnv, TextCraftEpisode, sample_episode
from atlas_exp.errors import ConfigError

App = Callable[[str, str, dict, Any], "tuple[int, Any]"]


# ------------------------------------------------------------------------------------------- HTTP plumbing


class _Handler(BaseHTTPRequestHandler):
    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        body = json.loads(raw) if raw else None
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.server.calls.append((method, url.path, query, body))
        status, payload = self.server.app(method, url.path, query, body)
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def log_message(self, *args: object) -> None:
        pass


class Server:
    """A threaded stdlib HTTP server on a free loopback port, answering with `app`; records every call."""

    def __init__(self, app: App):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.app = app
        self.httpd.calls = []
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def calls(self) -> list[tuple[str, str, dict, Any]]:
        return self.httpd.calls

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


NOT_FOUND = (404, {"detail": "Not Found"})


# ------------------------------------------------------------------------------ AgentGym's TextCraft server


class TextCraftServer:
    """AgentGym's TextCraft server API over our `TextCraftEnv`.

    `data_idx -> episode` is AgentGym's own item table where the data show it (the episode each
    `textcraft_<n>` record was played on, read from its first observation) and our seeded sampler elsewhere.
    Like AgentGym's server it never ends an episode on a step count, sends raw game text (inventory with
    its trailing blank) and has no `/close`.
    """

    def __init__(self, episodes: dict[int, TextCraftEpisode]):
        self.episodes = episodes
        self.envs: dict[int, TextCraftEnv] = {}
        self.last_obs: dict[int, str] = {}
        self.lock = threading.Lock()

    def episode(self, idx: int) -> TextCraftEpisode:
        return self.episodes.get(idx) or sample_episode(idx)

    def _reset(self, env_id: int, idx: int) -> dict:
        obs = self.envs[env_id].reset(self.episode(idx))[len(OBS_PREFIX):]
        self.last_obs[env_id] = obs
        return {"id": env_id, "observation": obs, "done": False, "reward": 0}

    def __call__(self, method: str, path: str, query: dict, body: Any) -> tuple[int, Any]:
        with self.lock:
            if (method, path) == ("GET", "/"):
                return 200, "This is environment TextCraft."
            if (method, path) == ("POST", "/create"):
                if not isinstance(body, dict):
                    return 422, {"detail": [{"loc": ["body"], "msg": "field required"}]}
                env_id = len(self.envs)
                self.envs[env_id] = TextCraftEnv(max_steps=10**9)
                return 200, self._reset(env_id, env_id)
            if method == "POST" and path in ("/reset", "/step"):
                if not isinstance(body, dict) or "id" not in body:
                    return 422, {"detail": [{"loc": ["body", "id"], "msg": "field required"}]}
                env_id = body["id"]
                if env_id not in self.envs:
                    return 200, {"error": f"The id {env_id} is not valid."}
                if path == "/reset":
                    return 200, self._reset(env_id, int(body.get("data_idx", 0)))
                try:
                    res = self.envs[env_id].step(body["action"])
                except RuntimeError as e:
                    return 200, {"error": str(e)}
                raw = res.info["raw_observation"]
                self.last_obs[env_id] = raw
                return 200, {"observation": raw, "reward": int(res.reward), "done": res.success}
            if (method, path) == ("GET", "/observation"):
                env_id = int(query.get("id", -1))
                return 200, self.last_obs.get(env_id, {"error": f"The id {env_id} is not valid."})
            return NOT_FOUND


@pytest.fixture(scope="module")
def records(agenttraj_dir: Path) -> list[dict]:
    with open(agenttraj_dir / "textcraft.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def textcraft_server(records):
    episodes = {
        int(rec["item_id"].rsplit("_", 1)[1]): TextCraftEpisode.from_observation(rec["conversations"][2]["value"])
        for rec in records
    }
    app = TextCraftServer(episodes)
    with Server(app) as server:
        yield server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------- TextCraft replay via HTTP


def test_replays_agenttraj_l_textcraft_trajectories_to_success_over_http(records, textcraft_server, agenttraj_dir):
    """A sample of real trajectories, replayed reply by reply through the client, show the data's text and win."""
    sample = random.Random(0).sample(records, 20)
    env = AgentGymHTTPEnv(base_url=textcraft_server.url, env="textcraft", retries=1, backoff=0.01)
    assert isinstance(env, Env) and env.name == "textcraft"
    successes = same = n_obs = 0
    with env:
        for k, rec in enumerate(sample):
            conv = rec["conversations"]
            assert env.instruction() == conv[0]["value"] and env.ack == conv[1]["value"]
            # both ways of naming the item: its AgentTraj-L id, and AgentGym's bare data_idx
            episode = AgentGymItem(id=rec["item_id"]) if k % 2 else int(rec["item_id"].rsplit("_", 1)[1])
            assert env.reset(episode) == conv[2]["value"]
            result = None
            for i in range(3, len(conv), 2):
                action = env.action_from_reply(conv[i]["value"])
                assert action == TextCraftEnv().action_from_reply(conv[i]["value"])
                result = env.step(action)
                if i + 1 < len(conv):
                    n_obs += 1
                    same += result.observation == conv[i + 1]["value"]
                if result.done:
                    break
            successes += bool(result and result.success and result.done and i == len(conv) - 1)
            assert result.reward == 1.0 and result.info["score"] == 1.0
    print(f"\nTextCraft over HTTP: {successes}/20 reach the goal; observations equal to the data: {same}/{n_obs}")
    assert successes == 20
    assert same / n_obs >= 0.98  # in-process: 2616/2618 over all 374 records
    # one server-side env, reused across episodes as AgentGym's clients do; close() tolerated the 404
    paths = [(m, p) for m, p, _, _ in textcraft_server.calls]
    assert paths.count(("POST", "/create")) == 1 and paths[-1] == ("POST", "/close")
    assert env.env_id is None
    # the data file gives the same instruction as the built-in one
    from_data = AgentGymHTTPEnv(textcraft_server.url, "textcraft", data_dir=agenttraj_dir).instruction()
    assert from_data == env.instruction() == records[0]["conversations"][0]["value"]


def test_wire_format_and_step_contract(textcraft_server):
    env = AgentGymHTTPEnv(textcraft_server.url + "/", env="textcraft", backoff=0.01, max_steps=2)
    first = env.reset(AgentGymItem(index=3))
    assert first.startswith("Instruction:\nCrafting commands:\n")
    n = len(textcraft_server.calls)
    res = env.step("Inventory.")
    method, path, _, body = textcraft_server.calls[n]
    assert (method, path) == ("POST", "/step") and body == {"id": env.env_id, "action": "Inventory"}
    assert res.observation == "Instruction:\nCould not execute Inventory" and not res.done
    res = env.step("inventory")
    # the server's inventory text ends in a blank; the data's does not
    assert res.info["raw_observation"].startswith("Inventory: ")
    assert res.observation == "Instruction:\nInventory: You are not carrying anything."
    assert res.done and res.info["truncated"] and not res.success
    with pytest.raises(RuntimeError):
        env.step("inventory")
    env.close()


# --------------------------------------------------------------------------------------------- errors


def test_server_down_is_a_config_error_naming_the_url_and_how_to_start_it():
    url = f"http://127.0.0.1:{_free_port()}"
    env = AgentGymHTTPEnv(url, env="textcraft", retries=2, backoff=0.01)
    with pytest.raises(ConfigError) as e:
        env.reset(0)
    msg = str(e.value)
    assert url in msg and "3 attempts" in msg and "\n" not in msg
    assert "is the AgentGym textcraft server running?" in msg and "textcraft --host 127.0.0.1 --port" in msg


def test_5xx_is_retried_then_a_clear_error():
    state = {"fail": 2}

    def flaky(method, path, query, body):
        if state["fail"] > 0:
            state["fail"] -= 1
            return 500, {"detail": "Internal Server Error"}
        if path == "/create":
            return 200, {"id": 0, "observation": "x", "done": False, "reward": 0}
        if path == "/reset":
            first = "Crafting commands:\ncraft 1 a using 1 b\n\nGoal: craft a."
            return 200, {"id": 0, "observation": first, "done": False, "reward": 0}
        return NOT_FOUND

    with Server(flaky) as server:
        env = AgentGymHTTPEnv(server.url, env="textcraft", retries=2, backoff=0.01)
        assert env.reset(0).startswith("Instruction:\nCrafting commands:")
        assert [p for _, p, _, _ in server.calls] == ["/create", "/create", "/create", "/reset"]

    with Server(lambda *a: (503, {"detail": "overloaded"})) as server:
        env = AgentGymHTTPEnv(server.url, env="webshop", retries=3, backoff=0.01)
        with pytest.raises(AgentGymServerError) as e:
            env.reset(5)
        assert len(server.calls) == 4
        msg = str(e.value)
        assert "HTTP 503 4 times" in msg and server.url in msg and "overloaded" in msg and "\n" not in msg


def test_a_step_is_only_resent_when_it_never_reached_the_server():
    game = TextCraftServer({})

    def slow(method, path, query, body):
        if path == "/step":
            time.sleep(0.6)  # longer than the client's timeout: the step may have been applied
        return game(method, path, query, body)

    with Server(slow) as server:
        env = AgentGymHTTPEnv(server.url, env="textcraft", timeout=0.2, retries=3, backoff=0.01)
        env.reset("textcraft_4")
        with pytest.raises(AgentGymServerError, match="not re-sent"):
            env.step("inventory")
        assert [p for _, p, _, _ in server.calls].count("/step") == 1
    # the server is gone now: the step never reaches it, so it is retried, then reported as unreachable
    with pytest.raises(ConfigError, match="is the AgentGym textcraft server running"):
        env.step("inventory")


def test_unknown_env_lists_the_known_ones():
    with pytest.raises(ConfigError) as e:
        AgentGymHTTPEnv("http://127.0.0.1:1", env="alfworld_v9")
    msg = str(e.value)
    assert "alfworld_v9" in msg and all(name in msg for name in DIALECTS)
    with pytest.raises(ConfigError, match="base_url"):
        AgentGymHTTPEnv("127.0.0.1:36001", env="webshop")


def test_server_side_errors_and_wrong_server_are_reported(textcraft_server, agenttraj_dir):
    env = AgentGymHTTPEnv(textcraft_server.url, env="textcraft", backoff=0.01)
    env.reset(1)
    env.env_id = 10**6  # as after a server restart: the server no longer knows this env
    with pytest.raises(AgentGymServerError, match="The id 1000000 is not valid"):
        env.step("inventory")
    # a Maze client pointed at the TextCraft server: its /maze/create is a 404 naming the LMRL-Gym server
    maze = AgentGymHTTPEnv(textcraft_server.url, env="maze", data_dir=agenttraj_dir, retries=0)
    with pytest.raises(ConfigError, match="agentenv-lmrlgym"):
        maze.reset(3)
    # items of another env are refused before any request
    with pytest.raises(ConfigError, match="textcraft_<n>"):
        env.reset(EpisodeSpec(id="webshop_3"))
    # long prompts need the data file; the message says which option gives it
    with pytest.raises(ConfigError, match="data_dir"):
        AgentGymHTTPEnv(textcraft_server.url, env="webshop").instruction()


# ---------------------------------------------------------------- other dialects, on scripted servers


def _first(agenttraj_dir: Path, env: str, pick: Callable[[dict], bool] = lambda r: True) -> dict:
    with open(agenttraj_dir / DIALECTS[env].data_file) as f:
        for line in f:
            rec = json.loads(line)
            if pick(rec):
                return rec
    raise AssertionError(f"no {env} record")


def _scripted(rec: dict, *, create: Any, reset: Callable[[str], Any], step: Callable[[str, bool], dict],
              observation: Callable[[str], Any] | None = None, prefix: str = "", first_server_obs: str) -> App:
    """A server that plays one data record: its observations, in the server's response shapes."""
    conv = rec["conversations"]
    later = [conv[i]["value"] for i in range(4, len(conv), 2)]
    pos = {"k": 0}

    def app(method, path, query, body):
        if not path.startswith(prefix):
            return NOT_FOUND
        path = path[len(prefix):]
        if (method, path) == ("POST", "/create"):
            return 200, create
        if (method, path) == ("POST", "/reset"):
            pos["k"] = 0
            return 200, reset(first_server_obs)
        if (method, path) == ("GET", "/observation") and observation is not None:
            return 200, observation(first_server_obs)
        if (method, path) == ("POST", "/step"):
            k = pos["k"]
            pos["k"] += 1
            last = k >= len(later)
            return 200, step(later[k] if not last else "Thank you for shopping with us!", last)
        if (method, path) == ("POST", "/close"):
            return 200, {"closed": True}
        return NOT_FOUND

    return app


def _replay(env: AgentGymHTTPEnv, rec: dict, index: int) -> tuple[str, list, Any]:
    conv = rec["conversations"]
    first = env.reset(index)
    assert env.instruction() == conv[0]["value"] and env.ack == conv[1]["value"]
    sent, result = [], None
    for i in range(3, len(conv), 2):
        action = env.action_from_reply(conv[i]["value"])
        sent.append(action)
        result = env.step(action)
        if i + 1 < len(conv):
            assert result.observation == conv[i + 1]["value"]
    return first, sent, result


def test_webshop_dialect(agenttraj_dir):
    rec = _first(agenttraj_dir, "webshop")
    first_obs = rec["conversations"][2]["value"]
    app = _scripted(
        rec, create=7, reset=lambda obs: [obs, None], observation=lambda obs: obs, first_server_obs=first_obs,
        step=lambda text, last: {"state": text, "reward": 1.0 if last else 0.0, "done": last, "info": None},
    )
    with Server(app) as server:
        env = AgentGymHTTPEnv(server.url, env="webshop", data_dir=agenttraj_dir, backoff=0.01)
        first, sent, result = _replay(env, rec, 0)
        assert first == first_obs
        assert sent[0].startswith("search[") and sent[-1] == "click[Buy Now]"
        assert result.success and result.done and result.info["score"] == 1.0
        env.close()
        calls = [(m, p, q, b) for m, p, q, b in server.calls]
    assert calls[0][:2] == ("POST", "/create") and calls[0][3] is None
    assert calls[1] == ("POST", "/reset", {}, {"env_idx": 7, "session_id": 0})
    assert calls[2] == ("GET", "/observation", {"env_idx": "7"}, None)
    assert calls[3][3] == {"env_idx": 7, "action": sent[0]}
    assert calls[-1] == ("POST", "/close", {}, {"env_idx": 7})


def test_maze_dialect_adds_the_client_preamble(agenttraj_dir):
    rec = _first(agenttraj_dir, "maze")
    conv2 = rec["conversations"][2]["value"]
    server_first = conv2.split("given the current environment state:\n", 1)[1]
    app = _scripted(
        rec, create={"id": 0}, reset=lambda obs: {"observation": obs}, prefix="/maze", first_server_obs=server_first,
        step=lambda text, last: {"observation": "Success" if last else text, "reward": float(last), "done": last},
    )
    with Server(app) as server:
        env = AgentGymHTTPEnv(server.url + "/maze", env="maze", data_dir=agenttraj_dir, backoff=0.01)
        index = int(rec["item_id"].rsplit("_", 1)[1])
        first, sent, result = _replay(env, rec, index)
        assert first == conv2
        assert set(sent) <= {"move up", "move down", "move left", "move right"}
        assert result.success
        assert server.calls[1][1:] == ("/maze/reset", {}, {"id": 0, "game": index})


def test_tool_dialect_sends_whole_replies_and_restores_the_data_wording(agenttraj_dir):
    rec = _first(agenttraj_dir, "weather")
    conv2 = rec["conversations"][2]["value"]
    # today's weather server words the first observation "Now new trial starts.\nYou should ..."
    server_first = conv2.replace("Now new trial starts. ", "Now new trial starts.\n", 1)
    app = _scripted(
        rec, create=0, reset=lambda obs: obs, first_server_obs=server_first,
        step=lambda text, last: {"observation": text, "reward": 1.0 if last else 0.5, "done": last},
    )
    with Server(app) as server:
        env = AgentGymHTTPEnv(server.url, env="weather", data_dir=agenttraj_dir, backoff=0.01)
        first, sent, result = _replay(env, rec, 0)
        assert first == conv2
        assert sent == [rec["conversations"][i]["value"] for i in range(3, len(rec["conversations"]), 2)]
        assert result.success
        assert server.calls[0][3] == {"id": 0}
        assert server.calls[1][3] == {"env_idx": 0, "id": 0}


def test_sciworld_and_babyai_dialects(agenttraj_dir):
    rec = _first(agenttraj_dir, "sciworld")
    conv2 = rec["conversations"][2]["value"]
    task, look = conv2.split("\n", 1)
    app = _scripted(
        rec, create={"id": 0}, first_server_obs=look,
        reset=lambda obs: {"task_name": "boil", "var_num": 0, "task_description": task, "observation": obs,
                           "reward": 0, "score": 0, "deleted": False, "done": False},
        step=lambda text, last: {"observation": text, "reward": 60 if last else 0, "score": 100 if last else 40,
                                 "done": last},
    )
    with Server(app) as server:
        env = AgentGymHTTPEnv(server.url, env="sciworld", data_dir=agenttraj_dir, backoff=0.01)
        first, _, result = _replay(env, rec, 0)
        assert first == conv2 and result.success and result.info["score"] == 1.0
        assert result.reward == 0.6 and result.info["raw_score"] == 100

    rec = _first(agenttraj_dir, "babyai", lambda r: len(r["conversations"]) >= 6)
    listing = '\nAvailable actions: ["turn left", "turn right", "move forward"]'
    app = _scripted(
        rec, create={"id": 0}, first_server_obs=rec["conversations"][2]["value"] + listing,
        reset=lambda obs: {"observation": obs, "reward": 0, "score": 0, "deleted": False, "done": False},
        step=lambda text, last: {"observation": text + listing, "reward": 0.8 if last else 0,
                                 "score": 0.8 if last else 0, "done": last},
    )
    with Server(app) as server:
        env = AgentGymHTTPEnv(server.url, env="babyai", backoff=0.01)
        first, _, result = _replay(env, rec, 0)
        assert first == rec["conversations"][2]["value"] and result.success and result.reward == 0.8


@pytest.mark.parametrize("env", sorted(DIALECTS))
def test_prompts_and_actions_match_the_data(agenttraj_dir, env):
    """Built-in prompts equal the data's; every data reply yields a non-empty action in the client's style."""
    d = DIALECTS[env]
    rec = _first(agenttraj_dir, env)
    conv = rec["conversations"]
    client = AgentGymHTTPEnv("http://127.0.0.1:1", env=env, data_dir=agenttraj_dir)
    assert client.instruction() == conv[0]["value"] and client.ack == conv[1]["value"]
    if d.builtin_instruction is not None:
        assert AgentGymHTTPEnv("http://127.0.0.1:1", env=env).instruction() == conv[0]["value"]
    replies = [c["value"] for c in conv[3::2]]
    assert all(action_from_reply(d.action_style, r).strip() for r in replies)
    # the data's item ids name AgentGym's data index
    assert item_index(d, AgentGymItem(id=rec["item_id"])) == (int(rec["item_id"].rsplit("_", 1)[1]), rec["item_id"])
