"""`python -m atlas_exp.report`: the results report of a sweep (report.md, report.csv, PNG plots).

    python -m atlas_exp.report outputs/cpu_small/multirun_2026-01-01_10-00-00          # -> into that dir
    python -m atlas_exp.report outputs/paper_main/sweep --out reports/main
    python -m atlas_exp.report --from-wandb ENTITY/PROJECT --group paper_main --out reports/main_wandb

From disk it reads every run dir under the sweep dir (config, selection/training summaries, results.json);
from W&B it reads the eval runs of a project/group (see `collect_wandb`: not run against a server here).
report.md records the command, the code's git commit and the date, so a number in a paper draft can be
traced back to what produced it.

Bad input (missing dir, no runs, an unreadable artifact) is one line on stderr naming the file, exit 2,
like the app's own errors: a traceback is kept for bugs.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from atlas_exp.artifacts import atomic_write_text
from atlas_exp.errors import AtlasError
from atlas_exp.report.collect import collect_sweep
from atlas_exp.report.compare import agreement_with_oracle, paired_vs_all
from atlas_exp.report.rows import RunRow
from atlas_exp.report.sections import agreement_md, categories_md, compute_md, paired_md
from atlas_exp.report.stats import DEFAULT_B
from atlas_exp.report.table import (
    NO_CI_MARK,
    PAPER_SOURCE,
    Table,
    aggregate,
    main_table_md,
    paper_table_md,
    runs_table_md,
    to_csv,
)
from atlas_exp.report.variants import common_overrides
from atlas_exp.report.wandb_runs import collect_wandb

PROG = "atlas_exp.report"


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line with exit 2 like every other bad input here."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{PROG}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = _Parser(prog=f"python -m {PROG}", description="Results report of a sweep: report.md, report.csv and plots.")
    p.add_argument("sweep_dir", nargs="?", type=Path, help="the Hydra multirun dir (searched recursively for run dirs)")
    p.add_argument("--out", type=Path, default=None, help="where to write the report (default: the sweep dir)")
    p.add_argument("--from-wandb", metavar="ENTITY/PROJECT", default=None,
                   help="read the eval runs of this W&B project instead of a sweep dir (needs --out)")
    p.add_argument("--group", default=None,
                   help="with --from-wandb: only runs of this W&B group (the app's logger.group: experiment_name by default)")
    p.add_argument("--bootstrap", type=int, default=DEFAULT_B, metavar="N",
                   help=f"bootstrap replicates per confidence interval (default {DEFAULT_B}; 0: no intervals)")
    p.add_argument("--bootstrap-seed", type=int, default=0, metavar="S",
                   help="seed of the bootstrap draws (default 0): the same report for the same runs")
    a = p.parse_args(list(argv))
    if a.bootstrap < 0:
        p.error(f"--bootstrap {a.bootstrap}: give 0 (no intervals) or more replicates")
    if a.from_wandb and a.sweep_dir is not None:
        p.error("give a sweep dir or --from-wandb, not both")
    if not a.from_wandb and a.sweep_dir is None:
        p.error("give a sweep dir (or --from-wandb ENTITY/PROJECT)")
    if a.from_wandb and a.out is None:
        p.error("--from-wandb needs --out DIR")
    if a.group and not a.from_wandb:
        p.error("--group is for --from-wandb")
    return a


def git_commit() -> str:
    """The commit of the checkout this package runs from, marked when the tree has uncommitted changes;
    'unknown' outside a git checkout (an installed wheel)."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"{sha} (with uncommitted changes)" if dirty else sha


@dataclass(frozen=True)
class Provenance:
    """What produced the report: shown at its top."""

    source: str
    command: str
    commit: str
    date: str


def ci_method_text(b: int, seed: int) -> str:
    if b <= 0:
        return "No confidence intervals (`--bootstrap 0`): cells are mean ± sample std over seeds."
    return (f"Intervals: percentile bootstrap, {b} replicates (seed {seed}; `--bootstrap N`). A replicate draws the "
            "row's seeds with replacement, then for each drawn seed resamples the episodes of that seed's run "
            "(`eval/<task>/<episode>.json`; for an offline expert-steps task an episode is one held-out expert "
            "trajectory, scored by the share of its steps reproduced), and recomputes the cell (a split average: "
            "the unweighted mean over its tasks); with one seed only the episodes are resampled. The interval "
            "shows episode noise and seed noise together. "
            f"{NO_CI_MARK} = no interval: a run of the cell has no episode files that reproduce its results.json "
            "value, so the cell is results.json's mean ± std over seeds.")


def render_report(prov: Provenance, runs: Sequence[RunRow], table: Table, plots: Sequence,
                  b: int = DEFAULT_B, seed: int = 0) -> str:
    incomplete = [r for r in runs if not r.complete]
    n_done = len(runs) - len(incomplete)
    lines = [
        "# Sweep report",
        "",
        f"- source: `{prov.source}`",
        f"- date: {prov.date}",
        f"- command: `{prov.command}`",
        f"- code: git {prov.commit}",
        f"- runs: {len(runs)} found, {n_done} complete, {len(incomplete)} incomplete",
    ]
    if table.models:
        lines.append(f"- model(s): {', '.join(table.models)}")
    common = common_overrides(runs)
    if common:
        lines.append(f"- overrides shared by every run: `{' '.join(common)}`")
    lines += [
        "",
        "## Main table",
        "",
        ("Cells: mean over the seeds of a row [95% confidence interval]; values in percent (success rate; "
         "ScienceWorld and the offline expert-steps tasks: score), as results.json reports them. `n` = complete "
         "runs in the row; a cell with fewer runs (a task without a finished episode) says its own n. Achieved "
         "ratio = selected / all steps; supervised tokens = tokens the loss saw (training_summary.json "
         "`data/n_supervised_tokens`), mean [interval over seeds]."),
        "",
        ci_method_text(b, seed),
        "",
    ]
    if table.rows:
        lines += main_table_md(table)
        lines += ["", (f"† **The paper's published numbers, not from this sweep**: {PAPER_SOURCE}. "
                       "Shown for comparison on rows that correspond to a paper row; the paper's setup (model, "
                       "data, evaluation tasks) differs from this sweep's unless the sweep reproduces it.")]
        missing = [(row, [c for c in table.columns if row.cells[c.key].no_ci]) for row in table.rows]
        missing = [(row, cols) for row, cols in missing if cols]
        if missing:
            lines += ["", f"{NO_CI_MARK} Cells without an interval:", ""]
            for row, cols in missing:
                why = "; ".join(dict.fromkeys(row.cells[c.key].no_ci for c in cols))
                lines.append(f"- {row.key.selector_label} {row.key.ratio_label} ({', '.join(c.label for c in cols)}): {why}")
    else:
        lines.append("_No complete run: nothing to aggregate._")
    lines += ["", "## Paired comparison with all steps", "",
              ("Per unit present in both the row and the `all steps` row (selector=all): offline expert-steps tasks, "
               "one unit per (seed, trajectory, step), the difference of `action_correct`; env tasks, one unit per "
               "(seed, episode id), the difference of success (or score). Cell: mean difference row - all in "
               "percentage points [paired bootstrap 95% interval: seeds, then trajectories (their steps together) or "
               "episodes within a seed] (n = units); a split: the unweighted mean over its tasks. `seeds`: matched "
               "seeds (only those count), or none shared, when each run of the row is paired with the mean of the "
               "`all` runs on each unit."), ""]
    lines += paired_md(paired_vs_all(table, b, seed), table) if b > 0 else ["_Not computed (`--bootstrap 0`)._"]
    lines += ["", "## Agreement with the oracle's selection", "",
              ("Mean Jaccard |A ∩ B| / |A ∪ B| of the selected steps of each selector and of the oracle at the same "
               "ratio, over the trajectories both selected from (same id and step count; seed by seed, the oracle "
               "run of the same seed or else its lowest seed: its choice does not depend on the seed), then the mean "
               "over the row's seeds. 1 = the same steps, 0 = none in common."), ""]
    lines += agreement_md(agreement_with_oracle(runs), len(table.models))
    lines += ["", "## Categories of the selected steps per env", "",
              ("Selected steps per category, mean per run of the row (share of the row's categorised selected steps), "
               "from selection.jsonl with each trajectory's env from trajectories.jsonl; achieved ratio = the env's "
               "selected / all steps (selection_summary.json `per_env`)."), ""]
    lines += categories_md(runs)
    lines += ["", "## Compute", "",
              ("What each row cost, beside its split averages; mean [bootstrap 95% interval over seeds]. Supervised "
               "tokens: tokens the loss saw per epoch (`data/n_supervised_tokens`); input tokens / epoch: all tokens "
               "of the training examples (`data/n_tokens`, after dropping what follows the last selected step); input "
               "tokens processed: that times the epochs run (with `train.max_steps`: global steps x global batch / "
               "examples, an estimate at the mean example length); train s / select s: wall time of the train and "
               "select stages (training_summary.json / selection_summary.json `seconds`; a cached selection is "
               "fast, so select s is the cost of this run's selection, not of the first one)."), ""]
    lines += compute_md(table)
    lines += ["", f"## The paper's published numbers ({PAPER_SOURCE})", "",
              "Not produced by this sweep; for reference.", ""]
    lines += paper_table_md()
    lines += ["", "## Plots", ""]
    for p in plots:
        lines.append(f"### {p.title}")
        lines.append("")
        lines.append(f"![{p.title}]({p.path.name})" if p.path else f"_{p.note}_")
        lines.append("")
    lines += ["## Incomplete runs", ""]
    if incomplete:
        lines.append("Runs without results.json (crashed, still running, or eval not run); not in the table.")
        lines.append("")
        for r in incomplete:
            has = ", ".join(r.has) if r.has else "no stage artifact"
            lines.append(f"- `{r.run_id}`: {r.selector}, ratio {r.ratio if r.ratio is not None else '?'}, "
                         f"seed {r.seed}; has: {has}")
    else:
        lines.append("None.")
    lines += ["", "## Complete runs", ""]
    lines += runs_table_md(runs) if n_done else ["None."]
    return "\n".join(lines) + "\n"


def run(argv: Sequence[str]) -> Path:
    from atlas_exp.report.plots import make_plots

    a = parse_args(argv)
    if a.from_wandb:
        source = f"W&B {a.from_wandb}" + (f" group {a.group}" if a.group else "")
        runs = collect_wandb(a.from_wandb, a.group)
        out = a.out
    else:
        sweep = a.sweep_dir.resolve()
        source = str(sweep)
        runs = collect_sweep(sweep)
        out = a.out or sweep
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AtlasError(f"--out {out}: cannot create: {e.strerror or e}") from None
    table = aggregate(runs, a.bootstrap, a.bootstrap_seed)
    plots = make_plots(table, runs, out)
    prov = Provenance(
        source=source,
        command=" ".join(["python", "-m", PROG, *map(shlex.quote, argv)]),
        commit=git_commit(),
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    )
    try:
        atomic_write_text(out / "report.csv", to_csv(table))
        atomic_write_text(out / "report.md", render_report(prov, runs, table, plots, a.bootstrap, a.bootstrap_seed))
    except OSError as e:
        raise AtlasError(f"--out {out}: cannot write the report: {e.strerror or e}") from None
    n_inc = sum(not r.complete for r in runs)
    print(f"report: {out / 'report.md'} and report.csv ({len(table.rows)} rows from {len(runs) - n_inc} complete "
          f"runs, {n_inc} incomplete)")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        run(argv)
    except AtlasError as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
