"""Finding the runs of a sweep and reading each one into a `RunRow`: the one place that knows the on-disk
(and W&B) shapes of a run's artifacts.

The report's aggregation and plots only see `RunRow`s, so a run read from disk and a run read from W&B
are interchangeable, and a change in an artifact's format is fixed here alone.

A run dir is any folder holding `.hydra/config.yaml` (what Hydra writes for every job of a multirun, and
for a single run). A run without `results.json` is kept as an incomplete row (with what it does have), so
a crashed or still-running job shows up in the report instead of silently shrinking a mean.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atlas_exp.artifacts import iter_jsonl, read_json
from atlas_exp.errors import AtlasError
from atlas_exp.eval.results import SPLITS
from atlas_exp.run_dir import RunDir

#: the selector names that the selector classes write (`Selector.name`), by class: used when a run has no
#: selection_summary.json yet (incomplete) or comes from W&B, where only the config's `_target_` is known
SELECTOR_BY_CLASS = {
    "AllStepsSelector": "all",
    "RandomSelector": "random",
    "OracleSelector": "oracle",
    "NonCriticalSelector": "non_critical",
    "HybridSelector": "hybrid",
    "ExcessLossSelector": "excess_loss",
    "RolloutValueSelector": "rollout_value",
}

#: overrides that never change what a run measures, or that are the row key itself (selector, ratio)
#: or what is averaged over (seed): they are not part of a row's "variant". A run's own list of keys that
#: do not change results (Hydra's `override_dirname.exclude_keys`, conf/hydra/default.yaml) is added.
KEY_OVERRIDES = {"selector", "ratio", "seed", "run_dir", "resume", "force", "stage", "cache_dir", "logger"}
#: prefixes of such keys: the logger's settings, and a combined selector's children (`selector@selector.base`),
#: which `combined_variant` already names from the config
KEY_PREFIXES = ("logger.", "hydra.", "selector@")

#: folders never walked into (besides hidden ones such as outputs/.cache); a run dir's own folders
#: (model, checkpoints, eval) are not walked either, because the walk stops at a run dir
_SKIP_DIRS = {"__pycache__"}


@dataclass(frozen=True)
class TaskScore:
    """One task's headline number in one run, as `results.json` (or W&B) reports it.

    `value` is in percent (success rate, or ScienceWorld's score), None when no episode finished: the
    report never turns a missing number into 0.
    """

    name: str
    split: str
    value: float | None
    metric: str | None = None
    env: str | None = None
    n: int | None = None


@dataclass(frozen=True)
class Episode:
    """One finished episode of a task, from its `eval/<task>/<episode>.json`: the unit the report's
    confidence intervals and paired comparisons resample."""

    #: in [0, 1]: success (1 or 0) or score, whichever the task's metric is
    value: float
    #: expert_steps tasks: `action_correct` of each scored step, in step order (None for env episodes)
    steps: tuple[bool, ...] | None = None


@dataclass
class RunRow:
    """Everything the report needs from one run: its identity (selector, ratio, seed, ...), its scores,
    and the two cost figures the paper's argument is about (supervised tokens, achieved ratio)."""

    #: where it came from: the run dir relative to the sweep dir, or a W&B run path
    run_id: str
    selector: str
    ratio: float | None
    seed: int | None
    model: str | None = None
    #: what else distinguishes this run's setup from the other rows (overrides not shared by the whole
    #: sweep, the children of a combined selector); runs of one row differ only in the seed
    variant: str = ""
    #: True when results.json (or W&B eval summary) exists
    complete: bool = False
    #: per task, in results.json's order
    tasks: dict[str, TaskScore] = field(default_factory=dict)
    #: held_in / held_out average as the eval stage computed it (None: a task of the split has no value)
    split_averages: dict[str, float | None] = field(default_factory=dict)
    achieved_ratio: float | None = None
    supervised_tokens: int | None = None
    #: env -> category -> selected steps with that category (empty when the selector gives no categories)
    categories: dict[str, dict[str, int]] = field(default_factory=dict)
    #: env -> achieved ratio in that env (selection_summary.json `per_env`)
    per_env_ratio: dict[str, float] = field(default_factory=dict)
    #: the overrides of the Hydra job (`.hydra/overrides.yaml`), for the variant and the report
    overrides: list[str] = field(default_factory=list)
    #: override keys that do not change results (Hydra's override_dirname.exclude_keys of the run)
    ignored_keys: list[str] = field(default_factory=list)
    #: for incomplete runs: which stage artifacts exist
    has: list[str] = field(default_factory=list)
    path: Path | None = None
    #: per task, per episode id: the episodes results.json counted (absent: no usable episode files, see
    #: `episode_notes`); what the confidence intervals resample
    episodes: dict[str, dict[str, Episode]] = field(default_factory=dict)
    #: per task without usable episode files: why (the report then shows results.json's value, no CI)
    episode_notes: dict[str, str] = field(default_factory=dict)
    #: compute: input tokens of the training examples per epoch (`data/n_tokens`), the same over the
    #: whole training (an estimate when training stopped at max_steps), training and selection wall time
    input_tokens: int | None = None
    tokens_processed: float | None = None
    train_seconds: float | None = None
    select_seconds: float | None = None


# ---------------------------------------------------------------------------------------------- reading


def _read_json(path: Path) -> Any:
    """read_json with every failure (bad JSON, bad encoding, permissions) as one AtlasError naming the file."""
    try:
        return read_json(path)
    except AtlasError:
        raise
    except (OSError, UnicodeDecodeError) as e:
        raise AtlasError(f"{path}: cannot read: {e}") from None


def _read_json_dict(path: Path, what: str) -> dict[str, Any]:
    d = _read_json(path)
    if not isinstance(d, dict):
        raise AtlasError(f"{path}: not a {what} (expected a JSON object, got {type(d).__name__})")
    return d


def _read_yaml(path: Path) -> Any:
    """Plain YAML, not OmegaConf: Hydra saves the config unresolved (`${seed}`, `${now:...}`, custom
    resolvers), and resolving it here would need the app's resolvers and the time of the run."""
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise AtlasError(f"{path}: cannot read: {e}") from None
    except yaml.YAMLError as e:
        raise AtlasError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None


def _num(x: Any) -> float | None:
    """A finite number, or None (a `${...}` interpolation, a missing key, NaN)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _int(x: Any) -> int | None:
    v = _num(x)
    return int(v) if v is not None else None


# ------------------------------------------------------------------------------------ naming selectors


def selector_from_config(sel: Any) -> str | None:
    """The selector's name from its config node (`_target_`, and `metric` for the perplexity class, whose
    name depends on it)."""
    if not isinstance(sel, Mapping) or not isinstance(sel.get("_target_"), str):
        return None
    cls = sel["_target_"].rsplit(".", 1)[-1]
    if cls == "PerplexitySelector":
        return "perplexity" if sel.get("metric") == "loss" else "perplexity_delta"
    return SELECTOR_BY_CLASS.get(cls, cls)


def combined_variant(sel: Any) -> str:
    """What a combined selector combines: the non-critical ablation of an oracle and of perplexity_delta
    are different experiments, and their names alone do not say which one a row is."""
    if not isinstance(sel, Mapping):
        return ""
    name = selector_from_config(sel)
    if name == "non_critical" and isinstance(sel.get("base"), Mapping):
        return f"base={selector_from_config(sel['base'])}"
    if name == "hybrid" and isinstance(sel.get("a"), Mapping) and isinstance(sel.get("b"), Mapping):
        return f"{selector_from_config(sel['a'])}+{selector_from_config(sel['b'])} {sel.get('mode', 'rank_fusion')}"
    return ""


def override_key(o: str) -> str:
    """`+x.y=1` -> `x.y`: the key an override sets, for telling key overrides from the rest."""
    return o.split("=", 1)[0].lstrip("+~")


def is_key_override(o: str, ignored: Iterable[str] = ()) -> bool:
    k = override_key(o)
    return k in KEY_OVERRIDES or k in set(ignored) or k.startswith(KEY_PREFIXES)


# --------------------------------------------------------------------------------------- one run dir


def find_run_dirs(root: Path) -> list[Path]:
    """Every folder under `root` (itself included) holding `.hydra/config.yaml`, sorted.

    The walk stops at a run dir (runs do not nest) and skips hidden folders, so a sweep of trained models
    with checkpoints is listed in milliseconds.
    """
    found: list[Path] = []
    for dirpath, dirnames, _ in os.walk(root, followlinks=False):
        here = Path(dirpath)
        if (here / ".hydra" / "config.yaml").is_file():
            found.append(here)
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS)
    return sorted(found)


def read_categories(rd: RunDir) -> dict[str, dict[str, int]]:
    """Per env, the categories of the selected steps in selection.jsonl.

    selection.jsonl has no env; trajectories.jsonl (same order, same ids) has it, so both are read, but
    only for runs whose selection_summary.json counted any category (the oracle's), because
    trajectories.jsonl of a full dataset is large.
    """
    if not rd.selection.exists():
        return {}
    env_by_id: dict[str, str] = {}
    if rd.trajectories.exists():
        for _, t in iter_jsonl(rd.trajectories):
            if isinstance(t, dict) and "id" in t:
                env_by_id[str(t["id"])] = str(t.get("env", "?"))
    out: dict[str, Counter[str]] = defaultdict(Counter)
    for lineno, s in iter_jsonl(rd.selection):
        if not isinstance(s, dict) or not isinstance(s.get("steps"), list):
            raise AtlasError(f"{rd.selection}:{lineno}: not a selection record (no steps)")
        env = env_by_id.get(str(s.get("id")), "?")
        for st in s["steps"]:
            if isinstance(st, dict) and st.get("selected") and st.get("category"):
                out[env][str(st["category"])] += 1
    return {env: dict(c) for env, c in sorted(out.items()) if c}


def parse_results(results: Mapping[str, Any], source: str) -> tuple[dict[str, TaskScore], dict[str, float | None]]:
    """Tasks and split averages of a results.json (see atlas_exp.eval.results.summarize)."""
    tasks_in = results.get("tasks")
    if not isinstance(tasks_in, Mapping):
        raise AtlasError(f"{source}: not a results.json (no 'tasks' object)")
    tasks: dict[str, TaskScore] = {}
    for name, t in tasks_in.items():
        if not isinstance(t, Mapping) or t.get("split") not in SPLITS:
            raise AtlasError(f"{source}: task {name!r} has no split ({' | '.join(SPLITS)})")
        tasks[str(name)] = TaskScore(
            name=str(name), split=str(t["split"]), value=_num(t.get("value")), metric=t.get("metric"),
            env=t.get("env"), n=_int(t.get("n")),
        )
    averages: dict[str, float | None] = {}
    splits = results.get("splits")
    for split, s in (splits.items() if isinstance(splits, Mapping) else ()):
        averages[str(split)] = _num(s.get("average")) if isinstance(s, Mapping) else None
    return tasks, averages


def read_run(run_dir: Path, sweep_dir: Path) -> RunRow:
    """One run dir -> RunRow. Broken artifacts raise an AtlasError naming the file; missing later-stage
    artifacts only make the row incomplete."""
    rd = RunDir(run_dir)
    cfg_path = run_dir / ".hydra" / "config.yaml"
    cfg = _read_yaml(cfg_path)
    if not isinstance(cfg, dict):
        raise AtlasError(f"{cfg_path}: not a Hydra config (expected a mapping)")
    overrides_path = run_dir / ".hydra" / "overrides.yaml"
    overrides = _read_yaml(overrides_path) if overrides_path.exists() else []
    overrides = [str(o) for o in overrides] if isinstance(overrides, list) else []

    sel_sum = _read_json_dict(rd.selection_summary, "selection summary") if rd.selection_summary.exists() else {}
    train_sum = _read_json_dict(rd.training_summary, "training summary") if rd.training_summary.exists() else {}
    results_path = results_file(rd)
    results = _read_json_dict(results_path, "results.json") if results_path else None
    res_sel = (results or {}).get("selection")
    res_sel = res_sel if isinstance(res_sel, Mapping) else {}

    selector = (
        sel_sum.get("selector") or res_sel.get("selector") or train_sum.get("selection/selector")
        or selector_from_config(cfg.get("selector")) or "?"
    )
    ratio = _num(cfg.get("ratio"))
    if ratio is None:  # an interpolated ratio: take what the selector was given
        ratio = _num(sel_sum.get("ratio", res_sel.get("ratio")))
    achieved = _num(sel_sum.get("achieved_ratio", res_sel.get("achieved_ratio", train_sum.get("selection/achieved_ratio"))))
    model = cfg.get("model", {}).get("name") if isinstance(cfg.get("model"), Mapping) else None

    try:
        rel = str(run_dir.relative_to(sweep_dir)) or "."
    except ValueError:
        rel = str(run_dir)
    row = RunRow(
        run_id=rel,
        selector=str(selector),
        ratio=ratio,
        seed=_int(cfg.get("seed")),
        model=str(model) if model is not None else None,
        variant=combined_variant(cfg.get("selector")),
        achieved_ratio=achieved,
        supervised_tokens=_int(train_sum.get("data/n_supervised_tokens")),
        overrides=overrides,
        ignored_keys=_hydra_exclude_keys(run_dir),
        path=run_dir,
    )
    if sel_sum.get("categories"):
        row.categories = read_categories(rd)
    per_env = sel_sum.get("per_env")
    for env, e in (per_env.items() if isinstance(per_env, Mapping) else ()):
        v = _num(e.get("achieved_ratio")) if isinstance(e, Mapping) else None
        if v is not None:
            row.per_env_ratio[str(env)] = v
    row.input_tokens = _int(train_sum.get("data/n_tokens"))
    row.tokens_processed = tokens_processed(train_sum, cfg.get("train"))
    row.train_seconds = _num(train_sum.get("seconds"))
    row.select_seconds = _num(sel_sum.get("seconds"))
    if results is not None:
        row.tasks, row.split_averages = parse_results(results, str(results_path))
        row.complete = True
        row.episodes, row.episode_notes = read_episodes(rd, row.tasks)
    else:
        row.has = [name for name, p in (("trajectories", rd.trajectories), ("selection", rd.selection),
                                         ("training summary", rd.training_summary), ("eval (no results.json)", rd.eval_dir))
                   if p.exists()]
    return row


def tokens_processed(train_sum: Mapping[str, Any], train_cfg: Any) -> float | None:
    """Input tokens the model processed over its whole training: the examples' tokens per epoch times the
    epochs run. With `train.max_steps > 0` the epochs run are global_step x global batch / examples (an
    estimate: it assumes the examples seen have the mean length); otherwise `train.epochs`."""
    n_tokens, n_ex = _num(train_sum.get("data/n_tokens")), _num(train_sum.get("n_examples"))
    if n_tokens is None or not isinstance(train_cfg, Mapping):
        return None
    max_steps = _num(train_cfg.get("max_steps"))
    if max_steps is not None and max_steps > 0:
        step, bs, ga = (_num(train_sum.get("global_step")), _num(train_cfg.get("per_device_batch_size")),
                        _num(train_cfg.get("grad_accum")))
        world = _num(train_sum.get("world_size")) or 1.0
        if step is None or bs is None or ga is None or not n_ex:
            return None
        return n_tokens * step * bs * ga * world / n_ex
    epochs = _num(train_cfg.get("epochs"))
    return n_tokens * epochs if epochs is not None else None


def _episode(rec: Mapping[str, Any], metric: str | None) -> Episode | None:
    if metric == "score":
        value = _num(rec.get("score"))
    else:
        value = 1.0 if rec.get("success") is True else 0.0 if rec.get("success") is False else None
    if value is None:
        return None
    steps = rec.get("steps")
    if isinstance(steps, list) and all(isinstance(s, Mapping) and isinstance(s.get("action_correct"), bool) for s in steps):
        ordered = sorted(steps, key=lambda s: _int(s.get("step")) or 0)
        return Episode(value, tuple(bool(s["action_correct"]) for s in ordered))
    return Episode(value)


def read_episodes(rd: RunDir, tasks: Mapping[str, TaskScore]) -> tuple[dict[str, dict[str, Episode]], dict[str, str]]:
    """Per task, the episode files behind results.json's value.

    An eval folder can also hold episodes of an earlier config of the task (the eval stage replays them
    and keeps the files), so the files are grouped by their `fingerprint` and the group that reproduces
    results.json (same n, same value to 0.01 points) is taken; when none does, the task gets a note and
    no episodes, and the report falls back to results.json's value without an interval. Unreadable
    files count as missing.
    """
    episodes: dict[str, dict[str, Episode]] = {}
    notes: dict[str, str] = {}
    for name, t in tasks.items():
        if not t.n or t.value is None:
            continue
        folder = rd.eval_dir / name
        if not folder.is_dir():
            notes[name] = "no episode files"
            continue
        groups: dict[str, dict[str, Episode]] = defaultdict(dict)
        for p in sorted(folder.glob("*.json")):
            try:
                rec = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
            if not isinstance(rec, dict) or rec.get("task", name) != name:
                continue
            ep = _episode(rec, t.metric)
            if ep is not None:
                groups[str(rec.get("fingerprint"))][str(rec.get("episode", p.stem))] = ep
        match = [g for g in groups.values() if len(g) == t.n
                 and abs(100.0 * sum(e.value for e in g.values()) / len(g) - t.value) <= 0.01]
        if match:
            episodes[name] = dict(sorted(match[0].items()))
        else:
            found = sum(len(g) for g in groups.values())
            notes[name] = (f"episode files ({found}) do not reproduce results.json (n={t.n}, value {t.value:g})"
                           if found else "no episode files")
    return episodes, notes


def results_file(rd: RunDir) -> Path | None:
    """The run's results.json: where the eval stage writes it now (RunDir.results), else the run dir's top
    (where earlier versions wrote it), so sweeps made before the move still report."""
    for p in (rd.results, rd.root / "results.json"):
        if p.is_file():
            return p
    return None


def _hydra_exclude_keys(run_dir: Path) -> list[str]:
    """Hydra's `job.config.override_dirname.exclude_keys` of this run: the app's own list of override keys
    that do not change a run's results (conf/hydra/default.yaml)."""
    p = run_dir / ".hydra" / "hydra.yaml"
    if not p.exists():
        return []
    try:
        keys = _read_yaml(p)["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"]
    except (AtlasError, KeyError, TypeError):
        return []
    return [str(k) for k in keys] if isinstance(keys, list) else []


def mark_variants(rows: Iterable[RunRow]) -> None:
    """Add to each row's variant the overrides that set it apart from the rest of the sweep.

    Overrides every run shares (the sweep's fixed settings) are not a variant; the key overrides
    (selector, ratio, seed, ...) are the row key itself. So `train.lr=1e-5,2e-5` in a sweep gives two rows
    per selector and ratio instead of one mean over two learning rates.
    """
    rows = list(rows)
    sets = [{o for o in r.overrides if not is_key_override(o, r.ignored_keys)} for r in rows]
    common = set.intersection(*sets) if sets else set()
    for r, s in zip(rows, sets):
        extra = sorted(s - common)
        if extra:
            r.variant = ", ".join(([r.variant] if r.variant else []) + extra)


def common_overrides(rows: Iterable[RunRow]) -> list[str]:
    """The overrides every run of the sweep has (shown once in the report's header)."""
    sets = [set(r.overrides) for r in rows]
    return sorted(set.intersection(*sets)) if sets else []


def collect_sweep(sweep_dir: Path) -> list[RunRow]:
    """All runs under `sweep_dir`, complete or not. Raises AtlasError when there is none."""
    if not sweep_dir.exists():
        raise AtlasError(f"sweep dir {sweep_dir} does not exist")
    if not sweep_dir.is_dir():
        raise AtlasError(f"sweep dir {sweep_dir} is not a directory")
    run_dirs = find_run_dirs(sweep_dir)
    if not run_dirs:
        raise AtlasError(f"no runs found under {sweep_dir} (a run dir holds .hydra/config.yaml)")
    rows = [read_run(d, sweep_dir) for d in run_dirs]
    mark_variants(rows)
    return rows


# ------------------------------------------------------------------------------------------------ W&B


def _unwrap(x: Any) -> Any:
    """W&B's raw config stores each key as {"value": v, "desc": ...}; the public Api unwraps it, the
    files of an offline run do not. Accept both."""
    if isinstance(x, Mapping) and set(x) <= {"value", "desc"} and "value" in x:
        return x["value"]
    return x


def row_from_wandb(config: Mapping[str, Any], summary: Mapping[str, Any], *, run_id: str,
                   train_summary: Mapping[str, Any] | None = None) -> RunRow:
    """One W&B eval run (its config and summary) -> RunRow.

    The eval stage's W&B run (`_log_wandb` in atlas_exp/eval/stage.py) has config
    `{"experiment": <the resolved app config>}` and summary keys `eval/<split>/<task>` and
    `eval/<split>/average` (plus W&B's own `_step`, `_runtime`, ... and the `eval/table` file). It has no
    selection or training figures: those come from the matching train run's summary
    (`data/n_supervised_tokens`, `selection/achieved_ratio`, `selection/selector`) when given.
    """
    exp = _unwrap(config.get("experiment"))
    if not isinstance(exp, Mapping):
        raise AtlasError(f"W&B run {run_id}: config has no 'experiment' (not an atlas_exp eval run)")
    train_summary = train_summary or {}
    tasks: dict[str, TaskScore] = {}
    averages: dict[str, float | None] = {}
    for key, v in summary.items():
        parts = str(key).split("/")
        if len(parts) != 3 or parts[0] != "eval" or parts[1] not in SPLITS:
            continue
        if parts[2] == "average":
            averages[parts[1]] = _num(v)
        else:
            tasks[parts[2]] = TaskScore(name=parts[2], split=parts[1], value=_num(v))
    # results.json order: held-in tasks first; within a split, the config's task order when known
    order = list((exp.get("eval") or {}).get("tasks") or {}) if isinstance(exp.get("eval"), Mapping) else []
    tasks = dict(sorted(tasks.items(), key=lambda kv: (SPLITS.index(kv[1].split),
                                                       order.index(kv[0]) if kv[0] in order else len(order), kv[0])))
    sel_cfg = exp.get("selector")
    model = exp.get("model", {}).get("name") if isinstance(exp.get("model"), Mapping) else None
    return RunRow(
        run_id=run_id,
        selector=str(train_summary.get("selection/selector") or selector_from_config(sel_cfg) or "?"),
        ratio=_num(exp.get("ratio")),
        seed=_int(exp.get("seed")),
        model=str(model) if model is not None else None,
        variant=combined_variant(sel_cfg),
        complete=bool(tasks or averages),
        tasks=tasks,
        split_averages=averages,
        achieved_ratio=_num(train_summary.get("selection/achieved_ratio")),
        supervised_tokens=_int(train_summary.get("data/n_supervised_tokens")),
    )


def collect_wandb(path: str, group: str | None) -> list[RunRow]:
    """The eval runs of a W&B project (and group) -> RunRows, with each run's train-run figures.

    NOT RUN AGAINST A W&B SERVER: the machine this was written on cannot reach one. It follows the
    public Api of wandb 0.31 (`Api().runs(path, filters={"jobType": ..., "group": ...})`,
    `run.config`, `run.summary_metrics`, `run.name`); `row_from_wandb`, which does the conversion, is
    tested on dicts shaped like a real run's. Train runs are matched to eval runs by name: the eval run
    is `<run dir name>-eval`, the Trainer's run `<experiment_name>/<run dir name>`.
    """
    if path.count("/") != 1 or not all(path.split("/")):
        raise AtlasError(f"--from-wandb {path!r}: give ENTITY/PROJECT")
    try:
        import wandb
    except ImportError:
        raise AtlasError("--from-wandb needs the wandb package (pip install wandb)") from None
    filters: dict[str, Any] = {"jobType": "eval"}
    if group:
        filters["group"] = group
    try:
        api = wandb.Api()
        eval_runs = list(api.runs(path, filters=filters))
        train_filters = {**filters, "jobType": "train"}
        train_by_dir = {}
        for r in api.runs(path, filters=train_filters):
            name = str(r.name or "")
            train_by_dir[name.rsplit("/", 1)[-1]] = dict(r.summary_metrics or {})
    except Exception as e:  # noqa: BLE001 - the Api raises many types (UsageError, CommError, HTTPError...)
        msg = " ".join(str(e).split())
        raise AtlasError(f"W&B {path}: {type(e).__name__}: {msg[:300]}") from None
    if not eval_runs:
        where = f"{path} group {group!r}" if group else path
        raise AtlasError(f"no runs found: W&B {where} has no eval runs (job_type 'eval')")
    rows = []
    for r in eval_runs:
        name = str(r.name or r.id)
        dir_name = name.removesuffix("-eval")
        rows.append(row_from_wandb(dict(r.config or {}), dict(r.summary_metrics or {}),
                                   run_id=f"{path}/{r.id} ({name})", train_summary=train_by_dir.get(dir_name)))
    return sorted(rows, key=lambda r: r.run_id)

