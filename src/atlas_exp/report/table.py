"""The sweep's main table: runs grouped into rows of (model, selector, variant, ratio), each cell the mean
and sample standard deviation over seeds, laid out like the paper's main table (held-in tasks, held-in
average, held-out tasks, held-out average), with the paper's published averages beside the rows they
correspond to; written as report.csv and as report.md.

Why mean +- std over seeds and not the best seed: the paper reports one run per row, and a difference
between selectors of a few points is within seed noise at small scale; the std makes that visible.
Std is the sample std (n - 1); a row with one run has none rather than a misleading 0.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from atlas_exp.eval.results import SPLITS
from atlas_exp.report.rows import RunRow
from atlas_exp.report.stats import (
    DEFAULT_B,
    bootstrap,
    bootstrap_values,
    episode_units,
    rng_for,
)

#: marks a cell without a confidence interval because a run of it has no usable per-episode files
NO_CI_MARK = "‡"

SPLIT_LABEL = {"held_in": "held-in", "held_out": "held-out", "offline": "offline (expert steps)"}
#: row order: the paper's order first (the baseline, the method, its ablations), then the rest by name
SELECTOR_ORDER = ("all", "oracle", "random", "non_critical", "perplexity", "perplexity_delta", "excess_loss", "rollout_value",
                  "hybrid")
#: two ratios closer than this are the same row (0.3 from YAML and 0.30000000000000004 from arithmetic)
RATIO_TOL = 1e-6

PAPER_SOURCE = "ATLaS paper (arXiv 2503.02197), main table, Llama-3.1-8B-Instruct"


@dataclass(frozen=True)
class PaperRow:
    """A row of the paper's main table: its label there and its published held-in / held-out averages."""

    label: str
    held_in: float
    held_out: float
    note: str = ""
    #: the paper's setup in our row terms (RowKey.variant); a row with another variant gets the note
    variant: str = ""


#: (selector, ratio) -> the paper's row; ratio None: any ratio (all steps trains every step)
PAPER_ROWS: dict[tuple[str, float | None], PaperRow] = {
    ("all", None): PaperRow("all steps", 60.52, 36.18),
    ("oracle", 0.3): PaperRow("ATLaS (oracle) 30%", 65.91, 38.36, "GPT-4o judge"),
    ("random", 0.3): PaperRow("random 30%", 59.90, 38.04),
    ("non_critical", 0.3): PaperRow("non-critical 30%", 56.17, 29.88, "complement of the GPT-4o judge's choice",
                                    variant="base=oracle"),
    ("perplexity", 0.3): PaperRow("perplexity top-30%", 53.21, 22.13),
}


def paper_row(selector: str, ratio: float | None) -> PaperRow | None:
    """The paper's row for our (selector, ratio), if the paper has one."""
    if selector == "all":
        return PAPER_ROWS.get(("all", None))
    if ratio is None:
        return None
    for (sel, r), row in PAPER_ROWS.items():
        if sel == selector and r is not None and abs(r - ratio) < RATIO_TOL:
            return row
    return None


@dataclass(frozen=True)
class Stat:
    """Mean, sample std (None for n < 2) and n of the runs that have a value; with the bootstrap 95%
    interval (`lo`, `hi`, and `units`: the episodes or steps it resampled) where it could be computed,
    else `no_ci` says why (e.g. a run without per-episode files)."""

    mean: float | None
    std: float | None
    n: int
    lo: float | None = None
    hi: float | None = None
    units: int | None = None
    no_ci: str = ""

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stat:
        xs = [float(v) for v in values if v is not None and math.isfinite(v)]
        if not xs:
            return cls(None, None, 0)
        return cls(statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None, len(xs))

    @classmethod
    def over_seeds(cls, values: Iterable[float | None], rng: np.random.Generator, b: int) -> Stat:
        """A per-run number (tokens, seconds): mean, std and the bootstrap interval over the seeds."""
        xs = [float(v) for v in values if v is not None and math.isfinite(v)]
        st = cls.of(xs)
        ci = bootstrap_values(xs, rng, b) if b > 0 and xs else None
        return replace(st, lo=ci.lo, hi=ci.hi, units=ci.n) if ci else st

    @property
    def has_ci(self) -> bool:
        return self.lo is not None and self.hi is not None


@dataclass(frozen=True)
class Column:
    """A score column: one task of a split, or the split's average (task None)."""

    split: str
    task: str | None

    @property
    def key(self) -> str:
        """CSV prefix, as the W&B summary keys name it: held_in/textcraft, held_in/average."""
        return f"{self.split}/{self.task or 'average'}"

    @property
    def label(self) -> str:
        return self.task if self.task else f"{SPLIT_LABEL[self.split]} avg"

    def value(self, run: RunRow) -> float | None:
        if self.task is None:
            return run.split_averages.get(self.split)
        t = run.tasks.get(self.task)
        return t.value if t is not None and t.split == self.split else None

    def tasks_of(self, run: RunRow) -> list[str]:
        """The tasks this cell's value of `run` is computed from (the split's tasks for an average)."""
        if self.task is None:
            return [n for n, t in run.tasks.items() if t.split == self.split]
        return [self.task]

    def units(self, run: RunRow) -> tuple[list[tuple[np.ndarray, np.ndarray]] | None, str]:
        """The episodes behind this cell's value of `run`, one unit set per task; None and why when a task
        has no usable episode files."""
        out = []
        for name in self.tasks_of(run):
            eps = run.episodes.get(name)
            if not eps:
                return None, run.episode_notes.get(name, "no per-episode files")
            out.append(episode_units([e.value for e in eps.values()]))
        return out, ""


@dataclass(frozen=True)
class RowKey:
    """What a row is: runs with the same key differ only in their seed."""

    model: str
    selector: str
    variant: str
    #: None for `all`: it trains every step whatever ratio the sweep gave it
    ratio: float | None

    @property
    def selector_label(self) -> str:
        name = "all steps" if self.selector == "all" else self.selector
        return f"{name} ({self.variant})" if self.variant else name

    @property
    def ratio_label(self) -> str:
        return "—" if self.ratio is None else f"{self.ratio:g}"

    def sort_key(self) -> tuple:
        rank = SELECTOR_ORDER.index(self.selector) if self.selector in SELECTOR_ORDER else len(SELECTOR_ORDER)
        return (self.model, rank, self.selector, self.variant, -1.0 if self.ratio is None else self.ratio)


def row_key(run: RunRow) -> RowKey:
    ratio = None if run.selector == "all" or run.ratio is None else round(run.ratio, 6)
    return RowKey(run.model or "?", run.selector, run.variant, ratio)


#: per-run compute figures (RunRow attributes) -> label
COMPUTE = {
    "input_tokens": "input tokens / epoch",
    "tokens_processed": "input tokens processed",
    "train_seconds": "train s",
    "select_seconds": "select s",
}


@dataclass
class TableRow:
    key: RowKey
    runs: list[RunRow]
    cells: dict[str, Stat]
    achieved_ratio: Stat
    supervised_tokens: Stat
    paper: PaperRow | None
    #: COMPUTE's figures, mean and interval over seeds
    compute: dict[str, Stat] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> list[int | None]:
        return sorted((r.seed for r in self.runs), key=lambda s: (s is None, s or 0))


@dataclass
class Table:
    columns: list[Column]
    rows: list[TableRow]
    models: list[str] = field(default_factory=list)


def columns_of(runs: Sequence[RunRow]) -> list[Column]:
    """Each held-in task, held-in average, each held-out task, held-out average: the paper's layout.
    Tasks in the order the runs' results list them; a split no run evaluated gets no columns."""
    cols: list[Column] = []
    for split in SPLITS:
        tasks: list[str] = []
        for r in runs:
            for name, t in r.tasks.items():
                if t.split == split and name not in tasks:
                    tasks.append(name)
        if tasks or any(split in r.split_averages for r in runs):
            cols += [Column(split, t) for t in tasks] + [Column(split, None)]
    return cols


def score_cell(col: Column, runs: Sequence[RunRow], b: int, seed: int, name: str) -> Stat:
    """Mean (± std) over the runs with a value, and the hierarchical bootstrap interval (seeds, then the
    episodes of each drawn seed's run; stats.bootstrap) when every one of those runs has its episodes."""
    have = [r for r in runs if col.value(r) is not None]
    st = Stat.of(col.value(r) for r in have)
    if not have or b <= 0:
        return st
    units = []
    for r in have:
        u, why = col.units(r)
        if u is None:
            return replace(st, no_ci=f"{r.run_id}: {why}")
        units.append(u)
    ci = bootstrap(units, rng_for(seed, name, col.key), b, scale=100.0)
    return replace(st, lo=ci.lo, hi=ci.hi, units=ci.n) if ci else replace(st, no_ci="no episodes")


def aggregate(runs: Sequence[RunRow], b: int = DEFAULT_B, seed: int = 0) -> Table:
    """Complete runs -> the table (incomplete runs are the report's separate list). `b` bootstrap
    replicates per interval (0: none), drawn from generators seeded by `seed` and the cell."""
    done = [r for r in runs if r.complete]
    cols = columns_of(done)
    groups: dict[RowKey, list[RunRow]] = {}
    for r in done:
        groups.setdefault(row_key(r), []).append(r)
    rows = []
    for key in sorted(groups, key=RowKey.sort_key):
        rs = groups[key]
        name = f"{key.model}|{key.selector}|{key.variant}|{key.ratio}"

        def seeds(attr: str, rs: list[RunRow] = rs, name: str = name) -> Stat:
            return Stat.over_seeds((getattr(r, attr) for r in rs), rng_for(seed, name, attr), b)

        rows.append(TableRow(
            key=key,
            runs=sorted(rs, key=lambda r: (r.seed is None, r.seed or 0, r.run_id)),
            cells={c.key: score_cell(c, rs, b, seed, name) for c in cols},
            achieved_ratio=Stat.of(r.achieved_ratio for r in rs),
            supervised_tokens=seeds("supervised_tokens"),
            paper=paper_row(key.selector, key.ratio),
            compute={attr: seeds(attr) for attr in COMPUTE},
        ))
    return Table(cols, rows, sorted({r.key.model for r in rows}))


# ---------------------------------------------------------------------------------------------- format


def fmt_stat(s: Stat, n_row: int, fmt: Callable[[float], str] = lambda x: f"{x:.2f}") -> str:
    """`mean [lo, hi]` (the bootstrap 95% interval), else `mean ± std`, marked ‡ where the interval is
    missing for want of per-episode files; n is shown only where it differs from the row's n (a run
    without that number)."""
    if s.mean is None:
        return "—"
    if s.has_ci:
        text = f"{fmt(s.mean)} [{fmt(s.lo)}, {fmt(s.hi)}]"  # type: ignore[arg-type]
    else:
        text = fmt(s.mean) if s.std is None else f"{fmt(s.mean)} ± {fmt(s.std)}"
        text += f" {NO_CI_MARK}" if s.no_ci else ""
    return text if s.n == n_row else f"{text} (n={s.n})"


def _csv_num(x: float | None) -> str:
    return "" if x is None else f"{x:.6g}" if abs(x) >= 1e6 else f"{round(x, 6):g}"


def to_csv(table: Table) -> str:
    """One line per row; for each score column `<split>/<task>_mean`, `_std`, `_n` (runs), `_lo`, `_hi`
    (the bootstrap 95% interval; empty where it could not be computed) and `_units` (episodes it
    resampled), so a spreadsheet or pandas gets numbers, not `a [b, c]` strings. Compute figures have
    `_mean`, `_lo`, `_hi` over seeds. The paper's numbers are in columns named `paper_*`."""
    head = ["model", "selector", "variant", "ratio", "n_runs", "seeds"]
    for c in table.columns:
        head += [f"{c.key}_mean", f"{c.key}_std", f"{c.key}_n", f"{c.key}_lo", f"{c.key}_hi", f"{c.key}_units"]
    head += ["achieved_ratio_mean", "achieved_ratio_std", "supervised_tokens_mean", "supervised_tokens_std",
             "supervised_tokens_lo", "supervised_tokens_hi"]
    for attr in COMPUTE:
        head += [f"{attr}_mean", f"{attr}_lo", f"{attr}_hi"]
    head += ["paper_row", "paper_held_in_average", "paper_held_out_average"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)
    for row in table.rows:
        k = row.key
        line = [k.model, k.selector, k.variant, _csv_num(k.ratio), row.n, " ".join(str(s) for s in row.seeds)]
        for c in table.columns:
            s = row.cells[c.key]
            line += [_csv_num(s.mean), _csv_num(s.std), s.n, _csv_num(s.lo), _csv_num(s.hi),
                     "" if s.units is None else s.units]
        p = row.paper
        st = row.supervised_tokens
        line += [_csv_num(row.achieved_ratio.mean), _csv_num(row.achieved_ratio.std),
                 _csv_num(st.mean), _csv_num(st.std), _csv_num(st.lo), _csv_num(st.hi)]
        for attr in COMPUTE:
            cs = row.compute.get(attr, Stat(None, None, 0))
            line += [_csv_num(cs.mean), _csv_num(cs.lo), _csv_num(cs.hi)]
        line += [p.label if p else "", _csv_num(p.held_in) if p else "", _csv_num(p.held_out) if p else ""]
        w.writerow(line)
    return buf.getvalue()


def _md_table(head: list[str], rows: list[list[str]], left: Iterable[int] = (0,)) -> list[str]:
    """A GitHub markdown table; columns in `left` are text (left-aligned), the others numbers."""
    left = set(left)

    def esc(x: str) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(esc(h) for h in head) + " |",
           "|" + "|".join(":---" if i in left else "---:" for i in range(len(head))) + "|"]
    out += ["| " + " | ".join(esc(x) for x in r) + " |" for r in rows]
    return out


def main_table_md(table: Table) -> list[str]:
    """The main table in markdown; the paper's averages in the last columns, marked †."""
    show_model = len(table.models) > 1
    head = (["model"] if show_model else []) + ["selector", "ratio", "n", "seeds"]
    head += [c.label for c in table.columns]
    head += ["achieved ratio", "supervised tokens", "paper† row", "paper† held-in avg", "paper† held-out avg"]
    rows = []
    for row in table.rows:
        k = row.key
        line = ([k.model] if show_model else []) + [k.selector_label, k.ratio_label, str(row.n),
                                                    ",".join(str(s) for s in row.seeds)]
        line += [fmt_stat(row.cells[c.key], row.n) for c in table.columns]
        line += [fmt_stat(row.achieved_ratio, row.n, lambda x: f"{x:.3f}"),
                 fmt_stat(row.supervised_tokens, row.n, lambda x: f"{x:,.0f}")]
        p = row.paper
        # a variant (e.g. non_critical of another base) is not exactly the paper's row: say what the paper's was
        label = f"{p.label} ({p.note})" if p and p.note and k.variant != p.variant else p.label if p else ""
        line += [label, f"{p.held_in:.2f}", f"{p.held_out:.2f}"] if p else ["", "", ""]
        rows.append(line)
    text = {0, 1} if show_model else {0}
    return _md_table(head, rows, text | {len(head) - 3})


def paper_table_md() -> list[str]:
    """All of the paper's rows this report maps to, whether or not the sweep has them."""
    rows = []
    for (sel, ratio), p in PAPER_ROWS.items():
        ours = "selector=all (any ratio)" if ratio is None else f"selector={sel} ratio={ratio:g}"
        rows.append([p.label, f"{p.held_in:.2f}", f"{p.held_out:.2f}", ours, p.note])
    return _md_table(["paper's row", "held-in avg", "held-out avg", "our row", "note"], rows, (0, 3, 4))


def runs_table_md(runs: Sequence[RunRow]) -> list[str]:
    """Every complete run, for checking a mean against its parts."""
    rows = []
    for r in sorted((r for r in runs if r.complete), key=lambda r: (row_key(r).sort_key(), r.seed or 0, r.run_id)):
        avgs = [("—" if r.split_averages.get(s) is None else f"{r.split_averages[s]:.2f}") for s in SPLITS]
        rows.append([f"`{r.run_id}`", row_key(r).selector_label, row_key(r).ratio_label, str(r.seed), *avgs,
                     "—" if r.achieved_ratio is None else f"{r.achieved_ratio:.3f}",
                     "—" if r.supervised_tokens is None else f"{r.supervised_tokens:,}"])
    return _md_table(["run", "selector", "ratio", "seed", *(f"{SPLIT_LABEL[s]} avg" for s in SPLITS), "achieved ratio",
                      "supervised tokens"], rows, (0, 1))
