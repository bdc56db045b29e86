"""`stage=inspect`: a self-contained HTML page showing what a selector chose, and why.

    python -m atlas_exp stage=inspect run_dir=outputs/...                       # -> <run_dir>/inspect.html
    python -m atlas_exp stage=inspect run_dir=outputs/A inspect.compare_to=outputs/B   # + agreement with B

The page has a summary table (achieved ratio per env, category counts, selected tokens vs all assistant
tokens, counted with the run's model tokenizer), the per-trajectory agreement (Jaccard of the selected
step sets) with a second run's selection when given, and a seeded sample of trajectories with every
turn shown and the selected steps highlighted with their category, score and reason. No scripts, no
external assets: it opens from disk in any browser and can be attached to a report.
"""

from __future__ import annotations

import html
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from atlas_exp.artifacts import atomic_write_text
from atlas_exp.data.selection import Selection
from atlas_exp.data.trajectory import Trajectory
from atlas_exp.errors import AtlasError, ConfigError
from atlas_exp.report.agreement import Agreement, agreement, jaccard  # noqa: F401 (re-exported)
from atlas_exp.run_dir import RunDir, read_selections, read_trajectories

log = logging.getLogger(__name__)


def token_counts(tokenizer: Any, trajs: Sequence[Trajectory], sels: Sequence[Selection]) -> dict[str, dict[str, int]]:
    """Per env: tokens of selected steps and of all steps (content only, as the model's tokenizer counts)."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: {"selected_tokens": 0, "assistant_tokens": 0})
    for t, s in zip(trajs, sels):
        chosen = set(s.selected_steps)
        lengths = [len(x) for x in tokenizer([m.content for m in t.steps], add_special_tokens=False)["input_ids"]]
        for k, n in enumerate(lengths):
            out[t.env]["assistant_tokens"] += n
            if k in chosen:
                out[t.env]["selected_tokens"] += n
    return dict(out)


def summary_rows(trajs: Sequence[Trajectory], sels: Sequence[Selection], tokens: dict[str, dict[str, int]] | None) -> list[dict[str, Any]]:
    per: dict[str, dict[str, Any]] = {}
    for t, s in zip(trajs, sels):
        r = per.setdefault(t.env, {"env": t.env, "trajectories": 0, "steps": 0, "selected": 0, "categories": Counter()})
        r["trajectories"] += 1
        r["steps"] += s.n_steps
        r["selected"] += len(s.selected_steps)
        r["categories"].update(c.category for c in s.steps if c.selected and c.category)
    rows = []
    for env in sorted(per):
        r = per[env]
        r["ratio"] = r["selected"] / r["steps"] if r["steps"] else 0.0
        if tokens is not None:
            r.update(tokens.get(env, {}))
        rows.append(r)
    return rows


_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:70em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}
.traj{border:1px solid #ddd;border-radius:6px;margin:1.5em 0;padding:.5em 1em}
.turn{white-space:pre-wrap;margin:.4em 0;padding:.4em .6em;border-radius:4px;font-family:ui-monospace,monospace;font-size:12.5px}
.user{background:#f6f6f6}.ctx{background:#fafafa;color:#777}
.step{background:#fff;border-left:4px solid #bbb}.sel{background:#fff6d5;border-left:4px solid #e0a800}
.tag{display:inline-block;font:600 11px system-ui,sans-serif;padding:.1em .5em;border-radius:3px;background:#e0a800;color:#fff;margin-right:.5em}
.why{font:italic 12.5px system-ui,sans-serif;color:#555;margin:.2em 0 0}
.plan{background:#eef5ff;padding:.4em .6em;border-radius:4px;white-space:pre-wrap}
"""


def _esc(x: Any) -> str:
    return html.escape(str(x))


def render_html(
    run_dir: Path,
    trajs: Sequence[Trajectory],
    sels: Sequence[Selection],
    *,
    sample: int,
    seed: int,
    tokens: dict[str, dict[str, int]] | None,
    agree: Agreement | None,
) -> str:
    sel0 = sels[0] if sels else None
    title = f"Selection: {sel0.selector if sel0 else '?'} at ratio {sel0.ratio if sel0 else '?'} — {run_dir}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(title)}</title><style>{_CSS}</style></head><body>"]
    parts.append(f"<h1>{_esc(title)}</h1>")

    rows = summary_rows(trajs, sels, tokens)
    tok_cols = tokens is not None
    parts.append("<h2>Summary</h2><table><tr><th class='l'>env</th><th>trajectories</th><th>steps</th><th>selected</th><th>achieved ratio</th>")
    if tok_cols:
        parts.append("<th>selected tokens</th><th>assistant tokens</th><th>token share</th>")
    parts.append("<th class='l'>categories</th></tr>")
    total = Counter()
    for r in rows:
        cats = ", ".join(f"{_esc(k)}: {v}" for k, v in r["categories"].most_common()) or "—"
        parts.append(
            f"<tr><td class='l'>{_esc(r['env'])}</td><td>{r['trajectories']}</td><td>{r['steps']}</td>"
            f"<td>{r['selected']}</td><td>{r['ratio']:.3f}</td>"
        )
        if tok_cols:
            a, s = r.get("assistant_tokens", 0), r.get("selected_tokens", 0)
            parts.append(f"<td>{s}</td><td>{a}</td><td>{(s / a if a else 0):.3f}</td>")
            total.update({"selected_tokens": s, "assistant_tokens": a})
        parts.append(f"<td class='l'>{cats}</td></tr>")
        total.update({k: r[k] for k in ("trajectories", "steps", "selected")})
    parts.append(
        f"<tr><th class='l'>all</th><th>{total['trajectories']}</th><th>{total['steps']}</th><th>{total['selected']}</th>"
        f"<th>{(total['selected'] / total['steps'] if total['steps'] else 0):.3f}</th>"
    )
    if tok_cols:
        a, s = total["assistant_tokens"], total["selected_tokens"]
        parts.append(f"<th>{s}</th><th>{a}</th><th>{(s / a if a else 0):.3f}</th>")
    parts.append("<th></th></tr></table>")

    if agree is not None:
        parts.append(
            f"<h2>Agreement with {_esc(agree.other)}</h2><p>Mean Jaccard of the selected steps over "
            f"{agree.n_common} common trajectories: <b>{agree.mean:.3f}</b></p>"
        )

    rng = random.Random(seed)
    idx = sorted(rng.sample(range(len(trajs)), min(sample, len(trajs))))
    parts.append(f"<h2>Sample ({len(idx)} of {len(trajs)} trajectories)</h2>")
    for i in idx:
        t, s = trajs[i], sels[i]
        extra = f" · Jaccard with other run {agree.per_trajectory[t.id]:.2f}" if agree and t.id in agree.per_trajectory else ""
        parts.append(
            f"<div class='traj' id='{_esc(t.id)}'><h3>{_esc(t.id)} <small>({_esc(t.env)}, {s.n_steps} steps, "
            f"{len(s.selected_steps)} selected{extra})</small></h3>"
        )
        if s.plan:
            parts.append(f"<div class='plan'><b>Judge's plan:</b> {_esc(s.plan)}</div>")
        for m in t.messages:
            if m.role != "assistant":
                parts.append(f"<div class='turn user'>{_esc(m.content)}</div>")
            elif m.step is None:
                parts.append(f"<div class='turn ctx'>{_esc(m.content)}</div>")
            else:
                c = s.steps[m.step]
                cls = "sel" if c.selected else "step"
                tag = f"<span class='tag'>{_esc(c.category or 'selected')}</span>" if c.selected else ""
                head = f"{tag}<small>step {m.step} · score {c.score:.3g}</small>\n"
                why = f"<div class='why'>{_esc(c.reason)}</div>" if c.reason else ""
                parts.append(f"<div class='turn {cls}'>{head}{_esc(m.content)}{why}</div>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "".join(parts)


def run_inspect_stage(cfg: DictConfig, rd: RunDir) -> None:
    for p, stage in ((rd.trajectories, "data"), (rd.selection, "select")):
        if not p.exists():
            raise AtlasError(f"no {p.name} in {rd.root}: run the {stage} stage first (stage={stage})")
    icfg = cfg.get("inspect") or {}
    sample = int(icfg.get("sample", 20))
    if sample < 1:
        raise ConfigError(f"inspect.sample={sample}; must be >= 1")
    trajs = read_trajectories(rd.trajectories)
    sels = read_selections(rd.selection)
    if len(trajs) != len(sels):
        raise AtlasError(f"{rd.selection} has {len(sels)} lines for {len(trajs)} trajectories: rerun the select stage")
    for t, s in zip(trajs, sels):
        s.check_matches(t, source=str(rd.selection))

    tokens = None
    if icfg.get("count_tokens", True):
        from atlas_exp.models import ModelSpec, load_tokenizer

        tokens = token_counts(load_tokenizer(ModelSpec.from_cfg(cfg.model), cfg.cache_dir), trajs, sels)
    agree = None
    other = icfg.get("compare_to")
    if other:
        other_sel = RunDir(Path(str(other))).selection
        if not other_sel.exists():
            raise ConfigError(f"inspect.compare_to={other}: no selection.jsonl there")
        agree = agreement(sels, read_selections(other_sel), str(other))

    out = rd.root / str(icfg.get("output", "inspect.html"))
    atomic_write_text(out, render_html(rd.root, trajs, sels, sample=sample, seed=int(cfg.seed), tokens=tokens, agree=agree))
    log.info("inspect: %s%s", out, f" (mean Jaccard with {other}: {agree.mean:.3f})" if agree else "")
