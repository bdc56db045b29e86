"""From played episodes to the numbers of the paper's tables: per-task scores and held-in/held-out averages.

The ATLaS and AgentGym tables report, per environment, the success rate in percent (ScienceWorld: the
average score, 0-100), and per split the unweighted mean over its environments. `summarize` computes
exactly that from `eval/episodes.jsonl` records, plus what a researcher needs to trust a number: how many
episodes, how they ended, invalid actions, turns.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable

#: metrics a task can report as its headline number
METRICS = ("success", "score")
#: held_in / held_out: agent success in environments, as the paper reports it; offline: teacher-forced
#: expert-step reproduction (eval/expert_steps.py), reported beside them, never averaged with them
SPLITS = ("held_in", "held_out", "offline")


@dataclass(frozen=True)
class TaskInfo:
    """What the summary needs to know about a task besides its episodes."""

    name: str
    env: str
    split: str
    metric: str
    n_planned: int


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(records: Iterable[dict[str, Any]], tasks: list[TaskInfo]) -> dict[str, Any]:
    """Per-task and per-split figures. A task with no finished episode gets NaN, not a made-up 0."""
    by_task: dict[str, list[dict[str, Any]]] = {t.name: [] for t in tasks}
    for r in records:
        if r["task"] in by_task:
            by_task[r["task"]].append(r)
    out_tasks: dict[str, Any] = {}
    for t in tasks:
        rs = by_task[t.name]
        success = [1.0 if r["success"] else 0.0 for r in rs]
        score = [float(r["score"]) for r in rs]
        headline = 100.0 * _mean(success if t.metric == "success" else score)
        out_tasks[t.name] = {
            "env": t.env,
            "split": t.split,
            "metric": t.metric,
            "value": round(headline, 4) if not math.isnan(headline) else None,
            "n": len(rs),
            "n_planned": t.n_planned,
            "success_rate": round(_mean(success), 6) if rs else None,
            "mean_score": round(_mean(score), 6) if rs else None,
            "mean_reward": round(_mean([float(r["reward"]) for r in rs]), 6) if rs else None,
            "mean_turns": round(_mean([float(r["turns"]) for r in rs]), 3) if rs else None,
            "invalid_actions": sum(int(r["invalid_actions"]) for r in rs),
            "ends": dict(sorted(Counter(r["end"] for r in rs).items())),
        }
    splits: dict[str, Any] = {}
    for split in SPLITS:
        names = [t.name for t in tasks if t.split == split]
        if not names:
            continue
        values = [out_tasks[n]["value"] for n in names]
        known = [v for v in values if v is not None]
        splits[split] = {
            "average": round(_mean(known), 4) if known and len(known) == len(values) else None,
            "tasks": names,
        }
    return {"tasks": out_tasks, "splits": splits}


def format_table(summary: dict[str, Any]) -> str:
    """A plain-text table of the summary for the log."""
    lines = [f"{'task':<16}{'split':<10}{'metric':<9}{'value':>8}{'n':>6}  ends"]
    for name, t in summary["tasks"].items():
        v = "-" if t["value"] is None else f"{t['value']:.2f}"
        ends = ", ".join(f"{k} {n}" for k, n in t["ends"].items())
        lines.append(f"{name:<16}{t['split']:<10}{t['metric']:<9}{v:>8}{t['n']:>6}  {ends}")
    for split, s in summary["splits"].items():
        v = "-" if s["average"] is None else f"{s['average']:.2f}"
        lines.append(f"{split + ' average':<35}{v:>8}")
    return "\n".join(lines)
