"""The run directory: where each stage's artifact lives (`RunDir`), the lock that lets one process at a time
write it (`RunDirLock`), and the readers of the two artifacts later stages read back (`read_trajectories`,
`read_selections`).

The ground floor of the package: every stage, the planner and the reports import it, and it imports
nothing of theirs (only the records, the artifact helpers and the errors).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlas_exp.artifacts import iter_jsonl
from atlas_exp.data.selection import Selection
from atlas_exp.data.trajectory import Trajectory
from atlas_exp.errors import AtlasError

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_.=+-]")


def safe_filename(name: str) -> str:
    """`name` as a file name: other characters become `_`, plus a short hash when anything was replaced
    (so two ids that differ only there do not collide)."""
    clean = _UNSAFE.sub("_", name)[:150] or "_"
    if clean != name:
        clean += "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return clean


@dataclass(frozen=True)
class RunDir:
    """Where each stage's artifacts live inside one run directory."""

    root: Path

    @property
    def trajectories(self) -> Path:
        return self.root / "trajectories.jsonl"

    @property
    def val_trajectories(self) -> Path:
        return self.root / "val_trajectories.jsonl"

    @property
    def data_summary(self) -> Path:
        return self.root / "data_summary.json"

    @property
    def selection(self) -> Path:
        return self.root / "selection.jsonl"

    @property
    def selection_summary(self) -> Path:
        return self.root / "selection_summary.json"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def training_summary(self) -> Path:
        return self.root / "model" / "training_summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def eval_episode(self, task: str, episode: str) -> Path:
        """One played episode's transcript and outcome (what resuming an evaluation checks for)."""
        return self.root / "eval" / task / f"{safe_filename(episode)}.json"

    @property
    def results(self) -> Path:
        """Per-task and held-in/held-out scores: what the sweep report collects."""
        return self.root / "eval" / "results.json"

    @property
    def train_config(self) -> Path:
        """The resolved config handed to torchrun workers (they do not compose Hydra again)."""
        return self.root / ".hydra" / "resolved.yaml"


class RunDirInUse(AtlasError):
    """Another live process holds the run directory's lock."""


class RunDirLock:
    """An exclusive, per-process lock on a run directory: the file `<run_dir>/.lock`, held with `flock`.

    The holder writes its pid, host, start time and command line into the file; a second process that
    tries to take the lock gets `RunDirInUse` naming them. The kernel drops an flock when its process
    dies, so a lock file left by a killed process is taken over, with a warning naming that process.
    A normal release removes the file. Acquiring a lock this process already holds is a no-op (counted),
    so `python -m atlas_exp` can take it before Hydra writes `.hydra/` and the stages again.
    """

    _held: dict[Path, list[Any]] = {}  # resolved root -> [fd, count], for this process

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.path = self.root / ".lock"

    def __enter__(self) -> "RunDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        import fcntl

        held = self._held.get(self.root)
        if held is not None:
            held[1] += 1
            return
        self.root.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunDirInUse(
                    f"run dir {self.root} is in use by process {holder.get('pid', '?')} "
                    f"(on {holder.get('host', '?')} since {holder.get('started', '?')}: {holder.get('command', '?')}); "
                    f"wait for it to finish or choose another run_dir (lock: {self.path})"
                ) from None
            # the holder before us may have removed the file between our open and our flock: lock the file
            # that is there now, not an orphaned inode
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = _read_holder(fd)
        if old.get("pid") is not None:
            log.warning("run dir %s: taking over the lock of process %s (on %s since %s), which is no longer running",
                        self.root, old.get("pid"), old.get("host", "?"), old.get("started", "?"))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(" ".join([os.path.basename(sys.executable)] + getattr(sys, "orig_argv", sys.argv)[1:]).split())[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        if not self._held:
            atexit.register(RunDirLock.release_all)
        self._held[self.root] = [fd, 1]

    @classmethod
    def release_all(cls) -> None:
        """Release every lock this process holds (at exit: a lock taken before Hydra started is kept to the end)."""
        for root in list(cls._held):
            cls._held[root][1] = 1
            RunDirLock(root).release()

    def release(self) -> None:
        held = self._held.get(self.root)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del self._held[self.root]
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(held[0])


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        return json.loads(data) if data else {}
    except (OSError, ValueError):
        return {}


# --- the artifacts later stages read back ---------------------------------------------------------------

def read_trajectories(path) -> list[Trajectory]:
    """trajectories.jsonl (or val_trajectories.jsonl) -> its trajectories, each naming its file:line."""
    return [Trajectory.from_dict(d, source=f"{path}:{n}") for n, d in iter_jsonl(path)]


def read_selections(path) -> list[Selection]:
    """selection.jsonl -> its selections, each naming its file:line."""
    return [Selection.from_dict(d, source=f"{path}:{n}") for n, d in iter_jsonl(path)]
