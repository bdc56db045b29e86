"""What a GPU run brings back: each row's figures read from its run dir (`row_result`), the one-line
headline the log prints, and the export filters (runs.tar.gz without weights; files replaced atomically so a
call cut short never leaves half a summary in $OUT)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
from pathlib import Path

import job_runner
from job_runner import Job


def read_json(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def row_result(run_dir: Path, job: Job | None) -> dict:
    """What a row brought back: training figures, the eval's per-task scores (or, for an evaluation cut
    short, the episodes that finished, marked partial), and how the process ended."""
    out: dict = {"run_dir": str(run_dir.relative_to(job_runner.OUT_ROOT)) if job_runner.OUT_ROOT else str(run_dir)}
    if job is not None:
        out.update(status=job.status, seconds=job.seconds)
    ts = read_json(run_dir / "model" / "training_summary.json") or {}
    for k in ("global_step", "train_loss", "seconds", "precision", "deepspeed_stage", "data/n_tokens",
              "data/n_supervised_tokens", "selection/achieved_ratio"):
        if k in ts:
            out[f"train.{k}"] = ts[k]
    if job is not None:
        m = re.findall(r"'train_runtime': '?([0-9.]+)", job.log_path.read_text(errors="replace")) if job.log_path.exists() else []
        if m:
            out["train.train_runtime"] = float(m[-1])
    res = read_json(run_dir / "eval" / "results.json")
    if res:
        out["eval"] = {name: {"value": t.get("value"), "n": t.get("n"), "metric": t.get("metric")}
                       for name, t in (res.get("tasks") or {}).items()}
        out["eval.splits"] = {s: v.get("average") for s, v in (res.get("splits") or {}).items() if isinstance(v, dict)}
        out["eval.seconds"] = res.get("seconds")
        n = sum(t.get("n") or 0 for t in (res.get("tasks") or {}).values())
        if res.get("seconds"):
            out["eval.episodes_per_min"] = round(60 * n / res["seconds"], 2)
    elif (run_dir / "eval").is_dir():
        part = {}
        for task_dir in sorted(p for p in (run_dir / "eval").iterdir() if p.is_dir()):
            eps = [read_json(f) for f in task_dir.glob("*.json")]
            eps = [e for e in eps if isinstance(e, dict)]
            if eps:
                part[task_dir.name] = {"value": round(100 * sum(bool(e.get("success")) for e in eps) / len(eps), 2),
                                       "n": len(eps), "metric": "success", "partial": True}
        if part:
            out["eval"] = part
    return out


def headline(name: str, r: dict) -> str:
    ev = r.get("eval") or {}
    parts = [f"{t} {v['value']}% of {v['n']}{' (partial)' if v.get('partial') else ''}" for t, v in ev.items()]
    loss = r.get("train.train_loss")
    train = (f"{r['train.global_step']} steps, loss {loss:.3f}" if isinstance(loss, (int, float)) else
             f"{r['train.global_step']} steps") if "train.global_step" in r else "no model"
    return f"{name}: {', '.join(parts) or 'no eval'}; {train}; {r.get('status', '')}"


#: what runs.tar.gz leaves out: weights, checkpoints, the shared cache, copies of the input data and of
#: the base model's tokenizer
SKIP_NAMES = {"checkpoints", "cache", "trajectories.jsonl", "val_trajectories.jsonl", "wandb", "tokenizer.json"}
SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".tmp")


def small_files(ti: tarfile.TarInfo) -> tarfile.TarInfo | None:
    name = Path(ti.name).name
    if name in SKIP_NAMES or name.endswith(SKIP_SUFFIXES):
        return None
    return ti


def atomic_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
