"""Print one table of every benchmark result in experiments/results/bench/*.json.

Columns: benchmark, figure, ours, baseline, ratio (ours / baseline; "-" where there is no baseline and the
target applies to `ours` itself), target, met? (yes / NO / - for informational rows). A benchmark run with
repeats shows medians, each followed by its range over the repeats, `[min-max]` (for the ratio: the range of the
per-repeat ratios). Quick runs (`--quick`: small sizes, a check that a benchmark runs, not a measurement to
quote) are marked with `*`.

    python experiments/bench/summary.py [--dir DIR] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import comparisons

ORDER = ["train_throughput", "critical_step_compute", "select_throughput", "eval_throughput", "oracle_cost"]


def load(folder: Path) -> list[dict]:
    out = []
    for p in sorted(folder.glob("*.json")):
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"warning: {p}: unreadable ({e})", file=sys.stderr)
            continue
        if isinstance(d, dict) and "benchmark" in d and "comparisons" in d:
            d["_path"] = str(p)
            out.append(d)
    out.sort(key=lambda d: (ORDER.index(d["benchmark"]) if d["benchmark"] in ORDER else len(ORDER), d["benchmark"]))
    return out


def rows(results: list[dict]) -> list[list[str]]:
    table = []
    for d in results:
        # one benchmark run several ways (gpu_train_8b_lora.json, gpu_train_8b_full.json): name the file
        stem = Path(d["_path"]).stem
        label = d["benchmark"] if stem == d["benchmark"] else f"{d['benchmark']} [{stem.removeprefix(d['benchmark'] + '_')}]"
        name = label + ("*" if d.get("quick") else "")
        for c in d["comparisons"]:
            met = {True: "yes", False: "NO", None: "-"}[c.get("met")]
            unit = f" [{c['unit']}]" if c.get("unit") and c["unit"] not in c["figure"] else ""
            table.append([
                name,
                c["figure"] + unit,
                comparisons.fmt(c.get("ours")) + comparisons.fmt_range(c, "ours"),
                comparisons.fmt(c.get("baseline")) + comparisons.fmt_range(c, "baseline"),
                # a row without a baseline (a rate, a cost) has no ratio: its value is under `ours`
                (comparisons.fmt(c.get("ratio")) + "x" + comparisons.fmt_range(c, "ratio"))
                if c.get("baseline") is not None and c.get("ratio") is not None else "-",
                c.get("target") or "-",
                met,
            ])
    return table


HEADER = ["benchmark", "figure", "ours", "baseline", "ratio", "target", "met?"]


def render(table: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in table]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(HEADER, *table)]
    right = {2, 3, 4}
    def line(r):
        return "  ".join(str(x).rjust(w) if i in right else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths)))
    return "\n".join([line(HEADER), line(["-" * w for w in widths])] + [line(r) for r in table])


def gpu_names(d: dict) -> str:
    """The GPUs the benchmark ran on: `machine.gpus`, else the devices its workers reported (results written
    before `machine_info` asked nvidia-smi, by a parent process that never imported torch, list none)."""
    names = [g["name"] for g in d.get("machine", {}).get("gpus", [])]
    if not names:
        sides = (d.get("figures") or {}).get("sides") or {}
        names = sorted({s["device"] for s in sides.values() if isinstance(s, dict) and s.get("device") not in (None, "cpu")})
    return ", ".join(names) or "none"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=common.RESULTS_DIR)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    results = load(args.dir)
    if not results:
        print(f"no benchmark results in {args.dir}")
        sys.exit(1)
    print(render(rows(results), args.markdown))
    print()
    for d in results:
        m, v = d.get("machine", {}), d.get("versions", {})
        commit = (v.get("atlas_exp_commit") or "?")[:10] + ("+changes" if v.get("atlas_exp_tracked_changes") else "")
        print(f"{d['benchmark']}{'*' if d.get('quick') else ''}: {d.get('date')}, {d.get('wall_seconds')} s, "
              f"{m.get('cpu_model')} ({m.get('cpu_usable')} cores, {m.get('ram_gb')} GB, load {m.get('loadavg_1_5_15')}, "
              f"GPU {gpu_names(d)}), threads {m.get('OMP_NUM_THREADS')}, "
              f"torch {v.get('torch')}, transformers {v.get('transformers')}, trl {v.get('trl')}, commit {commit}")
    if any(d.get("quick") for d in results):
        print("* quick run: small sizes, a check that the benchmark runs; rerun without --quick for the figures to quote")


if __name__ == "__main__":
    main()
