"""The report's figures (PNG, matplotlib's Agg backend: no display needed on a cluster node).

1. `avg_vs_ratio.png`: held-in / held-out average vs ratio, one line per selector, error bars = the
   bootstrap 95% interval (std over seeds where a row has no interval), `all` as a horizontal line (it has no ratio): does selecting fewer steps cost or gain score?
2. `tokens_vs_held_in.png`: supervised tokens vs held-in average, one point per run: the paper's claim is
   that fewer, better-chosen tokens do as well, so score per token is the figure that tests it.
3. `categories.png`: the categories of the selected steps per env (share of each, stacked), for selectors
   that give categories (the oracle): what the judge thinks is critical, and whether it differs by env.

Each function returns a `Plot`: its file, or a note saying why it was skipped (nothing to draw), which
the report prints in place of the image.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from atlas_exp.errors import AtlasError
from atlas_exp.report.rows import RunRow
from atlas_exp.report.table import SPLIT_LABEL, Table, row_key
from atlas_exp.selectors.oracle_prompt import CATEGORIES


@dataclass(frozen=True)
class Plot:
    title: str
    path: Path | None
    note: str = ""


def _skip(out: Path, name: str, title: str, note: str) -> Plot:
    """No figure: also remove the file an earlier report wrote, so report.md and the folder agree."""
    (out / name).unlink(missing_ok=True)
    return Plot(title, None, note)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise AtlasError("the report's plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(labels: Sequence[str]) -> dict[str, tuple]:
    """One colour per selector label, the same in every figure."""
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    return {lab: cmap(i % 10) for i, lab in enumerate(dict.fromkeys(labels))}


def _series_label(model: str, selector_label: str, models: Sequence[str]) -> str:
    return f"{selector_label} [{model}]" if len(models) > 1 else selector_label


def _band(s) -> tuple[float, float]:
    """The interval of a cell, or mean ± std where it has none (one run: the mean)."""
    if s.has_ci:
        return s.lo, s.hi
    return s.mean - (s.std or 0.0), s.mean + (s.std or 0.0)


def plot_avg_vs_ratio(table: Table, out: Path, colors: dict[str, tuple]) -> Plot:
    title = "Held-in / held-out average vs ratio"
    splits = [c.split for c in table.columns if c.task is None]
    if not splits or not any(r.cells[f"{s}/average"].mean is not None for r in table.rows for s in splits):
        return _skip(out, "avg_vs_ratio.png", title, "no complete run has a split average: nothing to plot")
    plt = _pyplot()
    labels = [_series_label(r.key.model, r.key.selector_label, table.models) for r in table.rows]
    fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 4.2), squeeze=False)
    for ax, split in zip(axes[0], splits):
        series: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
        for row, label in zip(table.rows, labels):
            s = row.cells[f"{split}/average"]
            if s.mean is None:
                continue
            lo, hi = _band(s)
            if row.key.ratio is None:  # all steps: no ratio, a horizontal reference line (+ its band)
                ax.axhline(s.mean, color=colors[label], linestyle="--", label=f"{label} (n={s.n})")
                if hi > lo:
                    ax.axhspan(lo, hi, color=colors[label], alpha=0.12)
            else:
                series[label].append((row.key.ratio, s.mean, s.mean - lo, hi - s.mean))
        for label, pts in series.items():
            pts.sort()
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[[p[2] for p in pts], [p[3] for p in pts]],
                        marker="o", capsize=3, color=colors[label], label=label)
        ax.set_xlim(0, 1.05)
        ax.set_xlabel("ratio (share of steps selected)")
        ax.set_ylabel(f"{SPLIT_LABEL[split]} average (%)")
        ax.set_title(f"{SPLIT_LABEL[split]} average (mean, bootstrap 95% interval; ± std without one)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "avg_vs_ratio.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Plot(title, path)


def plot_tokens_vs_held_in(runs: Sequence[RunRow], out: Path, models: Sequence[str], colors: dict[str, tuple]) -> Plot:
    title = "Supervised tokens vs held-in average (one point per run)"
    pts = [r for r in runs if r.complete and r.supervised_tokens is not None and r.split_averages.get("held_in") is not None]
    if not pts:
        return _skip(out, "tokens_vs_held_in.png", title,
                     "no complete run has both supervised tokens (training_summary.json) and a held-in average")
    plt = _pyplot()
    labels = [_series_label(r.model or "?", row_key(r).selector_label, models) for r in pts]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label in [lab for lab in colors if lab in labels]:
        xs = [r.supervised_tokens for r, lab in zip(pts, labels) if lab == label]
        ys = [r.split_averages["held_in"] for r, lab in zip(pts, labels) if lab == label]
        ax.scatter(xs, ys, color=colors[label], label=label, alpha=0.85, edgecolors="black", linewidths=0.4)
    ax.set_xlabel("supervised tokens (training_summary.json data/n_supervised_tokens)")
    ax.set_ylabel("held-in average (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "tokens_vs_held_in.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Plot(title, path)


def plot_categories(runs: Sequence[RunRow], out: Path) -> Plot:
    title = "Categories of the selected steps per env"
    with_cats = [r for r in runs if r.categories]
    if not with_cats:
        return _skip(out, "categories.png", title, "no run's selection has step categories (only selectors with a judge, e.g. "
                                 "the oracle, give them): category plot skipped")
    counts: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for r in with_cats:
        k = row_key(r)
        for env, cats in r.categories.items():
            counts[(f"{k.selector_label} {k.ratio_label}", env)].update(cats)
    bars = sorted(counts)
    seen = {c for cs in counts.values() for c in cs}
    cats = [c for c in CATEGORIES if c in seen] + sorted(seen - set(CATEGORIES))
    plt = _pyplot()
    colors = _colors(cats)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(bars) + 3), 4.5))
    bottom = [0.0] * len(bars)
    for cat in cats:
        share = [100.0 * counts[b][cat] / sum(counts[b].values()) for b in bars]
        ax.bar(range(len(bars)), share, bottom=bottom, color=colors[cat], label=cat)
        bottom = [x + y for x, y in zip(bottom, share)]
    for i, b in enumerate(bars):
        ax.text(i, 101, f"n={sum(counts[b].values())}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(bars)), [f"{env}\n{row}" for row, env in bars], fontsize=8)
    ax.set_ylabel("share of selected steps (%)")
    ax.set_ylim(0, 110)
    ax.set_title(title + " (all seeds of a row pooled)", fontsize=10)
    ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    path = out / "categories.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Plot(title, path)


def make_plots(table: Table, runs: Sequence[RunRow], out: Path) -> list[Plot]:
    """All figures into `out`; a selector has the same colour in each (the table's row order)."""
    models = table.models
    colors = _colors([_series_label(r.key.model, r.key.selector_label, models) for r in table.rows])
    return [plot_avg_vs_ratio(table, out, colors), plot_tokens_vs_held_in(runs, out, models, colors),
            plot_categories(runs, out)]
