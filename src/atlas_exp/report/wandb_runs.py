"""W&B eval runs -> `RunRow`s (`python -m atlas_exp.report --from-wandb ENTITY/PROJECT`): the eval run's
config and summary, with the matching train run's selection and training figures."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from atlas_exp.errors import AtlasError
from atlas_exp.eval.results import SPLITS
from atlas_exp.report.rows import RunRow, TaskScore, as_int, as_number
from atlas_exp.report.variants import combined_variant, selector_from_config


def _unwrap(value: Any) -> Any:
    """W&B's raw config stores each key as {"value": v, "desc": ...}; the public Api unwraps it, the
    files of an offline run do not. Accept both."""
    if isinstance(value, Mapping) and set(value) <= {"value", "desc"} and "value" in value:
        return value["value"]
    return value


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
    for key, value in summary.items():
        parts = str(key).split("/")
        if len(parts) != 3:
            continue
        prefix, split, task = parts
        if prefix != "eval" or split not in SPLITS:
            continue
        if task == "average":
            averages[split] = as_number(value)
        else:
            tasks[task] = TaskScore(name=task, split=split, value=as_number(value))
    # results.json order: held-in tasks first; within a split, the config's task order when known
    order = list((exp.get("eval") or {}).get("tasks") or {}) if isinstance(exp.get("eval"), Mapping) else []

    def report_order(name: str) -> tuple[int, int, str]:
        return SPLITS.index(tasks[name].split), order.index(name) if name in order else len(order), name

    tasks = {name: tasks[name] for name in sorted(tasks, key=report_order)}
    sel_cfg = exp.get("selector")
    model = exp.get("model", {}).get("name") if isinstance(exp.get("model"), Mapping) else None
    return RunRow(
        run_id=run_id,
        selector=str(train_summary.get("selection/selector") or selector_from_config(sel_cfg) or "?"),
        ratio=as_number(exp.get("ratio")),
        seed=as_int(exp.get("seed")),
        model=str(model) if model is not None else None,
        variant=combined_variant(sel_cfg),
        complete=bool(tasks or averages),
        tasks=tasks,
        split_averages=averages,
        achieved_ratio=as_number(train_summary.get("selection/achieved_ratio")),
        supervised_tokens=as_int(train_summary.get("data/n_supervised_tokens")),
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
        for run in api.runs(path, filters=train_filters):
            name = str(run.name or "")
            train_by_dir[name.rsplit("/", 1)[-1]] = dict(run.summary_metrics or {})
    except Exception as e:  # noqa: BLE001 - the Api raises many types (UsageError, CommError, HTTPError...)
        msg = " ".join(str(e).split())
        raise AtlasError(f"W&B {path}: {type(e).__name__}: {msg[:300]}") from None
    if not eval_runs:
        where = f"{path} group {group!r}" if group else path
        raise AtlasError(f"no runs found: W&B {where} has no eval runs (job_type 'eval')")
    rows = []
    for run in eval_runs:
        name = str(run.name or run.id)
        dir_name = name.removesuffix("-eval")
        rows.append(row_from_wandb(dict(run.config or {}), dict(run.summary_metrics or {}),
                                   run_id=f"{path}/{run.id} ({name})", train_summary=train_by_dir.get(dir_name)))
    return sorted(rows, key=lambda row: row.run_id)

