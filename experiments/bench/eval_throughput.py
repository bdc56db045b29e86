"""eval_throughput: batched agent rollouts (many episodes in flight) vs one episode at a time.

What is compared: episodes per minute of the eval stage's agent loop (`atlas_exp.eval.rollout.run_episodes`
with `atlas_exp.eval.policy.HFPolicy`) with `--in-flight` episodes at once (default 16: every round, one
left-padded greedy `generate` call for all of them) vs `batch_size=1` (one episode at a time, one
`generate` per turn), on TextCraft and BabyAI, SmolLM2-135M-Instruct base model (`policy.model=base`) on
the CPU, `max_new_tokens=48`, `max_turns=4` (so that a CPU finishes), default 16 episodes per env
(--quick 4: then only 4 are in flight). Target: batched >= 3x. Both modes run the policy's defaults: each
episode's KV cache reused across turns (`policy.reuse_kv_cache`), decoding into a cache that grows in place
(`policy.preallocate_kv_cache`) and, on a CPU, prompts of uneven length prefilled one by one before the batch
decodes together (`policy.separate_prefill`). `--ablations` adds batched modes with one of them off, to show
what each is worth: `batched_no_kv_reuse` re-prefills the whole conversation every turn,
`batched_dynamic_cache` decodes into transformers' DynamicCache (one copy of the whole cache per generated
token), `batched_joint_prefill` pads every prompt's new tokens to the longest and prefills them together.

Every mode runs `--repeats` times (default 3), the order of the modes rotating from one repeat to the next
(batched first, then sequential first, ...); episodes/min are medians with their range.
Episodes are the smoke preset's (conf/eval/smoke.yaml): TextCraft goals drawn with seeds 100000.., BabyAI
items 20000.. (level = item % 40). Both modes play the same episodes with the same weights and decoding
(greedy), envs built the same way; only the number of episodes in flight differs.
A warm-up `generate` runs before the first timing. Timed: the whole `run_episodes` loop (env resets and
steps included, model loading excluded). Every mode gets its own policy (the same weights, loaded again with
that mode's options), so no mode starts with another's kept keys/values.

Not strictly identical (see `notes`): a left-padded batch can make greedy decoding pick a different token
where two logits are within float noise, so a batched episode may take a different path (more or fewer
turns) than the same episode played alone. The JSON counts how many conversations came out identical and
also reports turns/min and generated tokens/s, which do not depend on how many turns episodes take.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import comparisons
import repeats

NAME = "eval_throughput"
FIRST_EPISODE = {"textcraft": 100000, "babyai": 20000}  # conf/eval/smoke.yaml
#: batched mode with one HFPolicy option turned off: mode name -> (option, figure label)
ABLATIONS = {
    "no_kv_reuse": ("reuse_kv_cache", "KV cache reused across turns vs re-prefilled"),
    "dynamic_cache": ("preallocate_kv_cache", "in-place KV cache vs transformers' DynamicCache"),
    "joint_prefill": ("separate_prefill", "prompts prefilled alone vs padded together"),
}


def make_env(name: str, max_steps: int):
    if name == "textcraft":
        from atlas_exp.envs.textcraft import TextCraftEnv

        return TextCraftEnv(max_steps=max_steps)
    if name == "babyai":
        from atlas_exp.envs.babyai import BabyAIEnv

        return BabyAIEnv(max_steps=max_steps)
    raise SystemExit(f"unknown env {name!r}: textcraft or babyai")


def play(policy, env: str, n: int, *, in_flight: int, max_turns: int) -> dict:
    from atlas_exp.eval.rollout import EnvPool, EpisodeTask, run_episodes

    tasks = [EpisodeTask(env, FIRST_EPISODE[env] + i) for i in range(n)]
    pool = EnvPool({env: lambda: make_env(env, max_turns)})
    before = dict(policy.stats)
    t0 = time.perf_counter()
    try:
        results = list(run_episodes(tasks, pool, policy, batch_size=in_flight, max_turns=max_turns))
    finally:
        pool.close()
    seconds = time.perf_counter() - t0
    delta = {k: policy.stats[k] - before.get(k, 0) for k in policy.stats}
    turns = sum(r.turns for r in results)
    return {
        "in_flight": in_flight,
        "episodes": len(results),
        "seconds": round(seconds, 3),
        "episodes_per_min": round(len(results) / seconds * 60, 4),
        "turns": turns,
        "turns_per_min": round(turns / seconds * 60, 3),
        "generated_tokens_per_s": round(delta["completion_tokens"] / seconds, 3),
        "policy_stats": delta,
        "ends": dict(Counter(r.end for r in results)),
        "successes": sum(r.success for r in results),
        "_conversations": {r.episode: r.messages for r in results},
    }


def main() -> None:
    p = common.base_parser(NAME, __doc__, n_default=16, n_quick=4, n_help="episodes per env")
    p.add_argument("--envs", default="textcraft,babyai")
    p.add_argument("--in-flight", type=int, default=16, help="episodes in flight in batched mode (eval.batch_size)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--max-turns", type=int, default=4)
    p.add_argument("--max-context", type=int, default=4096, help="policy.max_context (conf: 4096)")
    p.add_argument("--ablations", default=",".join(ABLATIONS),
                   help=f"batched modes with one policy option off, to show what each is worth "
                        f"(default: all of {', '.join(ABLATIONS)}; '' for none)")
    repeats.add_repeats_option(p)
    args = p.parse_args()
    common.setup_env(args.threads)
    started = time.time()
    n = common.resolve_n(args)
    envs = [e for e in args.envs.split(",") if e]
    for e in envs:
        make_env(e, args.max_turns).close()  # fail early on a missing env dependency
    common.torch_threads(args.threads)
    import torch

    from atlas_exp.eval.policy import HFPolicy, PolicyContext

    ctx = PolicyContext(model_cfg=dataclasses.asdict(common.smollm2_spec()), run_model_dir=Path("/nonexistent"),
                        cache_dir=str(args.cache_dir), seed=args.seed)

    ablations = [a for a in args.ablations.split(",") if a]
    unknown = set(ablations) - set(ABLATIONS)
    if unknown:
        p.error(f"--ablations: unknown {sorted(unknown)}; known: {', '.join(ABLATIONS)}")

    def make_policy(off: str | None) -> HFPolicy:
        pol = HFPolicy(context=ctx, model="base", max_new_tokens=args.max_new_tokens, temperature=0.0,
                       max_context=args.max_context, dtype="float32", batch_size=args.in_flight,
                       **({ABLATIONS[off][0]: False} if off else {}))
        # warm-up: one short generate, out of every timing (and out of the stats: they are taken as differences)
        pol.generate([[{"role": "user", "content": "Say OK."}]])
        torch.manual_seed(args.seed)
        return pol

    # mode -> (episodes in flight, the policy option turned off)
    modes: dict[str, tuple[int, str | None]] = {"batched": (args.in_flight, None), "sequential": (1, None)}
    for a in ablations:
        modes[f"batched_{a}"] = (args.in_flight, a)
    described = None
    per_env: dict[str, dict] = {}
    for env in envs:
        plays: dict[str, list[dict]] = {mode: [] for mode in modes}
        for r, mode in repeats.alternating(list(modes), args.repeats):
            k, off = modes[mode]
            print(f"[{NAME}] {env} run {r + 1}/{args.repeats}: {n} episodes, {mode} ({k} in flight) ...", flush=True)
            policy = make_policy(off)
            described = described or policy.describe()
            res = play(policy, env, n, in_flight=k, max_turns=args.max_turns)
            policy.close()
            print(f"[{NAME}]   {res['seconds']:.1f} s, {res['episodes_per_min']:.2f} episodes/min, {res['turns']} turns, "
                  f"ends {res['ends']}", flush=True)
            plays[mode].append(res)
        # per mode: the median run's figures (by seconds), every run's seconds, and the conversations of the first
        out = {}
        for mode, runs in plays.items():
            convs = runs[0].pop("_conversations")
            for x in runs[1:]:
                x.pop("_conversations")
            middle = sorted(runs, key=lambda x: x["seconds"])[len(runs) // 2]
            out[mode] = {**middle, "runs_seconds": [x["seconds"] for x in runs],
                         "runs_episodes_per_min": [x["episodes_per_min"] for x in runs], "_conversations": convs}
        convs_b, convs_s = out["batched"].pop("_conversations"), out["sequential"].pop("_conversations")
        for a in ablations:
            convs_a = out[f"batched_{a}"].pop("_conversations")
            out[f"identical_conversations_batched_vs_{a}"] = sum(convs_b[e] == convs_a.get(e) for e in convs_b)
        out["identical_conversations"] = sum(convs_b[e] == convs_s.get(e) for e in convs_b)
        per_env[env] = out

    def total(mode: str, key: str) -> float:
        return sum(per_env[e][mode][key] for e in envs)

    def per_repeat(mode: str) -> list[float]:
        """episodes/min over all envs, repeat by repeat"""
        return [total(mode, "episodes") / sum(per_env[e][mode]["runs_seconds"][r] for e in envs) * 60
                for r in range(args.repeats)]

    def ranges(ours: list[float], base: list[float]) -> dict[str, list[float]]:
        ratios = repeats.paired_ratios(ours, base)
        return {"ours": [min(ours), max(ours)], "baseline": [min(base), max(base)], "ratio": [min(ratios), max(ratios)]}

    epm_runs = {m: per_repeat(m) for m in modes}
    epm = {m: repeats.spread(v)["median"] for m, v in epm_runs.items()}
    tpm = {m: total(m, "turns") / total(m, "seconds") * 60 for m in ("batched", "sequential")}
    comps = [comparisons.comparison("episodes/min (all envs)", round(epm["batched"], 4), round(epm["sequential"], 4), op=">=", target=3.0,
                               unit="episodes/min", ours_label=f"batched ({args.in_flight} in flight)", baseline_label="one at a time",
                               ranges=ranges(epm_runs["batched"], epm_runs["sequential"]))]
    for e in envs:
        b, q = per_env[e]["batched"]["runs_episodes_per_min"], per_env[e]["sequential"]["runs_episodes_per_min"]
        comps.append(comparisons.comparison(f"episodes/min [{e}]", repeats.spread(b)["median"], repeats.spread(q)["median"],
                                       op=">=", target=3.0, unit="episodes/min", ours_label="batched", baseline_label="one at a time",
                                       ranges=ranges(b, q)))
    for a in ablations:
        opt, label = ABLATIONS[a]
        comps.append(comparisons.comparison(f"episodes/min, {label} (batched)", round(epm["batched"], 4),
                                       round(epm[f"batched_{a}"], 4), op=None, target=None, unit="episodes/min",
                                       ours_label=f"{opt}=default", baseline_label=f"{opt}=false",
                                       ranges=ranges(epm_runs["batched"], epm_runs[f"batched_{a}"])))
    comps.append(comparisons.comparison("turns/min (all envs)", round(tpm["batched"], 3), round(tpm["sequential"], 3), op=None, target=None,
                                   unit="turns/min", ours_label="batched", baseline_label="one at a time"))
    figures = {
        "episodes_per_env": n,
        "envs": envs,
        "effective_in_flight": min(args.in_flight, n),
        "per_env": per_env,
        "repeats": args.repeats,
        "episodes_per_min": epm,
        "episodes_per_min_per_repeat": epm_runs,
        "turns_per_min": tpm,
        "policy": described,
    }
    notes = [
        f"threads={args.threads}: on one CPU thread batching mostly amortises per-call overhead and the decode steps' "
        "weight reads; the prefill of long prompts stays compute-bound, so the CPU speedup is a lower bound of a GPU's.",
        "Both main modes run the HF policy's defaults: each episode's KV cache reused across turns (a turn prefills "
        "only its new observation), decoding into a KV cache that grows in place, and (on a CPU) prompts whose new "
        "parts differ in length prefilled one by one before the batch decodes together. Each batched_<ablation> mode "
        "turns one of these off: " + "; ".join(f"batched_{a}: {ABLATIONS[a][0]}=false" for a in ablations) + ".",
        "Greedy decoding in a left-padded batch can differ from unpadded decoding in float noise, so episodes can take "
        "different paths: see per_env.*.identical_conversations, turns and turns/min.",
        f"Per env, in the same process, one after the other, each with a freshly loaded policy: {', '.join(modes)}; "
        f"{args.repeats} repeat(s), the modes' order rotating from one repeat to the next. episodes/min are medians over "
        "the repeats, [min-max] their range (the ratio's: of the per-repeat ratios); per_env holds each mode's median "
        "run (by seconds) and every run's seconds.",
    ]
    if n < args.in_flight:
        notes.append(f"only {n} episodes per env, so at most {n} were in flight (not {args.in_flight})")
    comparisons.write_result(NAME, args, figures=figures, comparisons=comps, notes=notes, started=started)


if __name__ == "__main__":
    main()
