"""`python -m atlas_exp.plan <overrides>`: what a (multi)run would launch, without launching anything.

A paper-size sweep costs GPU-days, so before starting one a researcher wants to see the grid: every run's
directory, selector, ratio, seed, model, ranks and DeepSpeed stage, and which runs are already finished
(their `eval/results.json` exists: a relaunch skips them) or started (a trained model or checkpoints exist).
This expands the sweep exactly as Hydra's basic sweeper would (the `hydra.sweeper.params` of the config
plus comma-separated command-line overrides, as a cartesian product) and names each run's directory by
Hydra's own rule (`hydra.sweep.dir` / sorted `key=value` overrides without the excluded keys). It reads
configs only: no GPU, network or model is touched, and nothing is written.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from atlas_exp.config import CONF_DIR, safe_dirname
from atlas_exp.errors import AtlasError, ConfigError
from atlas_exp.run_dir import RunDir


@dataclass(frozen=True)
class PlannedRun:
    """One job of the sweep as it would be launched."""

    overrides: tuple[str, ...]
    run_dir: Path
    selector: str
    ratio: float
    seed: int
    model: str
    ranks: int
    deepspeed: str
    eval: str

    @property
    def status(self) -> str:
        rd = RunDir(self.run_dir)
        if rd.results.exists():
            return "done"
        if rd.training_summary.exists() or rd.checkpoints.exists():
            return "started"
        return "todo"


def _expand(overrides: list[str], params: dict[str, str]) -> list[list[str]]:
    """The job override lists of a sweep: config params first, the command line wins on the same key."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    cli = {}
    for o in parser.parse_overrides(overrides):
        cli[o.get_key_element()] = o
    axes: list[list[str]] = []
    merged = {k: parser.parse_overrides([f"{k}={v}"])[0] for k, v in params.items() if k not in cli}
    merged.update(cli)
    for key, o in merged.items():
        if o.is_sweep_override():
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    return [list(combo) for combo in itertools.product(*axes)]


def plan(overrides: list[str]) -> tuple[list[PlannedRun], bool]:
    """The runs `python -m atlas_exp <overrides>` would launch, and whether it is a multirun."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        base = [o for o in overrides if "," not in o.split("=", 1)[-1]]
        root = compose(config_name="config", overrides=base, return_hydra_config=True)
        hy = root.hydra
        multirun = str(hy.mode) == "RunMode.MULTIRUN" or str(hy.mode) == "MULTIRUN" or any(
            "," in o.split("=", 1)[-1] for o in overrides)
        params = OmegaConf.to_container(hy.sweeper.get("params") or {}, resolve=False) if multirun else {}
        jobs = _expand(overrides, {k: str(v) for k, v in params.items()}) if multirun else [list(overrides)]
        exclude = set(hy.job.config.override_dirname.exclude_keys)
        runs = []
        for job in jobs:
            cfg = compose(config_name="config", overrides=job, return_hydra_config=True)
            if multirun:
                # Hydra's own overrides (hydra.*) are not task overrides and never name a run dir
                keys = [o.split("=", 1)[0].lstrip("+~") for o in job]
                kept = sorted(o for o, k in zip(job, keys) if k not in exclude and not k.startswith("hydra."))
                sweep_dir = Path(str(cfg.hydra.sweep.dir))
                run_dir = sweep_dir / safe_dirname(",".join(kept))
            else:
                run_dir = Path(str(cfg.run_dir))
            sel = cfg.selector
            name = str(sel._target_).rsplit(".", 1)[-1]
            if "base" in sel and sel.base is not None and "_target_" in sel.base:
                name += f"({str(sel.base._target_).rsplit('.', 1)[-1]})"
            ds = "none" if not cfg.deepspeed.get("enabled") else f"zero{cfg.deepspeed.config.zero_optimization.stage}"
            runs.append(PlannedRun(
                overrides=tuple(job), run_dir=run_dir, selector=name, ratio=float(cfg.ratio), seed=int(cfg.seed),
                model=str(cfg.model.name), ranks=int(cfg.launcher.nproc_per_node), deepspeed=ds,
                eval=str(cfg.eval.get("name", "")),
            ))
    GlobalHydra.instance().clear()
    return runs, multirun


def format_plan(runs: list[PlannedRun]) -> str:
    lines = [f"{'status':<8}{'selector':<44}{'ratio':>6}{'seed':>6}  {'model':<22}{'ranks':>5}  {'deepspeed':<10}{'eval':<10}run dir"]
    for r in runs:
        lines.append(f"{r.status:<8}{r.selector:<44}{r.ratio:>6.2f}{r.seed:>6}  {r.model:<22}{r.ranks:>5}  "
                     f"{r.deepspeed:<10}{r.eval:<10}{r.run_dir}")
    counts = {s: sum(r.status == s for r in runs) for s in ("done", "started", "todo")}
    lines.append(f"{len(runs)} run(s): {counts['done']} done (skipped on launch), {counts['started']} started "
                 f"(resume), {counts['todo']} to do")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return
    try:
        runs, _ = plan([a for a in args if a not in ("-m", "--multirun")])
    except AtlasError as e:
        print(f"atlas_exp.plan: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # Hydra's composition errors name the bad override: show that line only
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"atlas_exp.plan: error: {ConfigError(msg)}", file=sys.stderr)
        sys.exit(2)
    print(format_plan(runs))


if __name__ == "__main__":
    main()
