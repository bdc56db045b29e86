"""BabyAI (minigrid) with AgentGym's high-level text interface, written from the AgentTraj-L trajectories.

What replaying the real data pins down (wording, scoring, versions, costs): docs/envs.md#babyai."""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections import deque
from dataclasses import dataclass

from atlas_exp.envs.base import Env, EpisodeSpec, StepResult, agentgym_action
from atlas_exp.errors import DataError

#: The first human turn of every AgentTraj-L BabyAI conversation, verbatim.
INSTRUCTION = (
    "You are an exploration master that wants to finish every goal you are given. Every round I will give you "
    "an observation, and you have to respond an action and your thought based on the observation to finish the "
    "given task. You are placed in a room and you need to accomplish the given goal with actions.\n\n"
    "You can use the following actions: \n\n- turn right \n\n- turn left \n\n- move forward \n\n"
    "- go to <obj> <id> \n\n- pick up <obj> <id> \n\n"
    "- go through <door> <id>: <door> must be an open door. \n\n"
    "- toggle and go through <door> <id>: <door> can be a closed door or a locked door. If you want to open a "
    "locked door, you need to carry a key that is of the same color as the locked door. \n\n"
    "- toggle: there is a closed or locked door right in front of you and you can toggle it.\n"
    "Your response should use the following format:\nThought:\n<Your Thought>\n\nAction:\n<Your Action>"
)

#: AgentGym's 40 BabyAI levels; item i plays LEVELS[i % 40] (each `BabyAI-<name>-v0`).
LEVELS = (
    "GoToRedBallGrey", "GoToRedBall", "GoToRedBallNoDists", "GoToObjS6", "GoToLocalS8N7", "GoToObjMazeS7",
    "GoToImpUnlock", "GoToSeqS5R2", "GoToRedBlueBall", "GoToDoor", "GoToObjDoor", "Open", "OpenRedDoor",
    "OpenDoorLoc", "OpenRedBlueDoorsDebug", "OpenDoorsOrderN4Debug", "Pickup", "UnblockPickup",
    "PickupLoc", "PickupDistDebug", "PickupAbove", "PutNextLocalS6N4", "PutNextS7N4Carrying", "Unlock",
    "UnlockLocalDist", "KeyInBox", "UnlockPickupDist", "BlockedUnlockPickup", "UnlockToUnlock",
    "ActionObjDoor", "FindObjS7", "KeyCorridorS6R3", "OneRoomS20", "MoveTwoAcrossS8N9", "SynthS5R2",
    "SynthLoc", "SynthSeq", "MiniBossLevel", "BossLevel", "BossLevelNoUnlock",
)

#: High-level actions per episode before it ends unfinished (the longest AgentTraj-L trajectory has 19).
DEFAULT_MAX_STEPS = 20

NOT_RECOGNIZED = "The action is not recognized. Please check valid actions."
NO_CHANGE = "No change in state."
BARRIER = "There is a barrier in front of you, you can't move forward."

_ITEM = re.compile(r"^babyai_(\d+)$")

# minigrid primitive actions
_LEFT, _RIGHT, _FORWARD, _PICKUP, _DROP, _TOGGLE = 0, 1, 2, 3, 4, 5
_DIRS = ((1, 0), (0, 1), (-1, 0), (0, -1))


@dataclass(frozen=True)
class BabyAIEpisode(EpisodeSpec):
    """A BabyAI level name (without `BabyAI-`/`-v0`) and the seed it is reset with."""

    level: str = ""
    seed: int = 0

    @classmethod
    def from_item(cls, item: int | str) -> "BabyAIEpisode":
        """AgentGym's item index (or `"babyai_<i>"`) -> its level and seed."""
        if isinstance(item, str):
            m = _ITEM.match(item.strip())
            if m is None:
                raise DataError(f"not a BabyAI item id (expected 'babyai_<i>'): {item!r}")
            item = int(m.group(1))
        if item < 0:
            raise ValueError(f"item index must be >= 0, got {item}")
        return cls(id=f"babyai_{item}", level=LEVELS[item % len(LEVELS)], seed=item // len(LEVELS))


def _make(level: str):
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")  # minigrid imports pygame, which greets on stdout
    import gymnasium as gym
    import minigrid  # noqa: F401  (registers the BabyAI levels)

    return gym.make(f"BabyAI-{level}-v0").unwrapped


def _quiet_reset(env, seed: int) -> None:
    """minigrid's level generator prints every rejected sample; keep stdout clean."""
    with contextlib.redirect_stdout(io.StringIO()):
        env.reset(seed=seed)


@dataclass
class _Seen:
    name: str  # "grey key", "blue locked door"
    number: int
    pos: tuple[int, int]
    forward: int
    side: int  # > 0: right
    kind: str  # minigrid type

    @property
    def label(self) -> str:
        return f"{self.name} {self.number}"


class BabyAIEnv(Env):
    """BabyAI levels with AgentGym's text interface; one episode at a time.

    `reset(BabyAIEpisode)` plays a (level, seed); `reset(i: int)` plays AgentGym item `babyai_<i>`.
    """

    name = "babyai"

    def __init__(self, max_steps: int = DEFAULT_MAX_STEPS):
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.max_steps = max_steps
        self.episode: BabyAIEpisode | None = None
        self._env = None
        self._envs: dict[str, object] = {}
        self.steps_taken = 0
        self.done = False
        self._reward = 0.0
        self._terminated = False
        self._truncated = False

    # ------------------------------------------------------------------------------------------ protocol

    def instruction(self) -> str:
        return INSTRUCTION

    def reset(self, episode: EpisodeSpec | int) -> str:
        if isinstance(episode, bool) or not isinstance(episode, (int, BabyAIEpisode)):
            raise TypeError(f"BabyAIEnv.reset takes a BabyAIEpisode or an item index, got {type(episode).__name__}")
        if isinstance(episode, int):
            episode = BabyAIEpisode.from_item(episode)
        if episode.level not in self._envs:
            self._envs[episode.level] = _make(episode.level)
        self._env = self._envs[episode.level]
        _quiet_reset(self._env, episode.seed)
        self.episode = episode
        self.steps_taken = 0
        self.done = False
        self._reward, self._terminated, self._truncated = 0.0, False, False
        return f"Your goal: {self.mission}\n{self.describe()}"

    def step(self, action: str) -> StepResult:
        if self._env is None:
            raise RuntimeError("call reset() before step()")
        if self.done:
            raise RuntimeError("the episode is over; call reset() to start another")
        available = self.available_actions()
        action = action.lower()
        recognized = action in available or self._recognized(action)
        obs = self._execute(action, available) if recognized else NOT_RECOGNIZED
        self.steps_taken += 1
        success = self._terminated and self._reward > 0.5
        truncated = not success and (self.steps_taken >= self.max_steps or self._truncated or self._terminated)
        self.done = success or truncated
        return StepResult(
            observation=obs,
            reward=float(self._reward),
            done=self.done,
            success=success,
            info={"recognized": recognized, "steps": self.steps_taken, "truncated": truncated,
                  "primitive_steps": int(self._env.step_count)},
        )

    def action_from_reply(self, reply: str) -> str | None:
        """What AgentGym's BabyAI client sent when the data were recorded: the text after the first "Action:"
        (up to a second one), stripped, as written: an action spanning two lines or ending in a full stop is
        "not recognized", as in the data's 21 such turns (`base.agentgym_action`); None without "Action:"."""
        return agentgym_action(reply)

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()
        self._env = None

    # ------------------------------------------------------------------------------------------ state

    @property
    def mission(self) -> str:
        """The mission as the data word it: sequence connectives (", then ", " after you ") read as "and"."""
        return self._env.mission.replace(", then ", ", and ").replace(" after you ", " and ")

    def _visible(self) -> tuple[list[_Seen], set[tuple[int, int]], tuple[str, int] | None]:
        """Visible objects (ordered, numbered), visible world cells, and what is straight ahead."""
        env = self._env
        grid, vis = env.gen_obs_grid()
        vs = env.agent_view_size
        ax, ay = env.agent_pos
        dx, dy = _DIRS[env.agent_dir]
        rx, ry = -dy, dx
        raw, cells = [], set()
        for i in range(vs):
            for j in range(vs):
                if not vis[i, j]:
                    continue
                fwd, side = vs - 1 - j, i - vs // 2
                pos = (ax + fwd * dx + side * rx, ay + fwd * dy + side * ry)
                if not (0 <= pos[0] < env.width and 0 <= pos[1] < env.height):
                    continue
                cells.add(pos)
                obj = grid.get(i, j)
                if obj is None or obj.type in ("wall", "floor", "lava", "goal") or (fwd == 0 and side == 0):
                    continue
                if obj.type == "door":
                    state = "open" if obj.is_open else ("locked" if obj.is_locked else "closed")
                    name = f"{obj.color} {state} door"
                else:
                    name = f"{obj.color} {obj.type}"
                raw.append((fwd, side, name, pos, obj.type))
        raw.sort(key=lambda t: (t[0] + abs(t[1]), abs(t[1]), t[1]))
        counts: dict[str, int] = {}
        seen = []
        for fwd, side, name, pos, kind in raw:
            counts[name] = counts.get(name, 0) + 1
            seen.append(_Seen(name, counts[name], pos, fwd, side, kind))
        ahead = None
        for k in range(1, vs):
            cell = grid.get(vs // 2, vs - 1 - k)
            if not vis[vs // 2, vs - 1 - k]:
                break
            if cell is not None and (cell.type in ("wall", "box") or (cell.type == "door" and not cell.is_open)):
                ahead = (cell.type, k)
                break
        return seen, cells, ahead

    def _sees_wall(self) -> bool:
        grid, vis = self._env.gen_obs_grid()
        return any(vis[i, j] and (c := grid.get(i, j)) is not None and c.type == "wall"
                   for i in range(grid.width) for j in range(grid.height))

    def describe(self) -> str:
        seen, _, ahead = self._visible()
        carrying = self._env.carrying
        carry = f"You are carrying a {carrying.color} {carrying.type}." if carrying else "You are not carrying anything."
        facing = ""
        if ahead is not None and ahead[0] != "door":
            facing = f"You are facing a {ahead[0]} {ahead[1]} steps away. "
        if not seen and not self._sees_wall():
            return "You cannot see any objects within sight.The room has walls around you. " + carry
        parts = []
        for s in seen:
            if s.side == 0:
                parts.append(f"There is a {s.label} right in front of you {s.forward} steps away.  ")
            else:
                lr = "right" if s.side > 0 else "left"
                parts.append(f"There is a {s.label} {s.forward} steps in front of you and {abs(s.side)} steps to your {lr}.  ")
        return ("In front of you in this room, you can see several objects: " + "".join(parts)
                + "The room has walls around you. " + facing + carry)

    def available_actions(self) -> list[str]:
        env = self._env
        seen, _, _ = self._visible()
        front = env.grid.get(*env.front_pos)
        acts = ["turn left", "turn right"]
        if front is None or front.type != "wall":
            acts.append("move forward")
        if env.carrying is not None:
            acts.append("drop")
        else:
            acts += [f"pickup {s.label}" for s in seen if s.kind in ("ball", "key", "box")]
        doors = [s for s in seen if s.kind == "door"]
        for s in doors:
            if "closed" in s.name or ("locked" in s.name and env.carrying is not None and env.carrying.type == "key"):
                acts.append(f"toggle and go through {s.label}")
        if front is not None and front.type == "door" and not front.is_open and (
            not front.is_locked or (env.carrying is not None and env.carrying.type == "key"
                                    and env.carrying.color == front.color)
        ):
            acts.append("toggle")
        acts += [f"go through {s.label}" for s in doors if "open" in s.name]
        acts += [f"go to {s.label}" for s in seen]
        acts.append("check available actions")
        return acts

    # ------------------------------------------------------------------------------------------ actions

    def _recognized(self, action: str) -> bool:
        """Actions the server understands beyond the listed ones: `move forward` always, and any door action
        on a visible door (it then explains why it cannot be done)."""
        if action == "move forward":
            return True
        seen, _, _ = self._visible()
        doors = {s.label for s in seen if s.kind == "door"}
        for verb in ("toggle and go through ", "go through "):
            if action.startswith(verb) and action[len(verb):] in doors:
                return True
        return False

    def _prim(self, a: int) -> None:
        """One primitive step. Like AgentGym, a macro action plays all its primitive steps and only the last
        step's reward/termination counts (passing by the goal object mid-way does not end the episode)."""
        _, r, term, trunc, _ = self._env.step(a)
        self._reward, self._terminated, self._truncated = float(r), bool(term), bool(trunc)

    def _path_to_face(self, target: tuple[int, int], cells: set[tuple[int, int]] | None = None) -> list[int] | None:
        """Shortest primitive-action sequence ending with the agent facing `target` (BFS over (pos, dir)),
        walking over passable cells (restricted to `cells` when given; None: the whole grid)."""
        env = self._env
        start = (tuple(int(v) for v in env.agent_pos), int(env.agent_dir))

        def free(p):
            if cells is not None and p not in cells and p != start[0]:
                return False
            c = env.grid.get(*p)
            return c is None or c.type in ("floor", "goal") or (c.type == "door" and c.is_open)

        prev = {start: None}
        q = deque([start])
        while q:
            state = q.popleft()
            (x, y), d = state
            dx, dy = _DIRS[d]
            if (x + dx, y + dy) == target:
                acts = []
                while prev[state] is not None:
                    state, a = prev[state]
                    acts.append(a)
                return acts[::-1]
            nxt = [(((x, y), (d - 1) % 4), _LEFT), (((x, y), (d + 1) % 4), _RIGHT)]
            if free((x + dx, y + dy)):
                nxt.append((((x + dx, y + dy), d), _FORWARD))
            for ns, a in nxt:
                if ns not in prev:
                    prev[ns] = (state, a)
                    q.append(ns)
        return None

    def _go_to(self, target: _Seen) -> bool:
        """Walk to face `target`; False (and no move) when there is no path."""
        path = self._path_to_face(target.pos)
        if path is None:
            return False
        for a in path:
            self._prim(a)
        return True

    def _execute(self, action: str, available: list[str]) -> str:
        env = self._env
        if action == "check available actions":
            return "You can take the following actions: " + ", ".join(available)
        if action in ("turn left", "turn right"):
            self._prim(_LEFT if action == "turn left" else _RIGHT)
            return self.describe()
        if action == "move forward":
            front = env.grid.get(*env.front_pos)
            if front is not None and front.type in ("wall", "box"):
                return BARRIER
            self._prim(_FORWARD)
            return self.describe()
        if action == "drop":
            if env.grid.get(*env.front_pos) is not None:
                return "You cannot drop the object, as there is already an object in front of you."
            self._prim(_DROP)
            return self.describe()
        if action == "toggle":
            self._prim(_TOGGLE)
            return self.describe()
        seen, _, _ = self._visible()
        by_label = {s.label: s for s in seen}
        for verb in ("toggle and go through", "go through", "go to", "pickup"):
            if action.startswith(verb + " "):
                label = action[len(verb) + 1:]
                break
        target = by_label[label]
        if verb == "go to":
            if tuple(env.front_pos) == target.pos:
                return NO_CHANGE
            if not self._go_to(target):
                return f"You cannot go to {label}, as there is no path leading to it."
            return self.describe()
        if verb == "pickup":
            if tuple(env.front_pos) != target.pos and not self._go_to(target):
                return f"You cannot pickup {label}, as there is no path leading to it."
            self._prim(_PICKUP)
            return self.describe()
        # doors: the key is checked before walking
        door = env.grid.get(*target.pos)
        if verb == "toggle and go through" and door.is_locked:
            if env.carrying is None or env.carrying.type != "key":
                return f"You cannot toggle and go through {label}, as you are not carrying a key."
            if env.carrying.color != door.color:
                return (f"You cannot toggle and go through {label}, as the color of the key you are carrying "
                        "does not match the color of door.")
        if tuple(env.front_pos) != target.pos and not self._go_to(target):
            return f"You cannot {verb} {label}, as there is no path leading to it."
        if verb == "toggle and go through":
            self._prim(_TOGGLE)
        self._prim(_FORWARD)
        return self.describe()


__all__ = ["DEFAULT_MAX_STEPS", "INSTRUCTION", "LEVELS", "BabyAIEnv", "BabyAIEpisode"]
