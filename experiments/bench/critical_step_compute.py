"""critical_step_compute: what training on critical steps only saves, per epoch, in our own trainer.

What is compared: the wall time of one training epoch (`trainer.train()` of the app's train stage, built by
its own recipe steps, `MaskedSFTRecipe`) and the tokens it processes, on the same N real AgentTraj-L
trajectories (default 64 TextCraft records in file order; --quick 8), SmolLM2-135M LoRA on the CPU
(conf/train/lora.yaml, fp32):

* ours: `ratio=0.3` steps chosen by `selector=perplexity_delta` (or `--selector random`) with
  `train.truncate_after_last_selected=true` (the tokens after the last selected step are dropped: a causal
  LM's loss and gradients cannot depend on them);
* baseline: all steps (`selector=all ratio=1.0`, standard agent tuning), everything else the same.

Ratio = seconds(ours) / seconds(all steps), medians over `--repeats` (default 3) runs of each condition;
target <= 0.7x. The same pair is then run again with `train.train_sampling_strategy=group_by_length` at a
batch size > 1 (`--gbl-batch-size`, default 2, gradient_accumulation_steps 1), where length grouping can also
cut padding (at batch size 1 it only reorders).

Memory: training keeps every layer's attention scores for the backward pass, so memory grows with
batch x length^2. Observed on this machine with the first 8 TextCraft records (up to 1,560 tokens): about
6.5-7 GB resident at batch size 1, over 10 GB at batch size 2, 18 GB at batch size 4. A child process over
$BENCH_WORKER_MAX_RSS_GB (default: 75% of the memory available, at most 14 GB) is stopped, so that the
benchmark never pushes a shared machine into its OOM killer; the group_by_length pair is then reported as
skipped and run again at batch size 1 (group_by_length on, gradient_accumulation_steps as the main pair),
where it only reorders the data.

Why it is fair: both conditions train the same trajectories with the same model, LoRA, optimiser, batch
size, max length, seed and number of optimizer steps (one epoch over the same N examples); only the
selection differs. Each run is its own fresh child process, one after the other, and only `train()` is timed
(model load, masking, saving excluded). Each repeat runs both conditions, the order alternating from one repeat
to the next (critical first, then all steps first, ...), so that neither always runs on a warmer or a quieter
machine; each figure is the median of its repeats, reported with its range. The perplexity_delta selection
itself is NOT free: it is timed separately (`figures.selection_seconds`, one scoring forward pass per trajectory,
score cache off) and reported in an extra row "epoch + selection", because a user pays it once per
dataset (it is cached and shared by every ratio/seed of a sweep).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import comparisons
import repeats
import train_timing
import workers

NAME = "critical_step_compute"


def _overrides(args, *, group_by_length: bool, batch_size: int, grad_accum: int) -> list[str]:
    return [
        f"cache_dir={args.cache_dir}",
        "logger=none",
        "train=lora",
        f"train.max_length={args.max_length}",
        f"train.per_device_train_batch_size={batch_size}",
        f"train.gradient_accumulation_steps={grad_accum}",
        f"train.train_sampling_strategy={'group_by_length' if group_by_length else 'random'}",
        "train.truncate_after_last_selected=true",
        "train.num_train_epochs=1",
        "train.max_steps=-1",
        "train.save_steps=1000000000",
        f"seed={args.seed}",
    ]


#: the two sides of every pair: ours first in the first repeat, then the order alternates
CONDITIONS = ["critical", "all_steps"]


def run_pair(args, tmp: Path, label: str, gbl: bool, bs: int, ga: int, trajs, sels: dict) -> list[dict]:
    """Every repeat of one pair, the conditions' order alternating; a list of per-run summaries (with
    `repeat` and `condition`). Raises WorkerMemoryLimit as `run_worker` does."""
    runs = []
    for r, cond in repeats.alternating(CONDITIONS, args.repeats):
        rd = tmp / f"{label}-{cond}-{r}"
        rd.mkdir()
        common.write_trajectories(rd / "trajectories.jsonl", trajs)
        common.write_selections(rd / "selection.jsonl", sels[cond])
        wargs = ["--worker", "train", "--run-dir", str(rd), "--threads", str(args.threads)]
        for o in _overrides(args, group_by_length=gbl, batch_size=bs, grad_accum=ga):
            wargs += ["--ov", o]
        print(f"[{NAME}] {label} repeat {r + 1}/{args.repeats}: {cond} ...", flush=True)
        res = workers.run_worker(Path(__file__), wargs, threads=args.threads, label=f"{label}-{cond}-{r}")
        s = train_timing.trainer_summary(res["record"])
        s.update(repeat=r, condition=cond, data=res["run_training_summary"], process_wall_seconds=res["_process_wall_seconds"],
                 process_peak_rss_mb_polled=res["_process_peak_rss_mb_polled"])
        runs.append(s)
        print(f"[{NAME}]   {cond}: {s['train_seconds']:.1f} s, {s['tokens']} tokens ({s['padded_tokens']} padded), "
              f"{s['supervised_tokens']} supervised, {s['optimizer_steps']} steps, peak RSS {s['peak_rss_mb']:.0f} MB", flush=True)
    return runs


def main() -> None:
    import argparse

    p = common.base_parser(NAME, __doc__, n_default=64, n_quick=8, n_help="trajectories")
    p.add_argument("--env", default="textcraft", help="AgentTraj-L env file(s), comma-separated (default textcraft)")
    p.add_argument("--selector", choices=["perplexity_delta", "random"], default="perplexity_delta")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--max-length", type=int, default=2048, help="train.max_length (conf: 2048)")
    p.add_argument("--batch-size", type=int, default=1, help="train.per_device_train_batch_size of the main pair (conf: 1)")
    p.add_argument("--grad-accum", type=int, default=4, help="train.gradient_accumulation_steps of the main pair (conf: 4)")
    p.add_argument("--gbl-batch-size", type=int, default=2, help="batch size of the group_by_length pair (grad_accum 1)")
    p.add_argument("--no-group-by-length", action="store_true", help="skip the group_by_length pair")
    repeats.add_repeats_option(p)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--ov", action="append", default=[], help=argparse.SUPPRESS)
    args = p.parse_args()
    common.setup_env(args.threads)
    if args.worker:
        common.torch_threads(args.threads)
        res = train_timing.our_training_worker(args.run_dir, args.ov)
        args.worker_out.write_text(json.dumps(res, default=str))
        return
    if args.repeats < 1:
        p.error("--repeats must be >= 1")

    started = time.time()
    n = common.resolve_n(args)
    envs = [e for e in args.env.split(",") if e]
    trajs = common.load_trajectories(args.data_dir, envs, n)
    common.torch_threads(args.threads)

    from atlas_exp.selectors.all_steps import AllStepsSelector
    from atlas_exp.selectors.base import summarize

    if args.selector == "perplexity_delta":
        from atlas_exp.selectors.perplexity import PerplexitySelector

        sel = PerplexitySelector(ratio=args.ratio, seed=args.seed, metric="ratio", model=common.smollm2_spec(),
                                 cache_dir=str(args.cache_dir), device="cpu", dtype="fp32", progress=False, score_cache=False)
        sel.load()  # model load is not part of the selection time
        with common.stopwatch() as t_sel:
            crit = list(sel.select(trajs))
        sel.close()
    else:
        from atlas_exp.selectors.random_steps import RandomSelector

        with common.stopwatch() as t_sel:
            crit = list(RandomSelector(ratio=args.ratio, seed=args.seed).select(trajs))
    sels = {"critical": crit, "all_steps": list(AllStepsSelector(ratio=1.0, seed=args.seed).select(trajs))}
    sel_summary = summarize(crit, trajs)
    print(f"[{NAME}] {len(trajs)} trajectories of {envs}; {args.selector} selection at {args.ratio}: "
          f"{sel_summary.get('achieved_ratio')} achieved, {t_sel['seconds']:.1f} s", flush=True)

    pairs = [(f"bs{args.batch_size}", False, args.batch_size, args.grad_accum)]
    if not args.no_group_by_length:
        pairs.append((f"group_by_length_bs{args.gbl_batch_size}", True, args.gbl_batch_size, 1))
    runs: dict[str, list[dict]] = {}
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-crit-") as tmp:
        i = 0
        while i < len(pairs):
            label, gbl, bs, ga = pairs[i]
            i += 1
            try:
                runs[label] = run_pair(args, Path(tmp), label, gbl, bs, ga, trajs, sels)
            except workers.WorkerMemoryLimit as e:
                if not gbl:
                    raise
                print(f"[{NAME}]   skipped: {e}", flush=True)
                skipped[label] = str(e)
                if bs > 1:  # group_by_length still on, at batch size 1 (where it only reorders)
                    print(f"[{NAME}]   retrying the group_by_length pair at batch size 1", flush=True)
                    pairs.append(("group_by_length_bs1", True, 1, args.grad_accum))

    pairs = [x for x in pairs if x[0] not in skipped]

    def values(label: str, cond: str, key: str) -> list:
        return [s[key] for s in sorted(runs[label], key=lambda s: s["repeat"]) if s["condition"] == cond]

    comps = []
    conditions = {}
    ours_label = f"{args.selector}@{args.ratio}+truncate"
    for label, *_ in pairs:
        c_sec, a_sec = values(label, "critical", "train_seconds"), values(label, "all_steps", "train_seconds")
        c_spread, a_spread = repeats.spread(c_sec), repeats.spread(a_sec)
        ratios = repeats.paired_ratios(c_sec, a_sec)
        ranges = {"ours": [c_spread["min"], c_spread["max"]], "baseline": [a_spread["min"], a_spread["max"]],
                  "ratio": [min(ratios), max(ratios)] if ratios else []}
        tag = f" [{label}]"
        comps.append(comparisons.comparison(f"epoch seconds{tag}", c_spread["median"], a_spread["median"], op="<=", target=0.7, unit="s",
                                       ours_label=ours_label, baseline_label="all steps", ranges=ranges))
        c_tok, a_tok = values(label, "critical", "padded_tokens"), values(label, "all_steps", "padded_tokens")
        comps.append(comparisons.comparison(f"tokens processed{tag}", c_tok[0], a_tok[0], op=None, target=None,
                                       unit="tokens (padded)", ours_label=ours_label, baseline_label="all steps"))
        if label == pairs[0][0] and args.selector == "perplexity_delta":
            comps.append(comparisons.comparison(f"epoch + selection seconds{tag}", c_spread["median"] + t_sel["seconds"], a_spread["median"],
                                           op=None, target=None, unit="s", ours_label="perplexity_delta scoring + epoch",
                                           baseline_label="all steps"))
        for cond in CONDITIONS:
            conditions[f"{label}/{cond}"] = {
                "train_seconds": repeats.spread(values(label, cond, "train_seconds")),
                "peak_rss_mb": repeats.spread(values(label, cond, "peak_rss_mb")),
                "tokens": values(label, cond, "tokens")[0],
                "padded_tokens": values(label, cond, "padded_tokens")[0],
                "supervised_tokens": values(label, cond, "supervised_tokens")[0],
                "optimizer_steps": values(label, cond, "optimizer_steps")[0],
                "same_tokens_every_repeat": len(set(values(label, cond, "padded_tokens"))) == 1,
            }
        conditions[f"{label}/ratio_per_repeat"] = ratios
    figures = {
        "n_trajectories": len(trajs),
        "envs": envs,
        "selector": args.selector,
        "ratio": args.ratio,
        "repeats": args.repeats,
        "selection_seconds": round(t_sel["seconds"], 3),
        "selection_summary": {k: sel_summary.get(k) for k in ("achieved_ratio", "n_steps", "n_selected")},
        "conditions": conditions,
        "runs": runs,
        "skipped": skipped,
        "same_optimizer_steps": all(conditions[f"{label}/critical"]["optimizer_steps"] == conditions[f"{label}/all_steps"]["optimizer_steps"]
                                    for label, *_ in pairs),
    }
    notes = [
        "Timed: trainer.train() of the app's train stage (its recipe steps, as run_training runs them), each run in its own "
        f"child process, one after the other, threads={args.threads}. {args.repeats} repeat(s) per condition, the order "
        "alternating (critical first in the first repeat, all steps first in the second, ...): figures are medians, "
        "[min-max] their range; the ratio's range is that of the per-repeat ratios (machine.loadavg_1_5_15: the machine "
        "is shared).",
        "tokens processed = sum over batches of the padded batch size (batch x longest); 'tokens' in figures is the "
        "real (unpadded) count. At batch size 1 they are equal. They are the same in every repeat (same_tokens_every_repeat).",
        "The all-steps baseline also has truncate_after_last_selected=true (the conf default); with every step selected "
        "it only drops what follows the last assistant turn, which AgentTraj-L trajectories rarely have.",
    ]
    for label, why in skipped.items():
        notes.append(f"{label} pair skipped: {why}")
    if args.selector == "perplexity_delta":
        notes.append("selection_seconds: PerplexitySelector.select with score_cache=False, model already loaded; paid once per "
                     "dataset and model (cached across a sweep's ratios and seeds).")
    comparisons.write_result(NAME, args, figures=figures, comparisons=comps, notes=notes, started=started)


if __name__ == "__main__":
    main()
