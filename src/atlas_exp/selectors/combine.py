"""Selectors built from other selectors: `selector=non_critical` and `selector=hybrid`.

Children are given as selector configs (`base:` for non_critical, `a:` and `b:` for hybrid), composed from
the selector group by Hydra defaults, so any selector plugs in by name:

    python -m atlas_exp selector=non_critical selector@selector.base=oracle
    python -m atlas_exp selector=hybrid selector@selector.a=oracle selector@selector.b=perplexity_delta

The yaml sets `_recursive_: false`, so the children arrive here as configs and are built by `build_child`
with THIS selector's `ratio` (a child config's own ratio is overridden: "the complement at the same ratio"
and "the union of two selections at the same ratio" need that) and, unless the child config sets its own
`seed`, this selector's seed (composed children inherit the top-level `${seed}` either way). A child may also be passed as a
built `Selector` (from Python); its ratio must then equal ours. Children are closed in `close()`, and every
child selection is checked against its trajectory (id and step count) before it is used.

Scores written by these selectors keep the contract "higher = more wanted by this selector", and the
selected steps are exactly the top-scored ones under the documented rule; the children's scores and
selections are kept in `meta` for inspection.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from atlas_exp.data.trajectory import Trajectory
from atlas_exp.errors import AtlasError, ConfigError
from atlas_exp.selectors.base import Selection, Selector, StepChoice, n_to_select

log = logging.getLogger(__name__)


def build_child(spec: Any, *, ratio: float, seed: int, role: str) -> Selector:
    """A child selector from a config (built with our ratio; with our seed unless it names its own) or an
    already built Selector."""
    if isinstance(spec, Selector):
        if not math.isclose(spec.ratio, ratio):
            raise ConfigError(f"selector.{role}: a child selector must run at ratio {ratio}, got {spec.ratio}")
        return spec
    from omegaconf import DictConfig, OmegaConf

    from atlas_exp.config import build

    if isinstance(spec, Mapping) and not isinstance(spec, DictConfig):
        spec = OmegaConf.create(dict(spec))
    if not isinstance(spec, DictConfig) or "_target_" not in spec:
        raise ConfigError(f"selector.{role} must be a selector config with a _target_ (e.g. selector@selector.{role}=random)")
    extra: dict[str, Any] = {"ratio": ratio}
    if spec.get("seed") is None:
        extra["seed"] = seed
    return build(spec, f"selector.{role}", Selector, **extra)


def aligned(child: Selector, trajs: Sequence[Trajectory], role: str) -> Iterator[Selection]:
    """The child's selections, checked one by one against the trajectories they must describe."""
    it = iter(child.select(trajs))
    for t in trajs:
        try:
            sel = next(it)
        except StopIteration:
            raise AtlasError(f"selector.{role} ({child.name}) returned fewer selections than trajectories") from None
        sel.check_matches(t, source=f"selector.{role} ({child.name})")
        yield sel


def normalized_ranks(scores: Sequence[float]) -> list[float]:
    """Each score's rank among the trajectory's scores, scaled to [0, 1] (0 = lowest, 1 = highest).

    Ties share their average rank, so equal scores stay equal. A single step gets 1.0 (it is the best
    step of its trajectory). Ranks make children with incomparable score scales (loss ratios, oracle
    categories, random draws) combinable, and per-trajectory scaling makes short and long trajectories alike.
    """
    n = len(scores)
    if n == 1:
        return [1.0]
    order = sorted(range(n), key=lambda i: scores[i])
    ranks = [0.0] * n
    i = 0
    while i < n:
        j = i
        while j + 1 < n and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        avg = (i + j) / 2
        for m in range(i, j + 1):
            ranks[order[m]] = avg / (n - 1)
        i = j + 1
    return ranks


def _order(priority: Sequence[float]) -> list[int]:
    """Steps by decreasing priority, ties to the earlier step (as `top_k`)."""
    return sorted(range(len(priority)), key=lambda i: (-priority[i], i))


class NonCriticalSelector(Selector):
    """The complement of a base selector at the same ratio: the paper's "non-critical steps" ablation.

    Rule, per trajectory of n steps, k = n_to_select(n, ratio):
    * candidates are the steps the base did NOT select; the k with the LOWEST base score are chosen (ties:
      earlier step). With a fixed-ratio base that selected k steps, n - k candidates remain.
    * if fewer than k candidates exist, all of them are chosen (never a base-selected step while a
      candidate remains): the selection never overlaps the base's.
    * if there is no candidate at all (n == 1, or the base selected every step), `on_exhausted` decides:
      `lowest` (default) chooses the single base-selected step with the lowest base score, so every
      trajectory still trains on one step (the train stage refuses empty selections by default), and the
      step's reason and `meta.overlap` say so; `none` chooses nothing (train with train.on_empty=skip).

    Written score: 1 + (1 - r)/2 for candidates and (1 - r)/2 for base-selected steps, r = the step's
    normalised rank of base score: candidates first, lowest base score first, so the chosen steps are the
    top-scored ones. meta: {"base", "base_selected", "base_scores", "overlap"?}.
    """

    name = "non_critical"

    def __init__(self, ratio: float = 0.3, seed: int = 0, base: Any = None, on_exhausted: str = "lowest"):
        super().__init__(ratio=ratio, seed=seed)
        if on_exhausted not in ("lowest", "none"):
            raise ConfigError(f"selector.on_exhausted must be 'lowest' or 'none', got {on_exhausted!r}")
        if base is None:
            raise ConfigError("selector.base is required: the selector whose choice non_critical complements")
        self.on_exhausted = on_exhausted
        self.base = build_child(base, ratio=self.ratio, seed=self.seed, role="base")

    def complement(self, traj: Trajectory, base_sel: Selection) -> Selection:
        n = traj.n_steps
        k = n_to_select(n, self.ratio)
        base_scores = [s.score for s in base_sel.steps]
        taken = set(base_sel.selected_steps)
        ranks = normalized_ranks(base_scores)
        prio = [(0.0 if i in taken else 1.0) + (1.0 - ranks[i]) / 2 for i in range(n)]
        cands = [i for i in _order(prio) if i not in taken]
        chosen = set(cands[:k])
        overlap: list[int] = []
        if not chosen and self.on_exhausted == "lowest" and n:
            overlap = _order(prio)[:1]
            chosen = set(overlap)
        steps = [
            StepChoice(
                step=i,
                score=prio[i],
                selected=i in chosen,
                reason=("the base selected every step; kept its lowest-scored one" if i in overlap else None),
            )
            for i in range(n)
        ]
        meta: dict[str, Any] = {"base": self.base.name, "base_selected": sorted(taken), "base_scores": base_scores}
        if overlap:
            meta["overlap"] = overlap
        return Selection(id=traj.id, selector=self.name, ratio=self.ratio, steps=steps, meta=meta)

    def select(self, trajectories: Sequence[Trajectory]) -> Iterator[Selection]:
        trajs = list(trajectories)
        for t, b in zip(trajs, aligned(self.base, trajs, "base")):
            yield self.complement(t, b)

    def select_one(self, traj: Trajectory) -> Selection:
        (sel,) = self.select([traj])
        return sel

    def close(self) -> None:
        self.base.close()


MODES = ("rank_fusion", "intersection", "union")
COUNTS = ("exact", "natural")


class HybridSelector(Selector):
    """Combines two selectors `a` and `b` (both run at this ratio) on each trajectory.

    fused_i = w_a * r_a(i) + w_b * r_b(i), with r the per-trajectory normalised rank of the child's score
    (`normalized_ranks`: 0 = lowest, 1 = highest, ties averaged) and weights normalised to sum 1 (default
    equal). Mean of normalised ranks rather than reciprocal rank fusion: RRF's constant (60) swamps the
    ranks of trajectories of 3 to 30 steps, making it almost linear in rank anyway, and it is not scale-free
    across trajectory lengths; normalised ranks are.

    Modes, k = n_to_select(n, ratio):
    * `rank_fusion` (default): the top k steps by fused score (ties: earlier step). score = fused.
    * `intersection` / `union` use votes v_i = how many children selected step i (0, 1, 2), and
      score = v_i + fused_i / 2 (so steps sort by votes, then by fused rank).
      - `count: exact` (default): exactly k steps, the top k by that score. Intersection keeps the steps
        both chose and fills up with steps one chose (then neither), best fused first; union caps the steps
        either chose, those both chose first. NOTE: with children that each select exactly k steps (every
        fixed-ratio selector), |A and B| <= k <= |A or B|, so the two exact modes give the same selection;
        they differ when a child's count varies (global scope, an oracle that selects by category).
      - `count: natural`: intersection = exactly the steps both chose, union = exactly the steps either
        chose; if that is empty, the single top-scored step (every trajectory trains on at least one).
    meta: {"children": [a, b], "a_selected", "b_selected", "a_scores", "b_scores", "fused"}.
    """

    name = "hybrid"

    def __init__(
        self,
        ratio: float = 0.3,
        seed: int = 0,
        a: Any = None,
        b: Any = None,
        mode: str = "rank_fusion",
        count: str = "exact",
        weights: Sequence[float] | None = None,
    ):
        super().__init__(ratio=ratio, seed=seed)
        if mode not in MODES:
            raise ConfigError(f"selector.mode must be one of {MODES}, got {mode!r}")
        if count not in COUNTS:
            raise ConfigError(f"selector.count must be one of {COUNTS}, got {count!r}")
        w = [1.0, 1.0] if weights is None else [float(x) for x in weights]
        if len(w) != 2 or any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
            raise ConfigError(f"selector.weights must be two non-negative numbers, not both 0, got {weights!r}")
        if a is None or b is None:
            raise ConfigError("selector.a and selector.b are required: the two selectors hybrid combines")
        self.mode = mode
        self.count = count
        self.weights = [x / sum(w) for x in w]
        self.a = build_child(a, ratio=self.ratio, seed=self.seed, role="a")
        try:
            self.b = build_child(b, ratio=self.ratio, seed=self.seed, role="b")
        except Exception:
            self.a.close()
            raise

    def combine(self, traj: Trajectory, sa: Selection, sb: Selection) -> Selection:
        n = traj.n_steps
        k = n_to_select(n, self.ratio)
        a_scores = [s.score for s in sa.steps]
        b_scores = [s.score for s in sb.steps]
        ra, rb = normalized_ranks(a_scores), normalized_ranks(b_scores)
        fused = [self.weights[0] * x + self.weights[1] * y for x, y in zip(ra, rb)]
        A, B = set(sa.selected_steps), set(sb.selected_steps)
        if self.mode == "rank_fusion":
            score = fused
            chosen = set(_order(score)[:k])
        else:
            votes = [(i in A) + (i in B) for i in range(n)]
            score = [v + f / 2 for v, f in zip(votes, fused)]
            if self.count == "exact":
                chosen = set(_order(score)[:k])
            else:
                chosen = A & B if self.mode == "intersection" else A | B
                if not chosen:
                    chosen = set(_order(score)[:1])
        steps = [StepChoice(step=i, score=score[i], selected=i in chosen) for i in range(n)]
        meta = {
            "children": [self.a.name, self.b.name],
            "a_selected": sorted(A),
            "b_selected": sorted(B),
            "a_scores": a_scores,
            "b_scores": b_scores,
            "fused": fused,
        }
        return Selection(id=traj.id, selector=self.name, ratio=self.ratio, steps=steps, meta=meta)

    def select(self, trajectories: Sequence[Trajectory]) -> Iterator[Selection]:
        trajs = list(trajectories)
        for t, sa, sb in zip(trajs, aligned(self.a, trajs, "a"), aligned(self.b, trajs, "b")):
            yield self.combine(t, sa, sb)

    def select_one(self, traj: Trajectory) -> Selection:
        (sel,) = self.select([traj])
        return sel

    def close(self) -> None:
        try:
            self.a.close()
        finally:
            self.b.close()
