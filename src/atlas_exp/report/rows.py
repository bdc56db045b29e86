"""The rows of a sweep report: one `RunRow` a run (its identity, scores, episodes and cost figures), its
`TaskScore`s and `Episode`s. The readers (`collect` for run dirs, `wandb_runs` for W&B) make them; the
aggregation, tables and plots only read them, so a run read from disk and one read from W&B are
interchangeable.

A number in a row is finite or None, never a stand-in 0: `as_number` and `as_int` are how a reader turns an
artifact's value into one."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TaskScore:
    """One task's headline number in one run, as `results.json` (or W&B) reports it.

    `value` is in percent (success rate, or ScienceWorld's score), None when no episode finished: the
    report never turns a missing number into 0.
    """

    name: str
    split: str
    value: float | None
    metric: str | None = None
    env: str | None = None
    n: int | None = None


@dataclass(frozen=True)
class Episode:
    """One finished episode of a task, from its `eval/<task>/<episode>.json`: the unit the report's
    confidence intervals and paired comparisons resample."""

    #: in [0, 1]: success (1 or 0) or score, whichever the task's metric is
    value: float
    #: expert_steps tasks: `action_correct` of each scored step, in step order (None for env episodes)
    steps: tuple[bool, ...] | None = None


@dataclass
class RunRow:
    """Everything the report needs from one run: its identity (selector, ratio, seed, ...), its scores,
    and the two cost figures the paper's argument is about (supervised tokens, achieved ratio)."""

    #: where it came from: the run dir relative to the sweep dir, or a W&B run path
    run_id: str
    selector: str
    ratio: float | None
    seed: int | None
    model: str | None = None
    #: what else distinguishes this run's setup from the other rows (overrides not shared by the whole
    #: sweep, the children of a combined selector); runs of one row differ only in the seed
    variant: str = ""
    #: True when results.json (or W&B eval summary) exists
    complete: bool = False
    #: per task, in results.json's order
    tasks: dict[str, TaskScore] = field(default_factory=dict)
    #: held_in / held_out average as the eval stage computed it (None: a task of the split has no value)
    split_averages: dict[str, float | None] = field(default_factory=dict)
    achieved_ratio: float | None = None
    supervised_tokens: int | None = None
    #: env -> category -> selected steps with that category (empty when the selector gives no categories)
    categories: dict[str, dict[str, int]] = field(default_factory=dict)
    #: env -> achieved ratio in that env (selection_summary.json `per_env`)
    per_env_ratio: dict[str, float] = field(default_factory=dict)
    #: the overrides of the Hydra job (`.hydra/overrides.yaml`), for the variant and the report
    overrides: list[str] = field(default_factory=list)
    #: override keys that do not change results (Hydra's override_dirname.exclude_keys of the run)
    ignored_keys: list[str] = field(default_factory=list)
    #: for incomplete runs: which stage artifacts exist
    has: list[str] = field(default_factory=list)
    path: Path | None = None
    #: per task, per episode id: the episodes results.json counted (absent: no usable episode files, see
    #: `episode_notes`); what the confidence intervals resample
    episodes: dict[str, dict[str, Episode]] = field(default_factory=dict)
    #: per task without usable episode files: why (the report then shows results.json's value, no CI)
    episode_notes: dict[str, str] = field(default_factory=dict)
    #: compute: input tokens of the training examples per epoch (`data/n_tokens`), the same over the
    #: whole training (an estimate when training stopped at max_steps), training and selection wall time
    input_tokens: int | None = None
    tokens_processed: float | None = None
    train_seconds: float | None = None
    select_seconds: float | None = None


def as_number(value: Any) -> float | None:
    """A finite number, or None (a `${...}` interpolation, a missing key, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def as_int(value: Any) -> int | None:
    """`as_number`, truncated to an integer."""
    number = as_number(value)
    return int(number) if number is not None else None
