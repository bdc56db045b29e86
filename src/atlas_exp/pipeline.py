"""The run directory and the order of stages: data -> select -> train -> eval.

Each stage reads only the previous stage's artifact from the run directory (plus its config), so any
stage can be rerun alone (`stage=select`), cached (a finished artifact with the same fingerprint is
skipped), or run elsewhere.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from atlas_exp.errors import ConfigError

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_.=+-]")


def safe_filename(name: str) -> str:
    """`name` as a file name: other characters become `_`, plus a short hash when anything was replaced
    (so two ids that differ only there do not collide)."""
    clean = _UNSAFE.sub("_", name)[:150] or "_"
    if clean != name:
        clean += "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return clean


@dataclass(frozen=True)
class RunDir:
    """Where each stage's artifacts live inside one run directory."""

    root: Path

    @property
    def trajectories(self) -> Path:
        return self.root / "trajectories.jsonl"

    @property
    def val_trajectories(self) -> Path:
        return self.root / "val_trajectories.jsonl"

    @property
    def data_summary(self) -> Path:
        return self.root / "data_summary.json"

    @property
    def selection(self) -> Path:
        return self.root / "selection.jsonl"

    @property
    def selection_summary(self) -> Path:
        return self.root / "selection_summary.json"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def training_summary(self) -> Path:
        return self.root / "model" / "training_summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def eval_episode(self, task: str, episode: str) -> Path:
        """One played episode's transcript and outcome (what resuming an evaluation checks for)."""
        return self.root / "eval" / task / f"{safe_filename(episode)}.json"

    @property
    def results(self) -> Path:
        """Per-task and held-in/held-out scores: what the sweep report collects."""
        return self.root / "eval" / "results.json"

    @property
    def train_config(self) -> Path:
        """The resolved config handed to torchrun workers (they do not compose Hydra again)."""
        return self.root / ".hydra" / "resolved.yaml"


def _stages() -> dict[str, Callable[[DictConfig, RunDir], None]]:
    # imported lazily so that `--help` and config errors do not pay for torch/transformers imports
    from atlas_exp.data.stage import run_data_stage
    from atlas_exp.eval.stage import run_eval_stage
    from atlas_exp.report.inspect import run_inspect_stage
    from atlas_exp.selectors.stage import run_select_stage
    from atlas_exp.train.launch import run_train_stage

    return {"data": run_data_stage, "select": run_select_stage, "train": run_train_stage,
            "eval": run_eval_stage, "inspect": run_inspect_stage}


#: what `stage=all` runs, in order
STAGE_ORDER = ("data", "select", "train", "eval")
#: stages that only look at artifacts; run on request
EXTRA_STAGES = ("inspect",)


def run(cfg: DictConfig, run_dir: Path) -> None:
    """Run `cfg.stage` (one stage, or `all` in order) in `run_dir`."""
    stage = str(cfg.stage)
    if stage == "all":
        names = list(STAGE_ORDER)
    elif stage in STAGE_ORDER or stage in EXTRA_STAGES:
        names = [stage]
    else:
        choices = ", ".join(("all",) + STAGE_ORDER + EXTRA_STAGES)
        raise ConfigError(f"stage={stage!r} is not a stage; choose one of: {choices}")
    stages = _stages()
    rd = RunDir(Path(run_dir))
    rd.root.mkdir(parents=True, exist_ok=True)
    for name in names:
        log.info("stage %s -> %s", name, rd.root)
        stages[name](cfg, rd)
