"""Paired comparison of each row with the `all steps` row: on the units both played, how much better or
worse is the row?

Two rows' means differ by seed noise and by which episodes each happened to fail; pairing removes the
second. Per unit present in both rows, the difference row - all:

- offline expert-steps tasks: a unit is (seed, trajectory, step), the difference of `action_correct`
  (-1, 0 or 1); the steps of one trajectory are resampled together (they share a history);
- env tasks: a unit is (seed, episode id), the difference of the task's metric (success 1/0, or score).

A cell is the mean difference in percentage points (a split: the unweighted mean over its tasks that both
rows have per-unit results for), with the paired hierarchical bootstrap interval of stats.bootstrap
(seeds, then trajectories / episodes within a seed) and the number of units. Seeds are matched when the
two rows share seeds (then only the shared seeds count); when they share none, each of the row's runs is
paired unit by unit with the mean of the `all` runs on that unit, and the table says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from atlas_exp.report.rows import RunRow
from atlas_exp.report.stats import (
    Interval,
    bootstrap,
    cluster_units,
    episode_units,
    rng_for,
)
from atlas_exp.report.table import Column, Table, TableRow


@dataclass(frozen=True)
class PairedRow:
    row: TableRow
    base: TableRow
    #: column key -> interval (None: no unit in common)
    cells: dict[str, Interval | None]
    #: how seeds were paired, for the table
    seeds: str


def _task_units(name: str, run: RunRow, bases: Sequence[RunRow]) -> tuple[np.ndarray, np.ndarray] | None:
    """The differences run - base on one task, over the units the run and the base runs share; the base
    value of a unit is the mean over the base runs that have it (one run when seeds are matched)."""
    mine = run.episodes.get(name)
    theirs = [b.episodes[name] for b in bases if b.episodes.get(name)]
    if not mine or not theirs:
        return None
    if any(e.steps is not None for e in mine.values()):
        clusters = []
        for ep_id, e in mine.items():
            refs = [t[ep_id].steps for t in theirs if ep_id in t and t[ep_id].steps is not None]
            if e.steps is None or not refs:
                continue
            diffs = []
            for k, ok in enumerate(e.steps):
                vals = [float(r[k]) for r in refs if k < len(r)]
                if vals:
                    diffs.append(float(ok) - sum(vals) / len(vals))
            clusters.append(diffs)
        units = cluster_units(clusters)
    else:
        diffs = []
        for ep_id, e in mine.items():
            vals = [t[ep_id].value for t in theirs if ep_id in t]
            if vals:
                diffs.append(e.value - sum(vals) / len(vals))
        units = episode_units(diffs)
    return units if len(units[0]) else None


def _pairs(row: TableRow, base: TableRow) -> tuple[list[tuple[RunRow, list[RunRow]]], str]:
    """(run of the row, the base runs it is paired with) and how; runs without any episode file take no
    part (they have no unit to pair)."""
    mine_runs = [r for r in row.runs if r.episodes]
    base_runs = [r for r in base.runs if r.episodes]
    by_seed = {r.seed: r for r in base_runs}
    shared = [r for r in mine_runs if r.seed in by_seed]
    if shared:
        seeds = ",".join(str(r.seed) for r in shared)
        return [(r, [by_seed[r.seed]]) for r in shared], f"matched: {seeds}"
    if not mine_runs or not base_runs:
        return [], "no episode files"
    mine = ",".join(str(r.seed) for r in mine_runs)
    theirs = ",".join(str(r.seed) for r in base_runs)
    return ([(r, base_runs) for r in mine_runs],
            f"none shared (row {mine}, all {theirs}): paired on units, `all` averaged over its seeds")


def paired_cell(col: Column, pairs: Sequence[tuple[RunRow, list[RunRow]]], rng: np.random.Generator, b: int) -> Interval | None:
    runs = []
    for run, bases in pairs:
        names = col.tasks_of(run) if col.task is None else [col.task]
        units = [u for u in (_task_units(n, run, bases) for n in names) if u is not None]
        if col.task is None and len(units) != len(names):
            units = []  # a split's difference needs every task of it paired: none rather than a partial mean
        if units:
            runs.append(units)
    return bootstrap(runs, rng, b, scale=100.0) if runs else None


def _base_for(row: TableRow, table: Table) -> TableRow | None:
    alls = [r for r in table.rows if r.key.selector == "all" and r.key.model == row.key.model]
    same = [r for r in alls if r.key.variant == row.key.variant]
    plain = [r for r in alls if not r.key.variant]
    return (same or plain or [None])[0]


def paired_vs_all(table: Table, b: int, seed: int) -> list[PairedRow]:
    """Every row but `all` against the `all` row of its model (of the same variant when there is one)."""
    out = []
    for row in table.rows:
        if row.key.selector == "all":
            continue
        base = _base_for(row, table)
        if base is None:
            continue
        pairs, seeds = _pairs(row, base)
        name = f"paired|{row.key.model}|{row.key.selector}|{row.key.variant}|{row.key.ratio}"
        cells = {c.key: paired_cell(c, pairs, rng_for(seed, name, c.key), b) if b > 0 else None
                 for c in table.columns}
        out.append(PairedRow(row, base, cells, seeds))
    return out


def fmt_paired(iv: Interval | None) -> str:
    if iv is None:
        return "—"
    return f"{iv.mean:+.2f} [{iv.lo:+.2f}, {iv.hi:+.2f}] (n={iv.n})"


# ------------------------------------------------------------------------------ agreement with the oracle


@dataclass(frozen=True)
class AgreementCell:
    #: mean over the row's seeds of each seed's mean Jaccard over the trajectories it shares with the oracle
    mean: float
    #: per seed: (seed, mean Jaccard, trajectories in common)
    per_seed: tuple[tuple[int | None, float, int], ...]
    #: the oracle run used for each seed (its own seed when the oracle has it)
    oracle_seeds: tuple[int | None, ...]


def _selection(run: RunRow, cache: dict) -> list | None:
    from atlas_exp.report.agreement import read_selected_steps

    if run.path is None:
        return None
    p = run.path / "selection.jsonl"
    if run.run_id not in cache:
        cache[run.run_id] = read_selected_steps(p) if p.is_file() else None
    return cache[run.run_id]


def agreement_with_oracle(runs: Sequence[RunRow]) -> dict[tuple[str, str], dict[tuple[str, str, float], AgreementCell]]:
    """(model, oracle variant) -> (selector label, variant, ratio) -> agreement of that row's selections with
    the oracle's at the same ratio. The oracle's choice does not depend on the seed (a temperature-0 judge,
    cached by prompt), so a row's seed is compared with the oracle run of the same seed when there is one,
    else with the oracle's lowest seed."""
    from atlas_exp.errors import AtlasError
    from atlas_exp.report.agreement import agreement
    from atlas_exp.report.table import row_key

    runs = [r for r in runs if r.path is not None and r.ratio is not None]
    cache: dict = {}
    oracles: dict[tuple[str, str, float], dict[int | None, RunRow]] = {}
    for r in runs:
        k = row_key(r)
        if r.selector == "oracle" and k.ratio is not None and _selection(r, cache) is not None:
            oracles.setdefault((k.model, k.variant, k.ratio), {})[r.seed] = r
    out: dict[tuple[str, str], dict[tuple[str, str, float], AgreementCell]] = {}
    for (model, ovariant, ratio), by_seed in sorted(oracles.items()):
        cells: dict[tuple[str, str, float], list[tuple[int | None, float, int, int | None]]] = {}
        for r in runs:
            k = row_key(r)
            if r.selector in ("oracle", "all") or k.model != model or k.ratio != ratio:
                continue
            mine = _selection(r, cache)
            if mine is None:
                continue
            oracle = by_seed.get(r.seed) or by_seed[min(by_seed, key=lambda s: (s is None, s or 0))]
            try:
                ag = agreement(_selection(oracle, cache), mine, oracle.run_id, where=f"{r.run_id} vs {oracle.run_id}")
            except AtlasError:
                continue
            cells.setdefault((k.selector, k.variant, ratio), []).append((r.seed, ag.mean, ag.n_common, oracle.seed))
        for key, per in cells.items():
            per.sort(key=lambda x: (x[0] is None, x[0] or 0))
            out.setdefault((model, ovariant), {})[key] = AgreementCell(
                mean=sum(p[1] for p in per) / len(per), per_seed=tuple((p[0], p[1], p[2]) for p in per),
                oracle_seeds=tuple(p[3] for p in per))
    return out
