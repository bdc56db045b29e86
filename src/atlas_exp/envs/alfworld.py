"""ALFWorld (TextWorld household tasks) with AgentGym's text interface, for held-out evaluation.

What replaying the real data pins down (wording, scoring, versions, costs): docs/envs.md#alfworld."""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlas_exp.envs.base import Env, EpisodeSpec, StepResult, agentgym_action
from atlas_exp.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: AgentGym's ALFWorld instruction (the first user turn of its ReAct conversations), verbatim: the quoted formats
#: contain real newlines, and the typo "envrionment" and the blank before "Reminder" are AgentGym's.
INSTRUCTION = (
    "Interact with a household to solve a task. Imagine you are an intelligent agent in a household environment "
    "and your target is to perform actions to complete the task goal. At the beginning of your interactions, you "
    "will be given the detailed description of the current environment and your goal to accomplish. For each of "
    "your turn, you will be given a list of actions which you can choose one to perform in this turn. You should "
    'choose from two actions: "THOUGHT" or "ACTION". If you choose "THOUGHT", you should first think about the '
    "current condition and plan for your future actions, and then output your action in this turn. Your output "
    'must strictly follow this format:"Thought:\nyour thoughts.\n\nAction:\nyour next action"; If you choose '
    '"ACTION", you should directly output the action in this turn. Your output must strictly follow this '
    'format:"Action:\nyour next action". After your each turn, the environment will give you immediate feedback '
    'based on which you plan your next few steps. if the envrionment output "Nothing happened", that means the '
    "previous action is invalid and you should try more options.\n Reminder: \n1. the action must be chosen from "
    "the given available actions. Any actions except provided available actions will be regarded as illegal. \n"
    "2. Think when necessary, try to act directly more in the process."
)

#: Actions per episode before it ends unfinished: AgentGym's `max_round` for ALFWorld evaluation.
DEFAULT_MAX_STEPS = 30

#: The splits in ALFWorld's `json_2.1.1` folder that we evaluate on; the first is the default.
SPLITS = ("valid_train", "valid_unseen", "valid_seen")
DEFAULT_SPLIT = SPLITS[0]
#: ALFWorld's training games: never evaluated on, but played to restore the expert's trajectories (their
#: `game_file` is of this split) when its folder is there (ALFWorld's full download has it)
TRAIN_SPLIT = "train"

#: ALFWorld's six text task types (`AlfredTWEnv.TASK_TYPES`); other folders are not games of the benchmark.
TASK_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)

GAME_FILE = "game.tw-pddl"
DATA_FOLDER = "json_2.1.1"
#: TextWorld's answer to anything that is not an admissible command
NOTHING_HAPPENS = "Nothing happens."
#: the config option a missing data folder is reported under
DATA_DIR_OPTION = "eval.alfworld_data_dir"

_DOWNLOAD_HINT = (
    "point it (or ALFWORLD_DATA) at ALFWorld's data folder, the one holding json_2.1.1/ "
    "(get it with `pip install alfworld==0.4.2 && alfworld-download`, default ~/.cache/alfworld)"
)
_ARRIVE = re.compile(r"^You arrive at loc \d+\. ")
_OLD_PUT = re.compile(r"^put (?P<o>.+) in/on (?P<r>.+)$")
_NEW_PUT = re.compile(r"^move (?P<o>.+) to (?P<r>.+)$")


# --------------------------------------------------------------------------------------------- episodes


@dataclass(frozen=True)
class AlfworldEpisode(EpisodeSpec):
    """One game of a split: `game` is its game file relative to the split folder
    (`<task folder>/<trial folder>/game.tw-pddl`); `id` is `<split>/<task folder>/<trial folder>`."""

    game: str = ""

    @classmethod
    def from_id(cls, item: str, split: str | None = None) -> AlfworldEpisode:
        """An episode from its id or any path that ends in the game's two folders: `valid_train/<task>/<trial>`,
        `<task>/<trial>`, `json_2.1.1/valid_train/<task>/<trial>/game.tw-pddl` (the form of the expert data's
        `game_file`). A split named in `item` must be `split` when that is given."""
        parts = [p for p in str(item).strip().replace("\\", "/").split("/") if p]
        if parts and parts[-1] == GAME_FILE:
            parts = parts[:-1]
        named = None
        for i, p in enumerate(parts[:-2]):
            if p in SPLITS or p == TRAIN_SPLIT:
                named = p
                parts = parts[i + 1:]
                break
        if len(parts) != 2 or not parts[1].startswith("trial_"):
            raise DataError(f"not an ALFWorld game id (expected '<split>/<task folder>/trial_...'): {item!r}")
        if named is not None and split is not None and named != split:
            raise ConfigError(f"episode {item!r} is from split {named!r}, but this env plays AlfworldEnv split={split!r}")
        where = named or split
        game_dir = "/".join(parts)
        return cls(id=f"{where}/{game_dir}" if where else game_dir, game=f"{game_dir}/{GAME_FILE}")

    @property
    def task_type(self) -> str:
        """`pick_and_place_simple`, ... (the task folder up to its first `-`)."""
        return self.game.split("-", 1)[0]


def resolve_data_dir(data_dir: str | os.PathLike | None = None, split: str = DEFAULT_SPLIT) -> Path:
    """The data folder (`data_dir`, else `$ALFWORLD_DATA`), checked to hold `json_2.1.1/<split>`."""
    if split not in (*SPLITS, TRAIN_SPLIT):
        raise ConfigError(f"AlfworldEnv split={split!r}: choose one of {', '.join((*SPLITS, TRAIN_SPLIT))}")
    given = data_dir if data_dir not in (None, "") else os.environ.get("ALFWORLD_DATA") or None
    if given is None:
        raise ConfigError(f"{DATA_DIR_OPTION} is not set and ALFWORLD_DATA is empty: {_DOWNLOAD_HINT}")
    root = Path(given).expanduser()
    source = DATA_DIR_OPTION if data_dir not in (None, "") else "ALFWORLD_DATA"
    if not root.is_dir():
        raise ConfigError(f"{source}={str(given)!r} is not a folder: {_DOWNLOAD_HINT}")
    if not (root / DATA_FOLDER / split).is_dir():
        raise ConfigError(f"{source}={str(given)!r} has no {DATA_FOLDER}/{split}/ folder: {_DOWNLOAD_HINT}")
    return root.resolve()


@functools.lru_cache(maxsize=16)
def _split_games(split_dir: str) -> tuple[str, ...]:
    """The split's playable game files, relative to the split folder, sorted (the rule of ALFWorld's
    `AlfredTWEnv.collect_game_files`: traj_data.json of a known task type, a `solvable` game file, and neither
    `movable` nor `Sliced` in the path)."""
    games = []
    for root, _dirs, files in os.walk(split_dir):
        if "traj_data.json" not in files or GAME_FILE not in files:
            continue
        if "movable" in root or "Sliced" in root:
            continue
        try:
            with open(os.path.join(root, "traj_data.json"), encoding="utf-8") as f:
                task_type = json.load(f).get("task_type")
            with open(os.path.join(root, GAME_FILE), encoding="utf-8") as f:
                solvable = json.load(f).get("solvable", False)
        except (OSError, ValueError) as e:
            raise DataError(f"unreadable game folder: {e}", source=root) from None
        if task_type in TASK_TYPES and solvable:
            games.append(os.path.relpath(os.path.join(root, GAME_FILE), split_dir).replace(os.sep, "/"))
    return tuple(sorted(games))


def list_episodes(split: str = DEFAULT_SPLIT, data_dir: str | os.PathLike | None = None) -> list[AlfworldEpisode]:
    """The split's episodes in the order `reset(i)` plays them: games sorted by path (deterministic across
    machines). Cached per process after the first call (~0.5 s: every game file is read once)."""
    root = resolve_data_dir(data_dir, split)
    games = _split_games(str(root / DATA_FOLDER / split))
    if not games:
        raise DataError(f"no playable ALFWorld games in {root / DATA_FOLDER / split}")
    return [AlfworldEpisode(id=f"{split}/{g.rsplit('/', 1)[0]}", game=g) for g in games]


def episode_ids(split: str = DEFAULT_SPLIT, data_dir: str | os.PathLike | None = None) -> list[str]:
    """The split's episode ids, for an eval config's `episodes: {_target_: ...}` (`reset` takes them back)."""
    return [ep.id for ep in list_episodes(split, data_dir)]


# --------------------------------------------------------------------------------------------- text


def first_observation(intro: str, admissible: list[str]) -> str:
    """AgentGym's first observation: the intro without its banner paragraph, paragraphs joined by one newline,
    then the admissible commands."""
    body = "\n".join(intro.split("\n\n")[1:])
    return f"{body}\nAVAILABLE ACTIONS: {','.join(admissible)}"


def step_observation(feedback: str) -> str:
    """AgentGym's step observation: the feedback without the `You arrive at loc N. ` prefix."""
    return _ARRIVE.sub("", feedback, count=1)


def to_game_grammar(command: str, admissible: list[str]) -> str:
    """The expert's 0.4-grammar `move X to Y` as the game's `put X in/on Y` when that one is admissible."""
    m = _NEW_PUT.match(command)
    if m is not None:
        old = f"put {m['o']} in/on {m['r']}"
        if old in admissible:
            return old
    return command


def to_expert_grammar(command: str) -> str:
    """An old-grammar `put X in/on Y` as the `move X to Y` that ALFWorld 0.4's handcoded expert looks for."""
    m = _OLD_PUT.match(command)
    return f"move {m['o']} to {m['r']}" if m is not None else command


# --------------------------------------------------------------------------------------------- textworld


def _import_alfworld():
    try:
        import textworld
        from alfworld.agents.environment.alfred_tw_env import (
            AlfredDemangler,
            AlfredExpert,
            AlfredInfos,
        )
    except ImportError as e:
        raise ConfigError(f"the alfworld env needs `pip install alfworld==0.4.2` ({e})") from None
    return textworld, AlfredDemangler, AlfredInfos, AlfredExpert


@functools.lru_cache(maxsize=1)
def _expert_wrapper_class():
    """ALFWorld's `AlfredExpert` wrapper, with the expert bridged to the game's grammar (see the module doc)."""
    _, _, _, AlfredExpert = _import_alfworld()
    import alfworld.agents.expert.handcoded_expert as hce

    class BridgedAlfredExpert(AlfredExpert):
        rng: random.Random = random.Random(0)

        def _gather_infos(self):
            state = self.state
            admissible = list(state["admissible_commands"])
            plan: list[str] = ["look"]  # the stock wrapper's answer before the first step / to a non-admissible move
            saved, hce.random = hce.random, self.rng  # the expert draws from the module's `random`
            try:
                if not self.prev_command:
                    self._handcoded_expert.observe(state["feedback"])
                else:
                    view = dict(state)
                    view["admissible_commands"] = [to_expert_grammar(c) for c in admissible]
                    action = self._handcoded_expert.act(view, 0, state["won"], self.prev_command)
                    action = to_game_grammar(action, admissible)
                    if action in admissible:
                        plan = [action]
            except (hce.HandCodedAgentTimeout, hce.HandCodedAgentFailed):
                plan = []  # the expert gave up (out of its own step budget, or out of subgoals)
            finally:
                hce.random = saved
            state["extra.expert_plan"] = plan

    return BridgedAlfredExpert


# --------------------------------------------------------------------------------------------- env


class AlfworldEnv(Env):
    """ALFWorld games of one split with AgentGym's text interface; one episode at a time.

    `reset(i)` plays the i-th game of `list_episodes(split)`; `reset(AlfworldEpisode)` or `reset("<id>")` a
    named one. With `expert=True` the handcoded expert follows along: `expert_action()` is its next action.
    """

    name = "alfworld"

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        split: str = DEFAULT_SPLIT,
        max_steps: int = DEFAULT_MAX_STEPS,
        expert: bool = False,
    ):
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ConfigError(f"AlfworldEnv max_steps must be an int >= 1, got {max_steps!r}")
        self.root = resolve_data_dir(data_dir, split)
        self.split = split
        self.split_dir = self.root / DATA_FOLDER / split
        self.max_steps = max_steps
        self.expert = bool(expert)
        self.episode: AlfworldEpisode | None = None
        self.steps_taken = 0
        self.done = False
        self.won = False
        self._tw = None  # the TextWorld env (wrapper stack), created on first reset
        self._loaded: str | None = None  # game file it has loaded
        self._state = None  # TextWorld's last GameState
        self.intro = ""  # the game's own intro text at reset (banner, room, task), before AgentGym's transform
        self._warned_grammar: set[str] = set()

    # ------------------------------------------------------------------------------------------ protocol

    def instruction(self) -> str:
        return INSTRUCTION

    def episodes(self) -> list[AlfworldEpisode]:
        """This env's split, in `reset(i)` order."""
        return list_episodes(self.split, self.root)

    def reset(self, episode: EpisodeSpec | int | str) -> str:
        episode = self._episode(episode)
        path = self.split_dir / episode.game
        if not path.is_file():
            raise DataError(f"no such ALFWorld game file (episode {episode.id!r})", source=str(path))
        self._load(str(path))
        if self.expert:
            self._tw.rng = random.Random(zlib.crc32(episode.game.encode()))
        self._state = self._tw.reset()
        self.intro = self._state["feedback"]
        self.episode = episode
        self.steps_taken = 0
        self.done = False
        self.won = bool(self._state["won"])
        return first_observation(self._state["feedback"], list(self._state["admissible_commands"]))

    def step(self, action: str) -> StepResult:
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        if self.done:
            raise RuntimeError("the episode is over; call reset() to start another")
        recognized = action.strip() in self._state["admissible_commands"]
        self._state, _, _ = self._tw.step(action)
        self.steps_taken += 1
        self.won = bool(self._state["won"])
        truncated = not self.won and self.steps_taken >= self.max_steps
        self.done = self.won or truncated
        info: dict[str, Any] = {
            "raw": self._state["feedback"],
            "recognized": recognized,
            "steps": self.steps_taken,
            "truncated": truncated,
            "available_actions": list(self._state["admissible_commands"]),
        }
        if self.expert:
            info["expert_plan"] = list(self._state.get("extra.expert_plan") or [])
        return StepResult(
            observation=step_observation(self._state["feedback"]),
            reward=1.0 if self.won else 0.0,
            done=self.done,
            success=self.won,
            info=info,
        )

    def action_from_reply(self, reply: str) -> str | None:
        """What AgentGym's ALFWorld client sends for a reply: the text after the first "Action:" up to a second
        "Action:" if any, stripped (text spanning lines is then not a command, and the game says "Nothing
        happens."). A reply without "Action:" is sent whole by AgentGym; here it gives None (the evaluator's
        fallback), like a reply whose action is empty."""
        return agentgym_action(reply)

    def close(self) -> None:
        """Drop the TextWorld env.

        Its copy of fast-downward's library stays loaded: unloading it (`fast_downward.close_lib`) with a
        second env's copy in the process made the interpreter crash at exit (SIGSEGV, seen with one env per
        ALFWorld split in one evaluation), and the library is freed with the process anyway.
        """
        self._tw, self._loaded, self._state = None, None, None

    # ------------------------------------------------------------------------------------------ state

    @property
    def available_actions(self) -> list[str]:
        """The admissible commands now (AgentGym lists them in the first observation only)."""
        return list(self._state["admissible_commands"]) if self._state is not None else []

    @property
    def task(self) -> str:
        """The goal sentence, e.g. `examine the alarmclock with the desklamp.`"""
        return self.intro.rsplit("Your task is to: ", 1)[-1].strip() if self.intro else ""

    def expert_action(self) -> str | None:
        """The handcoded expert's next action (`extra.expert_plan[0]`); None when it has given up.
        Needs `expert=True`."""
        if not self.expert:
            raise RuntimeError("expert_action() needs AlfworldEnv(expert=True)")
        if self._state is None:
            raise RuntimeError("call reset() before expert_action()")
        plan = self._state.get("extra.expert_plan") or []
        return plan[0] if plan else None

    # ------------------------------------------------------------------------------------------ helpers

    def _episode(self, episode: EpisodeSpec | int | str) -> AlfworldEpisode:
        if isinstance(episode, AlfworldEpisode):
            return episode
        if isinstance(episode, bool) or not isinstance(episode, (int, str)):
            raise TypeError(f"AlfworldEnv.reset takes an AlfworldEpisode, an index or an id, got {type(episode).__name__}")
        if isinstance(episode, str):
            if not episode.strip().lstrip("-").isdigit():
                return AlfworldEpisode.from_id(episode, self.split)
            episode = int(episode)
        games = self.episodes()
        if not 0 <= episode < len(games):
            raise ConfigError(f"alfworld episode index {episode} is out of range: split {self.split!r} has {len(games)} games (0..{len(games) - 1})")
        return games[episode]

    def _load(self, path: str) -> None:
        """Load `path` into the one TextWorld env, creating it on first use (a reset of the loaded game skips
        the load: fast-downward translates the problem at load and again at reset)."""
        if self._tw is not None and self._loaded == path:
            return
        textworld, AlfredDemangler, AlfredInfos, _ = _import_alfworld()
        if self._tw is None:
            infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile"])
            wrappers = [AlfredDemangler(shuffle=False), AlfredInfos]
            if self.expert:
                infos.extras.append("expert_plan")
                wrappers.append(_expert_wrapper_class()())
            self._tw = textworld.start(path, infos, wrappers=wrappers)
        else:
            self._loaded = None  # a failed load leaves nothing usable loaded
            self._tw.load(path)
        self._loaded = path
        self._check_grammar(path)

    def _check_grammar(self, path: str) -> None:
        logic = getattr(self._tw.unwrapped, "_game_data", None) or {}
        grammar = logic.get("grammar", "")
        if "put {o} in/on {r}" not in grammar and path not in self._warned_grammar:
            self._warned_grammar.add(path)
            log.warning("alfworld: %s uses ALFWorld 0.4's grammar (`move X to Y`), not the `put X in/on Y` of the "
                        "games AgentGym's data was collected on; the model will see wording it was not trained on",
                        path)


__all__ = [
    "DEFAULT_MAX_STEPS",
    "DEFAULT_SPLIT",
    "INSTRUCTION",
    "NOTHING_HAPPENS",
    "SPLITS",
    "TRAIN_SPLIT",
    "TASK_TYPES",
    "AlfworldEnv",
    "AlfworldEpisode",
    "episode_ids",
    "first_observation",
    "list_episodes",
    "resolve_data_dir",
    "step_observation",
]
