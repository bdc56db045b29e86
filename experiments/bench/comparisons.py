"""A benchmark's result: its comparison rows (ours, baseline, ratio, target, met; medians and ranges with
repeats) and the JSON it writes to experiments/results/bench/<name>.json, with where and how it ran.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from common import params_of
from provenance import machine_info, versions


def comparison(
    figure: str,
    ours: float | None,
    baseline: float | None,
    *,
    op: str | None,
    target: float | None,
    unit: str = "",
    ours_label: str = "ours",
    baseline_label: str = "baseline",
    ratio: float | None = None,
    ranges: dict[str, list[float]] | None = None,
) -> dict[str, Any]:
    """One headline row: ratio = ours / baseline (or the given ratio, e.g. a rate with no baseline);
    met = ratio `op` target, op one of '>=' / '<=', or None for an informational row with no target.
    With repeats, `ours` and `baseline` are medians and `ranges` their [min, max] (keys `ours`, `baseline`,
    and `ratio`: the range of the per-repeat ratios), printed and kept in the row."""
    if ratio is None and ours is not None and baseline not in (None, 0):
        ratio = ours / baseline  # type: ignore[operator]
    met = None
    if ratio is not None and op is not None and target is not None:
        met = bool(ratio >= target - 1e-12) if op == ">=" else bool(ratio <= target + 1e-12)
    row = {
        "figure": figure,
        "unit": unit,
        "ours": ours,
        "baseline": baseline,
        "ours_label": ours_label,
        "baseline_label": baseline_label,
        "ratio": None if ratio is None else float(f"{float(ratio):.4g}"),
        "target": f"{op} {target:g}" if op is not None and target is not None else None,
        "met": met,
    }
    if ranges:
        row["ranges"] = {k: [float(f"{float(x):.4g}") for x in v] for k, v in ranges.items() if v}
    return row




def fmt_range(c: dict[str, Any], key: str) -> str:
    """` [min-max]` of a comparison row's figure over its repeats ('' without repeats)."""
    r = (c.get("ranges") or {}).get(key)
    return f" [{fmt(r[0])}-{fmt(r[1])}]" if r and len(r) == 2 else ""


def write_result(
    name: str,
    args: argparse.Namespace,
    *,
    figures: dict[str, Any],
    comparisons: list[dict[str, Any]],
    notes: list[str],
    started: float,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write the benchmark's JSON (atomically) and print its comparison rows."""
    res = {
        "benchmark": name,
        "quick": bool(args.quick),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "cwd": os.getcwd(),
        "wall_seconds": round(time.time() - started, 1),
        "machine": machine_info(),
        "versions": versions(),
        "params": params_of(args),
        "comparisons": comparisons,
        "figures": figures,
        "notes": notes,
        **(info or {}),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(res, indent=2, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, out)
    print()
    for c in comparisons:
        met = {True: "MET", False: "NOT MET", None: "n/a"}[c["met"]]
        tail = f"(target {c['target']}: {met})" if c["target"] else "(no target)"
        if c["baseline"] is None:
            print(f"[{name}] {c['figure']}: {fmt(c['ours'])}{fmt_range(c, 'ours')} {c['unit']} {tail}")
        else:
            print(
                f"[{name}] {c['figure']}: {c['ours_label']} {fmt(c['ours'])}{fmt_range(c, 'ours')} vs {c['baseline_label']} "
                f"{fmt(c['baseline'])}{fmt_range(c, 'baseline')} {c['unit']} -> ratio {fmt(c['ratio'])}{fmt_range(c, 'ratio')} {tail}"
            )
    print(f"[{name}] {'quick ' if args.quick else ''}result -> {out} ({res['wall_seconds']} s)")
    return out


def fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if x != x:
            return "nan"
        a = abs(x)
        if a >= 1000:
            return f"{x:,.0f}"
        if a >= 10:
            return f"{x:.1f}"
        if a >= 0.01 or a == 0:
            return f"{x:.3f}"
        return f"{x:.2e}"
    return str(x)
