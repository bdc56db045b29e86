"""What the GPU experiment trains on, measured on the CPU: tokens per trajectory of the real files with
SmolLM2's tokenizer, per row (all steps, the oracle's 0.3, random 0.3), after the trainer's own masking and
truncation, and what that makes per epoch in micro-batches. These are the inputs of the time estimate in
experiments/gpu/README.md; nothing here runs on or pretends to know a GPU.

    .venv/bin/python experiments/gpu/sizing.py [--out experiments/gpu/sizing.json] [overrides...]

The data and select stages run through the product (`experiment=gpu_agenttraj`, any extra overrides) into a
temporary run dir per row; the oracle reads the judge's replies from the files the preset names.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROWS = ("all", "oracle", "random")


def _dist(xs: list[int]) -> dict[str, float]:
    xs = sorted(xs)
    q = lambda p: xs[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    return {"n": len(xs), "mean": round(statistics.fmean(xs), 1), "p50": q(0.5), "p90": q(0.9), "max": xs[-1],
            "sum": sum(xs)}


def measure(overrides: list[str]) -> dict:
    from atlas_exp.config import compose, register_resolvers
    from atlas_exp.data.stage import run_data_stage
    from atlas_exp.models import ModelSpec, load_tokenizer
    from atlas_exp.run_dir import RunDir, read_selections, read_trajectories
    from atlas_exp.selectors.stage import run_select_stage
    from atlas_exp.train.masking import build_examples

    register_resolvers()
    out: dict = {"overrides": overrides, "rows": {}}
    with tempfile.TemporaryDirectory(prefix="gpu-sizing-") as tmp:
        for row in ROWS:
            cfg = compose(["experiment=gpu_agenttraj", f"selector={row}", f"run_dir={tmp}/{row}", *overrides])
            rd = RunDir(Path(tmp) / row)
            rd.root.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            run_data_stage(cfg, rd)
            run_select_stage(cfg, rd)
            tok = load_tokenizer(ModelSpec.from_cfg(cfg.model), cfg.cache_dir)
            trajs, sels = read_trajectories(rd.trajectories), read_selections(rd.selection)
            examples, stats = build_examples(tok, trajs, sels, max_length=int(cfg.train.max_length),
                                             on_empty=str(cfg.train.on_empty), progress=False,
                                             truncate_after_last_selected=bool(cfg.train.truncate_after_last_selected))
            by_env: dict[str, list[int]] = {}
            for t, e in zip(trajs, examples):
                by_env.setdefault(t.env, []).append(len(e.input_ids))
            batch = int(cfg.train.per_device_train_batch_size) * int(cfg.train.gradient_accumulation_steps)
            out["rows"][row] = {
                "trajectories": len(trajs),
                "steps": sum(s.n_steps for s in sels),
                "selected_steps": sum(sum(c.selected for c in s.steps) for s in sels),
                "tokens_trained_on": _dist([len(e.input_ids) for e in examples]),
                "tokens_by_env": {k: _dist(v) for k, v in sorted(by_env.items())},
                "supervised_tokens": stats["n_supervised_tokens"],
                "n_truncated": stats["n_truncated"],
                "n_selected_tokens_lost": stats["n_selected_tokens_lost"],
                "optimizer_steps_per_epoch": -(-len(examples) // batch),
                "micro_batches_per_epoch": -(-len(examples) // int(cfg.train.per_device_train_batch_size)),
                "seconds_here": round(time.perf_counter() - t0, 1),
            }
            print(f"[sizing] {row}: {json.dumps(out['rows'][row]['tokens_trained_on'])}, "
                  f"{out['rows'][row]['supervised_tokens']} supervised", flush=True)
        out["tokenizer"] = getattr(tok, "name_or_path", "?")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "experiments" / "gpu" / "sizing.json")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    os.chdir(REPO)  # the preset's paths are relative to the repository
    res = measure(args.overrides)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"[sizing] -> {args.out}")


if __name__ == "__main__":
    main()
