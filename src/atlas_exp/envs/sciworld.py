"""ScienceWorld with AgentGym's text interface, written from the AgentTraj-L sciworld trajectories.

What replaying the real data pins down (wording, scoring, versions, costs): docs/envs.md#scienceworld."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass
from typing import Any

from atlas_exp.envs.base import Env, EpisodeSpec, StepResult, agentgym_action
from atlas_exp.errors import ConfigError, DataError

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

#: The ScienceWorld simplifications the data were recorded with (see the module docstring).
DEFAULT_SIMPLIFICATIONS = "easy"

#: HotSpot options that make identity hash codes, hence object listing order, the same in every run.
DETERMINISTIC_JVM_ARGS = ("-XX:+UnlockExperimentalVMOptions", "-XX:hashCode=2")

#: Actions per episode before it ends unfinished. The longest AgentTraj-L trajectory has 54 actions; an
#: evaluator usually sets its own turn cap below this.
DEFAULT_MAX_STEPS = 100

#: AgentGym's server ends an episode after this many ScienceWorld moves (the package's `envStepLimit`
#: default). Moves are ScienceWorld's clock ticks, not actions: looking costs none, "wait1" 2, "wait" 11.
DEFAULT_ENV_STEP_LIMIT = 100

#: Seconds to wait for the JVM to accept connections.
JVM_START_TIMEOUT = 60.0

NO_KNOWN_ACTION = "No known action matches that input."


@dataclass(frozen=True)
class SciWorldTask:
    """One ScienceWorld task as AgentGym lists it.

    `key` is AgentGym's id ("1-1"), `name` the 1.0.2 jar's task name ("task-1-boil"); the variations
    0..n_variations-1 split into train (the first `n_train`), dev (the next `n_dev`) and test (the rest),
    as ScienceWorld's `getVariationsTrain/Dev/Test` return them (contiguous ranges in 1.0.2).
    """

    key: str
    name: str
    n_variations: int
    n_train: int
    n_dev: int

    def split_of(self, variation: int) -> str:
        if variation < self.n_train:
            return "train"
        return "dev" if variation < self.n_train + self.n_dev else "test"


#: AgentGym's task list, in its order, without the tasks it leaves out (5-*, 9-*, 10-*, 2-3). Counts are
#: those of the `scienceworld==1.0.2` jar (checked against the JVM in the tests).
TASKS: tuple[SciWorldTask, ...] = (
    SciWorldTask("1-1", "task-1-boil", 30, 14, 7),
    SciWorldTask("1-2", "task-1-melt", 30, 14, 7),
    SciWorldTask("1-3", "task-1-freeze", 30, 14, 7),
    SciWorldTask("1-4", "task-1-change-the-state-of-matter-of", 30, 14, 7),
    SciWorldTask("2-1", "task-10-use-thermometer", 540, 270, 135),
    SciWorldTask("2-2", "task-10-measure-melting-point-(known-substance)", 436, 218, 109),
    SciWorldTask("3-1", "task-2-power-component", 20, 10, 5),
    SciWorldTask("3-2", "task-2-power-component-(renewable-vs-nonrenewable-energy)", 20, 10, 5),
    SciWorldTask("3-3", "task-2a-test-conductivity", 900, 450, 225),
    SciWorldTask("3-4", "task-2a-test-conductivity-of-unknown-substances", 600, 300, 150),
    SciWorldTask("4-1", "task-3-find-living-thing", 300, 150, 75),
    SciWorldTask("4-2", "task-3-find-non-living-thing", 300, 150, 75),
    SciWorldTask("4-3", "task-3-find-plant", 300, 150, 75),
    SciWorldTask("4-4", "task-3-find-animal", 300, 150, 75),
    SciWorldTask("6-1", "task-5-chemistry-mix", 32, 16, 8),
    SciWorldTask("6-2", "task-5-chemistry-mix-paint-(secondary-color)", 36, 18, 9),
    SciWorldTask("6-3", "task-5-chemistry-mix-paint-(tertiary-color)", 36, 18, 9),
    SciWorldTask("7-1", "task-6-lifespan-(longest-lived)", 125, 62, 31),
    SciWorldTask("7-2", "task-6-lifespan-(shortest-lived)", 125, 62, 31),
    SciWorldTask("7-3", "task-6-lifespan-(longest-lived-then-shortest-lived)", 125, 62, 31),
    SciWorldTask("8-1", "task-7-identify-life-stages-1", 14, 6, 3),
    SciWorldTask("8-2", "task-7-identify-life-stages-2", 10, 4, 2),
)

#: Tasks of the 1.0.2 jar that AgentGym's item list leaves out; they can still be played by name.
OTHER_TASKS: dict[str, int] = {
    "task-10-measure-melting-point-(unknown-substance)": 300,
    "task-4-grow-fruit": 126,
    "task-4-grow-plant": 126,
    "task-8-inclined-plane-determine-angle": 168,
    "task-8-inclined-plane-friction-(named-surfaces)": 1386,
    "task-8-inclined-plane-friction-(unnamed-surfaces)": 162,
    "task-9-mendellian-genetics-(known-plant)": 120,
    "task-9-mendellian-genetics-(unknown-plant)": 480,
}

#: Variations per task name, for every task of the jar.
N_VARIATIONS: dict[str, int] = {t.name: t.n_variations for t in TASKS} | OTHER_TASKS

_TASK_BY_NAME = {t.name: t for t in TASKS}
_TASK_BY_KEY = {t.key: t for t in TASKS}
_ITEM = re.compile(r"^sciworld_(\d+)$")


@dataclass(frozen=True)
class SciWorldItem:
    """One entry of AgentGym's item list: `sciworld_<index>` plays `task` at `variation`.

    `split` is ScienceWorld's own split of the task's variations ("train", "dev" or "test"); AgentTraj-L
    holds train variations only.
    """

    index: int
    task: str
    variation: int
    split: str

    @property
    def id(self) -> str:
        return f"sciworld_{self.index}"


def _build_items() -> tuple[SciWorldItem, ...]:
    items = []
    for t in TASKS:
        for v in range(t.n_variations):
            items.append(SciWorldItem(len(items), t.name, v, t.split_of(v)))
    return tuple(items)


_ITEMS = _build_items()


def n_items() -> int:
    """How many items AgentGym's ScienceWorld server knows: 4,339 (`sciworld_0` .. `sciworld_4338`)."""
    return len(_ITEMS)


def item_space(split: str | None = None) -> tuple[SciWorldItem, ...]:
    """AgentGym's item list, index order; with `split`, only the items of that ScienceWorld split.

    For evaluation pick items the training data do not hold: `item_space("test")` (or "dev") is disjoint
    from AgentTraj-L, which uses train variations only (2,120 of the 2,162 train items). Needs no JVM.
    """
    if split is None:
        return _ITEMS
    if split not in ("train", "dev", "test"):
        raise ConfigError(f"split must be 'train', 'dev' or 'test', got {split!r}")
    return tuple(it for it in _ITEMS if it.split == split)


def eval_items(split: str = "test", per_task: int = 10, limit: int | None = None) -> list[int]:
    """Item indices for evaluation: the first `per_task` variations of each task in ScienceWorld's `split`.

    Every task is represented equally (the split's raw item list is dominated by the tasks with hundreds of
    variations), and the choice is fixed by the split alone, so runs and papers compare on the same items.
    `conf/eval/held_in.yaml` uses it; the test split never overlaps AgentTraj-L (train variations only).
    `limit` keeps the first items of that list (one per task first, for a smoke test: `per_task=1`).
    """
    if per_task < 1:
        raise ConfigError(f"per_task must be >= 1, got {per_task}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1 or null, got {limit}")
    taken: dict[str, int] = {}
    out = []
    for it in item_space(split):
        if taken.get(it.task, 0) < per_task:
            taken[it.task] = taken.get(it.task, 0) + 1
            out.append(it.index)
    return out[:limit] if limit is not None else out


def task_split(task: str, variation: int) -> str:
    """ScienceWorld's split ("train"/"dev"/"test") of a variation of one of AgentGym's tasks."""
    t = _TASK_BY_NAME.get(task)
    if t is None:
        raise ConfigError(f"task {task!r} is not one of AgentGym's ScienceWorld tasks: {sorted(_TASK_BY_NAME)}")
    return t.split_of(variation)


@dataclass(frozen=True)
class SciWorldEpisode(EpisodeSpec):
    """A ScienceWorld task (1.0.2 name, or AgentGym's key like "1-1") and one of its variations.

    Checked on creation, so a bad task name or variation fails where it is written, not in the JVM.
    """

    task: str = ""
    variation: int = 0

    def __post_init__(self) -> None:
        if self.task in _TASK_BY_KEY:
            object.__setattr__(self, "task", _TASK_BY_KEY[self.task].name)
        if self.task not in N_VARIATIONS:
            raise ConfigError(
                f"unknown ScienceWorld task {self.task!r}; scienceworld 1.0.2 has: {', '.join(sorted(N_VARIATIONS))}"
            )
        n = N_VARIATIONS[self.task]
        if isinstance(self.variation, bool) or not isinstance(self.variation, int) or not 0 <= self.variation < n:
            raise ConfigError(f"variation of {self.task} must be an int in 0..{n - 1}, got {self.variation!r}")

    @classmethod
    def from_item(cls, item: int | str) -> SciWorldEpisode:
        """AgentGym's item index (or `"sciworld_<i>"`) -> its task and variation."""
        if isinstance(item, str):
            m = _ITEM.match(item.strip())
            if m is None:
                raise DataError(f"not a ScienceWorld item id (expected 'sciworld_<i>'): {item!r}")
            item = int(m.group(1))
        if isinstance(item, bool) or not isinstance(item, int):
            raise DataError(f"a ScienceWorld item is an int or 'sciworld_<i>', got {item!r}")
        if not 0 <= item < len(_ITEMS):
            raise DataError(f"ScienceWorld item {item} out of range: AgentGym's items are 0..{len(_ITEMS) - 1}")
        it = _ITEMS[item]
        return cls(id=it.id, task=it.task, variation=it.variation)

    @property
    def split(self) -> str | None:
        """ScienceWorld's split of this variation, or None for a task outside AgentGym's list."""
        t = _TASK_BY_NAME.get(self.task)
        return t.split_of(self.variation) if t is not None else None


def default_jar() -> str:
    """The jar shipped in the `scienceworld` package (imports it; its Python wrapper is not used)."""
    try:
        import scienceworld
    except ImportError as e:
        raise ConfigError("ScienceWorld is not installed: pip install 'scienceworld==1.0.2'") from e
    version = getattr(scienceworld, "__version__", "?")
    if version != "1.0.2":
        raise ConfigError(
            f"scienceworld=={version} is installed but the AgentTraj-L data match 1.0.2 "
            "(later versions word observations differently): pip install 'scienceworld==1.0.2', or pass jar="
        )
    return os.path.join(os.path.dirname(scienceworld.__file__), f"scienceworld-{version}.jar")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _stop(proc: subprocess.Popen | None, gateway: Any) -> None:
    """Close the py4j connection and end the JVM (terminate, then kill). Safe to call twice."""
    if gateway is not None:
        with contextlib.suppress(Exception):  # a dead JVM cannot be talked to; it is ended below anyway
            gateway.close()
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


class _Server:
    """One ScienceWorld JVM (`PythonInterface <port>`) and the py4j gateway to it."""

    def __init__(self, java: str, jar: str, port: int | None, jvm_args: tuple[str, ...] = ()):
        exe = shutil.which(java)
        if exe is None:
            raise ConfigError(
                f"java runtime {java!r} not found: ScienceWorld runs in a JVM and needs Java 17+ "
                "(e.g. apt-get install openjdk-17-jre-headless), or pass java='/path/to/java'"
            )
        if not os.path.isfile(jar):
            raise ConfigError(f"ScienceWorld jar not found: {jar}")
        from py4j.java_gateway import GatewayParameters, JavaGateway

        if port is not None and not _port_free(port):
            # a JVM would fail to bind it, and we would talk to whatever listens there instead
            raise ConfigError(f"port {port} is in use; pass another port, or port=None for a free one")
        self.port = port if port is not None else _free_port()
        # kept to explain a failed start; closed in close()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(
            [exe, *jvm_args, "-cp", jar, "scienceworld.runtime.pythonapi.PythonInterface", str(self.port)],
            # it reads object_type_ids.tsv from its working directory, which the package keeps beside the jar
            cwd=os.path.dirname(os.path.abspath(jar)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # it prints a line per loaded task; nobody reads it
            stderr=self._stderr,
        )
        self.gateway = None
        self._finalizer = weakref.finalize(self, _stop, self.proc, None)
        deadline = time.monotonic() + JVM_START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                self._stderr.seek(0)
                err = self._stderr.read().decode(errors="replace").strip().splitlines()
                raise ConfigError(
                    f"the ScienceWorld JVM ({exe}) exited with code {self.proc.returncode} on start (it needs "
                    f"Java 17+, and HotSpot for deterministic=True; port {self.port}): {err[-1] if err else 'no message'}"
                )
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    _stop(self.proc, None)
                    raise ConfigError(f"the ScienceWorld JVM did not open port {self.port} in {JVM_START_TIMEOUT:.0f} s")
                time.sleep(0.05)
        self.gateway = JavaGateway(gateway_parameters=GatewayParameters(auto_field=True, port=self.port))
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _stop, self.proc, self.gateway)

    def close(self) -> None:
        self._finalizer()
        self._stderr.close()


class SciWorldEnv(Env):
    """ScienceWorld 1.0.2 with AgentGym's text interface; one episode at a time, one JVM per env.

    `reset(SciWorldEpisode)` plays a (task, variation); `reset(i: int)` plays AgentGym item `sciworld_<i>`.
    The JVM starts on the first reset and serves every later one; `close()` (or leaving a `with` block)
    stops it.

    Scores: `info["raw_score"]` is ScienceWorld's integer score as AgentGym reports it (0..100, -100 once
    failed); `info["score"]` is the same floored at 0 and scaled to 0..1 (a failed task has made no
    progress), and `reward` is the step's change of `info["score"]`, so an episode's rewards sum to its
    final score.

    Options: `simplifications` is ScienceWorld's comma-separated list or "easy" (the data's, see the module
    docstring); `env_step_limit` ends the episode after that many ScienceWorld moves as AgentGym's server
    did; `java`/`jar` name the runtime and the game (default: `java` on PATH and the package's jar);
    `port` fixes the py4j port (default: a free one); `deterministic` fixes the object listing order.
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
        self._server: _Server | None = None
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
            self._server = _Server(self.java, self.jar or default_jar(), self.port, jvm_args)
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
    "DETERMINISTIC_JVM_ARGS",
    "INSTRUCTION",
    "NO_KNOWN_ACTION",
    "N_VARIATIONS",
    "TASKS",
    "SciWorldEnv",
    "SciWorldEpisode",
    "SciWorldItem",
    "SciWorldTask",
    "item_space",
    "n_items",
    "task_split",
]
