"""The select stage: trajectories.jsonl -> selection.jsonl (+ selection_summary.json)."""

from __future__ import annotations

import logging
import time
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from atlas_exp.artifacts import (
    SCHEMA_VERSION,
    file_fingerprint,
    fingerprint,
    read_json,
    summary_matches,
    write_json,
    write_jsonl,
)
from atlas_exp.config import build
from atlas_exp.errors import AtlasError
from atlas_exp.run_dir import RunDir, read_trajectories
from atlas_exp.selectors.base import Selection, Selector, summarize

log = logging.getLogger(__name__)


def build_selector(cfg: DictConfig) -> Selector:
    return build(cfg.selector, "selector", Selector)


def _warn_fallbacks(summary: dict[str, Any]) -> None:
    """A finished selection whose judge failed on some trajectories says so, and how to retry only those."""
    stats = summary.get("selector_stats") or {}
    n = int(stats.get("failed") or 0)
    if n:
        log.warning("select: %d trajector%s fell back to %s; rerun with selector.retry_failed=true to ask the "
                    "judge again for those only (the other replies come from the cache)",
                    n, "y" if n == 1 else "ies", stats.get("on_failure", "the fallback"))


def run_select_stage(cfg: DictConfig, rd: RunDir) -> None:
    if not rd.trajectories.exists():
        raise AtlasError(f"no trajectories at {rd.trajectories}: run the data stage first (stage=data)")
    sel_cfg: dict[str, Any] = OmegaConf.to_container(cfg.selector, resolve=True)  # type: ignore[assignment]
    fp = fingerprint("select", SCHEMA_VERSION, file_fingerprint(rd.trajectories), sel_cfg)
    if not cfg.force and summary_matches(rd.selection_summary, fp, rd.selection):
        log.info("select: %s is up to date, skipping", rd.selection)
        _warn_fallbacks(read_json(rd.selection_summary))
        return

    trajs = read_trajectories(rd.trajectories)
    selector = build_selector(cfg)
    t0 = time.time()
    selections: list[Selection] = []
    try:
        bar = tqdm(selector.select(trajs), total=len(trajs), desc=f"select[{selector.name}]")
        # drained to the end (not zipped), so a selector's work after its last selection runs (the oracle
        # writes a batch file there and stops the stage) and a selector yielding too many is caught
        for sel in bar:
            if len(selections) == len(trajs):
                raise AtlasError(f"selector {selector.name} returned more selections than the {len(trajs)} trajectories")
            traj = trajs[len(selections)]
            sel.check_matches(traj, source=f"selector {selector.name}")
            sel.trajectory_sha256 = traj.content_hash()
            selections.append(sel)
            postfix = selector.postfix()
            if postfix:
                bar.set_postfix(postfix, refresh=False)
    finally:
        selector.close()
    if len(selections) != len(trajs):
        raise AtlasError(f"selector {selector.name} returned {len(selections)} selections for {len(trajs)} trajectories")

    write_jsonl(rd.selection, (s.to_dict() for s in selections))
    summary = {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": fp,
        "selector": selector.name,
        "ratio": selector.ratio,
        "seconds": round(time.time() - t0, 3),
        **summarize(selections, trajs),
        "selector_stats": selector.stats(),
    }
    write_json(rd.selection_summary, summary)
    _warn_fallbacks(summary)
    log.info(
        "select: %d trajectories, %d/%d steps selected (achieved ratio %.3f) -> %s",
        summary["n_trajectories"],
        summary["n_selected"],
        summary["n_steps"],
        summary["achieved_ratio"],
        rd.selection,
    )
