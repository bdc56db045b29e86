"""A client for AgentGym's environment servers, so a model can be evaluated on envs we do not host ourselves.

AgentGym ships each environment as a FastAPI server (`agentenv-webshop`, `agentenv-lmrlgym` for Maze and
Wordle, `agentenv-tool` for Weather/Movie/Todo, `agentenv-textcraft`, `agentenv-babyai`,
`agentenv-sciworld`, `agentenv-sqlgym`). Their HTTP APIs share a shape (`/create` a server-side env,
`/reset` it to a data item, `/step` it with an action) but not the details, which is why this module keeps
one typed `AgentGymDialect` per env instead of sprinkling field names through the code. The table was read
from AgentGym's server code (`agentenv-*/.../server.py`, `environment.py`, `model.py`, HEAD 3ef9235) and its
clients (`agentenv/agentenv/envs/*.py`); the wording rules below from the AgentTraj-L records (`<env>.jsonl`).
What was tested is the client against stand-in servers that answer as AgentGym's do in the respects listed
here (tests/test_agentgym_http_env.py, tests/fakes/agentgym.py; several are our in-process envs behind
HTTP), not against AgentGym's own servers, which a user's check (AgentGym 3ef9235, 2025-09) found to differ
from the data in the ways handled below:

| env | create | id field | reset index field | first observation | step text field | close | success (ours) |
| --- | --- | --- | --- | --- | --- | --- | --- |
| textcraft | `{"id": n, "observation"}` | `id` | `data_idx` | reset's `observation` | `observation` | `/close` | reward == 1 |
| webshop | bare int | `env_idx` | `session_id` | `GET /observation` | `state` | tried (404 ignored) | reward == 1 |
| maze | `{"id": n}` at `/maze/*` | `id` | `game` | preamble + reset's `observation` | `observation` | none | reward == 1 |
| wordle | `{"id": n}` at `/wordle/*` | `id` | `seed` | client text + `GET /filtered_vocab` | `observation` | none | reward == 1 |
| weather, movie, todo | bare int (`{"id": 0}`) | `env_idx` | `id` | reset's body (a str) | `observation` | none | reward == 1 |
| babyai | `{"id": n}` | `id` | `data_idx` | reset's `observation` | `observation` | `/close` | done, reward > 0.5 |
| sciworld | `{"id": n}` | `id` | `data_idx` (mapped) | `task_description` + `\\n` + `observation` | `observation` | `/close` | score >= 100 |
| sqlgym | bare int | `env_idx` | `item_id` | `GET /observation` | `state` | none | reward == 1 |

Why each success rule: AgentGym's `Evaluator` counts an episode as a success when its final reward equals 1.
We require `done` as well (the episode must have ended there) and use each env's own scale: BabyAI's server
only reports `done` once minigrid's reward is above 0.5 (minigrid's reward is `1 - 0.9 * steps / max`, so it
never equals 1; our in-process `BabyAIEnv` uses the same rule); ScienceWorld's score runs 0-100 and a task
is complete at 100. Caveat for Weather: its server turns any partial progress into reward 1.0, so
"success" there means "finished with some progress", a limitation of that server we cannot undo client-side.
`info["score"]` carries the env's progress measure in [0, 1] (ScienceWorld's score / 100, -1 after a failed
task, with `reward` its change / 100, as in our in-process `SciWorldEnv`; the tool envs' progress rate;
WebShop's purchase score); `info["raw_score"]` is the server's own `score` field where it sends one.

Episodes are AgentGym's data items, and where a server's item table is known to differ from the data's, the
client maps or refuses rather than play another episode under the item's name:

- SciWorld. AgentTraj-L's item list leaves out task 2-3 (measure-melting-point of an unknown substance, 300
  variations); today's server lists it, so from item 1096 on its index is the data's + 300. The client asks
  the server: every reset answer names its task and variation, which must be the item's (else it refuses);
  for items from 1096 it first resets the server to index 1096 and reads which layout it has (2-3 there:
  +300; the data's item 1096: +0; anything else, or no task name in the answer: refuses).
- TextCraft. The server's goal for `data_idx` i depends on its file system's listing order (0 of the 374
  AgentTraj-L items came out at their own index on a real server), so an item id (`"textcraft_12"`, an
  `EpisodeSpec` with that id) is played only after checking that the server's goal is the data record's
  (needs `data_dir`; refused otherwise, and on a different goal); a bare int index plays the server's own
  item, whatever its goal.
- Maze item 25 starts on the goal: the published server fails there (our in-process `MazeEnv` plays it).

Text. Evaluation must show the model the wording of its training data, so where a server's text is known to
differ from AgentTraj-L in a fixed way, the dialect says how to restore it (each rule is backed by every
record of the env's data file): TextCraft observations get the data's `Instruction:\\n` prefix and lose the
server's trailing blank; BabyAI observations lose the `\\nAvailable actions: [...]` list that later servers
append; Maze observations get back the trailing newline every data observation has (today's server drops
it); Weather's and Movie's first observations get the data's opening ("Now new trial starts. You ..." and
"You should ..." where today's servers say "Now new trial starts.\\nYou ..."). Maze's and Wordle's first
observation is partly or wholly written by AgentGym's client: we take it from our in-process envs
(`maze.PREAMBLE`, `wordle.first_observation`), whose text equals the data's. Wordle's lists the vocabulary,
which the client fetches from the server (`/filtered_vocab`, as AgentGym's client does): the published
server loads a 40-word list where the data's prompt shows 431 words, so a server whose vocabulary is not the
data's is refused unless `wordle_vocab="server"` (then the prompt lists the server's words, as AgentGym's
client would show them).

Actions. `action_from_reply` parses a reply exactly as the in-process env of the same name does (the rule of
the AgentGym client that recorded the data, `envs/base.py` explains the choice): TextCraft by
`textcraft.reply_action`, BabyAI/SciWorld/Maze/Wordle by `base.agentgym_action`. Envs without an in-process
twin follow their data-time client (`ActionStyle`). Where the reply has no action it returns None, so the
evaluator counts an invalid action as it does for in-process envs. `step(action)` sends the action as given
(TextCraft's clean-up is idempotent and applied again, as in `TextCraftEnv`). The tool envs' servers parse
`Action: name with Action Input: {...}` themselves, so their "action" is the whole reply.

Server envs. One server-side env per client, created on the first `reset`, reused across episodes as
AgentGym's clients do, and released by `close()` on every server that has `/close` (TextCraft, BabyAI,
SciWorld: a JVM each); the LMRL-Gym, WebShop, tool and SQLGym servers have no such endpoint and keep every
env they created until they stop (each client makes one, so an evaluation leaves `batch_size` per task).

Transport: a `requests` session whose adapter retries with urllib3's `Retry` (exponential backoff, Retry-After
honoured) on connection errors, timeouts and HTTP 5xx; a `/step` has its own session that retries only
connection failures, where the request surely never reached the server (a step answered 5xx, timed out or cut
off mid-request may have been applied, and playing it twice would corrupt the episode); a server that cannot be reached at all is a `ConfigError` that
names `base_url` and how to start the server. AgentGym's servers report env-side failures as HTTP 200 with
`{"error": ...}`; those, 4xx answers and 5xx after the retries raise `AgentGymServerError`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from atlas_exp.envs.base import Env, EpisodeSpec, StepResult, agentgym_action
from atlas_exp.errors import AtlasError, ConfigError, DataError

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
    #: it is sent whole when it contains `search[`/`click[` (else AgentGym sent "": None here)
    REACT_LAST = "react_last"
    #: LMRL-Gym, BabyAI, SciWorld: `base.agentgym_action`, as the in-process envs: the text between the first
    #: "Action:" and a second one, stripped (None without a marker, where AgentGym sent the whole reply)
    AFTER_FIRST_MARK = "after_first_mark"
    #: TextCraft: `textcraft.reply_action`, as the in-process env: text after the last "Action:" (before any
    #: "Instruction:"), or the whole reply without a marker; then only letters, digits, commas and spaces
    TEXTCRAFT = "textcraft"
    #: Weather, Movie, Todo: the whole reply; the server finds `Action: ... with Action Input: ...` itself
    #: (None when the reply has no "Action:")
    FULL_REPLY = "full_reply"
    #: SQLGym: the contents of the ```sql block (None without one)
    SQL_BLOCK = "sql_block"


class FirstObservation(Enum):
    """Where the first observation of an episode comes from."""

    #: the reset response's `observation` field, or the response itself when it is a bare string
    RESET = "reset"
    #: `GET <observation_path>?<id_field>=<env id>` after the reset (WebShop, SQLGym)
    GET_OBSERVATION = "get_observation"
    #: SciWorld: the reset response's `task_description`, a newline, then its `observation`
    TASK_AND_OBSERVATION = "task_and_observation"
    #: Maze: the client's fixed preamble (`maze.PREAMBLE`), a newline, then the reset's `observation`
    PREAMBLE_AND_RESET = "preamble_and_reset"
    #: Wordle: the client's text with the server's vocabulary (`wordle.first_observation`); the server's
    #: own "Let's start Wordle!" is not shown
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


def _maze_preamble() -> str:
    from atlas_exp.envs.maze import PREAMBLE

    return PREAMBLE


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
    #: add a trailing newline to every observation that lacks one (Maze: the data's observations end in one)
    restore_newline: bool = False
    #: the client-written text of the first observation (Maze's preamble), where it is fixed
    builtin_preamble: Callable[[], str] | None = field(default=None, compare=False)
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


def _tool(env: str, *, port: int, replace: tuple[str, str] | None) -> AgentGymDialect:
    return AgentGymDialect(
        env=env,
        server="agentenv-tool",
        launch=f"{env} --host 127.0.0.1 --port {port}  (from the agentenv-tool folder)",
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
        close_path="/close",  # older servers answer 404, which close() ignores
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
        launch="lmrlgym --host 127.0.0.1 --port 36002",
        item_prefixes=("lmrlgym_maze_", "maze_"),
        first_observation=FirstObservation.PREAMBLE_AND_RESET,
        action_style=ActionStyle.AFTER_FIRST_MARK,
        success=SuccessRule.REWARD_ONE,
        path_prefix="/maze",
        index_field="game",
        restore_newline=True,
        builtin_preamble=_maze_preamble,
        builtin_instruction=lambda: "You are an expert maze solver.",
    ),
    "wordle": AgentGymDialect(
        env="wordle",
        server="agentenv-lmrlgym",
        launch="lmrlgym --host 127.0.0.1 --port 36002",
        item_prefixes=("lmrlgym_wordle_", "wordle_"),
        first_observation=FirstObservation.PREAMBLE_ONLY,
        action_style=ActionStyle.AFTER_FIRST_MARK,
        success=SuccessRule.REWARD_ONE,
        path_prefix="/wordle",
        index_field="seed",
        builtin_instruction=lambda: "You are an expert wordle player.",
    ),
    "weather": _tool("weather", port=36003, replace=("Now new trial starts.\n", "Now new trial starts. ")),
    "movie": _tool("movie", port=36004, replace=("Now new trial starts.\n", "")),
    "todo": _tool("todo", port=36005, replace=None),
    "babyai": AgentGymDialect(
        env="babyai",
        first_observation=FirstObservation.RESET,
        action_style=ActionStyle.AFTER_FIRST_MARK,
        success=SuccessRule.DONE_ABOVE_HALF,
        cut_observation_at="\nAvailable actions: [",
        close_path="/close",
        builtin_instruction=_babyai_instruction,
    ),
    "sciworld": AgentGymDialect(
        env="sciworld",
        first_observation=FirstObservation.TASK_AND_OBSERVATION,
        action_style=ActionStyle.AFTER_FIRST_MARK,
        success=SuccessRule.SCORE_100,
        close_path="/close",
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


def action_from_reply(style: ActionStyle, reply: str) -> str | None:
    """What AgentGym's client of that style posted to `/step` for a full model reply, parsed exactly as our
    in-process env of the same name parses it (TextCraft, BabyAI, SciWorld, Maze, Wordle); None where the
    reply has no action (the evaluator then counts an invalid action and sends the reply's last line)."""
    if style is ActionStyle.FULL_REPLY:
        return reply if "Action:" in reply else None
    if style is ActionStyle.TEXTCRAFT:
        from atlas_exp.envs.textcraft import reply_action

        return reply_action(reply)
    if style is ActionStyle.SQL_BLOCK:
        if "```sql" not in reply:
            return None
        return reply.split("```sql")[-1].split("```")[0].strip() or None
    if style is ActionStyle.AFTER_FIRST_MARK:
        return agentgym_action(reply)
    # REACT_LAST
    _, sep, tail = reply.rpartition("Action:")
    if sep:
        return tail.strip() or None
    return reply.strip() if ("search[" in reply or "click[" in reply) else None


# --------------------------------------------------------------------------------------------- data files


def _records(path: Path, *, first_only: bool = False) -> list[dict[str, Any]]:
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"data_dir: {path}:{n} is not a JSON record: {e}") from None
                if first_only:
                    break
    except OSError as e:
        raise ConfigError(f"data_dir: cannot read {path}: {e.strerror or e}") from None
    if not out:
        raise ConfigError(f"data_dir: {path} has no record")
    return out


_GOAL = re.compile(r"Goal: craft (?P<goal>.+?)\.\s*$", re.DOTALL)


def _textcraft_goal(first_observation: str) -> str | None:
    m = _GOAL.search(first_observation)
    return m.group("goal") if m else None


# ---------------------------------------------------------------------------------------------- sciworld


def sciworld_task_key(name: Any) -> str:
    """A ScienceWorld task name as every version writes it: 1.0.2's `task-10-measure-melting-point-(known-
    substance)` and later versions' `measure-melting-point-known-substance` both give the latter."""
    return re.sub(r"^task-\d+[a-z]?-", "", str(name)).replace("(", "").replace(")", "")


#: Maze: the item that starts on the goal (LMRL-Gym's reset refuses it)
MAZE_GOAL_ITEM = 25

#: the task that AgentGym's current SciWorld server lists and AgentTraj-L's item list leaves out (key 2-3)
SCIWORLD_EXTRA_TASK = ("measure-melting-point-unknown-substance", 300)


def _sciworld_split_item() -> int:
    """The first data item after task 2-2 (1096): where the two item layouts part."""
    from atlas_exp.envs.sciworld import TASKS

    keys = [t.key for t in TASKS]
    return sum(t.n_variations for t in TASKS[: keys.index("2-2") + 1])


def _sciworld_expected(index: int) -> tuple[str, int]:
    from atlas_exp.envs.sciworld import SciWorldEpisode

    try:
        ep = SciWorldEpisode.from_item(index)
    except DataError as e:
        raise ConfigError(f"sciworld: {e.reason}") from None
    return sciworld_task_key(ep.task), ep.variation


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
            Retry-After); a step is re-sent only after a connection failure, see `_sessions`.
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
        self._data_record: dict[str, Any] | None = None
        self._data_by_id: dict[str, dict[str, Any]] | None = None
        self._session, self._once_session = self._sessions()
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

    def _data_file(self, why: str) -> Path:
        if self.data_dir is None:
            raise ConfigError(
                f"{self.name}: {why} comes from AgentTraj-L's {self.dialect.data_file}; pass "
                f"data_dir=<folder with {self.dialect.data_file}>"
                + (" or instruction=..." if why == "the instruction" else "")
            )
        return self.data_dir / self.dialect.data_file

    def _data_turn(self, k: int, why: str) -> str:
        if self._data_record is None:
            self._data_record = _records(self._data_file(why), first_only=True)[0]
        try:
            return str(self._data_record["conversations"][k]["value"])
        except (KeyError, IndexError, TypeError):
            raise ConfigError(
                f"data_dir: the first record of {self.data_dir / self.dialect.data_file} has no "
                f"conversations[{k}].value"
            ) from None

    def _data_record_of(self, item_id: str, why: str) -> dict[str, Any]:
        if self._data_by_id is None:
            self._data_by_id = {str(r.get("item_id")): r for r in _records(self._data_file(why))}
        rec = self._data_by_id.get(item_id)
        if rec is None:
            raise ConfigError(
                f"{self.name}: no record {item_id!r} in {self.data_dir / self.dialect.data_file}; give the bare "
                f"index to play the server's own item"
            )
        return rec

    def instruction(self) -> str:
        if self._instruction is None:
            if self.data_dir is not None or self.dialect.builtin_instruction is None:
                self._instruction = self._data_turn(0, "the instruction")
            else:
                self._instruction = self.dialect.builtin_instruction()
        return self._instruction

    def _wordle_first_observation(self) -> str:
        from atlas_exp.envs.wordle import first_observation, vocabulary

        assert self.server_vocab is not None
        return first_observation(vocabulary() if self.wordle_vocab == "data" else self.server_vocab)

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
                 allow_404: bool = False, resend: bool = True) -> Any:
        """One API call: JSON result; `{"error": ...}` raised as AgentGymServerError.

        The retries are the sessions' (`_sessions`): a `/step`, or a call with `resend=False`, is re-sent
        only when it surely never reached the server (connection refused / not established).
        """
        url = self._url(path)
        once = path == "/step" or not resend
        attempts = self.retries + 1
        try:
            resp = (self._once_session if once else self._session).request(
                method, url, json=body, params=params, timeout=self.timeout
            )
        except (requests.ConnectionError, requests.Timeout) as e:
            if once and not _never_sent(e):
                raise AgentGymServerError(
                    f"{method} {url} failed after the request was sent ({type(e).__name__}: {_excerpt(str(e), 200)}); "
                    f"not re-sent, as the server may have applied the action (timeout={self.timeout:g}s)"
                ) from None
            raise self._unreachable(url, attempts, e) from None
        if resp.status_code >= 500 and once:
            raise AgentGymServerError(
                f"{method} {url} answered HTTP {resp.status_code} (AgentGym {self.name} server at "
                f"base_url={self.base_url!r}); not re-sent, as the server may have applied the action: "
                f"{_excerpt(resp.text)}"
            )
        if resp.status_code >= 500:
            raise AgentGymServerError(
                f"{method} {url} answered HTTP {resp.status_code} {attempts} times in a row "
                f"(AgentGym {self.name} server at base_url={self.base_url!r}): {_excerpt(resp.text)}"
            )
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
        when the server is not there, which is why a caller may want to call it before a long run. For
        Wordle it also fetches the server's vocabulary and refuses one that is not the data's (`wordle_vocab`)."""
        if self.env_id is None:
            out = self._request("POST", "/create", body=self.dialect.create_body)
            if isinstance(out, dict) and "id" in out:
                out = out["id"]
            if isinstance(out, bool) or not isinstance(out, int):
                raise AgentGymServerError(
                    f"POST {self._url('/create')} answered {_excerpt(json.dumps(out))}, not an env id"
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

        out = self._request("GET", "/filtered_vocab", params=self._ids())
        if not isinstance(out, list) or not out or not all(isinstance(w, str) for w in out):
            raise AgentGymServerError(f"GET {self._url('/filtered_vocab')} answered {_excerpt(json.dumps(out))}, "
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
        if d.restore_newline and not text.endswith("\n"):
            text += "\n"
        return text

    def _server_index(self, index: int) -> int:
        """The server's index for data item `index` (SciWorld: see the module docstring; others: the same)."""
        if self.name != "sciworld":
            return index
        split = _sciworld_split_item()
        if index < split:
            return index
        if self._sciworld_shift is None:
            out = self._request("POST", "/reset", body={**self._ids(), self.dialect.index_field: split})
            got = self._sciworld_task(out, split)
            expected = _sciworld_expected(split)
            if got == (SCIWORLD_EXTRA_TASK[0], 0):
                self._sciworld_shift = SCIWORLD_EXTRA_TASK[1]
            elif got == expected:
                self._sciworld_shift = 0
            else:
                raise AgentGymServerError(
                    f"sciworld: the server at base_url={self.base_url!r} plays {got[0]} variation {got[1]} at "
                    f"index {split}, where AgentTraj-L's item list has {expected[0]} variation {expected[1]} and "
                    f"AgentGym's current server {SCIWORLD_EXTRA_TASK[0]} variation 0: an item list we do not know, "
                    "so items from sciworld_1096 on cannot be mapped safely; refusing"
                )
            log.info("sciworld server at %s: data item i >= %d is server index i + %d",
                     self.base_url, split, self._sciworld_shift)
        return index + self._sciworld_shift

    def _sciworld_task(self, out: Any, server_index: int) -> tuple[str, int]:
        if not isinstance(out, dict) or "task_name" not in out or "var_num" not in out:
            raise AgentGymServerError(
                f"sciworld: the server's reset of index {server_index} names no task_name/var_num, so which task "
                "it plays for the item cannot be checked (AgentTraj-L's item list differs from some servers' by "
                f"task 2-3); refusing: {_excerpt(json.dumps(out))}"
            )
        try:
            return sciworld_task_key(out["task_name"]), int(out["var_num"])
        except (TypeError, ValueError):
            raise AgentGymServerError(f"sciworld: reset answered var_num={out['var_num']!r}, not an int") from None

    def _check_sciworld(self, out: Any, index: int, server_index: int) -> None:
        got, expected = self._sciworld_task(out, server_index), _sciworld_expected(index)
        if got != expected:
            raise AgentGymServerError(
                f"sciworld: for sciworld_{index} (server index {server_index}) the server at "
                f"base_url={self.base_url!r} plays {got[0]} variation {got[1]}, not AgentTraj-L's {expected[0]} "
                f"variation {expected[1]} (a ScienceWorld version with other tasks or variation counts?); "
                "refusing to play another task under this item's name"
            )

    def _check_textcraft(self, first: str, index: int, item_id: str) -> None:
        rec = self._data_record_of(item_id, f"the goal of {item_id}")
        try:
            want = _textcraft_goal(str(rec["conversations"][2]["value"]))
        except (KeyError, IndexError, TypeError):
            want = None
        got = _textcraft_goal(first)
        if want is None or got != want:
            raise AgentGymServerError(
                f"textcraft: the server at base_url={self.base_url!r} sets the goal {got!r} for data_idx {index}, "
                f"but AgentTraj-L's {item_id} was played on {want!r}: AgentGym's TextCraft server orders its goals "
                "by its file system's listing, so its items are not the data's; refusing to play another goal "
                "under this item's name (give the bare index to play the server's own item)"
            )

    def reset(self, episode: EpisodeSpec | int | str) -> str:
        index, episode_id = item_index(self.dialect, episode)
        d = self.dialect
        named = _names_data_item(episode)
        if self.name == "textcraft" and named:
            # TextCraft items must be checked against the data (module docstring): read it before any request
            if self.data_dir is None:
                raise ConfigError(
                    f"textcraft: episode {episode_id!r} names an AgentTraj-L trajectory, but AgentGym's TextCraft "
                    f"server picks the goal of data_idx {index} by its file system's listing order (0 of the 374 "
                    "AgentTraj-L items came out at their own index on a real server); pass data_dir=<folder with "
                    "textcraft.jsonl> to check each item's goal, or give the bare index to play the server's item"
                )
            self._data_record_of(episode_id, f"the goal of {episode_id}")
        if self.name == "sciworld":
            _sciworld_expected(index)  # an item AgentTraj-L's list has, before any request
        self.connect()
        server_index = self._server_index(index)
        try:
            out = self._request("POST", "/reset", body={**self._ids(), d.index_field: server_index})
        except AgentGymServerError as e:
            if self.name == "maze" and index == MAZE_GOAL_ITEM:
                raise AgentGymServerError(
                    f"{e} (maze item {index} starts on the goal, which AgentGym's published LMRL-Gym server cannot "
                    "reset to; the data hold such episodes, and the in-process atlas_exp.envs.maze.MazeEnv plays it)"
                ) from None
            raise
        if self.name == "sciworld":
            self._check_sciworld(out, index, server_index)
        if d.first_observation is FirstObservation.GET_OBSERVATION:
            first = self._clean(self._request("GET", d.observation_path, params=self._ids()), first=True)
        elif d.first_observation is FirstObservation.TASK_AND_OBSERVATION:
            task, look = _field(out, "task_description", self), _field(out, "observation", self)
            first = self._clean(f"{task}\n{look}", first=True)
        elif d.first_observation is FirstObservation.PREAMBLE_ONLY:
            first = self._wordle_first_observation()
        else:
            raw = out if isinstance(out, str) else _field(out, "observation", self)
            first = self._clean(raw, first=True)
            if d.first_observation is FirstObservation.PREAMBLE_AND_RESET:
                preamble = d.builtin_preamble() if d.builtin_preamble else self._data_turn(2, "the preamble")
                first = f"{preamble}\n{first}"
        if self.name == "textcraft" and named:
            self._check_textcraft(first, index, episode_id)
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

    def action_from_reply(self, reply: str) -> str | None:
        """The action for a reply, parsed as the in-process env of this name does (`action_from_reply`)."""
        return action_from_reply(self.dialect.action_style, reply)

    def close(self) -> None:
        """Release the server-side env where the server can (best effort: a server already gone is fine)."""
        if self.env_id is not None and self.dialect.close_path is not None:
            try:
                self._request("POST", self.dialect.close_path, body=self._ids(), allow_404=True, resend=False)
            except (AtlasError, requests.RequestException) as e:
                log.warning("%r: close failed: %s", self, e)
        self.env_id = None
        self.server_vocab = None
        self._sciworld_shift = None
        self._started = False
        self._session.close()
        self._once_session.close()
        self._session, self._once_session = self._sessions()  # a closed env may be reset again (it then creates a new one)

    def _sessions(self) -> tuple[requests.Session, requests.Session]:
        """(every call but `/step`, `/step`): urllib3 `Retry` adapters. Both retry connection failures
        (nothing was sent); only the first retries timeouts, broken responses and 5xx answers, which a step
        may have been applied behind."""
        common = dict(total=self.retries, connect=self.retries, other=0, allowed_methods=None,
                      backoff_factor=self.backoff, backoff_max=self.max_backoff, raise_on_status=False,
                      respect_retry_after_header=True)
        resend = Retry(read=self.retries, status=self.retries, status_forcelist=range(500, 600), **common)
        once = Retry(read=0, status=0, **common)
        sessions = []
        for retry in (resend, once):
            session = requests.Session()
            adapter = HTTPAdapter(max_retries=retry)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            sessions.append(session)
        return sessions[0], sessions[1]


def _names_data_item(episode: EpisodeSpec | int | str) -> bool:
    """Whether an episode is named by an AgentTraj-L item id (not by a bare server index)."""
    if isinstance(episode, str):
        return not episode.strip().isdigit()
    if isinstance(episode, EpisodeSpec):
        return getattr(episode, "index", None) is None and bool(episode.id)
    return False


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
    "SCIWORLD_EXTRA_TASK",
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
    "sciworld_task_key",
]
