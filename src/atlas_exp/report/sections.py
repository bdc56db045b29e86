"""The report's comparison sections in markdown: paired differences with `all steps`, agreement with the
oracle's selection, the categories of the selected steps per env, and what each row cost to compute."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

from atlas_exp.report.compare import AgreementCell, PairedRow, fmt_paired
from atlas_exp.report.rows import RunRow
from atlas_exp.report.table import COMPUTE, Stat, Table, _md_table, fmt_stat, row_key
from atlas_exp.selectors.oracle_prompt import CATEGORIES


def paired_md(paired: Sequence[PairedRow], table: Table) -> list[str]:
    if not paired:
        return ["_No `all steps` row (selector=all) with per-episode results to compare with._"]
    cols = [c for c in table.columns if any(p.cells.get(c.key) for p in paired)]
    if not cols:
        return ["_No unit (episode or expert step) is in both a row and the `all steps` row._"]
    head = ["selector", "ratio", "seeds"] + [c.label for c in cols]
    rows = [[p.row.key.selector_label, p.row.key.ratio_label, p.seeds] + [fmt_paired(p.cells.get(c.key)) for c in cols]
            for p in paired]
    return _md_table(head, rows, (0, 2))


def agreement_md(agree: dict[tuple[str, str], dict[tuple[str, str, float], AgreementCell]], models: int) -> list[str]:
    if not agree:
        return ["_No oracle run with a selection.jsonl, or no other selector at an oracle's ratio: nothing to compare._"]
    lines: list[str] = []
    for (model, ovariant), cells in agree.items():
        if models > 1 or ovariant:
            lines += [f"Oracle: {model}" + (f" ({ovariant})" if ovariant else ""), ""]
        ratios = sorted({k[2] for k in cells})
        labels = list(dict.fromkeys((k[0], k[1]) for k in sorted(cells, key=lambda k: (k[0], k[1]))))
        rows = []
        for sel, var in labels:
            line = [f"{sel} ({var})" if var else sel]
            for ratio in ratios:
                c = cells.get((sel, var, ratio))
                if c is None:
                    line.append("—")
                    continue
                n = sorted({p[2] for p in c.per_seed})
                seeds = ", ".join(f"{p[1]:.3f}" for p in c.per_seed)
                line.append(f"{c.mean:.3f} (seeds: {seeds}; {'/'.join(map(str, n))} traj.)" if len(c.per_seed) > 1
                            else f"{c.mean:.3f} ({n[0]} traj.)")
            rows.append(line)
        lines += _md_table(["selector"] + [f"ratio {r:g}" for r in ratios], rows)
        lines.append("")
    return lines


def categories_md(runs: Sequence[RunRow]) -> list[str]:
    """Per env and row: the mean count per run of each category among the selected steps, its share, and
    the env's achieved ratio."""
    groups: dict[tuple, list[RunRow]] = defaultdict(list)
    for r in runs:
        if r.categories:
            groups[row_key(r)].append(r)
    if not groups:
        return ["_No run's selection has step categories (only a judge, e.g. the oracle, gives them)._"]
    seen = {c for rs in groups.values() for r in rs for cs in r.categories.values() for c in cs}
    cats = [c for c in CATEGORIES if c in seen] + sorted(seen - set(CATEGORIES))
    envs = sorted({env for rs in groups.values() for r in rs for env in r.categories})
    rows = []
    for env in envs:
        for key in sorted(groups, key=lambda k: k.sort_key()):
            rs = groups[key]
            total: Counter[str] = Counter()
            for r in rs:
                total.update(r.categories.get(env, {}))
            if not total:
                continue
            n_all = sum(total.values())
            ratios = [r.per_env_ratio[env] for r in rs if env in r.per_env_ratio]
            line = [env, key.selector_label, key.ratio_label, str(len(rs)),
                    f"{sum(ratios) / len(ratios):.3f}" if ratios else "—"]
            line += [f"{_count(total[c] / len(rs))} ({100 * total[c] / n_all:.0f}%)" for c in cats]
            line.append(_count(n_all / len(rs)))
            rows.append(line)
    return _md_table(["env", "selector", "ratio", "runs", "achieved ratio"] + cats + ["selected (categorised)"], rows,
                     (0, 1))


def _count(x: float) -> str:
    return f"{x:,.0f}" if abs(x - round(x)) < 1e-9 else f"{x:,.1f}"


def _tokens(x: float) -> str:
    return f"{x:,.0f}"


def _seconds(x: float) -> str:
    return f"{x:,.1f}"


def compute_md(table: Table) -> list[str]:
    """Per row: the split averages (to read the cost beside the score), supervised tokens, input tokens,
    training and selection time, each mean [interval over seeds], and tokens processed relative to the
    `all steps` row of the model."""
    if not table.rows:
        return ["None."]
    avgs = [c for c in table.columns if c.task is None]
    head = ["selector", "ratio", "n"] + [c.label for c in avgs] + ["supervised tokens"] + list(COMPUTE.values())
    head.append("tokens processed / all steps")
    base = {r.key.model: r.compute.get("tokens_processed") for r in table.rows if r.key.selector == "all"}
    rows = []
    for row in table.rows:
        line = [row.key.selector_label, row.key.ratio_label, str(row.n)]
        line += [fmt_stat(row.cells[c.key], row.n) for c in avgs]
        line.append(fmt_stat(row.supervised_tokens, row.n, _tokens))
        for attr in COMPUTE:
            line.append(fmt_stat(row.compute.get(attr, Stat(None, None, 0)), row.n, _seconds if attr.endswith("seconds") else _tokens))
        b, mine = base.get(row.key.model), row.compute.get("tokens_processed")
        line.append(f"{mine.mean / b.mean:.2f}x" if b and mine and b.mean and mine.mean is not None else "—")
        rows.append(line)
    return _md_table(head, rows)
