"""The run directory and the order of stages: data -> select -> train -> eval.

Each stage reads only the previous stage's artifact from the run directory (plus its config), so any
stage can be rerun alone (`stage=select`), cached (a finished artifact with the same fingerprint is
skipped), or run elsewhere.

One process at a time writes a run directory: `run` holds `RunDirLock` on it while its stages run, and
checks before the first stage what would otherwise fail late (`preflight`: options without a value, a
model that cannot be loaded, `model.name` used as if it chose the model).
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
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from atlas_exp.errors import AtlasError, ConfigError

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


def _stages() -> dict[str, Callable[[DictConfig, RunDir], None]]:
    # imported lazily so that `--help` and config errors do not pay for torch/transformers imports
    from atlas_exp.data.stage import run_data_stage
    from atlas_exp.eval.stage import run_eval_stage
    from atlas_exp.report.inspect import run_inspect_stage
    from atlas_exp.selectors.stage import run_select_stage
    from atlas_exp.train.launch import run_train_stage

    return {"data": run_data_stage, "select": run_select_stage, "train": run_train_stage,
            "eval": run_eval_stage, "inspect": run_inspect_stage}


#: what `stage=all` runs, in order
STAGE_ORDER = ("data", "select", "train", "eval")
#: stages that only look at artifacts; run on request
EXTRA_STAGES = ("inspect",)


def stage_names(cfg: DictConfig) -> list[str]:
    """The stages `cfg.stage` runs, in order."""
    stage = str(cfg.stage)
    if stage == "all":
        return list(STAGE_ORDER)
    if stage in STAGE_ORDER or stage in EXTRA_STAGES:
        return [stage]
    choices = ", ".join(("all",) + STAGE_ORDER + EXTRA_STAGES)
    raise ConfigError(f"stage={stage!r} is not a stage; choose one of: {choices}")


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> None:
    """Run `cfg.stage` (one stage, or `all` in order) in `run_dir`, holding its lock, after `preflight`.
    `overrides`: the command line's, for the checks that depend on what was typed."""
    names = stage_names(cfg)
    preflight(cfg, names, overrides or [])
    stages = _stages()
    rd = RunDir(Path(run_dir))
    with RunDirLock(rd.root):
        for name in names:
            log.info("stage %s -> %s", name, rd.root)
            stages[name](cfg, rd)


# --- checks before the first stage ----------------------------------------------------------------------

#: which stage needs the options under each top-level key (others: every stage)
_OPTION_STAGE = {"data": "data", "selector": "select", "train": "train", "deepspeed": "train", "launcher": "train",
                 "logger": "train", "policy": "eval", "eval": "eval", "inspect": "inspect"}
_REQUIRED_HINTS = {
    "data.path": "the files or folders to read (data=local), e.g. data.path=data/my_trajectories.jsonl",
    "policy.model": "the served model's name (policy=openai), e.g. policy.model=my-agent",
}


def preflight(cfg: DictConfig, names: list[str], overrides: list[str]) -> None:
    """What would fail only deep inside a stage, checked before the first one, each as one ConfigError
    naming the option: a required option (`???`) that the stages to run need; `model.name` set on the
    command line without a model (it is a label); a model the stages need that cannot be loaded."""
    evals = "eval" in names and bool(cfg.get("eval") and cfg.eval.get("tasks"))
    wanted = set(names) - ({"eval"} if not evals else set())
    missing = sorted(k for k in _missing_keys(OmegaConf.to_container(cfg, resolve=False))
                     if _OPTION_STAGE.get(k.split(".", 1)[0], "*") in wanted | {"*"})
    if missing:
        raise ConfigError("; ".join(f"{k} is required: {_REQUIRED_HINTS.get(k, f'set {k}=...')}" for k in missing))
    check_model_label(cfg, overrides)
    from atlas_exp.models import ModelSpec, check_loadable

    seen: set[tuple] = set()
    for option, node in _models_needed(cfg, wanted, evals):
        spec = node if isinstance(node, ModelSpec) else ModelSpec.from_cfg(node)
        key = (spec.name_or_path, spec.gguf_file, spec.revision)
        if key not in seen:
            seen.add(key)
            check_loadable(spec, cfg.cache_dir, option=option)


def _missing_keys(node: Any, path: str = "") -> list[str]:
    """Dotted keys whose value is `???` (required, not set), found without resolving interpolations."""
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _missing_keys(v, f"{path}.{key}" if path else str(key))]
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in _missing_keys(v, f"{path}[{i}]")]
    return [path] if node == "???" else []


def _models_needed(cfg: DictConfig, stages: set[str], evals: bool) -> list[tuple[str, Any]]:
    from atlas_exp.models import ModelSpec

    out: list[tuple[str, Any]] = []
    if stages & {"train", "inspect"}:
        out.append(("model", cfg.model))
    if "select" in stages and cfg.get("selector") is not None:
        def walk(node: Any, path: str) -> None:
            if isinstance(node, DictConfig):
                if node.get("name_or_path") is not None and "_target_" not in node:
                    out.append((path, {k: node[k] for k in node if k in ModelSpec.__dataclass_fields__}))
                    return
                for k in node:
                    walk(node.get(k), f"{path}.{k}")
        walk(cfg.selector, "selector")
        m = cfg.selector.get("model")
        if isinstance(m, str) and m:
            out.append(("selector.model", ModelSpec(name=m, name_or_path=m)))
    if evals and cfg.get("policy") is not None and not str(cfg.policy.get("_target_", "")).endswith("OpenAIPolicy"):
        m = cfg.policy.get("model")
        if m in ("run", "base", None):
            out.append(("model", cfg.model))
        elif isinstance(m, str) and not Path(m).is_dir():  # a run dir or model folder is checked by the policy
            out.append(("policy.model", ModelSpec(name=m, name_or_path=m)))
    return out


def check_model_label(cfg: DictConfig, overrides: list[str]) -> None:
    """`model.name` only labels the model (summaries, reports, plans); setting it on the command line
    without `model.name_or_path` chooses nothing, so it is refused with the way to choose one."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    if "model.name" not in keys or "model.name_or_path" in keys:
        return
    from atlas_exp.config import CONF_DIR

    name = str(cfg.model.name)
    options = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    chosen = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+") == "model"), None)
    if name == chosen or (chosen is None and name == _default_model()):
        return
    did_you_mean = f" Did you mean model={name}?" if name in options else ""
    raise ConfigError(
        f"model.name={name!r} is only a label (it names the model in summaries and reports) and chooses no model: "
        f"the run would train {cfg.model.name_or_path}.{did_you_mean} Choose a model with model=<{'|'.join(options)}>, "
        f"or set model.name_or_path=<hub name or folder> (model.name then labels it)"
    )


def _default_model() -> str | None:
    from atlas_exp.config import CONF_DIR

    try:
        defaults = OmegaConf.load(CONF_DIR / "config.yaml").get("defaults", [])
    except Exception:  # noqa: BLE001 - only used to allow a no-op override
        return None
    return next((d["model"] for d in defaults if isinstance(d, dict) and "model" in d), None)
