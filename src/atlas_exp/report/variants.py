"""Naming what a row is: the selector's name from its config (for runs without a selection summary, and
W&B runs), what a combined selector combines, and which of a run's overrides set it apart from the rest of
the sweep (its `variant`: runs of one row differ only in the seed)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from atlas_exp.report.rows import RunRow

#: the selector names that the selector classes write (`Selector.name`), by class: used when a run has no
#: selection_summary.json yet (incomplete) or comes from W&B, where only the config's `_target_` is known
SELECTOR_BY_CLASS = {
    "AllStepsSelector": "all",
    "RandomSelector": "random",
    "OracleSelector": "oracle",
    "NonCriticalSelector": "non_critical",
    "HybridSelector": "hybrid",
    "ExcessLossSelector": "excess_loss",
    "RolloutValueSelector": "rollout_value",
}

#: overrides that never change what a run measures, or that are the row key itself (selector, ratio)
#: or what is averaged over (seed): they are not part of a row's "variant". A run's own list of keys that
#: do not change results (Hydra's `override_dirname.exclude_keys`, conf/hydra/default.yaml) is added.
KEY_OVERRIDES = {"selector", "ratio", "seed", "run_dir", "resume", "force", "stage", "cache_dir", "logger"}
#: prefixes of such keys: the logger's settings, and a combined selector's children (`selector@selector.base`),
#: which `combined_variant` already names from the config
KEY_PREFIXES = ("logger.", "hydra.", "selector@")


def selector_from_config(node: Any) -> str | None:
    """The selector's name from its config node (`_target_`, and `metric` for the perplexity class, whose
    name depends on it)."""
    if not isinstance(node, Mapping) or not isinstance(node.get("_target_"), str):
        return None
    class_name = node["_target_"].rsplit(".", 1)[-1]
    if class_name == "PerplexitySelector":
        return "perplexity" if node.get("metric") == "loss" else "perplexity_delta"
    return SELECTOR_BY_CLASS.get(class_name, class_name)


def combined_variant(node: Any) -> str:
    """What a combined selector combines: the non-critical ablation of an oracle and of perplexity_delta
    are different experiments, and their names alone do not say which one a row is."""
    if not isinstance(node, Mapping):
        return ""
    name = selector_from_config(node)
    if name == "non_critical" and isinstance(node.get("base"), Mapping):
        return f"base={selector_from_config(node['base'])}"
    if name == "hybrid" and isinstance(node.get("a"), Mapping) and isinstance(node.get("b"), Mapping):
        return f"{selector_from_config(node['a'])}+{selector_from_config(node['b'])} {node.get('mode', 'rank_fusion')}"
    return ""


def override_key(override: str) -> str:
    """`+x.y=1` -> `x.y`: the key an override sets, for telling key overrides from the rest."""
    return override.split("=", 1)[0].lstrip("+~")


def is_key_override(override: str, ignored: Iterable[str] = ()) -> bool:
    """Whether an override is part of the row key or changes nothing measured (`ignored`: the run's own
    such keys), so that it is no part of the row's variant."""
    key = override_key(override)
    return key in KEY_OVERRIDES or key in set(ignored) or key.startswith(KEY_PREFIXES)


def mark_variants(rows: Iterable[RunRow]) -> None:
    """Add to each row's variant the overrides that set it apart from the rest of the sweep.

    Overrides every run shares (the sweep's fixed settings) are not a variant; the key overrides
    (selector, ratio, seed, ...) are the row key itself. So `train.learning_rate=1e-5,2e-5` in a sweep gives two rows
    per selector and ratio instead of one mean over two learning rates.
    """
    rows = list(rows)
    sets = [{o for o in row.overrides if not is_key_override(o, row.ignored_keys)} for row in rows]
    common = set.intersection(*sets) if sets else set()
    for row, own in zip(rows, sets):
        extra = sorted(own - common)
        if extra:
            row.variant = ", ".join(([row.variant] if row.variant else []) + extra)


def common_overrides(rows: Iterable[RunRow]) -> list[str]:
    """The overrides every run of the sweep has (shown once in the report's header)."""
    sets = [set(row.overrides) for row in rows]
    return sorted(set.intersection(*sets)) if sets else []

