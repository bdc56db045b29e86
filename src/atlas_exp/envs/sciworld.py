"""ScienceWorld with AgentGym's text interface, written from the AgentTraj-L sciworld trajectories.

What replaying the real data pins down (wording, scoring, versions, costs): docs/envs.md#scienceworld. The
item list is `sciworld_items` (no JVM needed), the JVM launcher `sciworld_jvm`."""

from __future__ import annotations

from atlas_exp.envs.base import Env, EpisodeSpec, StepResult, agentgym_action
from atlas_exp.envs.sciworld_items import SciWorldEpisode
from atlas_exp.envs.sciworld_jvm import DETERMINISTIC_JVM_ARGS, SciWorldJVM, default_jar
from atlas_exp.errors import ConfigError

#: The first human turn of every AgentTraj-L ScienceWorld conversation, verbatim.
INSTRUCTION = (
    "You are an agent for science world. Every round I will give you an observation, you have to respond an "
    "action based on the observation to finish the given task. Here are the actions you may take: "
    '[{"action": "open/close OBJ", "description": "open/close a container"}, '
    '{"action": "de/activate OBJ", "description": "activate/deactivate a device"}, '
    '{"action": "connect OBJ to OBJ", "description": "connect electrical components"}, '
    '{"action": "disconnect OBJ", "description": "disconnect electrical components"}, '
    '{"action": "use OBJ [on OBJ]", "description": "use a device/item"}, '
    '{"action": "look around", "description": "describe the current room"}, '
    '{"action": "look at OBJ", "description": "describe an object in detail"}, '
    '{"action": "look in OBJ", "description": "describe a container\'s contents"}, '
    '{"action": "read OBJ", "description": "read a note or book"}, '
    '{"action": "move OBJ to OBJ", "description": "move an object to a container"}, '
    '{"action": "pick up OBJ", "description": "move an object to the inventory"}, '
    '{"action": "put down OBJ", "description": "drop an inventory item"}, '
    '{"action": "pour OBJ into OBJ", "description": "pour a liquid into a container"}, '
    '{"action": "dunk OBJ into OBJ", "description": "dunk a container into a liquid"}, '
    '{"action": "mix OBJ", "description": "chemically mix a container"}, '
    '{"action": "go to LOC", "description": "move to a new location"}, '
    '{"action": "eat OBJ", "description": "eat a food"}, '
    '{"action": "flush OBJ", "description": "flush a toilet"}, '
    '{"action": "focus on OBJ", "description": "signal intent on a task object"}, '
    '{"action": "wait", "description": "take no action for 10 iterations"}, '
    '{"action": "wait1", "description": "take no action for 1 iteration"}, '
    '{"action": "task", "description": "describe current task"}, '
    '{"action": "inventory", "description": "list your inventory"}]\n'
    "Your response should use the following format:\nThought:\nyour thoughts.\n\nAction:\nyour next action"
)

#: The ScienceWorld simplifications the data were recorded with (docs/envs.md#scienceworld).
DEFAULT_SIMPLIFICATIONS = "easy"

#: Actions per episode before it ends unfinished. The longest AgentTraj-L trajectory has 54 actions; an
#: evaluator usually sets its own turn cap below this.
DEFAULT_MAX_STEPS = 100

#: AgentGym's server ends an episode after this many ScienceWorld moves (the package's `envStepLimit`
#: default). Moves are ScienceWorld's clock ticks, not actions: looking costs none, "wait1" 2, "wait" 11.
DEFAULT_ENV_STEP_LIMIT = 100

NO_KNOWN_ACTION = "No known action matches that input."


class SciWorldEnv(Env):
    """ScienceWorld 1.0.2 with AgentGym's text interface; one episode at a time, one JVM per env.

    `reset(SciWorldEpisode)` plays a (task, variation); `reset(i: int)` plays AgentGym item `sciworld_<i>`.
    The JVM starts on the first reset and serves every later one; `close()` (or leaving a `with` block)
    stops it.

    Scores: `info["raw_score"]` is ScienceWorld's integer score as AgentGym reports it (0..100, -100 once
    failed); `info["score"]` is the same floored at 0 and scaled to 0..1 (a failed task has made no
    progress), and `reward` is the step's change of `info["score"]`, so an episode's rewards sum to its
    final score.

    Options: `simplifications` is ScienceWorld's comma-separated list or "easy" (the data's, see
    docs/envs.md#scienceworld); `env_step_limit` ends the episode after that many ScienceWorld moves as
    AgentGym's server did; `java`/`jar` name the runtime and the game (default: `java` on PATH and the
    package's jar); `port` fixes the py4j port (default: a free one); `deterministic` fixes the object
    listing order.
    """

    name = "sciworld"

    def __init__(
        self,
        max_steps: int = DEFAULT_MAX_STEPS,
        simplifications: str = DEFAULT_SIMPLIFICATIONS,
        env_step_limit: int = DEFAULT_ENV_STEP_LIMIT,
        java: str = "java",
        jar: str | None = None,
        port: int | None = None,
        deterministic: bool = True,
    ):
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ConfigError(f"max_steps must be an int >= 1, got {max_steps!r}")
        if isinstance(env_step_limit, bool) or not isinstance(env_step_limit, int) or env_step_limit < 1:
            raise ConfigError(f"env_step_limit must be an int >= 1, got {env_step_limit!r}")
        if port is not None and not (isinstance(port, int) and 0 < port < 65536):
            raise ConfigError(f"port must be an int in 1..65535 or None (a free port), got {port!r}")
        known = {"teleportAction", "openDoors", "selfWateringFlowerPots", "openContainers", "noElectricalAction"}
        parts = [p.strip() for p in simplifications.split(",") if p.strip()]
        bad = [p for p in parts if p not in known | {"easy"}]
        if bad:
            raise ConfigError(
                f"simplifications: unknown {', '.join(bad)}; use 'easy' (the data's) or a comma-separated "
                f"subset of {', '.join(sorted(known))}"
            )
        self.max_steps = max_steps
        self.simplifications = ",".join(parts)
        self.env_step_limit = env_step_limit
        self.java = java
        self.jar = jar
        self.port = port
        self.deterministic = deterministic
        self._server: SciWorldJVM | None = None
        self.episode: SciWorldEpisode | None = None
        self.steps_taken = 0
        self.done = False
        self.raw_score = 0  # ScienceWorld's integer score (0..100, -100 once failed)

    # ------------------------------------------------------------------------------------------ protocol

    def instruction(self) -> str:
        return INSTRUCTION

    def reset(self, episode: EpisodeSpec | int) -> str:
        if isinstance(episode, bool) or not isinstance(episode, (int, SciWorldEpisode)):
            raise TypeError(f"SciWorldEnv.reset takes a SciWorldEpisode or an item index, got {type(episode).__name__}")
        if isinstance(episode, int):
            episode = SciWorldEpisode.from_item(episode)
        if "noElectricalAction" in self.simplifications.split(",") and (
            "power-component" in episode.task or "conductivity" in episode.task
        ):
            raise ConfigError(f"simplifications: noElectricalAction makes {episode.task} unsolvable")
        gw = self._gateway()
        self.episode = None  # not playable until the load below has worked
        gw.load(episode.task, episode.variation, self.simplifications, False)
        task_description = gw.getTaskDescription()
        look = gw.step("look around")  # as AgentGym's reset does
        self.episode = episode
        self.steps_taken = 0
        self.done = False
        self.raw_score = self._raw_score(gw)
        return f"{task_description}\n{look}"

    def step(self, action: str) -> StepResult:
        if self.episode is None or self._server is None:
            raise RuntimeError("call reset() before step()")
        if self.done:
            raise RuntimeError("the episode is over; call reset() to start another")
        gw = self._server.gateway
        observation = gw.step(action)
        before = self.score
        self.raw_score = self._raw_score(gw)
        completed = bool(gw.getCompleted())
        moves = int(gw.getNumMoves())
        self.steps_taken += 1
        success = self.raw_score >= 100
        failed = self.raw_score < 0
        # AgentGym's server (the package's `step`): done when completed, failed, or past the move limit
        out_of_moves = moves > self.env_step_limit
        env_done = completed or failed or out_of_moves
        truncated = not (completed or failed) and (out_of_moves or self.steps_taken >= self.max_steps)
        self.done = env_done or truncated
        return StepResult(
            observation=observation,
            reward=self.score - before,
            done=self.done,
            success=success,
            info={
                "score": self.score,
                "raw_score": self.raw_score,
                "completed": completed,
                "failed": failed,
                "moves": moves,
                "steps": self.steps_taken,
                "truncated": truncated,
                "recognized": observation != NO_KNOWN_ACTION,
            },
        )

    @property
    def score(self) -> float:
        """Progress in 0..1: ScienceWorld's score / 100, a failed task counting 0."""
        return max(self.raw_score, 0) / 100.0

    def action_from_reply(self, reply: str) -> str | None:
        """What AgentGym's ScienceWorld client sends for a reply: the text after the first "Action:" up to a
        second "Action:" if any, stripped (it may span lines; ScienceWorld then answers that no action
        matches). A reply without "Action:" is sent whole by AgentGym; here it gives None (the evaluator's
        fallback), like a reply whose action is empty. A trailing "</s>" is dropped (AgentGym cut five
        characters there, one too many; the data never show it)."""
        return agentgym_action(reply)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self.episode = None

    # ------------------------------------------------------------------------------------------ helpers

    def _gateway(self):
        if self._server is not None and self._server.proc.poll() is not None:
            self._server.close()  # the JVM died (killed, out of memory): start a fresh one
            self._server = None
        if self._server is None:
            jvm_args = DETERMINISTIC_JVM_ARGS if self.deterministic else ()
            self._server = SciWorldJVM(self.java, self.jar or default_jar(), self.port, jvm_args)
        return self._server.gateway

    @staticmethod
    def _raw_score(gw) -> int:
        return round(100 * gw.getScore())

    def goal_progress(self) -> str:
        """ScienceWorld's list of the task's sub-goals and which are done (for debugging an episode)."""
        if self._server is None or self.episode is None:
            raise RuntimeError("call reset() first")
        return str(self._server.gateway.getGoalProgressStr())

    def possible_actions(self) -> list[str]:
        """The valid action strings in the current state (slow: ScienceWorld enumerates all combinations)."""
        if self._server is None or self.episode is None:
            raise RuntimeError("call reset() first")
        return list(self._server.gateway.getValidActionObjectCombinations())



__all__ = [
    "DEFAULT_ENV_STEP_LIMIT",
    "DEFAULT_MAX_STEPS",
    "DEFAULT_SIMPLIFICATIONS",
    "INSTRUCTION",
    "NO_KNOWN_ACTION",
    "SciWorldEnv",
]
