"""Running the train stage: in this process, or as N ranks under torchrun (DeepSpeed, multi-GPU).

Hydra composes the config once, in the parent process, and the workers read that resolved config
from the run dir (`.hydra/resolved.yaml`) instead of composing again. So all ranks share one run dir
(no per-rank timestamped folders), nobody parses `--local_rank`, and only rank 0 writes artifacts.

    python -m atlas_exp launcher.nproc_per_node=2 deepspeed=zero2
    # runs: python -m torch.distributed.run --nproc_per_node=2 -m atlas_exp.train.launch --run-dir <run_dir>
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from atlas_exp.artifacts import atomic_write_text
from atlas_exp.errors import AtlasError, ConfigError
from atlas_exp.models import ModelSpec, materialize
from atlas_exp.run_dir import RunDir

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def needs_torchrun(cfg: DictConfig) -> bool:
    n = int(cfg.launcher.nproc_per_node)
    if n < 1:
        raise ConfigError(f"launcher.nproc_per_node={n}; must be >= 1")
    return n > 1 or bool(cfg.deepspeed.enabled)


def run_train_stage(cfg: DictConfig, rd: RunDir) -> None:
    from atlas_exp.train.trainer import is_up_to_date, run_training

    for p, stage in ((rd.trajectories, "data"), (rd.selection, "select")):
        if not p.exists():
            raise AtlasError(f"no {p.name} in {rd.root}: run the {stage} stage first (stage={stage})")
    if not cfg.force and not cfg.resume and is_up_to_date(cfg, rd):
        log.info("train: %s is up to date, skipping", rd.model)
        return
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise ConfigError(
            "atlas_exp was started under torchrun; start it with plain python and set "
            "launcher.nproc_per_node=N instead (the app launches its own ranks, sharing one run dir)"
        )
    if not needs_torchrun(cfg):
        run_training(cfg, rd)
        return

    # convert/download the model once here, so that ranks do not race to do it
    materialize(ModelSpec.from_cfg(cfg.model), cfg.cache_dir)
    atomic_write_text(rd.train_config, OmegaConf.to_yaml(cfg, resolve=True))
    n = int(cfg.launcher.nproc_per_node)
    port = cfg.launcher.master_port or free_port()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={n}",
        f"--master_port={port}",
        "-m",
        "atlas_exp.train.launch",
        "--run-dir",
        str(rd.root),
    ]
    log.info("train: launching %d rank(s): %s", n, " ".join(cmd))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise AtlasError(f"training ranks failed (exit status {proc.returncode}); their output is above")


def _worker_main(argv: list[str] | None = None) -> None:
    """One rank: read the resolved config from the run dir and train."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run-dir", required=True, type=Path)
    args = ap.parse_args(argv)
    rd = RunDir(args.run_dir)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s][rank{rank}][%(name)s][%(levelname)s] - %(message)s",
    )
    if rank == 0:
        rd.logs.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(rd.logs / "train.log")
        fh.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger().addHandler(fh)
    from atlas_exp.config import register_resolvers
    from atlas_exp.train.trainer import run_training

    register_resolvers()
    cfg = OmegaConf.load(rd.train_config)
    try:
        run_training(cfg, rd)
    except AtlasError as e:
        print(f"atlas_exp[rank{rank}]: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _worker_main()
