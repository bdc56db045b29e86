"""Bootstrap confidence intervals for the report: over the units of a run (episodes, expert trajectories,
expert steps) and over the seeds of a row.

The statistic of a row is the mean over its seeds of each seed's run mean, which is what the table shows.
A replicate resamples the seeds with replacement, then, independently for each drawn seed, the units of
that seed's run (a seed drawn twice gets two independent resamples), and recomputes the statistic; the
interval is the 2.5 and 97.5 percentiles of B replicates (percentile bootstrap). With one seed only the
units are resampled.

A unit set is a list of clusters, each a (sum, count): an episode is (value, 1); an expert trajectory in a
step-level comparison is (sum of its steps' differences, number of steps), so steps of one trajectory are
resampled together (they are not independent) while the mean stays the mean over steps. A run may carry
several unit sets (the tasks of a split): its value is then the unweighted mean over them, like the eval
stage's split average.

Every function takes a `numpy.random.Generator`; `rng_for` derives one from the report's seed and a
cell's name, so a cell's interval does not change when rows or columns are added.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_B = 2000
LEVEL = 0.95
#: at most this many resampled indices in memory at once (B x n is chunked over B)
_CHUNK = 4_000_000

#: one run's units: per unit set (task), (sums, counts) of its clusters
Units = Sequence[tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Interval:
    """Point estimate and percentile-bootstrap interval; n = units in all (clusters' counts summed)."""

    mean: float
    lo: float
    hi: float
    n: int


def rng_for(seed: int, *names: str) -> np.random.Generator:
    """A generator for one cell: the same (seed, names) always gives the same draws."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *(zlib.crc32(n.encode()) for n in names)])


def episode_units(values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Units of one value each (an episode's success or score)."""
    v = np.asarray(values, dtype=float)
    return v, np.ones_like(v)


def cluster_units(clusters: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Clusters of values resampled together (the steps of one trajectory); empty clusters dropped."""
    cs = [c for c in clusters if len(c)]
    return (np.array([float(sum(c)) for c in cs], dtype=float), np.array([float(len(c)) for c in cs], dtype=float))


def _resampled_means(sums: np.ndarray, counts: np.ndarray, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Ratio-of-sums means of `shape` independent resamples (with replacement) of the clusters."""
    n = len(sums)
    total = int(np.prod(shape))
    out = np.empty(total)
    step = max(1, _CHUNK // max(n, 1))
    for i in range(0, total, step):
        m = min(step, total - i)
        idx = rng.integers(0, n, size=(m, n))
        out[i:i + m] = sums[idx].sum(1) / counts[idx].sum(1)
    return out.reshape(shape)


def _point(units: Units) -> float:
    return float(np.mean([s.sum() / c.sum() for s, c in units]))


def bootstrap(runs: Sequence[Units], rng: np.random.Generator, b: int = DEFAULT_B, scale: float = 1.0) -> Interval | None:
    """Mean over runs (seeds) of each run's mean over its unit sets, with the hierarchical percentile
    bootstrap interval (seeds, then clusters within each drawn seed's run). `scale` multiplies everything
    (100: proportions in percent). None when a run has an empty unit set."""
    runs = [list(r) for r in runs]
    if not runs or any(not r or any(len(s) == 0 for s, _ in r) for r in runs):
        return None
    n = int(sum(c.sum() for r in runs for _, c in r))
    point = float(np.mean([_point(r) for r in runs]))
    k = len(runs)
    slots = 1 if k == 1 else k
    # per run, per slot of a replicate: that run's resampled value (mean over its unit sets)
    per_run = np.stack([np.mean([_resampled_means(s, c, rng, (b, slots)) for s, c in r], axis=0) for r in runs])
    if k == 1:
        reps = per_run[0, :, 0]
    else:
        choice = rng.integers(0, k, size=(b, k))
        reps = per_run[choice, np.arange(b)[:, None], np.arange(k)[None, :]].mean(1)
    lo, hi = np.quantile(reps, [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2])
    return Interval(point * scale, float(lo) * scale, float(hi) * scale, n)


def bootstrap_values(values: Sequence[float], rng: np.random.Generator, b: int = DEFAULT_B) -> Interval | None:
    """Mean of one number per seed (a run's training time, its tokens), with the bootstrap over seeds."""
    vs = [float(v) for v in values]
    if not vs:
        return None
    return bootstrap([[episode_units([v])] for v in vs], rng, b)
