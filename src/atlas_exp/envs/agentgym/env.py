"""`AgentGymHTTPEnv`: an `Env` played on an AgentGym environment server that the user runs.

It puts the pieces of this package behind our `Env` protocol: the server's dialect (`dialect`), its item
table (`items`), the AgentTraj-L file for the prompts (`records`) and the HTTP calls (`transport`).

Server envs. One server-side env per client, created on the first `reset`, reused across episodes as
AgentGym's clients do, and released by `close()` on every server that has `/close` (TextCraft, BabyAI,
SciWorld: a JVM each); the LMRL-Gym, WebShop, tool and SQLGym servers have no such endpoint and keep every
env they created until they stop (each client makes one, so an evaluation leaves `batch_size` per task).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import requests

from atlas_exp.envs.agentgym.dialect import ActionStyle, FirstObservation, SuccessRule, action_from_reply, dialect_for
from atlas_exp.envs.agentgym.items import (
    MAZE_GOAL_ITEM,
    check_sciworld,
    check_textcraft_goal,
    item_index,
    names_data_item,
    sciworld_expected,
    sciworld_shift,
    sciworld_split_item,
)
from atlas_exp.envs.agentgym.records import AgentTrajFile
from atlas_exp.envs.agentgym.transport import AgentGymServerError, Transport, excerpt
from atlas_exp.envs.base import Env, EpisodeSpec, StepResult
from atlas_exp.errors import AtlasError, ConfigError

log = logging.getLogger(__name__)


class AgentGymHTTPEnv(Env):
    """An `Env` played on an AgentGym environment server that the user runs (see `atlas_exp.envs.agentgym`).

    Args:
        base_url: the server's root, e.g. `http://127.0.0.1:36001` (for Maze/Wordle, the LMRL-Gym server's
            root; a URL already ending in `/maze` or `/wordle` is accepted too).
        env: one of `DIALECTS` ("webshop", "maze", "wordle", "weather", "movie", "todo", "textcraft",
            "babyai", "sciworld", "sqlgym").
        instruction: the first user turn of the env's training conversations. By default it is read from
            `data_dir` (the first record of AgentTraj-L's `<env>.jsonl`, all of whose records share it), or
            taken from our in-process env (textcraft, babyai, maze, wordle).
        data_dir: a folder with AgentTraj-L's `<env>.jsonl`: the source of the long instruction prompts
            (webshop, tool envs, sciworld, sqlgym), and of the TextCraft records whose goals are checked when
            an episode is named by item id. Read lazily.
        wordle_vocab: "data" (default) plays Wordle only on a server whose vocabulary is the data's 431 words
            (`wordle.vocabulary()`), refusing others; "server" lists whatever the server has in the prompt, as
            AgentGym's client does (the published server's 40 words: not the prompt the model was trained on).
        timeout: seconds per HTTP request (300, as AgentGym's clients: a Movie step may wait out the TMDB
            API). retries: attempts after the first on connection errors, timeouts and HTTP 5xx (urllib3's
            `Retry`: `backoff * 2**k` seconds between them, at most `max_backoff`, or the server's
            Retry-After); a step is re-sent only after a connection failure, see `transport`.
        max_steps: end an episode unfinished after this many steps (`info["truncated"]`); None leaves the
            episode length to the server and to the caller's turn cap.

    The server-side env is created on the first `reset` (or by `connect()`), reused across episodes as
    AgentGym's clients do, and released by `close()` where the server has `/close` (TextCraft, BabyAI,
    SciWorld); the other servers keep every env they created until they stop.
    """

    def __init__(
        self,
        base_url: str,
        env: str,
        *,
        instruction: str | None = None,
        data_dir: str | Path | None = None,
        wordle_vocab: str = "data",
        timeout: float = 300.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        max_steps: int | None = None,
    ):
        self.dialect = dialect_for(env)
        if not isinstance(base_url, str) or not re.match(r"^https?://[^/\s]+", base_url):
            raise ConfigError(f"base_url={base_url!r} is not an http(s) URL such as http://127.0.0.1:36001")
        if retries < 0:
            raise ConfigError(f"retries must be >= 0, got {retries}")
        if timeout <= 0:
            raise ConfigError(f"timeout must be > 0 seconds, got {timeout}")
        if max_steps is not None and max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1 or None, got {max_steps}")
        if wordle_vocab not in ("data", "server"):
            raise ConfigError(f"wordle_vocab={wordle_vocab!r}: choose data (the training prompt's words) or server")
        self.name = self.dialect.env
        self.ack = self.dialect.ack
        root = base_url.rstrip("/")
        if self.dialect.path_prefix and root.endswith(self.dialect.path_prefix):
            root = root[: -len(self.dialect.path_prefix)]
        self.base_url = root
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.wordle_vocab = wordle_vocab
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.max_steps = max_steps
        self._instruction = instruction
        self._data = AgentTrajFile(self.name, self.data_dir, self.dialect.data_file)
        self._http = Transport(self.dialect, self.base_url, timeout=self.timeout, retries=self.retries,
                               backoff=self.backoff, max_backoff=self.max_backoff)
        self.env_id: Any = None
        #: Wordle: the server's vocabulary, fetched once per server env; SciWorld: its item offset from 1096
        self.server_vocab: tuple[str, ...] | None = None
        self._sciworld_shift: int | None = None
        self.episode_id: str | None = None
        self.steps_taken = 0
        self.done = False
        self._started = False

    def __repr__(self) -> str:
        return f"AgentGymHTTPEnv(env={self.name!r}, base_url={self.base_url!r}, env_id={self.env_id!r})"

    # -- prompts and data --------------------------------------------------------------------------------

    def instruction(self) -> str:
        if self._instruction is None:
            if self.data_dir is not None or self.dialect.builtin_instruction is None:
                self._instruction = self._data.turn(0, "the instruction")
            else:
                self._instruction = self.dialect.builtin_instruction()
        return self._instruction

    def _wordle_first_observation(self) -> str:
        from atlas_exp.envs.wordle import first_observation, vocabulary

        assert self.server_vocab is not None
        return first_observation(vocabulary() if self.wordle_vocab == "data" else self.server_vocab)

    # -- episode -----------------------------------------------------------------------------------------

    def connect(self) -> Any:
        """Create the server-side env (done by the first `reset`); returns its id. Fails early and clearly
        when the server is not there, which is why a caller may want to call it before a long run. For
        Wordle it also fetches the server's vocabulary and refuses one that is not the data's (`wordle_vocab`)."""
        if self.env_id is None:
            out = self._http.request("POST", "/create", body=self.dialect.create_body)
            if isinstance(out, dict) and "id" in out:
                out = out["id"]
            if isinstance(out, bool) or not isinstance(out, int):
                raise AgentGymServerError(
                    f"POST {self._http.url('/create')} answered {excerpt(json.dumps(out))}, not an env id"
                )
            self.env_id = out
            self._sciworld_shift = None
            if self.dialect.first_observation is FirstObservation.PREAMBLE_ONLY:
                try:
                    self.server_vocab = self._fetch_vocab()
                except Exception:
                    self.env_id = None  # not usable: the next reset starts over (and says why again)
                    raise
        return self.env_id

    def _fetch_vocab(self) -> tuple[str, ...]:
        """Wordle: the server's vocabulary (`GET /filtered_vocab`, as AgentGym's client reads it right after
        `/create`, when nothing has been filtered yet), checked against the data's."""
        from atlas_exp.envs.wordle import vocabulary

        out = self._http.request("GET", "/filtered_vocab", params=self._ids())
        if not isinstance(out, list) or not out or not all(isinstance(w, str) for w in out):
            raise AgentGymServerError(f"GET {self._http.url('/filtered_vocab')} answered {excerpt(json.dumps(out))}, "
                                      "not a list of words")
        words = tuple(w.strip() for w in out if w.strip())
        ours = vocabulary()
        if self.wordle_vocab == "data" and set(words) != set(ours):
            missing = sorted(set(ours) - set(words))
            raise ConfigError(
                f"wordle_vocab=data: the Wordle server at base_url={self.base_url!r} accepts {len(words)} words "
                f"({', '.join(words[:5])}, ...), not the {len(ours)} words the training prompt lists "
                f"({len(missing)} of them missing, e.g. {', '.join(missing[:3])}): AgentGym's published server loads "
                "LMRL-Gym's tweet_words.txt; make it load wordle_official_400.txt (the data's list, also "
                "atlas_exp/envs/data/wordle_vocab.txt), or pass wordle_vocab=server to list the server's words "
                "in the prompt as AgentGym's client does (not the prompt the model was trained on), or play the "
                "in-process atlas_exp.envs.wordle.WordleEnv"
            )
        return words

    def _ids(self) -> dict[str, Any]:
        return {self.dialect.id_field: self.env_id}

    def _server_index(self, index: int) -> int:
        """The server's index for data item `index` (SciWorld: see `items`; others: the same)."""
        if self.name != "sciworld":
            return index
        split = sciworld_split_item()
        if index < split:
            return index
        if self._sciworld_shift is None:
            out = self._http.request("POST", "/reset", body={**self._ids(), self.dialect.index_field: split})
            self._sciworld_shift = sciworld_shift(out, split, self.base_url)
            log.info("sciworld server at %s: data item i >= %d is server index i + %d",
                     self.base_url, split, self._sciworld_shift)
        return index + self._sciworld_shift

    def reset(self, episode: EpisodeSpec | int | str) -> str:
        index, episode_id = item_index(self.dialect, episode)
        d = self.dialect
        named = names_data_item(episode)
        if self.name == "textcraft" and named:
            # TextCraft items must be checked against the data (`items`): read it before any request
            if self.data_dir is None:
                raise ConfigError(
                    f"textcraft: episode {episode_id!r} names an AgentTraj-L trajectory, but AgentGym's TextCraft "
                    f"server picks the goal of data_idx {index} by its file system's listing order (0 of the 374 "
                    "AgentTraj-L items came out at their own index on a real server); pass data_dir=<folder with "
                    "textcraft.jsonl> to check each item's goal, or give the bare index to play the server's item"
                )
            self._data.record(episode_id, f"the goal of {episode_id}")
        if self.name == "sciworld":
            sciworld_expected(index)  # an item AgentTraj-L's list has, before any request
        self.connect()
        server_index = self._server_index(index)
        try:
            out = self._http.request("POST", "/reset", body={**self._ids(), d.index_field: server_index})
        except AgentGymServerError as e:
            if self.name == "maze" and index == MAZE_GOAL_ITEM:
                raise AgentGymServerError(
                    f"{e} (maze item {index} starts on the goal, which AgentGym's published LMRL-Gym server cannot "
                    "reset to; the data hold such episodes, and the in-process atlas_exp.envs.maze.MazeEnv plays it)"
                ) from None
            raise
        if self.name == "sciworld":
            check_sciworld(out, index, server_index, self.base_url)
        if d.first_observation is FirstObservation.GET_OBSERVATION:
            out = self._http.request("GET", d.observation_path, params=self._ids())
            first = d.clean_observation(out, first=True)
        elif d.first_observation is FirstObservation.TASK_AND_OBSERVATION:
            task, look = self._http.field(out, "task_description"), self._http.field(out, "observation")
            first = d.clean_observation(f"{task}\n{look}", first=True)
        elif d.first_observation is FirstObservation.PREAMBLE_ONLY:
            first = self._wordle_first_observation()
        else:
            raw = out if isinstance(out, str) else self._http.field(out, "observation")
            first = d.clean_observation(raw, first=True)
            if d.first_observation is FirstObservation.PREAMBLE_AND_RESET:
                preamble = d.builtin_preamble() if d.builtin_preamble else self._data.turn(2, "the preamble")
                first = f"{preamble}\n{first}"
        if self.name == "textcraft" and named:
            record = self._data.record(episode_id, f"the goal of {episode_id}")
            check_textcraft_goal(first, record, index, episode_id, self.base_url)
        self.episode_id = episode_id
        self.steps_taken = 0
        self.done = False
        self._started = True
        return first

    def step(self, action: str) -> StepResult:
        if not self._started:
            raise RuntimeError("call reset() before step()")
        if self.done:
            raise RuntimeError("the episode is over; call reset() to start another")
        d = self.dialect
        if d.action_style is ActionStyle.TEXTCRAFT:
            from atlas_exp.envs.textcraft import clean_action

            sent = clean_action(action)
        else:
            sent = action
        out = self._http.request("POST", "/step", body={**self._ids(), "action": sent})
        raw = self._http.field(out, d.step_text_field)
        reward = float(self._http.field(out, "reward"))
        server_done = bool(self._http.field(out, "done"))
        score_raw = float(out["score"]) if isinstance(out, dict) and "score" in out else None
        if d.success is SuccessRule.SCORE_100:
            # as our in-process ScienceWorld env: reward = score change / 100, score = score / 100 (-1: failed)
            score_raw = float(self._http.field(out, "score"))
            success = server_done and score_raw >= 100
            reward, score = reward / 100.0, score_raw / 100.0
        elif d.success is SuccessRule.DONE_ABOVE_HALF:
            success = server_done and reward > 0.5
            score = 1.0 if success else 0.0
        else:
            success = server_done and reward >= 1.0
            score = max(0.0, min(1.0, reward))
        self.steps_taken += 1
        truncated = not server_done and self.max_steps is not None and self.steps_taken >= self.max_steps
        self.done = server_done or truncated
        return StepResult(
            observation=d.clean_observation(raw),
            reward=reward,
            done=self.done,
            success=success,
            info={
                "action": sent,
                "raw_observation": raw,
                "steps": self.steps_taken,
                "truncated": truncated,
                "score": score,
                "raw_score": score_raw,
                "episode": self.episode_id,
            },
        )

    def action_from_reply(self, reply: str) -> str | None:
        """The action for a reply, parsed as the in-process env of this name does (`action_from_reply`)."""
        return action_from_reply(self.dialect.action_style, reply)

    def close(self) -> None:
        """Release the server-side env where the server can (best effort: a server already gone is fine)."""
        if self.env_id is not None and self.dialect.close_path is not None:
            try:
                self._http.request("POST", self.dialect.close_path, body=self._ids(), allow_404=True, resend=False)
            except (AtlasError, requests.RequestException) as e:
                log.warning("%r: close failed: %s", self, e)
        self.env_id = None
        self.server_vocab = None
        self._sciworld_shift = None
        self._started = False
        self._http.close()  # a closed env may be reset again (it then creates a new one)


__all__ = ["AgentGymHTTPEnv"]
