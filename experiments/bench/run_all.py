"""Run every benchmark of experiments/bench/ one after the other, then print the summary table.

What `make bench` calls. Benchmarks run sequentially (never two at once: they would time each other), each
as its own process; a failing one is reported and the others still run (exit status 1 at the end then).

    python experiments/bench/run_all.py [--quick] [--only a,b] [--skip c] [--threads 1]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

BENCHMARKS = ["train_throughput", "critical_step_compute", "select_throughput", "eval_throughput", "oracle_cost"]
#: run only where a GPU is (on a CPU its default size, an 8B model, would not finish)
GPU_BENCHMARKS = ["gpu_train"]


def has_gpu() -> bool:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                         capture_output=True, text=True)
    return out.stdout.strip() == "True"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="pass --quick to every benchmark (small sizes)")
    p.add_argument("--only", default="", help="comma-separated benchmarks to run (default: all)")
    p.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    p.add_argument("--threads", type=int, default=1, help="passed to every benchmark (default 1)")
    p.add_argument("--data-dir", type=Path, default=None, help="passed to every benchmark (AgentTraj-L folder)")
    p.add_argument("--cache-dir", type=Path, default=None, help="passed to every benchmark (atlas_exp cache_dir)")
    args = p.parse_args()
    only = [b for b in args.only.split(",") if b]
    skip = {b for b in args.skip.split(",") if b}
    known = BENCHMARKS + GPU_BENCHMARKS
    unknown = (set(only) | skip) - set(known)
    if unknown:
        p.error(f"unknown benchmark(s) {sorted(unknown)}; known: {', '.join(known)}")
    default = BENCHMARKS + (GPU_BENCHMARKS if has_gpu() else [])
    if not only and not has_gpu():
        print(f"no GPU here: {', '.join(GPU_BENCHMARKS)} left out (run it with --only on a GPU machine)")
    todo = [b for b in (only or default) if b not in skip]

    times: dict[str, tuple[int, float]] = {}
    for name in todo:
        cmd = [sys.executable, str(common.BENCH_DIR / f"{name}.py"), "--threads", str(args.threads)]
        if args.quick:
            cmd.append("--quick")
        if args.data_dir:
            cmd += ["--data-dir", str(args.data_dir)]
        if args.cache_dir:
            cmd += ["--cache-dir", str(args.cache_dir)]
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=common.REPO)
        times[name] = (rc, time.perf_counter() - t0)
        print(f"=== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {times[name][1]:.0f} s", flush=True)

    print("\n=== summary")
    subprocess.call([sys.executable, str(common.BENCH_DIR / "summary.py")], cwd=common.REPO)
    print("\n=== wall times: " + ", ".join(f"{n} {t:.0f} s{'' if rc == 0 else ' (FAILED)'}" for n, (rc, t) in times.items()))
    sys.exit(0 if all(rc == 0 for rc, _ in times.values()) else 1)


if __name__ == "__main__":
    main()
