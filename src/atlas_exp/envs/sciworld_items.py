"""AgentGym's ScienceWorld item list: `sciworld_<i>` -> (task, variation), and ScienceWorld's own
train/dev/test split of every variation.

Apart from the env because it needs no JVM: configs (`eval_items`) and the AgentGym HTTP client
(`envs/agentgym/items.py`) look items up without starting ScienceWorld. Which tasks AgentGym leaves out, and
why the counts are those of the 1.0.2 jar: docs/envs.md#scienceworld (Episodes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from atlas_exp.envs.base import EpisodeSpec
from atlas_exp.errors import ConfigError, DataError


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


__all__ = [
    "N_VARIATIONS",
    "OTHER_TASKS",
    "TASKS",
    "SciWorldEpisode",
    "SciWorldItem",
    "SciWorldTask",
    "eval_items",
    "item_space",
    "n_items",
    "task_split",
]
