"""Child processes under time limits, for experiments/gpu/run.py: a `Job` (one command, its log, what became
of it) and `run_jobs` (at most `parallel` at once, a job waiting for the one it needs, all ended at a deadline).

Why its own file: run.py reads as the device session's story (phases, rows, export); this is the process
plumbing under it, which tests/test_gpu_dry_run.py checks with tiny processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: set by run.py's main: the session log every line also goes to, and the folder log paths are shown against
LOG_FILE: Path | None = None
OUT_ROOT: Path | None = None


def log(msg: str) -> None:
    line = f"[gpu {time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if LOG_FILE is not None:
        with LOG_FILE.open("a") as f:
            f.write(line + "\n")


@dataclass
class Job:
    """One child process: a name, its command, where its output goes, and what became of it."""

    name: str
    cmd: list[str]
    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    started: float = 0.0
    seconds: float | None = None
    status: str = "not started"  # not started | running | done | failed (exit N) | killed at the time limit
    returncode: int | None = None
    #: the name of a job that must be done before this one starts
    after: str | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._out = self.log_path.open("w")
        self._out.write("$ " + " ".join(self.cmd) + "\n")
        self._out.flush()
        # a process group of its own, so that a time limit ends torchrun's workers too
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.started = time.time()
        self.status = "running"

    def poll(self) -> bool:
        """True once the process has ended (then status says how)."""
        if self.proc is None or self.status != "running":
            return self.status != "running"
        rc = self.proc.poll()
        if rc is None:
            return False
        self._finish(rc, "done" if rc == 0 else f"failed (exit {rc})")
        return True

    def kill(self, why: str) -> None:
        if self.proc is None or self.status != "running":
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self._finish(self.proc.returncode, why)

    def _finish(self, rc: int | None, status: str) -> None:
        self.returncode = rc
        self.status = status
        self.seconds = round(time.time() - self.started, 1)
        self._out.close()

    def tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def run_jobs(jobs: list[Job], *, parallel: int, deadline: float, on_done=None) -> None:
    """Start `jobs` in order, at most `parallel` at a time; end any still running at `deadline`. A job with
    `after` waits for that job (when it is one of `jobs`) to be done; the jobs behind it start meanwhile."""
    todo = list(jobs)
    by_name = {j.name: j for j in jobs}
    running: list[Job] = []
    while todo or running:
        while todo and len(running) < parallel and time.time() < deadline - 5:
            j = next((j for j in todo if _ready(j, by_name)), None)
            if j is None:
                break
            todo.remove(j)
            need = by_name.get(j.after) if j.after else None
            if need is not None and need.status != "done":
                j.status = f"not started ({j.after} {need.status})"
                log(f"{j.name}: {j.status}")
                if on_done:
                    on_done(j)
                continue
            log(f"start {j.name} (log: {j.log_path.relative_to(OUT_ROOT) if OUT_ROOT else j.log_path})")
            j.start()
            running.append(j)
        if not running:
            break
        time.sleep(1.0)
        for j in list(running):
            if j.poll():
                running.remove(j)
                log(f"{j.name}: {j.status} after {j.seconds} s" + ("" if j.status == "done" else "\n" + j.tail()))
                if on_done:
                    on_done(j)
        if time.time() >= deadline:
            for j in running:
                j.kill("killed at the time limit")
                log(f"{j.name}: {j.status} after {j.seconds} s")
                if on_done:
                    on_done(j)
            running = []
    for j in todo:
        j.status = "not started (no time left)"


def _ready(job: Job, by_name: dict[str, Job]) -> bool:
    """Whether `job` can be decided now: no prerequisite among the jobs, or it has ended (well or not)."""
    need = by_name.get(job.after) if job.after else None
    return need is None or need.status not in ("not started", "running")
