"""`python -m atlas_exp [overrides]`: compose `conf/config.yaml` with Hydra and run the stages.

Errors in the user's input or config (AtlasError) are printed as one clear line naming the file,
record, field or option, and exit with status 2; a stage that stops on purpose (a Batch API file written,
waiting for its answers) says what to do next and exits with status 3; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from atlas_exp.config import CONF_DIR, check_overrides, command_line_overrides
from atlas_exp.errors import AtlasError, StageStopped

log = logging.getLogger("atlas_exp")


def _quiet_third_party() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("httpx", "httpx2", "httpcore", "httpcore2", "openai", "urllib3", "filelock", "datasets", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from atlas_exp.pipeline import run

    _quiet_third_party()
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        run(cfg, run_dir, overrides=list(hc.overrides.task))
    except StageStopped as e:
        log.warning("%s", e)
        print(f"atlas_exp: stopped: {e}", file=sys.stderr)
        sys.exit(3)
    except AtlasError as e:
        log.error("%s", e)
        print(f"atlas_exp: error: {e}", file=sys.stderr)
        sys.exit(2)
    log.info("done: %s", run_dir)


#: Hydra flags after which nothing runs and no override needs checking
_INFO_FLAGS = ("--help", "-h", "--hydra-help", "--shell-completion", "-sc", "--info", "-i", "--version")


def _before_hydra(argv: list[str]) -> None:
    """Checks Hydra would otherwise report in many lines (or too late): the overrides (`check_overrides`),
    and, for a single run into an explicit `run_dir=PATH`, that no other live process writes it; that lock
    is taken here, before Hydra writes the composed config into `PATH/.hydra/`, and kept by `run`."""
    if any(a in _INFO_FLAGS for a in argv):
        return
    multirun = any(a in ("-m", "--multirun") for a in argv)
    overrides = command_line_overrides(argv)
    from atlas_exp.train.options import check_override_names

    check_override_names(overrides)  # train.lr=... names train.learning_rate, before Hydra's "add it with +"
    check_overrides(overrides, multirun=multirun)
    if multirun or any(a in ("--cfg", "-c") for a in argv):
        return
    run_dirs = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+") == "run_dir"]
    if run_dirs and run_dirs[-1] and "${" not in run_dirs[-1]:
        from atlas_exp.run_dir import RunDirLock

        RunDirLock(run_dirs[-1]).acquire()  # released when this process exits


def main() -> None:
    if not CONF_DIR.is_dir():
        print(f"atlas_exp: error: config folder {CONF_DIR} not found (set ATLAS_EXP_CONF)", file=sys.stderr)
        sys.exit(2)
    try:
        _before_hydra(sys.argv[1:])
    except AtlasError as e:
        print(f"atlas_exp: error: {e}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
