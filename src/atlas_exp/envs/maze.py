"""LMRL-Gym's Maze (the fully observed `double_t_maze`) with AgentGym's wording, written from the AgentTraj-L data.

What replaying the real data pins down (wording, scoring, versions, costs): docs/envs.md#maze-lmrl-gym."""

from __future__ import annotations

from dataclasses import dataclass

from atlas_exp.envs.base import (
    Env,
    EpisodeSpec,
    StepResult,
    agentgym_action,
    item_number,
)
from atlas_exp.errors import DataError

#: The first human turn of every AgentTraj-L Maze conversation, verbatim.
INSTRUCTION = "You are an expert maze solver."

#: AgentGym's Maze client's fixed text before the first observation (verbatim from the data: the first
#: observation is this, a newline, then the start observation).
PREAMBLE = (
    "Your objective is to reach the goal in as few steps as possible. At each step you will be given information about where the goal is, your current position,\n"
    "and the walls that surround you. \n"
    "\n"
    "When you move right you increase your y position by 1, when you move down you increase your x position by 1. \n"
    "\n"
    "Here is an example.\n"
    "\n"
    "```\n"
    "environment: The goal is at position 8, 6. Your current position is at position 5, 6. There is a wall above you.\n"
    "action: move left\n"
    "environment: The goal is at position 8, 6. Your current position is at position 5, 5. There are walls above you, below you.\n"
    "action: move left\n"
    "environment: The goal is at position 8, 6. Your current position is at position 5, 4. There are walls above you, below you.\n"
    "action: move up\n"
    "environment: The goal is at position 8, 6. Your current position is at position 5, 4. There are walls above you, below you.\n"
    "action: move left\n"
    "environment: The goal is at position 8, 6. Your current position is at position 5, 3. There are walls to your left, below you.\n"
    "action: move down\n"
    "environment: The goal is at position 8, 6. Your current position is at position 5, 3. There are walls to your left, below you.\n"
    "action: move left\n"
    "environment: The goal is at position 8, 6. Your current position is at position 5, 3. There are walls to your left, below you.\n"
    "action: move down\n"
    "environment: The goal is at position 8, 6. Your current position is at position 5, 3. There are walls to your left, below you.\n"
    "action: move left\n"
    "environment: The goal is at position 8, 6. Your current position is at position 5, 3. There are walls to your left, below you.\n"
    "action: move right\n"
    "environment: The goal is at position 8, 6. Your current position is at position 5, 4. There are walls above you, below you.\n"
    "action: move down\n"
    "environment: The goal is at position 8, 6. Your current position is at position 5, 4. There are walls above you, below you.\n"
    "action: move right\n"
    "environment: The goal is at position 8, 6. Your current position is at position 5, 5. There are walls above you, below you.\n"
    "action: move right\n"
    "environment: The goal is at position 8, 6. Your current position is at position 5, 6. There is a wall above you.\n"
    "action: move down\n"
    "environment: The goal is at position 8, 6. Your current position is at position 6, 6. There are walls to your right, to your left.\n"
    "action: move down\n"
    "environment: The goal is at position 8, 6. Your current position is at position 7, 6. There are walls to your right, to your left.\n"
    "action: move right\n"
    "environment: The goal is at position 8, 6. Your current position is at position 7, 6. There are walls to your right, to your left.\n"
    "action: move down\n"
    "environment: Success\n"
    "```\n"
    "\n"
    "Your possible actions are \"move up\", \"move down\", \"move left\", \"move right\". Formally, your return should be in this format:\n"
    "Thought:\n"
    "<Your Thought>\n"
    "\n"
    "Action:\n"
    "<Your Action>\n"
    "\n"
    "Now let's start a new game. Return your action and your thought in the format above strictly. Now, make the optimal action given the current environment state:"
)

#: The maze, row by row ('#' wall, '.' free): two T-junctions on top of a vertical corridor down to the goal.
LAYOUT = (
    "#############",
    "#.....#.....#",
    "###.#####.###",
    "###.#####.###",
    "###.#####.###",
    "###.......###",
    "######.######",
    "######.######",
    "######.######",
    "#############",
)

GOAL = (8, 6)

#: AgentGym's start cells: item n starts at STARTS[n] (all 26 free cells; the last is the goal).
STARTS: tuple[tuple[int, int], ...] = (
    (1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (1, 7), (1, 8), (1, 9), (1, 10), (1, 11),
    (2, 3), (3, 3), (4, 3), (5, 3), (5, 4), (5, 5), (5, 6), (6, 6), (7, 6),
    (5, 7), (5, 8), (5, 9), (4, 9), (3, 9), (2, 9), (8, 6),
)

#: The four actions and their (row, column) steps.
MOVES: dict[str, tuple[int, int]] = {
    "move up": (-1, 0),
    "move down": (1, 0),
    "move left": (0, -1),
    "move right": (0, 1),
}

#: Non-goal steps before the next one ends the episode with `FAILURE` (the server's `max_steps`).
DEFAULT_MAX_STEPS = 50

SUCCESS = "Success\n"
FAILURE = "Failure\n"

#: the walls around a cell are named in this order
_WALL_NAMES = (("to your right", (0, 1)), ("to your left", (0, -1)), ("above you", (-1, 0)), ("below you", (1, 0)))

#: item id prefixes: AgentTraj-L's, and the short form
ITEM_PREFIXES = ("lmrlgym_maze_", "maze_")


def is_free(cell: tuple[int, int]) -> bool:
    r, c = cell
    return 0 <= r < len(LAYOUT) and 0 <= c < len(LAYOUT[0]) and LAYOUT[r][c] == "."


def describe(position: tuple[int, int], goal: tuple[int, int] = GOAL) -> str:
    """The observation at `position`, with the data's trailing newline."""
    walls = [name for name, (dr, dc) in _WALL_NAMES if not is_free((position[0] + dr, position[1] + dc))]
    if not walls:
        wall_text = "There are no walls near you."
    elif len(walls) == 1:
        wall_text = f"There is a wall {walls[0]}."
    else:
        wall_text = f"There are walls {', '.join(walls)}."
    return (
        f"The goal is at position {goal[0]}, {goal[1]}. "
        f"Your current position is at position {position[0]}, {position[1]}. {wall_text}\n"
    )


@dataclass(frozen=True)
class MazeEpisode(EpisodeSpec):
    """A start cell (row, column) of the double T-maze; the goal is always `GOAL`."""

    start: tuple[int, int] = STARTS[0]

    def __post_init__(self) -> None:
        start = tuple(self.start)
        if len(start) != 2 or not is_free(start):  # type: ignore[arg-type]
            raise DataError(f"maze start {self.start!r} is not a free cell of the double T-maze")
        object.__setattr__(self, "start", start)

    @classmethod
    def from_item(cls, item: int | str) -> MazeEpisode:
        """AgentGym's item index (or `"lmrlgym_maze_<n>"`) -> its start cell."""
        item = item_number(item, ITEM_PREFIXES, "Maze")
        if item >= len(STARTS):
            raise DataError(f"Maze item {item} out of range: AgentGym's items are 0..{len(STARTS) - 1}")
        return cls(id=f"lmrlgym_maze_{item}", start=STARTS[item])


class MazeEnv(Env):
    """The double T-maze with AgentGym's wording; one episode at a time.

    `reset(MazeEpisode)` starts at a given cell; `reset(n: int)` plays AgentGym item `lmrlgym_maze_<n>`.
    `max_steps` is the server's cap on non-goal steps (50): the call after them answers `Failure\\n`.
    """

    name = "maze"

    def __init__(self, max_steps: int = DEFAULT_MAX_STEPS):
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.max_steps = max_steps
        self.episode: MazeEpisode | None = None
        self.position: tuple[int, int] | None = None
        self.steps_taken = 0
        self.done = False

    def instruction(self) -> str:
        return INSTRUCTION

    def reset(self, episode: EpisodeSpec | int) -> str:
        if isinstance(episode, bool) or not isinstance(episode, (int, MazeEpisode)):
            raise TypeError(f"MazeEnv.reset takes a MazeEpisode or an item index, got {type(episode).__name__}")
        if isinstance(episode, int):
            episode = MazeEpisode.from_item(episode)
        self.episode = episode
        self.position = episode.start
        self.steps_taken = 0
        self.done = False
        return f"{PREAMBLE}\n{describe(self.position)}"

    def step(self, action: str) -> StepResult:
        if self.position is None:
            raise RuntimeError("call reset() before step()")
        if self.done:
            raise RuntimeError("the episode is over; call reset() to start another")
        valid = action in MOVES
        # every earlier call was a non-goal step (the episode ends at the goal), so the server's cap on
        # non-goal steps is a cap on earlier calls
        capped = self.steps_taken >= self.max_steps
        if valid and not capped:
            dr, dc = MOVES[action]
            target = (self.position[0] + dr, self.position[1] + dc)
            if is_free(target):
                self.position = target
        self.steps_taken += 1
        success = not capped and self.position == GOAL
        self.done = capped or success
        if capped:
            observation, reward = FAILURE, -1.0
        elif success:
            observation, reward = SUCCESS, 1.0
        else:
            observation, reward = describe(self.position), 0.0
        return StepResult(
            observation=observation,
            reward=reward,
            done=self.done,
            success=success,
            info={"action": action, "recognized": valid, "position": self.position, "steps": self.steps_taken,
                  "truncated": capped},
        )

    def action_from_reply(self, reply: str) -> str | None:
        """What AgentGym's LMRL-Gym client sent when the data were recorded: the text after the first
        `Action:` (up to a second one), stripped; None when there is none (see `base.agentgym_action`)."""
        return agentgym_action(reply)


__all__ = [
    "DEFAULT_MAX_STEPS",
    "FAILURE",
    "GOAL",
    "INSTRUCTION",
    "LAYOUT",
    "MOVES",
    "PREAMBLE",
    "STARTS",
    "SUCCESS",
    "MazeEnv",
    "MazeEpisode",
    "describe",
    "is_free",
]
