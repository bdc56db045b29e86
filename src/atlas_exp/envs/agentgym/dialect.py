"""What each AgentGym server expects and returns, and how its client wrapped the text: one typed
`AgentGymDialect` per env (`DIALECTS`), so the servers' differences live in one table, not in the client's code.

The servers share a shape (`/create` a server-side env, `/reset` it to a data item, `/step` it with an action)
but not the details. The table was read from AgentGym's server code (`agentenv-*/.../server.py`,
`environment.py`, `model.py`, HEAD 3ef9235) and its clients (`agentenv/agentenv/envs/*.py`); the wording rules
below from the AgentTraj-L records (`<env>.jsonl`):

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
evaluator counts an invalid action as it does for in-process envs. `AgentGymHTTPEnv.step(action)` sends the
action as given (TextCraft's clean-up is idempotent and applied again, as in `TextCraftEnv`). The tool envs'
servers parse `Action: name with Action Input: {...}` themselves, so their "action" is the whole reply.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from atlas_exp.envs.base import agentgym_action
from atlas_exp.errors import ConfigError

#: the acknowledgement turn of the envs whose clients answer "OK. I'll follow ..." (textcraft, maze, ...)
ACK_OK = "OK. I'll follow your instructions and try my best to solve the task."
#: the acknowledgement turn of WebShop, the tool envs and SQLGym
ACK_SHORT = "Ok."


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

    def clean_observation(self, text: Any, *, first: bool = False) -> str:
        """A server's observation in the data's wording (the text restorations of the module docstring)."""
        text = str(text)
        if self.cut_observation_at is not None:
            text = text.split(self.cut_observation_at, 1)[0]
        if first and self.first_observation_replace is not None:
            old, new = self.first_observation_replace
            text = text.replace(old, new, 1)
        if self.rstrip_observation:
            text = text.rstrip()
        if self.observation_prefix and not text.startswith(self.observation_prefix):
            text = self.observation_prefix + text
        if self.restore_newline and not text.endswith("\n"):
            text += "\n"
        return text

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


__all__ = [
    "ACK_OK",
    "ACK_SHORT",
    "DIALECTS",
    "ActionStyle",
    "AgentGymDialect",
    "FirstObservation",
    "SuccessRule",
    "action_from_reply",
    "dialect_for",
]
