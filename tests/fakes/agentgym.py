"""Stand-ins for AgentGym's environment servers (`agentenv-*`, HEAD 3ef9235), for tests of the HTTP client.

Each answers on loopback with the routes, request/response shapes and error conventions of AgentGym's server
of that env (errors as HTTP 200 `{"error": ...}`, unknown routes 404, an unhandled exception 500), and
behaves like it in the respects the client depends on; the game behind it is ours or scripted, not
AgentGym's. What each one reproduces:

- `TextCraftServer`: our `TextCraftEnv` behind AgentGym's TextCraft API; `data_idx -> episode` is a given
  table (AgentGym's real table follows the server's file-system order, so a table that is not the data's
  stands for a real server); raw observations without the data's `Instruction:` prefix, inventory with its
  trailing blank; `/close` deletes the env.
- `LmrlgymServer`: Maze and Wordle under `/maze/*` and `/wordle/*`. Maze is our `MazeEnv` with the published
  server's text: observations without the trailing newline the data have, `Success\\n` / `Failure\\n` as
  LMRL-Gym writes them, an error for item 25 (LMRL-Gym cannot start on the goal) and after the episode is
  done. Wordle serves its own vocabulary (the published server's is a 40-word list, not the data's 431),
  `/filtered_vocab` as the published server computes it (every word before the first valid guess), the
  feedback text `b y y b y\\n` and `invalid word`. The published Wordle server draws a new hidden word among
  the still-consistent ones at every guess; this one keeps one per seed, which the client cannot tell apart.
  Neither has `/close`.
- `SciWorldServer`: AgentGym's item table over the tasks of ScienceWorld in order, with task 2-3 listed
  (today's server) or left out (the table of AgentTraj-L's time), in 1.1-style (`boil`) or 1.0.2-style
  (`task-1-boil`) names; a reset answers `task_name` and `var_num` as the real one does (or not, for a
  server that does not); the game text is scripted. `/close` deletes the env ("a JVM"); closing it twice is an
  unhandled error (HTTP 500), as in the real server.
- `BabyAIServer`: AgentGym's BabyAI API with scripted text, the `Available actions` suffix of today's
  server, and `/close`.

Every server records its calls and which envs are alive (created and not closed).
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from atlas_exp.envs.maze import FAILURE, STARTS, SUCCESS, MazeEnv
from atlas_exp.envs.sciworld_items import TASKS
from atlas_exp.envs.textcraft import (
    OBS_PREFIX,
    TextCraftEnv,
    TextCraftEpisode,
    sample_episode,
)
from atlas_exp.envs.wordle import INVALID, N_TRIES, feedback

App = Callable[[str, str, dict, Any], "tuple[int, Any]"]

NOT_FOUND = (404, {"detail": "Not Found"})
INTERNAL_ERROR = (500, "Internal Server Error")


def missing(field: str) -> tuple[int, Any]:
    """FastAPI's answer to a body without a required field."""
    return 422, {"detail": [{"loc": ["body", field], "msg": "field required", "type": "value_error.missing"}]}


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
        self.app = app
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.app = app
        self.httpd.calls = []
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def calls(self) -> list[tuple[str, str, dict, Any]]:
        return self.httpd.calls

    def paths(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p, _, _ in self.calls]

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Envs:
    """Server-side env ids as AgentGym's servers keep them: created in order, deleted by `/close`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.created = 0
        self.deleted: set[int] = set()

    def create(self) -> int:
        self.created += 1
        return self.created - 1

    def check(self, env_id: Any, finished: bool = False) -> str | None:
        """The server's error text for an id it cannot use (or, with `finished`, whose episode is over)."""
        if not isinstance(env_id, int) or not 0 <= env_id < self.created:
            return f"The id {env_id} is not valid."
        if env_id in self.deleted:
            return f"The task with environment {env_id} has been deleted."
        if finished:
            return f"The task with environment {env_id} has finished."
        return None

    @property
    def alive(self) -> int:
        return self.created - len(self.deleted)

    def route(self, method: str, path: str, body: Any) -> int | tuple[int, Any]:
        """`/create` answered, and the env id of a `/reset`, `/step` or `/close` body; else the server's answer
        (404 for other routes, 422 without an id), as a (status, payload) tuple."""
        if (method, path) == ("POST", "/create"):
            return 200, {"id": self.create()}
        if method != "POST" or path not in ("/reset", "/step", "/close"):
            return NOT_FOUND
        if not isinstance(body, dict) or "id" not in body:
            return missing("id")
        return body["id"]


# ------------------------------------------------------------------------------------------------ TextCraft


class TextCraftServer(_Envs):
    """AgentGym's TextCraft server API over our `TextCraftEnv` (see the module docstring).

    `episodes` is the server's `data_idx -> episode` table where given, our seeded sampler elsewhere. Like
    AgentGym's server it never ends an episode on a step count and sends raw game text.
    """

    def __init__(self, episodes: dict[int, TextCraftEpisode]):
        super().__init__()
        self.episodes = episodes
        self.envs: dict[int, TextCraftEnv] = {}
        self.last_obs: dict[int, str] = {}

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
                    return missing("body")
                env_id = self.create()
                self.envs[env_id] = TextCraftEnv(max_steps=10**9)
                return 200, self._reset(env_id, env_id)  # AgentGym's create resets to data_idx = env id
            if method == "POST" and path in ("/reset", "/step", "/close"):
                if not isinstance(body, dict) or "id" not in body:
                    return missing("id")
                env_id = body["id"]
                if path == "/close":
                    if env_id not in self.envs or env_id in self.deleted:
                        return 200, False
                    self.deleted.add(env_id)
                    return 200, True
                error = self.check(env_id)
                if error:
                    return 200, {"error": error}
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


# ------------------------------------------------------------------------------------------------- LMRL-Gym


#: a stand-in for the published server's 40-word `tweet_words.txt` (other words: only its size matters here)
SERVER_WORDS: tuple[str, ...] = (
    "about", "above", "after", "again", "among", "apple", "basic", "beach", "begin", "black",
    "board", "brain", "bread", "break", "bring", "brown", "build", "carry", "catch", "chair",
    "clean", "clear", "close", "cloud", "count", "cover", "dance", "dream", "drink", "early",
    "earth", "enjoy", "every", "field", "first", "floor", "fruit", "glass", "grass", "green",
)


class LmrlgymServer:
    """AgentGym's LMRL-Gym server: Maze at `/maze/*`, Wordle at `/wordle/*` (see the module docstring)."""

    def __init__(self, wordle_vocab: Sequence[str] = SERVER_WORDS, wordle_target: Callable[[int], str] | None = None):
        self.lock = threading.Lock()
        self.maze = _Envs()
        self.maze_envs: dict[int, MazeEnv] = {}
        self.maze_done: dict[int, bool] = {}
        self.wordle = _Envs()
        self.vocab = tuple(wordle_vocab)
        self.target = wordle_target or (lambda seed: random.Random(seed).choice(self.vocab))
        self.games: dict[int, dict[str, Any]] = {}

    def __call__(self, method: str, path: str, query: dict, body: Any) -> tuple[int, Any]:
        with self.lock:
            if (method, path) == ("GET", "/"):
                return 200, "This is environment LMRL-Gym."
            if path.startswith("/maze/"):
                return self._maze(method, path[len("/maze"):], body)
            if path.startswith("/wordle/"):
                return self._wordle(method, path[len("/wordle"):], query, body)
            return NOT_FOUND

    # maze: the published server's observations lack the trailing newline (AgentGym's describe_observation)
    def _maze(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if (method, path) == ("POST", "/create"):
            env_id = self.maze.create()
            self.maze_done[env_id] = False
            return 200, {"id": env_id}
        if method != "POST" or path not in ("/reset", "/step"):
            return NOT_FOUND
        if not isinstance(body, dict) or "id" not in body:
            return missing("id")
        env_id = body["id"]
        error = self.maze.check(env_id, finished=path == "/step" and self.maze_done.get(env_id, False))
        if error:
            return 200, {"error": error}
        if path == "/reset":
            game = body.get("game")
            if not isinstance(game, int):
                return missing("game")
            if game >= len(STARTS):
                return 200, {"error": f"The game {game} is not valid."}
            if game == len(STARTS) - 1:
                return 200, {"error": ""}  # LMRL-Gym asserts the start is not the goal: an empty AssertionError
            env = self.maze_envs[env_id] = MazeEnv()
            self.maze_done[env_id] = False
            first = env.reset(game).rsplit("\n", 2)[-2]  # the start observation, without the client's preamble
            return 200, {"observation": first}
        res = self.maze_envs[env_id].step(body.get("action", ""))
        self.maze_done[env_id] = res.done
        obs = res.observation if res.observation in (SUCCESS, FAILURE) else res.observation.rstrip("\n")
        return 200, {"observation": obs, "reward": res.reward, "done": res.done}

    def _wordle(self, method: str, path: str, query: dict, body: Any) -> tuple[int, Any]:
        if (method, path) == ("POST", "/create"):
            env_id = self.wordle.create()
            self.games[env_id] = {"target": None, "guesses": [], "done": False, "consistent": list(self.vocab)}
            return 200, {"id": env_id}
        if (method, path) == ("GET", "/filtered_vocab"):
            try:
                env_id = int(query["id"])
            except (KeyError, ValueError):
                return 422, {"detail": [{"loc": ["query", "id"], "msg": "field required"}]}
            error = self.wordle.check(env_id, finished=self.games.get(env_id, {}).get("done", False))
            return 200, ({"error": error} if error else list(self.games[env_id]["consistent"]))
        if method != "POST" or path not in ("/reset", "/step"):
            return NOT_FOUND
        if not isinstance(body, dict) or "id" not in body:
            return missing("id")
        env_id = body["id"]
        game = self.games.get(env_id, {})
        error = self.wordle.check(env_id, finished=path == "/step" and game.get("done", False))
        if error:
            return 200, {"error": error}
        if path == "/reset":
            seed = body.get("seed")
            if not isinstance(seed, int):
                return missing("seed")
            game.update(target=self.target(seed), guesses=[], done=False, consistent=list(self.vocab))
            return 200, {"id": env_id, "observation": "Let's start Wordle!"}
        word = str(body.get("action", "")).strip().replace(" ", "")
        game["guesses"].append(word)
        valid = len(word) == 5 and word.isascii() and word.isalpha() and word.islower() and word in self.vocab
        solved = valid and word == game["target"]
        if valid:
            marks = feedback(word, game["target"])
            game["consistent"] = [w for w in game["consistent"] if feedback(word, w) == marks]
        game["done"] = solved or len(game["guesses"]) >= N_TRIES
        return 200, {"observation": marks if valid else INVALID, "reward": 1.0 if solved else 0.0, "done": game["done"]}


# ------------------------------------------------------------------------------------------------- SciWorld


def sciworld_games(*, with_2_3: bool = True, names: str = "1.1") -> list[tuple[str, int]]:
    """AgentGym's SciWorld item table: (task name, variation) over the tasks in ScienceWorld's order, 2-3
    listed (today's server) or not (AgentTraj-L's), with 1.1-style or 1.0.2-style task names."""
    from atlas_exp.envs.agentgym.items import sciworld_task_key

    tasks = [(t.key, t.name, t.n_variations) for t in TASKS]
    if with_2_3:
        at = [k for k, _, _ in tasks].index("2-2") + 1
        tasks.insert(at, ("2-3", "task-10-measure-melting-point-(unknown-substance)", 300))
    out = []
    for _, name, n in tasks:
        shown = name if names == "1.0.2" else sciworld_task_key(name)
        out += [(shown, v) for v in range(n)]
    return out


class SciWorldServer(_Envs):
    """AgentGym's SciWorld server API over a scripted game (see the module docstring).

    An episode is won by the action "finish" (score 100, done); any other action scores 0 and goes on.
    """

    def __init__(self, *, with_2_3: bool = True, names: str = "1.1", task_names: bool = True):
        super().__init__()
        self.games = sciworld_games(with_2_3=with_2_3, names=names)
        self.task_names = task_names
        self.loaded: dict[int, tuple[str, int]] = {}
        self.done: dict[int, bool] = {}

    def __call__(self, method: str, path: str, query: dict, body: Any) -> tuple[int, Any]:
        with self.lock:
            if (method, path) == ("GET", "/"):
                return 200, "This is environment ScienceWorld."
            env_id = self.route(method, path, body)
            if isinstance(env_id, tuple):
                return env_id
            if path == "/close":  # the real server checks nothing but "deleted", outside its try: HTTP 500
                if self.check(env_id) is not None:
                    return INTERNAL_ERROR
                self.deleted.add(env_id)
                return 200, True
            error = self.check(env_id, finished=path == "/step" and self.done.get(env_id, False))
            if error:
                return 200, {"error": error}
            if path == "/reset":
                idx = body.get("data_idx", 0)
                if not isinstance(idx, int) or not 0 <= idx < len(self.games):
                    return 200, {"error": "list index out of range"}
                task, var = self.games[idx]
                self.loaded[env_id], self.done[env_id] = (task, var), False
                payload = {"task_description": f"Your task is to {task} (variation {var}).",
                           "observation": "This room is called the kitchen. In it, you see: the agent",
                           "reward": 0, "score": 0, "deleted": False, "done": False}
                if self.task_names:
                    payload = {"task_name": task, "var_num": var, **payload}
                return 200, payload
            won = body.get("action") == "finish"
            self.done[env_id] = won
            return 200, {"observation": "Task completed." if won else "No known action matches that input.",
                         "reward": 100 if won else 0, "score": 100 if won else 0, "done": won}


# --------------------------------------------------------------------------------------------------- BabyAI


class BabyAIServer(_Envs):
    """AgentGym's BabyAI server API over a scripted game: "go to red ball 1" wins (reward 0.9)."""

    LISTING = '\nAvailable actions: ["turn left", "turn right", "move forward", "go to red ball 1"]'

    def __call__(self, method: str, path: str, query: dict, body: Any) -> tuple[int, Any]:
        with self.lock:
            env_id = self.route(method, path, body)
            if isinstance(env_id, tuple):
                return env_id
            error = self.check(env_id)
            if path == "/close":
                if error:
                    return 200, {"error": error}
                self.deleted.add(env_id)
                return 200, True
            if error:
                return 200, {"error": error}
            if path == "/reset":
                return 200, {"observation": "Your goal: go to the red ball\nThere is a red ball 1 3 steps in front "
                                            "of you." + self.LISTING, "reward": 0, "score": 0, "deleted": False,
                             "done": False}
            won = body.get("action") == "go to red ball 1"
            text = "There is a red ball 1 right in front of you 1 steps away." if won else (
                "The action is not recognized. Please check valid actions.")
            return 200, {"observation": text + self.LISTING, "reward": 0.9 if won else 0, "score": 0.9 if won else 0,
                         "done": won}
