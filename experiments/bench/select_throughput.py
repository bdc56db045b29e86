"""select_throughput: perplexity_delta scoring, our one-pass implementation vs one forward pass per step.

What is compared: steps scored per second by `selector=perplexity_delta` (IFD-style score
loss(step | history) / loss(step alone), see src/atlas_exp/selectors/perplexity.py) on real AgentTraj-L
ScienceWorld trajectories of about 20 steps (15 to 25 steps, first N in file order; default 20, --quick 3),
SmolLM2-135M-Instruct on the CPU in fp32. Target: ours >= 5x the reference.

* ours: `PerplexitySelector(...).select(trajs)` as the select stage runs it, with `score_cache=False` (its
  on-disk score cache would make a rerun free) and the model already loaded: one forward pass over each
  whole trajectory gives every step's conditioned loss, the step-alone sequences are batched across
  trajectories (distinct contents once), only span positions get logits.
* reference: the obvious per-step algorithm, written here independently of the selector: for each step k,
  one forward pass over the trajectory's tokens up to the end of step k (history + step) and one over the
  step rendered alone; mean cross-entropy over the step's supervised span in each (same span definition:
  `atlas_exp.train.turn_spans.tokenize_trajectory`). Each forward is batch 1 and asks the model only for the
  logits it needs (`logits_to_keep`), so the reference does not pay for a full-vocabulary projection
  over the history either: the difference measured is the one-pass + batching design.

Why it is fair: same model object, same thread count, same trajectories, both under
`torch.inference_mode()`, both after a warm-up forward; the timed region of each is the scoring only
(tokenization included on both sides). Each side runs `--repeats` times (default 3), the order alternating
from one repeat to the next (ours first, then the reference first, ...); steps/s are medians with their range. Both must give the same scores: the max absolute difference of the
scores and of both losses is reported (and the benchmark fails above `--tolerance`).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import comparisons
import repeats

NAME = "select_throughput"


def span_loss(model, ids: list[int], span: tuple[int, int]) -> float:
    """Mean CE of tokens ids[a:b] given everything before them: one forward over ids[:b]."""
    import torch

    a, b = span
    x = torch.tensor([ids[:b]], dtype=torch.long)
    # the last b-a+1 positions are a-1 .. b-1; position p predicts token p+1, so a-1 .. b-2 are the ones we need
    logits = model(input_ids=x, use_cache=False, logits_to_keep=b - a + 1).logits[0, :-1].float()
    target = torch.tensor(ids[a:b], dtype=torch.long)
    return float(torch.nn.functional.cross_entropy(logits, target))


def reference(model, tok, trajs) -> tuple[list[dict], dict]:
    import torch

    from atlas_exp.data.trajectory import Message, Trajectory
    from atlas_exp.train.turn_spans import tokenize_trajectory

    out = []
    t_cond = t_alone = 0.0
    with torch.inference_mode():
        for t in trajs:
            tt = tokenize_trajectory(tok, t)
            cond, alone = [], []
            for k, span in enumerate(tt.step_spans):
                t0 = time.perf_counter()
                cond.append(span_loss(model, tt.input_ids, span))
                t1 = time.perf_counter()
                one = Trajectory(id=f"{t.id}/alone{k}", env="-", messages=[Message("assistant", t.steps[k].content, step=0)])
                ta = tokenize_trajectory(tok, one)
                alone.append(span_loss(model, ta.input_ids, ta.step_spans[0]))
                t_alone += time.perf_counter() - t1
                t_cond += t1 - t0
            out.append({"cond": cond, "alone": alone, "scores": [c / max(a, 1e-6) for c, a in zip(cond, alone)],
                        "tokens": len(tt.input_ids)})
    return out, {"conditioned_seconds": round(t_cond, 3), "alone_seconds": round(t_alone, 3)}


def main() -> None:
    p = common.base_parser(NAME, __doc__, n_default=20, n_quick=3, n_help="ScienceWorld trajectories")
    p.add_argument("--env", default="sciworld")
    p.add_argument("--min-steps", type=int, default=15)
    p.add_argument("--max-steps", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=8, help="selector.batch_size (conf: 8)")
    p.add_argument("--max-batch-tokens", type=int, default=8192, help="selector.max_batch_tokens (conf: 8192)")
    p.add_argument("--tolerance", type=float, default=1e-3, help="max abs score difference accepted")
    repeats.add_repeats_option(p)
    args = p.parse_args()
    common.setup_env(args.threads)
    started = time.time()
    n = common.resolve_n(args)
    trajs = common.load_trajectories(args.data_dir, [args.env], n, min_steps=args.min_steps, max_steps=args.max_steps)
    common.torch_threads(args.threads)
    import torch

    from atlas_exp.selectors.perplexity import PerplexitySelector

    n_steps = sum(t.n_steps for t in trajs)
    sel = PerplexitySelector(ratio=0.3, seed=args.seed, metric="ratio", model=common.smollm2_spec(), cache_dir=str(args.cache_dir),
                             device="cpu", dtype="fp32", batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
                             progress=False, score_cache=False)
    sel.load()
    model, tok = sel.model, sel.tokenizer
    with torch.inference_mode():  # warm-up: first-call allocations out of both timings
        model(input_ids=torch.tensor([tok("warm up " * 64)["input_ids"]]), use_cache=False, logits_to_keep=1)
    print(f"[{NAME}] {len(trajs)} {args.env} trajectories, {n_steps} steps", flush=True)

    seconds: dict[str, list[float]] = {"ours": [], "reference": []}
    ref_parts_runs: list[dict] = []
    for r, side in repeats.alternating(["ours", "reference"], args.repeats):
        with common.stopwatch() as t:
            if side == "ours":
                selections = list(sel.select(trajs))
            else:
                ref, ref_parts = reference(model, tok, trajs)
                ref_parts_runs.append(ref_parts)
        seconds[side].append(t["seconds"])
        print(f"[{NAME}]   run {r + 1}/{args.repeats}, {side}: {t['seconds']:.1f} s ({n_steps / t['seconds']:.2f} steps/s)",
              flush=True)

    d_score = d_cond = d_alone = 0.0
    windowed = 0
    for s, r in zip(selections, ref):
        scores = [x.score for x in s.steps]
        windowed += len(s.meta.get("history_dropped", []))
        for a, b in zip(scores, r["scores"]):
            d_score = max(d_score, abs(a - b))
        for a, b in zip(s.meta["loss_cond"], r["cond"]):
            d_cond = max(d_cond, abs(a - b))
        for a, b in zip(s.meta["loss_alone"], r["alone"]):
            d_alone = max(d_alone, abs(a - b))
    same_top = sum(
        set(sorted(range(len(r["scores"])), key=lambda k: (-r["scores"][k], k))[: len(s.selected_steps)]) == set(s.selected_steps)
        for s, r in zip(selections, ref)
    )
    rates = {side: [n_steps / x for x in seconds[side]] for side in seconds}
    ours_sps, ref_sps = repeats.spread(rates["ours"]), repeats.spread(rates["reference"])
    ratios = repeats.paired_ratios(rates["ours"], rates["reference"])
    figures = {
        "n_trajectories": len(trajs),
        "n_steps": n_steps,
        "tokens_per_trajectory": [r["tokens"] for r in ref],
        "repeats": args.repeats,
        "ours_seconds": repeats.spread(seconds["ours"]),
        "reference_seconds": repeats.spread(seconds["reference"]),
        "reference_breakdown": ref_parts_runs,
        "ours_steps_per_s": ours_sps,
        "reference_steps_per_s": ref_sps,
        "ratio_per_repeat": ratios,
        "max_abs_diff": {"score": d_score, "loss_cond": d_cond, "loss_alone": d_alone},
        "same_selection_trajectories": same_top,
        "windowed_steps": windowed,
        "selector_options": {"batch_size": args.batch_size, "max_batch_tokens": args.max_batch_tokens, "max_length": sel.max_length,
                             "score_cache": False},
        "ids": [t.id for t in trajs],
    }
    comps = [
        comparisons.comparison("perplexity_delta steps/s", round(ours_sps["median"], 4), round(ref_sps["median"], 4), op=">=", target=5.0,
                          unit="steps/s", ours_label="one-pass (PerplexitySelector)", baseline_label="one forward per step",
                          ranges={"ours": [ours_sps["min"], ours_sps["max"]], "baseline": [ref_sps["min"], ref_sps["max"]],
                                  "ratio": [min(ratios), max(ratios)]}),
        comparisons.comparison("max |score diff| (ours vs reference)", d_score, None, op="<=", target=args.tolerance, ratio=d_score,
                          ours_label="max abs diff", baseline_label="-"),
    ]
    notes = [
        f"Timed on one thread each (threads={args.threads}), model loaded and warmed up before either timing, in the same "
        f"process; {args.repeats} run(s) per side, the order alternating (ours first in the first repeat); steps/s are "
        "medians, [min-max] their range (the ratio's: of the per-repeat ratios). Scores are compared on the last run of each.",
        "The reference runs two forward passes per step (history+step, then step alone), batch 1, no deduplication of "
        "identical step contents; its alone part is reported separately in reference_breakdown (small next to the "
        "conditioned part). Ours batches sequences across trajectories and scores each distinct content alone once.",
        "Scores are compared step by step; 'same_selection_trajectories' counts trajectories whose top-k steps agree.",
    ]
    if windowed:
        notes.append(f"{windowed} steps were scored in a window by ours (history dropped); the reference has no windows")
    comparisons.write_result(NAME, args, figures=figures, comparisons=comps, notes=notes, started=started)
    sel.close()
    if not (d_score <= args.tolerance) or math.isnan(d_score):
        raise SystemExit(f"[{NAME}] scores differ by {d_score} > {args.tolerance}")


if __name__ == "__main__":
    main()
