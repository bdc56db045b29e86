"""The policy a rollout selector plays with, as its `selector.policy` option names it: a policy config
(`conf/policy/*.yaml`, built only when a rollout is needed, so a fully cached selection loads no model) or a
Policy object (tests, plugins). Here: the option's checks, the policy's identity (what its replies depend on,
for cache keys), building it, and reading its token counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from atlas_exp.config import plain
from atlas_exp.errors import ConfigError


def check_policy_option(policy: Any) -> None:
    """Refuse a missing policy and `model: run` (the select stage runs before there is a trained model)."""
    if policy is None:
        raise ConfigError("selector.policy is missing: a policy config (conf/policy/*.yaml) or a Policy object")
    if is_config(policy) and str(plain(policy).get("model", "")) == "run":
        raise ConfigError("selector.policy.model=run: the select stage runs before training, so there is no "
                          "trained model yet; use base (the default) or a model folder / Hub name")


def policy_identity(policy: Any, temperature: float, model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What the rollouts' outcomes depend on, besides the trajectory: the policy as configured (less the
    options that do not change replies), the base model it loads, the temperature."""
    if not is_config(policy):
        describe = getattr(policy, "describe", None)
        return {"policy": describe() if describe else type(policy).__name__, "temperature": temperature}
    pol = plain(policy)
    cls = _class_of(pol)
    for key in getattr(cls, "reply_neutral", ()):
        pol.pop(key, None)
    pol["temperature"] = temperature
    out: dict[str, Any] = {"policy": pol}
    if getattr(cls, "loads_base_model", False) and pol.get("model") == "base":
        out["base_model"] = dict(model_cfg)
    return out


def build_policy(policy: Any, model_cfg: Mapping[str, Any], cache_dir: str, seed: int, temperature: float) -> Any:
    """The Policy of a policy config, sampling at `temperature` (`model: base` loads `model_cfg`)."""
    from atlas_exp.config import build
    from atlas_exp.eval.policy_base import Policy, PolicyContext

    ctx = PolicyContext(model_cfg=dict(model_cfg), run_model_dir=Path(cache_dir) / "no-trained-model",
                        cache_dir=cache_dir, seed=seed)
    return build(policy, "selector.policy", Policy, context=ctx, temperature=temperature)


def token_counts(policy: Any) -> dict[str, int]:
    """The policy's prompt and completion tokens so far (empty for a policy that does not count them)."""
    stats = getattr(policy, "stats", None)
    if not isinstance(stats, Mapping):
        return {}
    return {k: int(stats.get(k) or 0) for k in ("prompt_tokens", "completion_tokens")}


def is_config(x: Any) -> bool:
    from omegaconf import DictConfig

    return isinstance(x, (DictConfig, dict))




def _class_of(pol: dict[str, Any]) -> type | None:
    from hydra.utils import get_class

    try:
        return get_class(str(pol.get("_target_", "")))
    except Exception:
        return None
