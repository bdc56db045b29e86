"""Child processes: a benchmark side run in a fresh process (its own memory peak, no state shared with the
parent), stopped above a resident-memory limit so that a shared machine never reaches its OOM killer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, setup_env


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
