"""The order of stages: data -> select -> train -> eval (`inspect` on request), one line each.

Each stage reads only the previous stage's artifact from the run directory (`atlas_exp.run_dir`) plus its
config, so any stage can be rerun alone (`stage=select`), cached (a finished artifact with the same
fingerprint is skipped), or run elsewhere. `run` checks first what would otherwise fail late
(`atlas_exp.preflight`), then holds the run directory's lock while the stages run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from atlas_exp.errors import ConfigError
from atlas_exp.preflight import preflight
from atlas_exp.run_dir import RunDir, RunDirLock

log = logging.getLogger(__name__)


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


def stage_names(cfg: DictConfig) -> list[str]:
    """The stages `cfg.stage` runs, in order."""
    stage = str(cfg.stage)
    if stage == "all":
        return list(STAGE_ORDER)
    if stage in STAGE_ORDER or stage in EXTRA_STAGES:
        return [stage]
    choices = ", ".join(("all",) + STAGE_ORDER + EXTRA_STAGES)
    raise ConfigError(f"stage={stage!r} is not a stage; choose one of: {choices}")


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> None:
    """Run `cfg.stage` (one stage, or `all` in order) in `run_dir`, holding its lock, after `preflight`.
    `overrides`: the command line's, for the checks that depend on what was typed."""
    names = stage_names(cfg)
    preflight(cfg, names, overrides or [])
    stages = _stages()
    rd = RunDir(Path(run_dir))
    with RunDirLock(rd.root):
        for name in names:
            log.info("stage %s -> %s", name, rd.root)
            stages[name](cfg, rd)
