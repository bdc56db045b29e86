"""`python -m atlas_exp [overrides]`: compose `conf/config.yaml` with Hydra and run the stages.

Errors in the user's input or config (AtlasError) are printed as one clear line naming the file,
record, field or option, and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from atlas_exp.config import CONF_DIR
from atlas_exp.errors import AtlasError

log = logging.getLogger("atlas_exp")


def _quiet_third_party() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("httpx", "httpx2", "httpcore", "httpcore2", "openai", "urllib3", "filelock", "datasets", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from atlas_exp.pipeline import run

    _quiet_third_party()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run(cfg, run_dir)
    except AtlasError as e:
        log.error("%s", e)
        print(f"atlas_exp: error: {e}", file=sys.stderr)
        sys.exit(2)
    log.info("done: %s", run_dir)


def main() -> None:
    if not CONF_DIR.is_dir():
        print(f"atlas_exp: error: config folder {CONF_DIR} not found (set ATLAS_EXP_CONF)", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
