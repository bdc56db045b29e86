"""The eval stage: the run's model (or any model/endpoint) as a ReAct agent in real envs -> results.json.

Artifacts in the run dir:
- `eval/<task>/<episode>.json`: one file per finished episode (the whole conversation, how it ended,
  success and score, attempts), written atomically as each episode ends. They are the stage's resume
  state: a crashed or interrupted evaluation restarted in the same run dir plays only the episodes whose
  file is missing. Each carries the fingerprint of its task (env config, policy, model); a file of another
  fingerprint is played again, so changing one task's config reruns only that task.
- `eval/results.json`: per task (value in percent as the paper reports it, n, ends, invalid actions) and
  the held-in / held-out averages; what `python -m atlas_exp.report` collects across a sweep.

Tasks come from `cfg.eval.tasks` (see `conf/eval/`): each names an env (`_target_`), its split (held_in |
held_out), its headline metric (success | score) and its episodes (`{start, count}`, a list, or a
`_target_` that returns a list). The policy comes from `cfg.policy` (see `conf/policy/`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from atlas_exp.artifacts import (
    SCHEMA_VERSION,
    file_fingerprint,
    fingerprint,
    summary_matches,
    write_json,
)
from atlas_exp.config import build
from atlas_exp.envs.base import Env
from atlas_exp.errors import ConfigError
from atlas_exp.eval.expert_steps import ExpertTrajectories, local_model, score_trajectory
from atlas_exp.eval.policy_base import Policy, PolicyContext
from atlas_exp.eval.results import METRICS, SPLITS, TaskInfo, format_table, summarize
from atlas_exp.eval.rollout import EnvPool, EpisodeTask, run_episodes
from atlas_exp.run_dir import RunDir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalTask:
    """One configured task: an env, its episodes and how it is scored."""

    name: str
    split: str
    metric: str
    #: the env config (agent tasks) or `{"kind": "expert_steps", "trajectories": <source config>}`
    env_cfg: dict[str, Any]
    episodes: list[int | str]
    max_turns: int

    @property
    def kind(self) -> str:
        return str(self.env_cfg.get("kind", "agent"))

    def info(self, env_name: str) -> TaskInfo:
        return TaskInfo(self.name, env_name, self.split, self.metric, len(self.episodes))


def _episodes(name: str, spec: Any) -> list[int | str]:
    where = f"eval.tasks.{name}.episodes"
    if spec is None:
        raise ConfigError(f"{where} is missing: give {{start, count}}, a list of items, or a _target_")
    if OmegaConf.is_config(spec):
        spec = OmegaConf.to_container(spec, resolve=True)
    if isinstance(spec, list):
        items = spec
    elif isinstance(spec, dict) and "_target_" in spec:
        items = list(build(spec, where))
    elif isinstance(spec, dict) and "count" in spec:
        start, count, step = int(spec.get("start", 0)), int(spec["count"]), int(spec.get("step", 1))
        if count < 0 or step < 1:
            raise ConfigError(f"{where}: count must be >= 0 and step >= 1, got count={count} step={step}")
        items = list(range(start, start + count * step, step))
    else:
        raise ConfigError(f"{where} must be {{start, count[, step]}}, a list, or a _target_; got {spec!r}")
    for i in items:
        if isinstance(i, bool) or not isinstance(i, (int, str)):
            raise ConfigError(f"{where}: items must be ints or strings, got {i!r}")
    if len(set(map(str, items))) != len(items):
        raise ConfigError(f"{where}: the episode list has duplicates")
    return items


def build_tasks(cfg: DictConfig) -> list[EvalTask]:
    """The configured tasks, validated: a bad option is named here, not discovered an hour into a run."""
    ev = cfg.eval
    tasks = []
    default_turns = int(ev.get("max_turns", 30))
    for name, t in (ev.get("tasks") or {}).items():
        if t is None:  # `eval.tasks.sciworld=null` drops a task from a preset
            continue
        split = str(t.get("split", "held_in"))
        if split not in SPLITS:
            raise ConfigError(f"eval.tasks.{name}.split={split!r}: choose one of {', '.join(SPLITS)}")
        metric = str(t.get("metric", "success"))
        if metric not in METRICS:
            raise ConfigError(f"eval.tasks.{name}.metric={metric!r}: choose one of {', '.join(METRICS)}")
        kind = str(t.get("kind", "agent"))
        if kind == "expert_steps":
            if not t.get("trajectories") or "_target_" not in t.trajectories:
                raise ConfigError(f"eval.tasks.{name}.trajectories needs a _target_ (a data source, as in data.sources)")
            env_cfg = {"kind": kind, "trajectories": OmegaConf.to_container(t.trajectories, resolve=True)}
        elif kind == "agent":
            if not t.get("env") or "_target_" not in t.env:
                raise ConfigError(f"eval.tasks.{name}.env needs a _target_ (an atlas_exp.envs class)")
            env_cfg = OmegaConf.to_container(t.env, resolve=True)
        else:
            raise ConfigError(f"eval.tasks.{name}.kind={kind!r}: choose agent (an env, the default) or expert_steps")
        turns = int(t.get("max_turns") or default_turns)
        if turns < 1:
            raise ConfigError(f"eval.tasks.{name}.max_turns must be >= 1")
        tasks.append(EvalTask(str(name), split, metric, env_cfg, _episodes(str(name), t.get("episodes")), turns))
    return tasks


def _env_factory(task: EvalTask) -> Callable[[], Env]:
    def make() -> Env:
        return build(task.env_cfg, f"eval.tasks.{task.name}.env", Env)

    return make


def _model_fingerprint(cfg: DictConfig, rd: RunDir) -> dict[str, Any]:
    """What identifies the agent: the policy config, the base model, and the trained weights (via the
    training summary, which changes whenever training reruns)."""
    pol = OmegaConf.to_container(cfg.policy, resolve=True)
    assert isinstance(pol, dict)
    cls = _policy_class(pol)
    for key in getattr(cls, "reply_neutral", ()):
        pol.pop(key, None)
    cap = _reply_cap(cfg)
    if cap:
        pol["max_new_tokens"] = cap
    out: dict[str, Any] = {"policy": pol}
    if pol.get("model", "run") in ("run", "base") and getattr(cls, "loads_base_model", False):
        out["base_model"] = OmegaConf.to_container(cfg.model, resolve=True)
    if pol.get("model") == "run":
        out["trained"] = file_fingerprint(rd.training_summary) if rd.training_summary.exists() else None
    return out


def _policy_class(pol: dict[str, Any]) -> type | None:
    """The class `policy._target_` names, without building it (None if it does not import: building the
    policy then reports that with the option's name)."""
    from hydra.utils import get_class

    try:
        return get_class(str(pol.get("_target_", "")))
    except Exception:
        return None


def _load_done(rd: RunDir, tasks: list[EvalTask], fps: dict[str, str]) -> list[dict[str, Any]]:
    """Episodes of this config already played: their files exist with this task's fingerprint."""
    done, stale, unreadable = [], 0, 0
    for t in tasks:
        for e in t.episodes:
            path = rd.eval_episode(t.name, str(e))
            if not path.exists():
                continue
            try:
                r = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                unreadable += 1  # written atomically, so only a file edited by hand gets here
                continue
            if r.get("fingerprint") == fps[t.name] and r.get("episode") == str(e):
                done.append(r)
            else:
                stale += 1
    if stale or unreadable:
        log.info("eval: %d episode file(s) of another config and %d unreadable one(s) will be played again",
                 stale, unreadable)
    return done


def _log_wandb(cfg: DictConfig, rd: RunDir, results: dict[str, Any], records: list[dict[str, Any]]) -> None:
    lg = cfg.logger
    if str(lg.report_to) != "wandb":
        return
    try:
        import wandb
    except ImportError:  # pragma: no cover - wandb is a requirement
        log.warning("eval: logger=wandb but wandb is not installed; skipping")
        return
    rd.logs.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=str(lg.project), entity=lg.entity or None, group=str(lg.group) if lg.group else None,
        job_type="eval", name=f"{rd.root.name}-eval", dir=str(rd.logs), mode=str(lg.mode),
        tags=list(lg.tags or []), config={"experiment": OmegaConf.to_container(cfg, resolve=True)},
        reinit="finish_previous",
    )
    flat: dict[str, Any] = {}
    for name, t in results["tasks"].items():
        flat[f"eval/{t['split']}/{name}"] = t["value"]
    for split, s in results["splits"].items():
        flat[f"eval/{split}/average"] = s["average"]
    run.log(flat)
    run.summary.update(flat)
    rows = [[n, t["split"], t["metric"], t["value"], t["n"]] for n, t in results["tasks"].items()]
    run.log({"eval/table": wandb.Table(columns=["task", "split", "metric", "value", "n"], data=rows)})
    cols = ["task", "episode", "success", "score", "turns", "end", "invalid_actions", "attempts"]
    episodes = [[r.get(c) for c in cols] for r in sorted(records, key=lambda r: (r["task"], r["episode"]))]
    run.log({"eval/episodes": wandb.Table(columns=cols, data=episodes)})
    run.finish()


def build_policy(cfg: DictConfig, rd: RunDir) -> Policy:
    ctx = PolicyContext(
        model_cfg=OmegaConf.to_container(cfg.model, resolve=True),  # type: ignore[arg-type]
        run_model_dir=rd.model,
        cache_dir=str(cfg.cache_dir),
        seed=int(cfg.seed),
    )
    cap = _reply_cap(cfg)
    return build(cfg.policy, "policy", Policy, context=ctx, **({"max_new_tokens": cap} if cap else {}))


def _reply_cap(cfg: DictConfig) -> int | None:
    """`eval.max_new_tokens` caps `policy.max_new_tokens` (never raises it): the smoke preset keeps replies
    short because a model trained for a few steps may not stop on its own, and every long reply makes every
    later prompt of its episode longer."""
    cap = cfg.eval.get("max_new_tokens")
    if not cap:
        return None
    own = cfg.policy.get("max_new_tokens")
    return int(min(int(cap), int(own))) if own else int(cap)


def run_eval_stage(cfg: DictConfig, rd: RunDir) -> None:
    tasks = build_tasks(cfg)
    if not tasks:
        log.info("eval: no tasks configured (eval=%s); nothing to evaluate", cfg.eval.get("name", "?"))
        return
    model_fp = _model_fingerprint(cfg, rd)
    fps = {t.name: fingerprint("eval", SCHEMA_VERSION, model_fp, t.env_cfg, t.max_turns) for t in tasks}
    planned = {t.name: {str(e) for e in t.episodes} for t in tasks}
    run_fp = fingerprint("eval-run", sorted(fps.items()), sorted((k, sorted(v)) for k, v in planned.items()))
    n_planned = sum(len(v) for v in planned.values())
    done = [] if cfg.force else _load_done(rd, tasks, fps)
    if not cfg.force and summary_matches(rd.results, run_fp) and len(done) == n_planned:
        log.info("eval: %s is up to date, skipping", rd.results)
        return
    done_keys = {(r["task"], r["episode"]) for r in done}
    todo = [EpisodeTask(t.name, e) for t in tasks for e in t.episodes if (t.name, str(e)) not in done_keys]
    env_names = {t.name: (str(t.env_cfg["_target_"]).rsplit(".", 1)[-1] if t.kind == "agent" else t.kind) for t in tasks}
    by_name = {t.name: t for t in tasks}
    agent_todo = [x for x in todo if by_name[x.task].kind == "agent"]
    expert_todo = [x for x in todo if by_name[x.task].kind == "expert_steps"]
    for r in done:
        env_names[r["task"]] = r["env"]

    t0 = time.time()
    policy_info: dict[str, Any] = {}
    if todo:
        log.info("eval: %d episode(s) to play (%d already in %s)", len(todo), len(done), rd.eval_dir)
        factories = {t.name: _env_factory(t) for t in tasks if t.kind == "agent"}
        # build each env (and each expert source) once now: a missing dependency or data folder fails
        # before the model loads
        for t in tasks:
            if any(x.task == t.name for x in agent_todo):
                factories[t.name]().close()
        sources = {t.name: ExpertTrajectories(t.name, t.env_cfg["trajectories"]) for t in tasks if t.kind == "expert_steps"}
        for x in expert_todo:
            sources[x.task].get(x.episode)
        policy = build_policy(cfg, rd)
        policy_info = policy.describe()
        # expert_steps tasks score the policy's own model: fail now, not after the agent episodes
        scorer = local_model(policy, expert_todo[0].task) if expert_todo else None
        pool = EnvPool(factories)
        records = list(done)
        wins: dict[str, list[int]] = {}
        bar = tqdm(total=len(todo), desc="eval", unit="ep")

        def finished(task: str, episode: str, rec: dict[str, Any]) -> None:
            # one file per episode, written atomically the moment it ends: a crash loses only the
            # episodes in flight, and each transcript can be read on its own
            write_json(rd.eval_episode(task, episode), rec)
            records.append(rec)
            w = wins.setdefault(task, [0, 0])
            w[0] += int(rec["success"])
            w[1] += 1
            bar.update(1)
            bar.set_postfix({k: f"{a}/{n}" for k, (a, n) in wins.items()}, refresh=False)

        try:
            for res in run_episodes(agent_todo, pool, policy, batch_size=int(cfg.eval.batch_size),
                                    max_turns={t.name: t.max_turns for t in tasks},
                                    env_retries=int(cfg.eval.get("env_retries", 1))):
                env_names[res.task] = res.env
                finished(res.task, res.episode, {"fingerprint": fps[res.task], **res.to_dict()})
            for x in expert_todo:
                model, tok, max_context = scorer
                scored = score_trajectory(model, tok, sources[x.task].get(x.episode), max_context=max_context)
                finished(x.task, str(x.episode), {"fingerprint": fps[x.task], "task": x.task, "episode": str(x.episode),
                                                  "env": "expert_steps", **scored})
        finally:
            bar.close()
            pool.close()
            stats = getattr(policy, "stats", None)
            if stats:
                policy_info["stats"] = dict(stats)
            policy.close()
    else:
        records = done
        log.info("eval: all %d episode(s) already played for this config (%s)", len(done), rd.eval_dir)

    summary = summarize(records, [t.info(env_names[t.name]) for t in tasks])
    results = {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": run_fp,
        "run_dir": str(rd.root),
        "eval": str(cfg.eval.get("name", "")),
        # nothing played in this call (every episode file was already there): the config says what played them
        "policy": policy_info or {"played_in_an_earlier_call": True, **model_fp["policy"]},
        "model": model_fp,
        "selection": _json_or_empty(rd.selection_summary, ("selector", "ratio", "achieved_ratio", "n_steps", "n_selected")),
        "training": _json_or_empty(rd.training_summary, ("mode", "model", "global_step", "train_loss", "world_size")),
        **summary,
        "seconds": round(time.time() - t0, 3),
    }
    write_json(rd.results, results)
    log.info("eval results -> %s\n%s", rd.results, format_table(summary))
    _log_wandb(cfg, rd, results, records)


def _json_or_empty(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return {k: d[k] for k in keys if k in d}
