"""The environment contract that the evaluation loop and the expert recorders talk to.

Every env (textcraft, babyai, sciworld, alfworld, maze, wordle) speaks *text in the wording of the training data*: the
model is finetuned on AgentTraj-L conversations, so at evaluation time it must see the very same
instruction prompt and observation phrasing, or we would be measuring prompt drift instead of the effect of
step selection. An env therefore exposes

- `instruction()`: the fixed first user turn of every training conversation of that env;
- `reset(episode)`: the first observation (the user turn right after the "OK. I'll follow..." reply);
- `step(action)`: the next observation plus reward/done/success.

Replies are written in AgentGym's ReAct format (`Thought:\\n...\\n\\nAction:\\n<action>`); `parse_action`
pulls the action out of one, and `Env.action_from_reply` lets an env reproduce exactly what its AgentGym
client sent to the server (some clients clean actions up, see TextCraft).

Which extraction each env uses. AgentGym's clients changed after AgentTraj-L was recorded: the 2024 ones
(the data's) send the text after the first `Action:` up to a second one, stripped, multi-line text and
punctuation included (TextCraft's: after the last `Action:`, then only letters, digits, commas and spaces);
the current TextCraft and BabyAI clients take only the line after `Action:`, strip punctuation and refuse a
reply with two markers. The data show the 2024 rule at work (18 BabyAI and 2 TextCraft turns whose action
ran over two lines, and BabyAI's "go to purple box 1.", got the game's answer to the text as sent: "not
recognized", "could not find a valid recipe"; the trajectories go on from those answers), so a model trained on them learned that feedback. Every env here
therefore keeps the data's rule, and an AgentGym HTTP env (`envs/agentgym/dialect.py`) parses exactly as the
in-process env of the same name:

| env | extraction | no `Action:` |
|---|---|---|
| textcraft | after the last `Action:` (before any `Instruction:`), then letters/digits/commas/spaces only | the whole reply, cleaned (the data hold one) |
| babyai, sciworld, alfworld, maze, wordle | `agentgym_action`: after the first `Action:`, up to a second, stripped | None |

None counts as an invalid action in the evaluation (`eval/rollout.py`), which then sends the reply's last
line, so every env, in-process or over HTTP, counts `invalid_actions` the same way.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from atlas_exp.errors import DataError


@dataclass(frozen=True)
class EpisodeSpec:
    """Which episode to play. Each env subclasses this with the fields that pin an episode down.

    `id` names the episode in trajectories and reports (e.g. the data item it was read from, or the seed
    it was sampled with); it plays no part in the game itself.
    """

    id: str = ""


@dataclass
class StepResult:
    """What one action leads to.

    `done` ends the episode (goal reached, env-side failure, or the step budget spent); `success` says
    whether the goal was reached, so a caller never has to guess it from the reward scale of each env.
    `info` carries env-specific extras (raw observation, step count, whether the action was understood).
    """

    observation: str
    reward: float
    done: bool
    success: bool
    info: dict[str, Any] = field(default_factory=dict)


class Env(ABC):
    """A text environment, one episode at a time.

    Call `reset` before the first `step`; after a `StepResult` with `done=True`, only `reset` or `close`
    are valid. Envs are cheap to create and not thread-safe: use one per worker.
    """

    #: the env name used in `Trajectory.env` and in configs ("textcraft", "babyai", ...)
    name: str = ""
    #: the assistant's reply to the instruction in every training conversation (AgentTraj-L's `loss: false`
    #: turn); evaluation replays it so the model sees the conversation shape it was trained on
    ack: str = "OK. I'll follow your instructions and try my best to solve the task."

    @abstractmethod
    def instruction(self) -> str:
        """The env's fixed instruction prompt: the first user turn of every training conversation."""

    @abstractmethod
    def reset(self, episode: EpisodeSpec | int) -> str:
        """Start an episode and return its first observation, worded exactly as in the training data.

        An `EpisodeSpec` replays a known episode (e.g. read from a data record); an int is a seed or index
        for the env's own, documented rule for choosing a new episode.
        """

    @abstractmethod
    def step(self, action: str) -> StepResult:
        """Apply one action (already extracted from the reply) and return what follows."""

    def action_from_reply(self, reply: str) -> str | None:
        """The action this env would receive for a full model reply; None when the reply has none.

        The default is `parse_action`; envs whose AgentGym client treats replies differently override it,
        so that evaluation feeds the env what data collection fed it.
        """
        return parse_action(reply)

    def close(self) -> None:
        """Release whatever the env holds (processes, files). The default holds nothing."""

    def __enter__(self) -> "Env":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# "Action:" anywhere (the last one wins, as in AgentGym's clients), tolerating blanks before the colon.
_ACTION_MARK = re.compile(r"Action\s*:", re.IGNORECASE)


def item_number(item: int | str, prefixes: tuple[str, ...], env: str) -> int:
    """The data index of an AgentGym item: an int as is, or the trailing number of an item id that starts with
    one of `prefixes` (`"lmrlgym_maze_13"` -> 13). A DataError names the expected form otherwise."""
    if isinstance(item, str):
        text = item.strip()
        prefix = next((p for p in prefixes if text.startswith(p)), "")
        if not text[len(prefix):].isdigit():
            raise DataError(f"not a {env} item id (expected '{prefixes[0]}<n>'): {item!r}")
        item = int(text[len(prefix):])
    if isinstance(item, bool) or not isinstance(item, int) or item < 0:
        raise DataError(f"a {env} item is an int >= 0 or '{prefixes[0]}<n>', got {item!r}")
    return item


def agentgym_action(reply: str) -> str | None:
    """The action AgentGym's 2024 clients (the ones AgentTraj-L was recorded with) sent for a reply: the text
    after the first "Action:", up to a second one if any, stripped (it may span lines: the env then answers
    that it does not understand, as in the data); a trailing "</s>" is dropped. None when the reply has no
    "Action:" or nothing after it (AgentGym then sent the whole reply; the evaluator counts an invalid action
    and sends the reply's last line)."""
    parts = reply.removesuffix("</s>").split("Action:")
    if len(parts) < 2:
        return None
    return parts[1].strip() or None


def parse_action(reply: str) -> str | None:
    """The action of a ReAct reply `Thought:\\n...\\n\\nAction:\\n<action>`, or None when there is none.

    Lenient about layout, because small models drift from the exact format: the marker may be followed by
    spaces, a newline or nothing, and the action may sit on the marker's line (`Action: get 1 stick`).
    The action is the first non-empty line after the *last* marker (a model that writes a second
    Thought/Action pair has changed its mind, and anything on later lines is usually hallucinated
    observation text). Returns None when there is no marker or nothing follows it.
    """
    marks = list(_ACTION_MARK.finditer(reply))
    if not marks:
        return None
    rest = reply[marks[-1].end():]
    for line in rest.splitlines():
        line = line.strip()
        if line:
            return line
    return None
