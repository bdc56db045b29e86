"""Checks before the first stage: what would otherwise fail only deep inside one, each refused as one
`ConfigError` naming the option (a required option without a value, `model.name` used as if it chose the
model, a train option that is neither ours nor a TrainingArguments field, a model that cannot be loaded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from atlas_exp.errors import ConfigError

#: which stage needs the options under each top-level key (others: every stage)
_OPTION_STAGE = {"data": "data", "selector": "select", "train": "train", "deepspeed": "train", "launcher": "train",
                 "logger": "train", "policy": "eval", "eval": "eval", "inspect": "inspect"}
_REQUIRED_HINTS = {
    "data.path": "the files or folders to read (data=local), e.g. data.path=data/my_trajectories.jsonl",
    "policy.model": "the served model's name (policy=openai), e.g. policy.model=my-agent",
}


def preflight(cfg: DictConfig, names: list[str], overrides: list[str]) -> None:
    """What would fail only deep inside a stage, checked before the first one, each as one ConfigError
    naming the option: a required option (`???`) that the stages to run need; `model.name` set on the
    command line without a model (it is a label); a model the stages need that cannot be loaded."""
    evals = "eval" in names and bool(cfg.get("eval") and cfg.eval.get("tasks"))
    wanted = set(names) - ({"eval"} if not evals else set())
    missing = sorted(k for k in _missing_keys(OmegaConf.to_container(cfg, resolve=False))
                     if _OPTION_STAGE.get(k.split(".", 1)[0], "*") in wanted | {"*"})
    if missing:
        raise ConfigError("; ".join(f"{k} is required: {_REQUIRED_HINTS.get(k, f'set {k}=...')}" for k in missing))
    check_model_label(cfg, overrides)
    if "train" in wanted:  # an old or misspelt train option in a preset: refused before the data stage runs
        from atlas_exp.train.options import check_train_options

        check_train_options(cfg.train)
    from atlas_exp.models import ModelSpec, check_loadable

    seen: set[tuple] = set()
    for option, node in _models_needed(cfg, wanted, evals):
        spec = node if isinstance(node, ModelSpec) else ModelSpec.from_cfg(node)
        key = (spec.name_or_path, spec.gguf_file, spec.revision)
        if key not in seen:
            seen.add(key)
            check_loadable(spec, cfg.cache_dir, option=option)


def _missing_keys(node: Any, path: str = "") -> list[str]:
    """Dotted keys whose value is `???` (required, not set), found without resolving interpolations."""
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _missing_keys(v, f"{path}.{key}" if path else str(key))]
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in _missing_keys(v, f"{path}[{i}]")]
    return [path] if node == "???" else []


def _models_needed(cfg: DictConfig, stages: set[str], evals: bool) -> list[tuple[str, Any]]:
    from atlas_exp.models import ModelSpec

    out: list[tuple[str, Any]] = []
    if stages & {"train", "inspect"}:
        out.append(("model", cfg.model))
    if "select" in stages and cfg.get("selector") is not None:
        def walk(node: Any, path: str) -> None:
            if isinstance(node, DictConfig):
                if node.get("name_or_path") is not None and "_target_" not in node:
                    out.append((path, {k: node[k] for k in node if k in ModelSpec.__dataclass_fields__}))
                    return
                for k in node:
                    walk(node.get(k), f"{path}.{k}")
        walk(cfg.selector, "selector")
        m = cfg.selector.get("model")
        if isinstance(m, str) and m:
            out.append(("selector.model", ModelSpec(name=m, name_or_path=m)))
        r = cfg.selector.get("reference")  # excess_loss; an adapter folder has no config.json of its own
        if isinstance(r, str) and r and not (Path(r).expanduser() / "adapter_config.json").is_file():
            out.append(("selector.reference", ModelSpec(name=r, name_or_path=r)))
    if evals and cfg.get("policy") is not None and not str(cfg.policy.get("_target_", "")).endswith("OpenAIPolicy"):
        m = cfg.policy.get("model")
        if m in ("run", "base", None):
            out.append(("model", cfg.model))
        elif isinstance(m, str) and not Path(m).is_dir():  # a run dir or model folder is checked by the policy
            out.append(("policy.model", ModelSpec(name=m, name_or_path=m)))
    return out


def check_model_label(cfg: DictConfig, overrides: list[str]) -> None:
    """`model.name` only labels the model (summaries, reports, plans); setting it on the command line
    without `model.name_or_path` chooses nothing, so it is refused with the way to choose one."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    if "model.name" not in keys or "model.name_or_path" in keys:
        return
    from atlas_exp.config import CONF_DIR

    name = str(cfg.model.name)
    options = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    chosen = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+") == "model"), None)
    if name == chosen or (chosen is None and name == _default_model()):
        return
    did_you_mean = f" Did you mean model={name}?" if name in options else ""
    raise ConfigError(
        f"model.name={name!r} is only a label (it names the model in summaries and reports) and chooses no model: "
        f"the run would train {cfg.model.name_or_path}.{did_you_mean} Choose a model with model=<{'|'.join(options)}>, "
        f"or set model.name_or_path=<hub name or folder> (model.name then labels it)"
    )


def _default_model() -> str | None:
    from atlas_exp.config import CONF_DIR

    try:
        defaults = OmegaConf.load(CONF_DIR / "config.yaml").get("defaults", [])
    except Exception:  # noqa: BLE001 - only used to allow a no-op override
        return None
    return next((d["model"] for d in defaults if isinstance(d, dict) and "model" in d), None)
