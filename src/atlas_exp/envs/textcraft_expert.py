"""A scripted TextCraft expert: plays the planner's actions (`textcraft_planner`) in the real env, with
templated thoughts, and records the AgentGym-style ReAct trajectories.

Why: AgentTraj-L has only 374 TextCraft trajectories. To study step selection at other data sizes we record
more, from episodes the data never had (`textcraft.sample_episode`), in the same conversation shape:
instruction / "OK. I'll follow..." (not trained) / first observation, then `Thought:\\n...\\n\\nAction:\\n...`
steps alternating with `Instruction:\\n...` observations, ending with the action that crafts the goal.

Around the plan the expert sometimes checks its inventory first or before the final craft, as the data's
experts often do. The thoughts are templated English, chosen with the episode's rng: varied across episodes,
identical for the same seed. Every recorded trajectory is replayed in the real env while it is recorded and
must reach the goal; an episode whose goal cannot be made from its commands, or not within `max_steps`, is
replaced by a new sample and counted in `RecordStats`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from atlas_exp.artifacts import iter_jsonl, write_jsonl
from atlas_exp.data.trajectory import Message, Trajectory
from atlas_exp.envs.textcraft import DEFAULT_MAX_STEPS, TextCraftEnv, TextCraftEpisode, item_name, sample_episode
from atlas_exp.envs.textcraft_planner import Action, Command, Planner, UncraftableGoal
from atlas_exp.errors import ConfigError

log = logging.getLogger(__name__)

#: The not-trained assistant turn that follows the instruction in every AgentTraj-L conversation: the env's
#: own `ack`, which the evaluation loop replays, so recorded data and evaluation cannot drift apart.
ACK = TextCraftEnv.ack


class _OverBudget(UncraftableGoal):
    """The goal can be made, but not within the step limit."""


# ------------------------------------------------------------------------------------------------ thoughts


def _n(item: str, k: int) -> str:
    return f"{k} {item_name(item)}"


def _list(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _times(k: int) -> str:
    return {1: "once", 2: "twice"}.get(k, f"{k} times")


def _more_times(k: int) -> str:
    return {1: "once more", 2: "twice more"}.get(k, f"{k} more times")


class ThoughtWriter:
    """Short, plausible thoughts for each planned action, drawn from a few phrasings with the episode's rng."""

    def __init__(self, goal: str, goal_command: Command | None, rng: random.Random):
        self.goal = goal
        self.goal_command = goal_command
        self.rng = rng

    def pick(self, *options: str) -> str:
        return self.rng.choice(options)

    def inventory_first(self) -> str:
        g = item_name(self.goal)
        if self.goal_command is not None:
            return self.pick(
                f"To craft {g}, I can use the command: {self.goal_command.text}. Let me first check my inventory to "
                "see if I already have any of the ingredients.",
                f"I need to craft {g}. Before gathering ingredients, I should check what is in my inventory.",
                f"I should check my inventory first to see if I have the ingredients for {g}.",
            )
        return f"I should check my inventory before I start working on {g}."

    def inventory_before_goal(self) -> str:
        return self.pick(
            f"Before crafting {item_name(self.goal)}, let me check my inventory to make sure I have everything.",
            "Let me check my inventory to confirm I have all the ingredients.",
        )

    def after_empty_inventory(self) -> str:
        return self.pick(
            "My inventory is empty, so I have to gather everything myself. ",
            "I am not carrying anything yet. ",
            "I don't have any items in my inventory. ",
            "",
        )

    def _purpose(self, consumers: tuple[str, ...]) -> str:
        return _list([item_name(c) for c in consumers]) if consumers else item_name(self.goal)

    def get(self, a: Action, first: bool) -> str:
        what, purpose = _n(a.item, a.amount), self._purpose(a.consumers)
        lead = ""
        if first and self.goal_command is not None:
            g, cmd = item_name(self.goal), self.goal_command.text
            lead = self.pick(
                f"To craft {g}, I will use the command: {cmd}. ",
                f"The command for {g} is: {cmd}. ",
                f"I need to craft {g} with the command: {cmd}. ",
            )
        return lead + self.pick(
            f"I need {what} to craft {purpose}. It is a basic ingredient, so I can get it directly.",
            f"To craft {purpose}, I need {what}. I will get it from the environment.",
            f"Next, I need {what} for {purpose}.",
            f"{item_name(a.item).capitalize()} cannot be crafted from the commands, so I should get {what} for {purpose}.",
        )

    def craft(self, a: Action, prev: Action | None) -> str:
        item, cmd = item_name(a.item), a.command
        assert cmd is not None
        ingredients = _list([_n(i, c) for i, c in a.concrete_inputs])
        subs = " ".join(
            f"The command uses generic {item_name(t)}, so I can use {item_name(m)} instead." for t, m in a.substitutes
        )
        if a.item == self.goal and a.batch == a.batches:
            text = self.pick(
                f"Now I have all the ingredients for {item}: {ingredients}. I can craft it.",
                f"I have {ingredients}, which is everything {item} needs. Let me craft it now.",
                f"All the ingredients are ready, so I can craft {item} using the command: {cmd.text}.",
            )
        elif a.batches > 1 and a.batch == 1:
            text = (
                f"I need {a.amount} {item} for {self._purpose(a.consumers)}, but one craft makes {cmd.out_count}, "
                f"so I have to craft it {_times(a.batches)}. "
                + self.pick("Let me start with the first one.", "")
            ).strip()
        elif a.batches > 1:
            left = a.batches - a.batch + 1
            text = self.pick(
                f"I crafted {item}, and I need to craft it {_more_times(left)}.",
                f"Good, that worked. I still have to craft {item} {_more_times(left)} to have {a.amount}.",
            )
        else:
            text = self.pick(
                f"Now I can craft {item} using the command: {cmd.text}.",
                f"I have {ingredients}, so I can craft {item}, which I need for {self._purpose(a.consumers)}.",
                f"With {ingredients} I can make {item}.",
                f"Next I craft {item} for {self._purpose(a.consumers)}.",
            )
        if prev is not None and prev.kind == "get" and self.rng.random() < 0.5:
            text = f"I got {_n(prev.item, prev.amount)}. " + text
        return (text + (" " + subs if subs else "")).strip()


def _step_text(thought: str, action: str) -> str:
    return f"Thought:\n{thought}\n\nAction:\n{action}"


# ---------------------------------------------------------------------------------------------- recording


@dataclass
class RecordStats:
    """What recording had to skip: episodes replaced by a fresh sample, by reason."""

    recorded: int = 0
    uncraftable: int = 0
    over_budget: int = 0
    dropped_goals: list[str] = field(default_factory=list)

    @property
    def dropped(self) -> int:
        return self.uncraftable + self.over_budget


class ExpertFailed(RuntimeError):
    """A planned trajectory did not reach the goal in the real env: a planner bug, never data to keep."""


def expert_turns(
    episode: TextCraftEpisode, rng: random.Random, env: TextCraftEnv
) -> list[tuple[str, str]]:
    """Plan and play one episode; return [(assistant step text, following observation)], the last observation
    being the one that reports the goal crafted. Raises UncraftableGoal when there is no plan within
    `env.max_steps` actions, ExpertFailed when the env does not confirm it."""
    planner = Planner(episode, rng, env.tree)
    actions = planner.plan()
    budget = env.max_steps - len(actions)
    if budget < 0:
        raise _OverBudget(f"{len(actions)} actions needed for {item_name(episode.goal)}, limit {env.max_steps}")
    goal_cmd = planner.choice.get(episode.goal)
    writer = ThoughtWriter(episode.goal, goal_cmd, rng)
    check_first = budget >= 1 and rng.random() < 0.6
    check_before_goal = budget - check_first >= 1 and len(actions) >= 3 and rng.random() < 0.15
    if check_before_goal:
        actions.insert(len(actions) - 1, Action("inventory", "inventory"))
    if check_first:
        actions.insert(0, Action("inventory", "inventory"))

    env.reset(episode)
    turns: list[tuple[str, str]] = []
    prev: Action | None = None
    last_obs = ""
    fetched_first = False
    result = None
    for a in actions:
        if a.kind == "inventory":
            thought = writer.inventory_first() if prev is None else writer.inventory_before_goal()
        elif a.kind == "get":
            thought = writer.get(a, first=not fetched_first and not check_first)
            fetched_first = True
        else:
            thought = writer.craft(a, prev)
        if prev is not None and prev.kind == "inventory" and last_obs.endswith("You are not carrying anything."):
            thought = writer.after_empty_inventory() + thought
        result = env.step(a.text)
        last_obs = result.observation
        turns.append((_step_text(thought, a.text), result.observation))
        prev = a
        if result.done:
            break
    if result is None or not result.success or len(turns) != len(actions):
        raise ExpertFailed(
            f"expert plan for {item_name(episode.goal)} ({episode.id}) did not reach the goal: "
            f"last observation {last_obs!r}"
        )
    return turns


def record_expert_trajectories(
    n: int,
    seed: int,
    max_steps: int = DEFAULT_MAX_STEPS,
    *,
    progress: bool = True,
    stats: RecordStats | None = None,
) -> list[Trajectory]:
    """Record `n` expert trajectories on new episodes sampled with `seed` (same seed -> same trajectories).

    Trajectory `i` plays `sample_episode(random.Random("textcraft_expert:<seed>:<i>:<attempt>"))`; `attempt`
    only grows when an episode has to be replaced (goal uncraftable, or not within `max_steps` actions),
    which `stats` counts. Ids are `textcraft_expert_<seed>_<i>`.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    stats = stats if stats is not None else RecordStats()
    env = TextCraftEnv(max_steps=max_steps)
    out: list[Trajectory] = []
    for i in tqdm(range(n), desc="textcraft expert", unit="traj", disable=not progress):
        for attempt in range(1000):
            rng = random.Random(f"textcraft_expert:{seed}:{i}:{attempt}")
            episode = sample_episode(rng, id=f"seed={seed}:{i}:{attempt}", tree=env.tree)
            try:
                turns = expert_turns(episode, rng, env)
            except _OverBudget:
                stats.over_budget += 1
                stats.dropped_goals.append(episode.goal)
                continue
            except UncraftableGoal:
                stats.uncraftable += 1
                stats.dropped_goals.append(episode.goal)
                continue
            break
        else:  # pragma: no cover - would need 1000 bad samples in a row
            raise ExpertFailed(f"no playable TextCraft episode found for trajectory {i} of seed {seed}")
        messages = [
            Message("user", env.instruction()),
            Message("assistant", ACK, step=None, trainable=False),
            Message("user", episode.first_observation()),
        ]
        for k, (step_text, obs) in enumerate(turns):
            if k > 0:
                messages.append(Message("user", turns[k - 1][1]))
            messages.append(Message("assistant", step_text, step=k))
        out.append(
            Trajectory(
                id=f"textcraft_expert_{seed}_{i}",
                env="textcraft",
                source=f"textcraft_expert:seed={seed}:{i}",
                messages=messages,
                meta={"goal": item_name(episode.goal), "attempt": attempt},
            )
        )
        stats.recorded += 1
    env.close()
    return out


class TextCraftExpertSource:
    """`data=textcraft_expert`: a data source that records `n` expert trajectories with `seed`.

    Recording is deterministic, so the result is cached as JSONL under
    `<cache_dir>/textcraft_expert/` (keyed by n, seed, max_steps and the recorder version): later runs read
    it instead of playing the episodes again. The cache file is written atomically.
    """

    #: bump when the expert's output changes, so stale caches are not reused
    VERSION = 1

    def __init__(self, n: int = 64, seed: int = 0, max_steps: int = DEFAULT_MAX_STEPS, cache_dir: str | None = None):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"data.sources: textcraft expert n={n!r}; expected a positive integer")
        self.n, self.seed, self.max_steps = n, int(seed), int(max_steps)
        self.cache_dir = cache_dir
        self.stats = RecordStats()

    def describe(self) -> str:
        return f"textcraft_expert(n={self.n}, seed={self.seed})"

    def cache_path(self) -> Path | None:
        if not self.cache_dir:
            return None
        name = f"v{self.VERSION}_n{self.n}_seed{self.seed}_max{self.max_steps}.jsonl"
        return Path(self.cache_dir).expanduser() / "textcraft_expert" / name

    def iter_trajectories(self) -> Iterator[Trajectory]:
        path = self.cache_path()
        if path is not None and path.exists():
            log.info("textcraft expert: reading cached trajectories from %s", path)
            for lineno, d in iter_jsonl(path):
                yield Trajectory.from_dict(d, source=f"{path}:{lineno}")
            return
        trajs = record_expert_trajectories(self.n, self.seed, self.max_steps, stats=self.stats)
        if self.stats.dropped:
            log.info(
                "textcraft expert: %d sampled goals replaced (%d over the %d-step budget, %d uncraftable)",
                self.stats.dropped, self.stats.over_budget, self.max_steps, self.stats.uncraftable,
            )
        if path is not None:
            write_jsonl(path, (t.to_dict() for t in trajs))
        yield from trajs


__all__ = [
    "ACK",
    "ExpertFailed",
    "RecordStats",
    "TextCraftExpertSource",
    "expert_turns",
    "record_expert_trajectories",
]
