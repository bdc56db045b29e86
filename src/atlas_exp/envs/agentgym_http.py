"""A client for AgentGym's environment servers, so a model can be evaluated on envs we do not host ourselves.

AgentGym ships each environment as a FastAPI server (`agentenv-webshop`, `agentenv-lmrlgym` for Maze and
Wordle, `agentenv-tool` for Weather/Movie/Todo, `agentenv-textcraft`, `agentenv-babyai`,
`agentenv-sciworld`, `agentenv-sqlgym`). Their HTTP APIs share a shape (`/create` a server-side env,
`/reset` it to a data item, `/step` it with an action) but not the details, which is why this module keeps
one typed `AgentGymDialect` per env instead of sprinkling field names through the code. The facts in the
table were read from AgentGym's server code (`agentenv-*/.../server.py`, `environment.py`, `model.py`) and
its clients (`agentenv/agentenv/envs/*.py`), and checked against the AgentTraj-L trajectories
(`<env>.jsonl`: instruction, acknowledgement, first-observation wording):

| env | create | id field | reset index field | first observation | step text field | success (ours) |
| --- | --- | --- | --- | --- | --- | --- |
| textcraft | `{"id": n, "observation"}` | `id` | `data_idx` | reset's `observation` | `observation` | reward == 1 |
| webshop | bare int | `env_idx` | `session_id` | `GET /observation` | `state` | reward == 1 |
| maze | `{"id": n}` at `/maze/*` | `id` | `game` | preamble + reset's `observation` | `observation` | reward == 1 |
| wordle | `{"id": n}` at `/wordle/*` | `id` | `seed` | client text only | `observation` | reward == 1 |
| weather, movie, todo | bare int (`{"id": 0}`) | `env_idx` | `id` | reset's body (a str) | `observation` | reward == 1 |
| babyai | `{"id": n}` | `id` | `data_idx` | reset's `observation` | `observation` | done, reward > 0.5 |
| sciworld | `{"id": n}` | `id` | `data_idx` | `task_description` + `\\n` + `observation` | `observation` | score >= 100 |
| sqlgym | bare int | `env_idx` | `item_id` | `GET /observation` | `state` | reward == 1 |

Why each success rule: AgentGym's `Evaluator` counts an episode as a success when its final reward equals 1.
We require `done` as well (the episode must have ended there) and use each env's own scale: BabyAI's server
only reports `done` once minigrid's reward is above 0.5 (minigrid's reward is `1 - 0.9 * steps / max`, so it
never equals 1; our in-process `BabyAIEnv` uses the same rule); ScienceWorld's score runs 0-100 and a task
is complete at 100. Caveat for Weather: its server turns any partial progress into reward 1.0, so
"success" there means "finished with some progress", a limitation of that server we cannot undo client-side.
`info["score"]` carries the env's progress measure in [0, 1] (ScienceWorld's score / 100, -1 after a failed
task, with `reward` its change / 100, as in our in-process `SciWorldEnv`; the tool envs' progress rate;
WebShop's purchase score); `info["raw_score"]` is the server's own `score` field where it sends one.

Text. Evaluation must show the model the wording of its training data, so where a server's text is known to
differ from AgentTraj-L in a fixed way, the dialect says how to restore it (each rule is backed by every
record of the env's data file): TextCraft observations get the data's `Instruction:\\n` prefix and lose the
server's trailing blank; BabyAI observations lose the `\\nAvailable actions: [...]` list that later servers
append; Weather's and Movie's first observations get the data's opening ("Now new trial starts. You ..." and
"You should ..." where today's servers say "Now new trial starts.\\nYou ..."). Maze and Wordle's first
observation is partly or wholly written by AgentGym's client (rules of the game; Wordle's vocabulary), which
we take from the data file, as we do the long instruction prompts (see `AgentGymHTTPEnv`).

Actions. `action_from_reply` reproduces what the env's AgentGym client sent for a full model reply
(`ActionStyle`); `step(action)` sends the action as given (TextCraft's clean-up is idempotent and applied
again, as in `TextCraftEnv`). The tool envs' servers parse `Action: name with Action Input: {...}`
themselves, so their "action" is the whole reply.

Transport: `requests`, retried with exponential backoff on connection errors and HTTP 5xx (a `/step` only
when it cannot have reached the server); a server that cannot be reached at all is a `ConfigError` that
names `base_url` and how to start the server. AgentGym's servers report env-side failures as HTTP 200 with
`{"error": ...}`; those, 4xx answers and 5xx after the retries raise `AgentGymServerError`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import requests
import urllib3

from atlas_exp.envs.base import Env, EpisodeSpec, StepResult
from atlas_exp.errors import AtlasError, ConfigError

log = logging.getLogger(__name__)

#: the acknowledgement turn of the envs whose clients answer "OK. I'll follow ..." (textcraft, maze, ...)
ACK_OK = "OK. I'll follow your instructions and try my best to solve the task."
#: the acknowledgement turn of WebShop, the tool envs and SQLGym
ACK_SHORT = "Ok."


class AgentGymServerError(AtlasError):
    """The server answered, but not with a usable result: `{"error": ...}`, a 4xx, or 5xx after retries."""


class ActionStyle(Enum):
    """How an env's AgentGym client turned a full reply into the action it posted to `/step`."""

    #: WebShop (`BaseAdapter.parse_react`): everything after the last "Action:", stripped; a reply without
    #: it is sent whole when it contains `search[`/`click[`, else as the empty action
    REACT_LAST = "react_last"
    #: LMRL-Gym, BabyAI, SciWorld: `reply.split("Action:")[1].strip()` (text between the first and a second
    #: marker), or the whole stripped reply when there is no marker
    AFTER_FIRST_MARK = "after_first_mark"
    #: TextCraft: text after the last "Action:" (before any "Instruction:"), or the whole reply without a
    #: marker; then only letters, digits, commas and spaces, whitespace collapsed
    TEXTCRAFT = "textcraft"
    #: Weather, Movie, Todo: the whole reply; the server finds `Action: ... with Action Input: ...` itself
    FULL_REPLY = "full_reply"
    #: SQLGym: the contents of the ```sql block
    SQL_BLOCK = "sql_block"


class FirstObservation(Enum):
    """Where the first observation of an episode comes from."""

    #: the reset response's `observation` field, or the response itself when it is a bare string
    RESET = "reset"
    #: `GET <observation_path>?<id_field>=<env id>` after the reset (WebShop, SQLGym)
    GET_OBSERVATION = "get_observation"
    #: SciWorld: the reset response's `task_description`, a newline, then its `observation`
    TASK_AND_OBSERVATION = "task_and_observation"
    #: Maze: the client's fixed preamble (from the data), a newline, then the reset's `observation`
    PREAMBLE_AND_RESET = "preamble_and_reset"
    #: Wordle: the client's fixed text (rules + vocabulary, from the data); the server's is not shown
    PREAMBLE_ONLY = "preamble_only"


class SuccessRule(Enum):
    """When a step counts as reaching the goal (see the module docstring for why per env)."""

    REWARD_ONE = "reward_one"  # done and reward >= 1
    DONE_ABOVE_HALF = "done_above_half"  # BabyAI: done and reward > 0.5
    SCORE_100 = "score_100"  # SciWorld: score >= 100


def _textcraft_instruction() -> str:
    from atlas_exp.envs.textcraft import INSTRUCTION

    return INSTRUCTION


def _babyai_instruction() -> str:
    from atlas_exp.envs.babyai import INSTRUCTION

    return INSTRUCTION


@dataclass(frozen=True)
class AgentGymDialect:
    """What one AgentGym server expects and returns, and how its client wrapped the text.

    Paths are relative to the server root; `path_prefix` is prepended (LMRL-Gym serves Maze and Wordle
    from one server under `/maze` and `/wordle`).
    """

    env: str
    first_observation: FirstObservation
    action_style: ActionStyle
    success: SuccessRule
    #: AgentGym package that serves it, and the command that starts it (shown when it cannot be reached);
    #: by default `agentenv-<env>` and `<env> --host 127.0.0.1 --port 36001`
    server: str = ""
    launch: str = ""
    #: AgentTraj-L file whose records give the instruction and client-side preamble (default `<env>.jsonl`),
    #: and the item id prefixes of its records (default `<env>_`: `webshop_12` -> data index 12)
    data_file: str = ""
    item_prefixes: tuple[str, ...] = ()
    path_prefix: str = ""
    #: the field that names the server-side env in every request after `/create`
    id_field: str = "id"
    #: the reset request's field for the data item
    index_field: str = "data_idx"
    #: JSON body of `/create` (None: no body, as AgentGym's client sends none)
    create_body: Mapping[str, Any] | None = None
    observation_path: str = "/observation"
    #: the step response's text field ("state" for WebShop and SQLGym)
    step_text_field: str = "observation"
    #: endpoint that frees the server-side env, where the server has one
    close_path: str | None = None
    #: text restorations (module docstring): dropped from this marker on, prefix added, trailing blanks
    #: dropped, and one replacement in the first observation
    cut_observation_at: str | None = None
    observation_prefix: str = ""
    rstrip_observation: bool = False
    first_observation_replace: tuple[str, str] | None = None
    #: the marker the Maze preamble ends with inside the data's first observation
    preamble_end: str | None = None
    #: the acknowledgement turn after the instruction in every training conversation
    ack: str = ACK_OK
    #: the instruction without reading the data file, where we have it verbatim
    builtin_instruction: Callable[[], str] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        defaults = {"server": f"agentenv-{self.env}", "launch": f"{self.env} --host 127.0.0.1 --port 36001",
                    "data_file": f"{self.env}.jsonl", "item_prefixes": (f"{self.env}_",)}
        for name, value in defaults.items():
            if not getattr(self, name):
                object.__setattr__(self, name, value)


def _tool(env: str, *, replace: tuple[str, str] | None) -> AgentGymDialect:
    return AgentGymDialect(
        env=env,
        server="agentenv-tool",
        first_observation=FirstObservation.RESET,
        action_style=ActionStyle.FULL_REPLY,
        success=SuccessRule.REWARD_ONE,
        id_field="env_idx",
        index_field="id",
        create_body={"id": 0},
        first_observation_replace=replace,
        ack=ACK_SHORT,
    )


#: The known servers, by our env name.
DIALECTS: dict[str, AgentGymDialect] = {
    "textcraft": AgentGymDialect(
        env="textcraft",
        first_observation=FirstObservation.RESET,
        action_style=ActionStyle.TEXTCRAFT,
        success=SuccessRule.REWARD_ONE,
        create_body={"commands": None, "goal": None},
        close_path="/close",  # newer clients post it; older servers answer 404, which close() ignores
        observation_prefix="Instruction:\n",
        rstrip_observation=True,
        builtin_instruction=_textcraft_instruction,
    ),
    "webshop": AgentGymDialect(
        env="webshop",
        first_observation=FirstObservation.GET_OBSERVATION,
        action_style=ActionStyle.REACT_LAST,
        success=SuccessRule.REWARD_ONE,
        id_field="env_idx",
        index_field="session_id",
        step_text_field="state",
        close_path="/close",
        ack=ACK_SHORT,
    ),
    "maze": AgentGymDialect(
        env="maze",
        server="agentenv-lmrlgym",
        launch="lmrlgym --host 127.0.0.1 --port 36001",
        item_prefixes=("lmrlgym_maze_", "maze_"),
        first_observation=FirstObservation.PREAMBLE_AND_RESET,
        action_style=ActionStyle.AFTER_FIRST_MARK,
        success=SuccessRule.REWARD_ONE,
        path_prefix="/maze",
        index_field="game",
        preamble_end="given the current environment state:",
        builtin_instruction=lambda: "You are an expert maze solver.",
    ),
    "wordle": AgentGymDialect(
        env="wordle",
        server="agentenv-lmrlgym",
        launch="lmrlgym --host 127.0.0.1 --port 36001",
        item_prefixes=("lmrlgym_wordle_", "wordle_"),
        first_observation=FirstObservation.PREAMBLE_ONLY,
        action_style=ActionStyle.AFTER_FIRST_MARK,
        success=SuccessRule.REWARD_ONE,
        path_prefix="/wordle",
        index_field="seed",
        builtin_instruction=lambda: "You are an expert wordle player.",
    ),
    "weather": _tool("weather", replace=("Now new trial starts.\n", "Now new trial starts. ")),
    "movie": _tool("movie", replace=("Now new trial starts.\n", "")),
    "todo": _tool("todo", replace=None),
    "babyai": AgentGymDialect(
        env="babyai",
        first_observation=FirstObservation.RESET,
        action_style=ActionStyle.AFTER_FIRST_MARK,
        success=SuccessRule.DONE_ABOVE_HALF,
        cut_observation_at="\nAvailable actions: [",
        builtin_instruction=_babyai_instruction,
    ),
    "sciworld": AgentGymDialect(
        env="sciworld",
        first_observation=FirstObservation.TASK_AND_OBSERVATION,
        action_style=ActionStyle.AFTER_FIRST_MARK,
        success=SuccessRule.SCORE_100,
    ),
    "sqlgym": AgentGymDialect(
        env="sqlgym",
        first_observation=FirstObservation.GET_OBSERVATION,
        action_style=ActionStyle.SQL_BLOCK,
        success=SuccessRule.REWARD_ONE,
        id_field="env_idx",
        index_field="item_id",
        step_text_field="state",
        ack=ACK_SHORT,
    ),
}


def dialect_for(env: str) -> AgentGymDialect:
    """The dialect of a known env; a ConfigError listing the known ones otherwise."""
    try:
        return DIALECTS[env]
    except KeyError:
        raise ConfigError(
            f"env={env!r} is not an AgentGym env this client knows; choose one of {', '.join(sorted(DIALECTS))}"
        ) from None


# ------------------------------------------------------------------------------------------------ episodes


@dataclass(frozen=True)
class AgentGymItem(EpisodeSpec):
    """One data item of an AgentGym server: `AgentGymItem(id="webshop_12")` or `AgentGymItem(index=12)`.

    AgentGym's servers pick an episode by an integer (`data_idx`, `session_id`, `game`, ...); AgentTraj-L
    records name it in their item id (`webshop_12`, `lmrlgym_maze_13`), so either can be given.
    """

    index: int | None = None


_TRAILING_INT = re.compile(r"^(?P<prefix>.*?)(?P<n>\d+)$")


def item_index(dialect: AgentGymDialect, item: EpisodeSpec | int | str) -> tuple[int, str]:
    """(server index, episode id) for an int index, an item id string (`"webshop_12"`, or `"12"`), or an
    episode spec of `dialect`'s env (its `index` field if it has one, else its `id`)."""
    if isinstance(item, bool):
        raise TypeError("an episode is an int item index, an item id or an EpisodeSpec, not a bool")
    if isinstance(item, EpisodeSpec):
        index = getattr(item, "index", None)
        if index is not None:
            return item_index(dialect, int(index))[0], item.id or f"{dialect.item_prefixes[0]}{index}"
        item_id = item.id or ""
    elif isinstance(item, str):
        item_id = item.strip()
        if item_id.isdigit():
            return item_index(dialect, int(item_id))
    elif isinstance(item, int):
        if item < 0:
            raise ConfigError(f"{dialect.env}: item index must be >= 0, got {item}")
        return item, f"{dialect.item_prefixes[0]}{item}"
    else:
        raise TypeError(f"an episode is an int item index, an item id or an EpisodeSpec, got {type(item).__name__}")
    m = _TRAILING_INT.match(item_id)
    if m is None or m.group("prefix") not in dialect.item_prefixes:
        raise ConfigError(
            f"{dialect.env}: episode id {item_id!r} is not an item id of this env "
            f"(expected {dialect.item_prefixes[0]}<n>, e.g. {dialect.item_prefixes[0]}12)"
        )
    return int(m.group("n")), item_id


# ------------------------------------------------------------------------------------------------- actions

_NOT_TEXTCRAFT_CHARS = re.compile(r"[^A-Za-z0-9, ]+")


def _textcraft_clean(text: str) -> str:
    return " ".join(_NOT_TEXTCRAFT_CHARS.sub("", text).split())


def action_from_reply(style: ActionStyle, reply: str) -> str:
    """What AgentGym's client of that style posted to `/step` for a full model reply (never None: the clients
    always send something, and the server answers that it is not a valid action)."""
    if style is ActionStyle.FULL_REPLY:
        return reply
    if style is ActionStyle.TEXTCRAFT:
        return _textcraft_clean(reply.split("Instruction:")[0].split("Action:")[-1])
    if style is ActionStyle.SQL_BLOCK:
        return reply.split("```sql")[-1].split("```")[0].strip()
    if style is ActionStyle.AFTER_FIRST_MARK:
        parts = reply.split("Action:")
        return (parts[1] if len(parts) > 1 else parts[0]).strip()
    # REACT_LAST
    _, sep, tail = reply.rpartition("Action:")
    if sep:
        return tail.strip()
    return reply.strip() if ("search[" in reply or "click[" in reply) else ""


# ----------------------------------------------------------------------------------------- data prompts


def _first_record(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    return json.loads(line)
    except OSError as e:
        raise ConfigError(f"data_dir: cannot read {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"data_dir: {path} does not start with a JSON record: {e}") from None
    raise ConfigError(f"data_dir: {path} has no record")


# ------------------------------------------------------------------------------------------------------ env


class AgentGymHTTPEnv(Env):
    """An `Env` played on an AgentGym environment server that the user runs (see the module docstring).

    Args:
        base_url: the server's root, e.g. `http://127.0.0.1:36001` (for Maze/Wordle, the LMRL-Gym server's
            root; a URL already ending in `/maze` or `/wordle` is accepted too).
        env: one of `DIALECTS` ("webshop", "maze", "wordle", "weather", "movie", "todo", "textcraft",
            "babyai", "sciworld", "sqlgym").
        instruction: the first user turn of the env's training conversations. By default it is read from
            `data_dir` (the first record of AgentTraj-L's `<env>.jsonl`, all of whose records share it), or
            taken from our in-process env (textcraft, babyai) or the short prompt (maze, wordle).
        data_dir: a folder with AgentTraj-L's `<env>.jsonl`: the source of the long instruction prompts
            (webshop, tool envs, sciworld, sqlgym) and of the client-written first observation of Maze
            (preamble) and Wordle (rules + vocabulary). Read lazily, first record only.
        timeout: seconds per HTTP request (300, as AgentGym's clients: a Movie step may wait out the TMDB
            API). retries: attempts after the first on connection errors and HTTP 5xx, waiting
            `backoff * 2**k` seconds (at most `max_backoff`) before each (a step is never re-sent once it may
            have reached the server, see `_request`).
        max_steps: end an episode unfinished after this many steps (`info["truncated"]`); None leaves the
            episode length to the server and to the caller's turn cap.

    The server-side env is created on the first `reset` (or by `connect()`), reused across episodes as
    AgentGym's clients do, and released by `close()` where the server has an endpoint for it (WebShop, newer
    TextCraft); the other servers keep every env they created until they stop.
    """

    def __init__(
        self,
        base_url: str,
        env: str,
        *,
        instruction: str | None = None,
        data_dir: str | Path | None = None,
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
        self.name = self.dialect.env
        self.ack = self.dialect.ack
        root = base_url.rstrip("/")
        if self.dialect.path_prefix and root.endswith(self.dialect.path_prefix):
            root = root[: -len(self.dialect.path_prefix)]
        self.base_url = root
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.max_steps = max_steps
        self._instruction = instruction
        self._data_record: dict[str, Any] | None = None
        self._session = requests.Session()
        self.env_id: Any = None
        self.episode_id: str | None = None
        self.steps_taken = 0
        self.done = False
        self._started = False

    def __repr__(self) -> str:
        return f"AgentGymHTTPEnv(env={self.name!r}, base_url={self.base_url!r}, env_id={self.env_id!r})"

    # -- prompts -----------------------------------------------------------------------------------------

    def _record(self, why: str) -> dict[str, Any]:
        if self._data_record is None:
            if self.data_dir is None:
                raise ConfigError(
                    f"{self.name}: {why} comes from AgentTraj-L's {self.dialect.data_file}; pass "
                    f"data_dir=<folder with {self.dialect.data_file}>"
                    + (" or instruction=..." if why == "the instruction" else "")
                )
            self._data_record = _first_record(self.data_dir / self.dialect.data_file)
        return self._data_record

    def _data_turn(self, k: int, why: str) -> str:
        rec = self._record(why)
        try:
            return str(rec["conversations"][k]["value"])
        except (KeyError, IndexError, TypeError):
            raise ConfigError(
                f"data_dir: the first record of {self.data_dir / self.dialect.data_file} has no "
                f"conversations[{k}].value"
            ) from None

    def instruction(self) -> str:
        if self._instruction is None:
            if self.data_dir is not None or self.dialect.builtin_instruction is None:
                self._instruction = self._data_turn(0, "the instruction")
            else:
                self._instruction = self.dialect.builtin_instruction()
        return self._instruction

    def _preamble(self) -> str:
        """The client-written part of the first observation (Maze: up to its end marker; Wordle: all)."""
        text = self._data_turn(2, "the first observation's client-written text")
        end = self.dialect.preamble_end
        if end is None:
            return text
        i = text.find(end)
        if i < 0:
            raise ConfigError(f"data_dir: the first {self.name} observation in the data lacks {end!r}")
        return text[: i + len(end)]

    # -- transport ---------------------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return f"{self.base_url}{self.dialect.path_prefix}{path}"

    def _unreachable(self, url: str, attempts: int, reason: object) -> ConfigError:
        return ConfigError(
            f"base_url={self.base_url!r}: cannot reach the AgentGym {self.name} server ({url}, {attempts} "
            f"attempts: {type(reason).__name__}); is the AgentGym {self.name} server running? start it with "
            f"`{self.dialect.launch}` ({self.dialect.server}) and pass its address as base_url"
        )

    def _request(self, method: str, path: str, *, body: Any = None, params: dict | None = None,
                 allow_404: bool = False, retries: int | None = None) -> Any:
        """One API call: JSON result; `{"error": ...}` raised as AgentGymServerError.

        Retried with backoff on HTTP 5xx and on connection errors, except that a `/step` is re-sent only
        when it surely never reached the server (connection refused / not established): a step that timed
        out or whose connection broke mid-request may have been applied, and playing it twice would
        corrupt the episode.
        """
        url = self._url(path)
        last: object = None
        attempts = (self.retries if retries is None else retries) + 1
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), self.max_backoff))
            try:
                resp = self._session.request(
                    method, url, json=body, params=params, timeout=self.timeout
                )
            except (requests.ConnectionError, requests.Timeout) as e:
                if path == "/step" and not _never_sent(e):
                    raise AgentGymServerError(
                        f"POST {url} failed after the request was sent ({type(e).__name__}: {_excerpt(str(e), 200)}); "
                        f"not re-sent, as the server may have applied the action (timeout={self.timeout:g}s)"
                    ) from None
                last = e
                log.debug("%s %s failed (%s), attempt %d/%d", method, url, e, attempt + 1, attempts)
                continue
            if resp.status_code >= 500:
                last = resp
                log.debug("%s %s answered %d, attempt %d/%d", method, url, resp.status_code, attempt + 1, attempts)
                continue
            break
        else:
            if isinstance(last, requests.Response):
                raise AgentGymServerError(
                    f"{method} {url} answered HTTP {last.status_code} {attempts} times in a row "
                    f"(AgentGym {self.name} server at base_url={self.base_url!r}): {_excerpt(last.text)}"
                )
            raise self._unreachable(url, attempts, last)
        if resp.status_code == 404 and allow_404:
            return None
        if resp.status_code == 404:
            raise ConfigError(
                f"base_url={self.base_url!r}: {method} {url} answered 404: is this the AgentGym {self.name} "
                f"server ({self.dialect.server}, started with `{self.dialect.launch}`)?"
            )
        if resp.status_code >= 400:
            raise AgentGymServerError(
                f"{method} {url} answered HTTP {resp.status_code} (the server may be an AgentGym version whose "
                f"API differs from the {self.name} dialect): {_excerpt(resp.text)}"
            )
        try:
            data = resp.json()
        except ValueError:
            raise AgentGymServerError(f"{method} {url} answered non-JSON: {_excerpt(resp.text)}") from None
        if isinstance(data, dict) and "error" in data:
            raise AgentGymServerError(f"AgentGym {self.name} server, {method} {url}: {data['error']}")
        return data

    # -- episode -----------------------------------------------------------------------------------------

    def connect(self) -> Any:
        """Create the server-side env (done by the first `reset`); returns its id. Fails early and clearly
        when the server is not there, which is why a caller may want to call it before a long run."""
        if self.env_id is None:
            out = self._request("POST", "/create", body=self.dialect.create_body)
            if isinstance(out, dict) and "id" in out:
                out = out["id"]
            if isinstance(out, bool) or not isinstance(out, int):
                raise AgentGymServerError(
                    f"POST {self._url('/create')} answered {_excerpt(json.dumps(out))}, not an env id"
                )
            self.env_id = out
        return self.env_id

    def _ids(self) -> dict[str, Any]:
        return {self.dialect.id_field: self.env_id}

    def _clean(self, text: Any, *, first: bool = False) -> str:
        text = str(text)
        d = self.dialect
        if d.cut_observation_at is not None:
            text = text.split(d.cut_observation_at, 1)[0]
        if first and d.first_observation_replace is not None:
            old, new = d.first_observation_replace
            text = text.replace(old, new, 1)
        if d.rstrip_observation:
            text = text.rstrip()
        if d.observation_prefix and not text.startswith(d.observation_prefix):
            text = d.observation_prefix + text
        return text

    def reset(self, episode: EpisodeSpec | int | str) -> str:
        index, episode_id = item_index(self.dialect, episode)
        d = self.dialect
        # read what the data must supply before touching the server, so a missing data_dir fails first
        preamble = self._preamble() if d.first_observation in (
            FirstObservation.PREAMBLE_AND_RESET, FirstObservation.PREAMBLE_ONLY) else None
        self.connect()
        out = self._request("POST", "/reset", body={**self._ids(), d.index_field: index})
        if d.first_observation is FirstObservation.GET_OBSERVATION:
            first = self._clean(self._request("GET", d.observation_path, params=self._ids()), first=True)
        elif d.first_observation is FirstObservation.TASK_AND_OBSERVATION:
            task, look = _field(out, "task_description", self), _field(out, "observation", self)
            first = self._clean(f"{task}\n{look}", first=True)
        elif d.first_observation is FirstObservation.PREAMBLE_ONLY:
            first = preamble
        else:
            raw = out if isinstance(out, str) else _field(out, "observation", self)
            first = self._clean(raw, first=True)
            if d.first_observation is FirstObservation.PREAMBLE_AND_RESET:
                first = f"{preamble}\n{first}"
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
        sent = _textcraft_clean(action) if d.action_style is ActionStyle.TEXTCRAFT else action
        out = self._request("POST", "/step", body={**self._ids(), "action": sent})
        raw = _field(out, d.step_text_field, self)
        reward = float(_field(out, "reward", self))
        server_done = bool(_field(out, "done", self))
        score_raw = float(out["score"]) if isinstance(out, dict) and "score" in out else None
        if d.success is SuccessRule.SCORE_100:
            # as our in-process ScienceWorld env: reward = score change / 100, score = score / 100 (-1: failed)
            score_raw = float(_field(out, "score", self))
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
            observation=self._clean(raw),
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

    def action_from_reply(self, reply: str) -> str:
        """What this env's AgentGym client posted for the reply (`ActionStyle`); never None."""
        return action_from_reply(self.dialect.action_style, reply)

    def close(self) -> None:
        """Release the server-side env where the server can (best effort: a server already gone is fine)."""
        if self.env_id is not None and self.dialect.close_path is not None:
            try:
                self._request("POST", self.dialect.close_path, body=self._ids(), allow_404=True, retries=0)
            except (AtlasError, requests.RequestException) as e:
                log.warning("%r: close failed: %s", self, e)
        self.env_id = None
        self._started = False
        self._session.close()
        self._session = requests.Session()  # a closed env may be reset again (it then creates a new one)


def _never_sent(e: Exception) -> bool:
    """Whether a requests failure happened before the request reached the server (nothing to double-apply)."""
    if isinstance(e, requests.ConnectTimeout):
        return True
    if not isinstance(e, requests.ConnectionError) or isinstance(e, requests.Timeout):
        return False
    reason = getattr(e.args[0], "reason", None) if e.args else None
    return isinstance(reason, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError))


def _field(out: Any, name: str, env: AgentGymHTTPEnv) -> Any:
    if not isinstance(out, dict) or name not in out:
        raise AgentGymServerError(
            f"AgentGym {env.name} server at base_url={env.base_url!r} answered without {name!r} "
            f"(a server version whose API differs from the {env.name} dialect?): {_excerpt(json.dumps(out))}"
        )
    return out[name]


def _excerpt(text: str, n: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n] + "..."


__all__ = [
    "ACK_OK",
    "ACK_SHORT",
    "DIALECTS",
    "ActionStyle",
    "AgentGymDialect",
    "AgentGymHTTPEnv",
    "AgentGymItem",
    "AgentGymServerError",
    "FirstObservation",
    "SuccessRule",
    "action_from_reply",
    "dialect_for",
    "item_index",
]
