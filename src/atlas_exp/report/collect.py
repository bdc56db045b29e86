"""Finding the runs of a sweep and reading each run dir into a `RunRow`: the one place that knows the
on-disk shapes of a run's artifacts (W&B runs: `wandb_runs`).

The report's aggregation and plots only see `RunRow`s (`rows`), so a change in an artifact's format is
fixed here alone.

A run dir is any folder holding `.hydra/config.yaml` (what Hydra writes for every job of a multirun, and
for a single run). A run without `results.json` is kept as an incomplete row (with what it does have), so
a crashed or still-running job shows up in the report instead of silently shrinking a mean.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from atlas_exp.artifacts import iter_jsonl, read_json
from atlas_exp.errors import AtlasError
from atlas_exp.eval.results import SPLITS
from atlas_exp.report.rows import Episode, RunRow, TaskScore, as_int, as_number
from atlas_exp.report.variants import combined_variant, mark_variants, selector_from_config
from atlas_exp.run_dir import RunDir

#: folders never walked into (besides hidden ones such as outputs/.cache); a run dir's own folders
#: (model, checkpoints, eval) are not walked either, because the walk stops at a run dir
_SKIP_DIRS = {"__pycache__"}


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
    """`_read_json` of a file that must hold an object (`what` it is, for the error)."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise AtlasError(f"{path}: not a {what} (expected a JSON object, got {type(data).__name__})")
    return data


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
        dirnames[:] = sorted(name for name in dirnames if not name.startswith(".") and name not in _SKIP_DIRS)
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
        for _, traj in iter_jsonl(rd.trajectories):
            if isinstance(traj, dict) and "id" in traj:
                env_by_id[str(traj["id"])] = str(traj.get("env", "?"))
    out: dict[str, Counter[str]] = defaultdict(Counter)
    for lineno, selection in iter_jsonl(rd.selection):
        if not isinstance(selection, dict) or not isinstance(selection.get("steps"), list):
            raise AtlasError(f"{rd.selection}:{lineno}: not a selection record (no steps)")
        env = env_by_id.get(str(selection.get("id")), "?")
        for step in selection["steps"]:
            if isinstance(step, dict) and step.get("selected") and step.get("category"):
                out[env][str(step["category"])] += 1
    return {env: dict(counts) for env, counts in sorted(out.items()) if counts}


def parse_results(results: Mapping[str, Any], source: str) -> tuple[dict[str, TaskScore], dict[str, float | None]]:
    """Tasks and split averages of a results.json (see atlas_exp.eval.results.summarize)."""
    tasks_in = results.get("tasks")
    if not isinstance(tasks_in, Mapping):
        raise AtlasError(f"{source}: not a results.json (no 'tasks' object)")
    tasks: dict[str, TaskScore] = {}
    for name, task in tasks_in.items():
        if not isinstance(task, Mapping) or task.get("split") not in SPLITS:
            raise AtlasError(f"{source}: task {name!r} has no split ({' | '.join(SPLITS)})")
        tasks[str(name)] = TaskScore(
            name=str(name), split=str(task["split"]), value=as_number(task.get("value")), metric=task.get("metric"),
            env=task.get("env"), n=as_int(task.get("n")),
        )
    averages: dict[str, float | None] = {}
    splits = results.get("splits")
    for split, summary in (splits.items() if isinstance(splits, Mapping) else ()):
        averages[str(split)] = as_number(summary.get("average")) if isinstance(summary, Mapping) else None
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
    overrides = [str(override) for override in overrides] if isinstance(overrides, list) else []

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
    ratio = as_number(cfg.get("ratio"))
    if ratio is None:  # an interpolated ratio: take what the selector was given
        ratio = as_number(sel_sum.get("ratio", res_sel.get("ratio")))
    achieved = as_number(sel_sum.get("achieved_ratio", res_sel.get("achieved_ratio", train_sum.get("selection/achieved_ratio"))))
    model = cfg.get("model", {}).get("name") if isinstance(cfg.get("model"), Mapping) else None

    try:
        rel = str(run_dir.relative_to(sweep_dir)) or "."
    except ValueError:
        rel = str(run_dir)
    row = RunRow(
        run_id=rel,
        selector=str(selector),
        ratio=ratio,
        seed=as_int(cfg.get("seed")),
        model=str(model) if model is not None else None,
        variant=combined_variant(cfg.get("selector")),
        achieved_ratio=achieved,
        supervised_tokens=as_int(train_sum.get("data/n_supervised_tokens")),
        overrides=overrides,
        ignored_keys=_hydra_exclude_keys(run_dir),
        path=run_dir,
    )
    if sel_sum.get("categories"):
        row.categories = read_categories(rd)
    per_env = sel_sum.get("per_env")
    for env, env_summary in (per_env.items() if isinstance(per_env, Mapping) else ()):
        env_ratio = as_number(env_summary.get("achieved_ratio")) if isinstance(env_summary, Mapping) else None
        if env_ratio is not None:
            row.per_env_ratio[str(env)] = env_ratio
    row.input_tokens = as_int(train_sum.get("data/n_tokens"))
    row.tokens_processed = tokens_processed(train_sum, cfg.get("train"))
    row.train_seconds = as_number(train_sum.get("seconds"))
    row.select_seconds = as_number(sel_sum.get("seconds"))
    if results is not None:
        row.tasks, row.split_averages = parse_results(results, str(results_path))
        row.complete = True
        row.episodes, row.episode_notes = read_episodes(rd, row.tasks)
    else:
        row.has = [name for name, path in (("trajectories", rd.trajectories), ("selection", rd.selection),
                                            ("training summary", rd.training_summary), ("eval (no results.json)", rd.eval_dir))
                   if path.exists()]
    return row


def tokens_processed(train_sum: Mapping[str, Any], train_cfg: Any) -> float | None:
    """Input tokens the model processed over its whole training: the examples' tokens per epoch times the
    epochs run. With `train.max_steps > 0` the epochs run are global_step x global batch / examples (an
    estimate: it assumes the examples seen have the mean length); otherwise `train.num_train_epochs`. Run dirs written before the TrainingArguments names
    (`per_device_batch_size`, `grad_accum`, `epochs`) are read under those."""
    n_tokens, n_examples = as_number(train_sum.get("data/n_tokens")), as_number(train_sum.get("n_examples"))
    if n_tokens is None or not isinstance(train_cfg, Mapping):
        return None
    max_steps = as_number(train_cfg.get("max_steps"))
    if max_steps is not None and max_steps > 0:
        step = as_number(train_sum.get("global_step"))
        batch_size = as_number(_option(train_cfg, "per_device_train_batch_size", "per_device_batch_size"))
        grad_accum = as_number(_option(train_cfg, "gradient_accumulation_steps", "grad_accum"))
        world = as_number(train_sum.get("world_size")) or 1.0
        if step is None or batch_size is None or grad_accum is None or not n_examples:
            return None
        return n_tokens * step * batch_size * grad_accum * world / n_examples
    epochs = as_number(_option(train_cfg, "num_train_epochs", "epochs"))
    return n_tokens * epochs if epochs is not None else None


def _option(train_cfg: Mapping[str, Any], name: str, old_name: str) -> Any:
    """A train option under its TrainingArguments name, else under the name a run dir of before used."""
    return train_cfg[name] if name in train_cfg else train_cfg.get(old_name)


def _episode(record: Mapping[str, Any], metric: str | None) -> Episode | None:
    """An episode file's value under the task's metric (None: unfinished), with its scored steps if any."""
    if metric == "score":
        value = as_number(record.get("score"))
    else:
        value = 1.0 if record.get("success") is True else 0.0 if record.get("success") is False else None
    if value is None:
        return None
    steps = record.get("steps")
    if isinstance(steps, list) and all(isinstance(step, Mapping) and isinstance(step.get("action_correct"), bool)
                                       for step in steps):
        ordered = sorted(steps, key=lambda step: as_int(step.get("step")) or 0)
        return Episode(value, tuple(bool(step["action_correct"]) for step in ordered))
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
    for name, task in tasks.items():
        if not task.n or task.value is None:
            continue
        folder = rd.eval_dir / name
        if not folder.is_dir():
            notes[name] = "no episode files"
            continue
        # fingerprint -> episode id -> episode
        groups: dict[str, dict[str, Episode]] = defaultdict(dict)
        for path in sorted(folder.glob("*.json")):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
            if not isinstance(record, dict) or record.get("task", name) != name:
                continue
            episode = _episode(record, task.metric)
            if episode is not None:
                groups[str(record.get("fingerprint"))][str(record.get("episode", path.stem))] = episode
        reproducing = next((group for group in groups.values() if len(group) == task.n
                            and abs(100.0 * sum(e.value for e in group.values()) / len(group) - task.value) <= 0.01),
                           None)
        if reproducing is not None:
            episodes[name] = dict(sorted(reproducing.items()))
        else:
            found = sum(len(group) for group in groups.values())
            notes[name] = (f"episode files ({found}) do not reproduce results.json (n={task.n}, value {task.value:g})"
                           if found else "no episode files")
    return episodes, notes


def results_file(rd: RunDir) -> Path | None:
    """The run's results.json: where the eval stage writes it now (RunDir.results), else the run dir's top
    (where earlier versions wrote it), so sweeps made before the move still report."""
    for path in (rd.results, rd.root / "results.json"):
        if path.is_file():
            return path
    return None


def _hydra_exclude_keys(run_dir: Path) -> list[str]:
    """Hydra's `job.config.override_dirname.exclude_keys` of this run: the app's own list of override keys
    that do not change a run's results (conf/hydra/default.yaml)."""
    path = run_dir / ".hydra" / "hydra.yaml"
    if not path.exists():
        return []
    try:
        keys = _read_yaml(path)["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"]
    except (AtlasError, KeyError, TypeError):
        return []
    return [str(key) for key in keys] if isinstance(keys, list) else []


def collect_sweep(sweep_dir: Path) -> list[RunRow]:
    """All runs under `sweep_dir`, complete or not. Raises AtlasError when there is none."""
    if not sweep_dir.exists():
        raise AtlasError(f"sweep dir {sweep_dir} does not exist")
    if not sweep_dir.is_dir():
        raise AtlasError(f"sweep dir {sweep_dir} is not a directory")
    run_dirs = find_run_dirs(sweep_dir)
    if not run_dirs:
        raise AtlasError(f"no runs found under {sweep_dir} (a run dir holds .hydra/config.yaml)")
    rows = [read_run(run_dir, sweep_dir) for run_dir in run_dirs]
    mark_variants(rows)
    return rows

