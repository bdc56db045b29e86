"""Two sides, repeated: every A/B benchmark runs each side `--repeats` times (default 3), the order alternating
from one repeat to the next, and reports each figure's median and range.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Iterator
from typing import Any


def alternating(sides: list[str], repeats: int) -> Iterator[tuple[int, str]]:
    """`(repeat, side)` in the order an A/B benchmark runs them: every side once per repeat, the order
    rotating from one repeat to the next (A B, B A, A B, ...), so that neither side always runs first (on a
    warmer or a quieter machine)."""
    for r in range(int(repeats)):
        k = r % len(sides)
        for side in sides[k:] + sides[:k]:
            yield r, side


def spread(values: list[float]) -> dict[str, Any]:
    """Median and range of one figure over the repeats of a side."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def add_repeats_option(p: argparse.ArgumentParser, default: int = 3) -> None:
    p.add_argument("--repeats", type=int, default=default,
                   help=f"runs per side, the order alternating from one repeat to the next; median and range "
                        f"reported (default {default})")


def paired_ratios(ours: list[float], baseline: list[float]) -> list[float]:
    """ours / baseline repeat by repeat (the two sides of one repeat ran next to each other)."""
    return [a / b for a, b in zip(ours, baseline) if b]
