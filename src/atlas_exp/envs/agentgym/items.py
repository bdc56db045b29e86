"""Which server episode is an AgentTraj-L data item, and the checks that refuse to play another under its name.

An episode is a server's integer index or an AgentTraj-L item id (`AgentGymItem`, `item_index`). Where a
server's item table is known to differ from the data's, the client maps or refuses rather than play another
episode under the item's name:

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
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from atlas_exp.envs.agentgym.dialect import AgentGymDialect
from atlas_exp.envs.agentgym.transport import AgentGymServerError, excerpt
from atlas_exp.envs.base import EpisodeSpec
from atlas_exp.errors import ConfigError, DataError


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


def names_data_item(episode: EpisodeSpec | int | str) -> bool:
    """Whether an episode is named by an AgentTraj-L item id (not by a bare server index)."""
    if isinstance(episode, str):
        return not episode.strip().isdigit()
    if isinstance(episode, EpisodeSpec):
        return getattr(episode, "index", None) is None and bool(episode.id)
    return False


# ---------------------------------------------------------------------------------------------- textcraft

_GOAL = re.compile(r"Goal: craft (?P<goal>.+?)\.\s*$", re.DOTALL)


def _textcraft_goal(first_observation: str) -> str | None:
    m = _GOAL.search(first_observation)
    return m.group("goal") if m else None


def check_textcraft_goal(first: str, record: dict[str, Any], index: int, item_id: str, base_url: str) -> None:
    """Refuse when the server's goal for `data_idx` `index` (in its first observation) is not the goal the
    AgentTraj-L `record` of `item_id` was played on."""
    try:
        want = _textcraft_goal(str(record["conversations"][2]["value"]))
    except (KeyError, IndexError, TypeError):
        want = None
    got = _textcraft_goal(first)
    if want is None or got != want:
        raise AgentGymServerError(
            f"textcraft: the server at base_url={base_url!r} sets the goal {got!r} for data_idx {index}, "
            f"but AgentTraj-L's {item_id} was played on {want!r}: AgentGym's TextCraft server orders its goals "
            "by its file system's listing, so its items are not the data's; refusing to play another goal "
            "under this item's name (give the bare index to play the server's own item)"
        )


# ---------------------------------------------------------------------------------------------- sciworld


def sciworld_task_key(name: Any) -> str:
    """A ScienceWorld task name as every version writes it: 1.0.2's `task-10-measure-melting-point-(known-
    substance)` and later versions' `measure-melting-point-known-substance` both give the latter."""
    return re.sub(r"^task-\d+[a-z]?-", "", str(name)).replace("(", "").replace(")", "")


#: Maze: the item that starts on the goal (LMRL-Gym's reset refuses it)
MAZE_GOAL_ITEM = 25

#: the task that AgentGym's current SciWorld server lists and AgentTraj-L's item list leaves out (key 2-3)
SCIWORLD_EXTRA_TASK = ("measure-melting-point-unknown-substance", 300)


def sciworld_split_item() -> int:
    """The first data item after task 2-2 (1096): where the two item layouts part."""
    from atlas_exp.envs.sciworld_items import TASKS

    keys = [t.key for t in TASKS]
    return sum(t.n_variations for t in TASKS[: keys.index("2-2") + 1])


def sciworld_expected(index: int) -> tuple[str, int]:
    """(task key, variation) of AgentTraj-L's item `sciworld_<index>`; a ConfigError for an item it lacks."""
    from atlas_exp.envs.sciworld_items import SciWorldEpisode

    try:
        ep = SciWorldEpisode.from_item(index)
    except DataError as e:
        raise ConfigError(f"sciworld: {e.reason}") from None
    return sciworld_task_key(ep.task), ep.variation


def sciworld_task(out: Any, server_index: int) -> tuple[str, int]:
    """(task key, variation) that a SciWorld server's reset answer `out` names."""
    if not isinstance(out, dict) or "task_name" not in out or "var_num" not in out:
        raise AgentGymServerError(
            f"sciworld: the server's reset of index {server_index} names no task_name/var_num, so which task "
            "it plays for the item cannot be checked (AgentTraj-L's item list differs from some servers' by "
            f"task 2-3); refusing: {excerpt(json.dumps(out))}"
        )
    try:
        return sciworld_task_key(out["task_name"]), int(out["var_num"])
    except (TypeError, ValueError):
        raise AgentGymServerError(f"sciworld: reset answered var_num={out['var_num']!r}, not an int") from None


def sciworld_shift(out: Any, split: int, base_url: str) -> int:
    """How far the server's item table is shifted from the data's at `split`, from its reset answer there:
    `SCIWORLD_EXTRA_TASK`'s variation count when it plays that task's variation 0, 0 when it plays the data's
    item; otherwise it refuses."""
    got = sciworld_task(out, split)
    expected = sciworld_expected(split)
    if got == (SCIWORLD_EXTRA_TASK[0], 0):
        return SCIWORLD_EXTRA_TASK[1]
    if got == expected:
        return 0
    raise AgentGymServerError(
        f"sciworld: the server at base_url={base_url!r} plays {got[0]} variation {got[1]} at "
        f"index {split}, where AgentTraj-L's item list has {expected[0]} variation {expected[1]} and "
        f"AgentGym's current server {SCIWORLD_EXTRA_TASK[0]} variation 0: an item list we do not know, "
        "so items from sciworld_1096 on cannot be mapped safely; refusing"
    )


def check_sciworld(out: Any, index: int, server_index: int, base_url: str) -> None:
    """Refuse when the reset answer `out` for server index `server_index` is not data item `index`'s task."""
    got, expected = sciworld_task(out, server_index), sciworld_expected(index)
    if got != expected:
        raise AgentGymServerError(
            f"sciworld: for sciworld_{index} (server index {server_index}) the server at "
            f"base_url={base_url!r} plays {got[0]} variation {got[1]}, not AgentTraj-L's {expected[0]} "
            f"variation {expected[1]} (a ScienceWorld version with other tasks or variation counts?); "
            "refusing to play another task under this item's name"
        )


__all__ = [
    "MAZE_GOAL_ITEM",
    "SCIWORLD_EXTRA_TASK",
    "AgentGymItem",
    "check_sciworld",
    "check_textcraft_goal",
    "item_index",
    "names_data_item",
    "sciworld_expected",
    "sciworld_shift",
    "sciworld_split_item",
    "sciworld_task",
    "sciworld_task_key",
]
