"""Filters over lists of trajectories: each returns what it kept and how many it dropped, never silently.

All filters are pure (the input list is not modified) and keep the input order. Those that must choose
(`cap_per_env`, `split_train_val`) rank trajectories by a hash of `(seed, purpose, id)` rather than by a
shuffled position, so the choice for one trajectory does not depend on the others: adding or removing data
moves only the trajectories at the boundary instead of reshuffling everything, and the same seed gives the
same choice on any machine.

`apply_filters` runs them in this order (each step's drop count goes into the report):
1. `filter_envs`: keep only `envs` (when given): a cheap cut before anything else is counted;
2. `filter_steps`: keep trajectories with `min_steps <= n_steps <= max_steps`;
3. `dedupe`: drop exact repeats of an earlier trajectory's turns (`Trajectory.content_hash`);
4. `make_ids_unique`: rename the remaining same-id-different-content trajectories `id#2`, `id#3`, ...
   (AgentTraj-L's maze file has 215 distinct episodes under only 11 ids), since selection, training and
   the split all key on ids; the first occurrence keeps its id, the original id goes to `meta`;
5. `cap_per_env`: at most `max_per_env` per env, the ones with the lowest seeded hash rank.
The train/validation split (`split_train_val`) runs after `apply_filters`, on its output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from atlas_exp.data.trajectory import Trajectory
from atlas_exp.errors import ConfigError

log = logging.getLogger(__name__)


def hash_rank(traj_id: str, seed: int, purpose: str) -> int:
    """A 64-bit rank for one id: stable across runs and machines (unlike Python's `hash`)."""
    digest = hashlib.sha256(f"{seed}\x00{purpose}\x00{traj_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def filter_envs(trajs: list[Trajectory], envs: Iterable[str] | None) -> tuple[list[Trajectory], int]:
    """Keep the trajectories whose env is in `envs` (None keeps all). Returns (kept, dropped)."""
    if envs is None:
        return list(trajs), 0
    wanted = _env_list(envs)
    if not wanted:
        raise ConfigError("data.envs is empty, which would keep nothing; use null to keep every env")
    kept = [t for t in trajs if t.env in wanted]
    return kept, len(trajs) - len(kept)


def filter_steps(trajs: list[Trajectory], min_steps: int = 1, max_steps: int | None = None
                 ) -> tuple[list[Trajectory], int]:
    """Keep trajectories with `min_steps <= n_steps <= max_steps` (None: no upper bound)."""
    _check_int("data.min_steps", min_steps, 0)
    if max_steps is not None:
        _check_int("data.max_steps", max_steps, 1)
        if max_steps < min_steps:
            raise ConfigError(f"data.max_steps={max_steps} is below data.min_steps={min_steps}")
    kept = [t for t in trajs if t.n_steps >= min_steps and (max_steps is None or t.n_steps <= max_steps)]
    return kept, len(trajs) - len(kept)


def dedupe(trajs: list[Trajectory]) -> tuple[list[Trajectory], int]:
    """Drop trajectories whose turns repeat an earlier one's exactly (ids and sources may differ)."""
    seen: set[str] = set()
    kept = []
    for t in trajs:
        h = t.content_hash()
        if h not in seen:
            seen.add(h)
            kept.append(t)
    return kept, len(trajs) - len(kept)


def make_ids_unique(trajs: list[Trajectory]) -> tuple[list[Trajectory], int]:
    """Give every trajectory a distinct id; returns (trajectories, number renamed).

    The first trajectory with an id keeps it; later ones become `<id>#2`, `<id>#3`, ... in input order
    (skipping any suffix already taken), with `meta["original_id"]` holding the id they came with. Run
    `dedupe` first so that exact repeats are dropped rather than renamed.
    """
    taken = {t.id for t in trajs}
    used: set[str] = set()
    counts: Counter[str] = Counter()
    out = []
    renamed = 0
    for t in trajs:
        counts[t.id] += 1
        if t.id not in used:
            used.add(t.id)
            out.append(t)
            continue
        k = counts[t.id]
        while f"{t.id}#{k}" in taken or f"{t.id}#{k}" in used:
            k += 1
        new_id = f"{t.id}#{k}"
        used.add(new_id)
        out.append(dataclasses.replace(t, id=new_id, meta={**t.meta, "original_id": t.id}))
        renamed += 1
    return out, renamed


def cap_per_env(trajs: list[Trajectory], max_per_env: int | None, seed: int = 0) -> tuple[list[Trajectory], int]:
    """Keep at most `max_per_env` trajectories of each env: those with the lowest `hash_rank(id, seed)`.

    A seeded choice rather than "the first N": input order often follows file order and id sort order
    (`babyai_0, babyai_1, babyai_10, ...`), which is not a sample of anything. Ranking by id hash keeps the
    choice reproducible and independent of the input order; the kept trajectories stay in input order.
    """
    if max_per_env is None:
        return list(trajs), 0
    _check_int("data.max_per_env", max_per_env, 1)
    by_env: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(trajs):
        by_env[t.env].append(i)
    keep: set[int] = set()
    for idx in by_env.values():
        ranked = sorted(idx, key=lambda i: (hash_rank(trajs[i].id, seed, "max_per_env"), i))
        keep.update(ranked[:max_per_env])
    kept = [t for i, t in enumerate(trajs) if i in keep]
    return kept, len(trajs) - len(kept)


def split_train_val(
    trajs: list[Trajectory],
    val_fraction: float | None = None,
    val_size: int | None = None,
    seed: int = 0,
    stratify: bool = True,
) -> tuple[list[Trajectory], list[Trajectory]]:
    """Split into (train, val), both in input order; give `val_fraction` or `val_size` (or neither: no val).

    Each trajectory is ranked by `hash_rank(id, seed, "val")` and the lowest-ranked go to validation.
    With `stratify` (the default) this happens per env: `val_fraction` takes `round(fraction * n_env)` of
    each env, `val_size` is shared out in proportion to env sizes (largest remainders first), so every env
    is represented as in the data. Because the rank depends only on the id and the seed, adding
    trajectories moves at most a few existing ones across the boundary. Ids should be unique
    (`make_ids_unique`); equal ids fall back to input order.
    """
    if val_fraction is not None and val_size is not None and val_fraction > 0 and val_size > 0:
        raise ConfigError("give data.val_fraction or data.val_size, not both")
    n = len(trajs)
    if val_size:
        _check_int("data.val_size", val_size, 1)
        if val_size >= n:
            raise ConfigError(f"data.val_size={val_size} leaves no training data ({n} trajectories)")
    elif val_fraction:
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
            raise ConfigError(f"data.val_fraction={val_fraction!r}: expected a number in [0, 1)")
    else:
        return list(trajs), []

    groups: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(trajs):
        groups[t.env if stratify else ""].append(i)
    if val_size:
        quota = _shares(val_size, {g: len(idx) for g, idx in groups.items()})
    else:
        quota = {g: int(round(val_fraction * len(idx))) for g, idx in groups.items()}
    val_idx: set[int] = set()
    for g, idx in groups.items():
        ranked = sorted(idx, key=lambda i: (hash_rank(trajs[i].id, seed, "val"), i))
        val_idx.update(ranked[: quota[g]])
    train = [t for i, t in enumerate(trajs) if i not in val_idx]
    val = [t for i, t in enumerate(trajs) if i in val_idx]
    return train, val


@dataclass
class FilterConfig:
    """The data filters, as named in `conf/data/*.yaml` (`data.envs`, `data.min_steps`, ...)."""

    envs: list[str] | None = None
    min_steps: int = 1
    max_steps: int | None = None
    dedupe: bool = True
    unique_ids: bool = True
    max_per_env: int | None = None
    seed: int = 0

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any], seed: int | None = None) -> "FilterConfig":
        """Pick the filter options out of a data config (other keys such as `sources` are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: cfg[k] for k in names if k in cfg and cfg[k] is not None}
        if "envs" in kwargs:
            kwargs["envs"] = sorted(_env_list(kwargs["envs"]))
        if seed is not None:
            kwargs["seed"] = seed
        return cls(**kwargs)


def apply_filters(trajs: list[Trajectory], cfg: FilterConfig) -> tuple[list[Trajectory], dict[str, Any]]:
    """Run the filters in the module's documented order; returns (kept, report).

    The report has `n_in`, `n_out`, `dropped` ({filter: count}, summing to n_in - n_out), `renamed_ids`,
    `per_env` (kept counts) and `envs_not_found` (requested envs with no trajectory at all: likely a typo).
    Every nonzero drop is also logged.
    """
    report: dict[str, Any] = {"n_in": len(trajs), "dropped": {}, "renamed_ids": 0}
    kept = list(trajs)
    if cfg.envs is not None:
        present = {t.env for t in kept}
        missing = sorted(_env_list(cfg.envs) - present)
        report["envs_not_found"] = missing
        if missing:
            log.warning("data.envs names envs with no trajectory: %s (present: %s)", missing, sorted(present))
    kept, report["dropped"]["env"] = filter_envs(kept, cfg.envs)
    n_before = len(kept)
    kept, _ = filter_steps(kept, cfg.min_steps, None)
    report["dropped"]["min_steps"] = n_before - len(kept)
    kept, report["dropped"]["max_steps"] = filter_steps(kept, cfg.min_steps, cfg.max_steps)
    if cfg.dedupe:
        kept, report["dropped"]["duplicate"] = dedupe(kept)
    if cfg.unique_ids:
        kept, report["renamed_ids"] = make_ids_unique(kept)
    kept, report["dropped"]["max_per_env"] = cap_per_env(kept, cfg.max_per_env, cfg.seed)
    report["n_out"] = len(kept)
    report["per_env"] = dict(sorted(Counter(t.env for t in kept).items()))
    for name, n in report["dropped"].items():
        if n:
            log.info("filter %s dropped %d trajectories", name, n)
    if report["renamed_ids"]:
        log.info("renamed %d trajectories whose id was already taken (id#2, id#3, ...)", report["renamed_ids"])
    return kept, report


def _env_list(envs: Iterable[str] | str) -> set[str]:
    if isinstance(envs, str):
        return {envs}
    return {str(e) for e in envs}


def _check_int(name: str, v: Any, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError(f"{name}={v!r}: expected an integer >= {lo}")


def _shares(total: int, sizes: dict[str, int]) -> dict[str, int]:
    """Share `total` among groups in proportion to their sizes (largest remainder, ties by name)."""
    n = sum(sizes.values())
    exact = {g: total * s / n for g, s in sizes.items()}
    out = {g: int(x) for g, x in exact.items()}
    left = total - sum(out.values())
    for g in sorted(sizes, key=lambda g: (-(exact[g] - out[g]), g))[:left]:
        out[g] += 1
    return out
