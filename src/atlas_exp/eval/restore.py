"""Restoring a recorded trajectory's env state: which episode it was played in, what it recorded, and whether
replaying its replies reproduces it. `selector=rollout_value` restarts policy rollouts from these states.

Our envs are deterministic given the item and the actions; this is checked, not assumed: `replay_recording`
replays a trajectory in full and compares each observation with the recorded one (whitespace aside; with
`match="unordered"`, ScienceWorld's default there, also the order of lines and of words in a line, since
AgentGym's ScienceWorld listed objects in a random order), and every restart replays its prefix and checks it
again (`eval/rollout.py` `EpisodeStart`).

The episode is found from the trajectory: TextCraft from its first observation (goal and recipes), BabyAI and
ScienceWorld from their AgentGym item id (`babyai_12`, `sciworld_3`), ALFWorld from the game file in its meta
(`game_file`) or its id; an env object with an `episode_for_trajectory(id, first_observation, meta)` method
decides for itself (plugins, tests). A trajectory that cannot be restored (no item id, an env not configured
or not installed, a differing observation, an episode that ends before the recording does, tool-call turns)
raises NotRestorable, naming the step at fault.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from atlas_exp.data.trajectory import Trajectory
from atlas_exp.envs.base import Env, EpisodeSpec, StepResult
from atlas_exp.errors import AtlasError, ConfigError, DataError
from atlas_exp.eval.rollout import EpisodeStart, PrefixMismatch, replay


class NotRestorable(AtlasError):
    """A trajectory whose env state cannot be rebuilt; `step` is the recorded step at fault (-1: reset).
    `env_failed`: the env itself raised (it should be replaced), rather than disagreeing with the recording."""

    def __init__(self, message: str, step: int | None = None, env_failed: bool = False):
        super().__init__(message)
        self.step = step
        self.env_failed = env_failed


@dataclass
class Recording:
    """A trajectory as the env saw it: the conversation, the expert's replies and the observations.

    `observations[k]` is the text step k answers (k = 0..n-1), `observations[n]` the one after the last step
    when recorded. `history(k)` is the conversation up to observation k: what the policy continues from s_k.
    """

    messages: list[dict[str, str]]
    step_index: list[int]
    replies: list[str]
    observations: list[str]

    def history(self, k: int) -> tuple[dict[str, str], ...]:
        if k < len(self.step_index):
            return tuple(self.messages[: self.step_index[k]])
        return tuple(self.messages)

    def start(self, k: int, last_observation: str, match: str = "exact") -> EpisodeStart:
        """The restart at state s_k: the first k replies replayed, the conversation up to observation k.
        `last_observation` (the env's, from a full replay) ends the history of s_n when the recording has none."""
        history = self.history(k)
        if k == len(self.replies) and len(self.observations) == k:  # the last observation was not recorded
            history = history + ({"role": "user", "content": last_observation},)
        return EpisodeStart(history=history, replies=tuple(self.replies[:k]),
                            observations=tuple(self.observations[: k + 1]), match=match)


def recording(traj: Trajectory) -> Recording:
    """The recording of a ReAct trajectory; NotRestorable when its turns are not reply/observation pairs."""
    msgs = traj.messages
    if any(m.role == "tool" or getattr(m, "tool_calls", None) for m in msgs):
        raise NotRestorable("it has tool-call turns; only ReAct text trajectories (reply, observation) are replayed")
    idx = traj.step_message_index()
    if not idx:
        raise NotRestorable("it has no steps")
    if idx[0] == 0 or msgs[idx[0] - 1].role != "user":
        raise NotRestorable("its first step does not answer an observation (a user turn)", step=0)
    observations = [msgs[idx[0] - 1].content]
    for k, i in enumerate(idx):
        end = idx[k + 1] if k + 1 < len(idx) else len(msgs)
        between = msgs[i + 1 : end]
        if k + 1 < len(idx) and (len(between) != 1 or between[0].role != "user"):
            raise NotRestorable(f"the turns after step {k} are not one observation (user turn)", step=k)
        if k + 1 == len(idx) and between:
            if len(between) != 1 or between[0].role != "user":
                raise NotRestorable(f"the turns after the last step ({k}) are not one observation", step=k)
        if between:
            observations.append(between[0].content)
    return Recording(
        messages=[{"role": m.role, "content": m.content} for m in msgs],
        step_index=idx,
        replies=[msgs[i].content for i in idx],
        observations=observations,
    )


# --------------------------------------------------------------------------------------------------
# how a trajectory names its episode


def _textcraft(traj: Trajectory, first: str, env: Env) -> EpisodeSpec:
    from atlas_exp.envs.textcraft import TextCraftEpisode

    return TextCraftEpisode.from_observation(first, id=traj.id)


def _babyai(traj: Trajectory, first: str, env: Env) -> EpisodeSpec:
    from atlas_exp.envs.babyai import BabyAIEpisode

    return BabyAIEpisode.from_item(traj.id)


def _sciworld(traj: Trajectory, first: str, env: Env) -> EpisodeSpec:
    from atlas_exp.envs.sciworld_items import SciWorldEpisode

    return SciWorldEpisode.from_item(traj.id)


def _alfworld(traj: Trajectory, first: str, env: Env) -> EpisodeSpec:
    from atlas_exp.envs.alfworld import AlfworldEpisode

    return AlfworldEpisode.from_id(str(traj.meta.get("game_file") or traj.id), getattr(env, "split", None))


#: env name -> how a trajectory names its episode (trajectory, recorded first observation, env)
EPISODE_RULES: dict[str, Callable[[Trajectory, str, Env], EpisodeSpec]] = {
    "textcraft": _textcraft, "babyai": _babyai, "sciworld": _sciworld, "alfworld": _alfworld,
}


def episode_for(traj: Trajectory, first: str, env: Env) -> EpisodeSpec:
    """The episode of `env` a trajectory was recorded in (see the module docstring); NotRestorable if none."""
    hook = getattr(env, "episode_for_trajectory", None)
    try:
        if hook is not None:
            return hook(traj.id, first, dict(traj.meta))
        rule = EPISODE_RULES.get(traj.env)
        if rule is None:
            raise NotRestorable(f"no rule finds the {traj.env!r} episode of a trajectory (known: {', '.join(EPISODE_RULES)})")
        return rule(traj, first, env)
    except (DataError, ConfigError, ValueError) as e:
        raise NotRestorable(f"its {traj.env} episode cannot be found from the trajectory: {e}", step=-1) from None


# --------------------------------------------------------------------------------------------------
# the check


def replay_recording(env: Env, traj: Trajectory, rec: Recording, match: str = "exact") -> tuple[EpisodeSpec, list[StepResult]]:
    """Reset `env` to the trajectory's episode and replay every recorded reply, each observation checked;
    the episode and the step results, which end where the env ended the episode (a recording may go on after
    that). NotRestorable on any failure (`env_failed` when the env raised)."""
    try:
        spec = episode_for(traj, rec.observations[0], env)
        first = env.reset(spec)
        start = EpisodeStart(history=(), replies=tuple(rec.replies), observations=tuple(rec.observations), match=match)
        return spec, replay(env, first, start, stop_at_done=True)
    except NotRestorable:
        raise
    except PrefixMismatch as e:
        raise NotRestorable(f"replaying it: {e}", step=e.step) from None
    except AtlasError as e:
        raise NotRestorable(str(e)) from None
    except Exception as e:
        raise NotRestorable(f"replaying it, the env raised {type(e).__name__}: {e}", env_failed=True) from None


def describe_failure(traj: Trajectory, e: NotRestorable) -> str:
    """One line naming the trajectory, its env and the step at fault."""
    step = "" if e.step is None else (" at reset" if e.step < 0 else f" at step {e.step}")
    return f"trajectory {traj.id!r} ({traj.env}) cannot be restored{step}: {e}"
