"""train_throughput: our masked finetuning (the app's train stage, `atlas_exp.train.trainer`) vs TRL's `SFTTrainer`.

What is compared: training throughput (real tokens/s and supervised tokens/s over the whole `train()` call)
and the peak resident memory during `train()`, ours / TRL, on the same N real AgentTraj-L trajectories
(default 200 TextCraft records in file order; --quick 16), SmolLM2-135M-Instruct on the CPU in fp32, LoRA
with conf/train/lora.yaml's r / alpha / dropout / target_modules, the same batch size, gradient accumulation,
max length, learning-rate schedule, seed and number of optimizer steps (one epoch). Target: ours >= 1.0x.

Why it is a fair comparison:

* Same sequences and labels. The selection (random, ratio 0.3, seeded) is written once to a run dir. Our
  side runs the app's own train stage on it, with the recipe steps `run_training` runs (`MaskedSFTRecipe`;
  composed config: `conf/config.yaml` + `train=lora` + the size overrides below), which masks with
  `build_examples` and trains with `MaskedCollator`. The TRL side takes the rows the same recipe's
  `setup_data` step builds and hands TRL an already tokenized `datasets.Dataset` with exactly two columns,
  `input_ids` and `labels` (-100 outside the selected steps). TRL 1.x treats a dataset that has
  `input_ids` as pre-tokenized (no chat template, no formatting function), uses a `labels` column as is,
  and pads with its own `DataCollatorForLanguageModeling` (pad token / -100 on the right, like ours);
  `packing=False`, `padding_free=False`, `completion_only_loss`/`assistant_only_loss` unused, its
  `max_length` equal to ours (a no-op: our sequences are already cut to it), `shuffle_dataset=False`.
* Same batches in the same order: both trainers are wrapped by the same instrumentation (a recording
  collator), and the benchmark checks that the sha1 of every batch's input_ids and labels is identical on
  both sides, batch for batch (`figures.same_batches`); it fails otherwise.
* Same optimisation: same TrainingArguments values (the recipe's `train.*` TrainingArguments fields,
  `atlas_exp.train.options.training_arguments`; checked: `figures.args_equal`), TRL's own defaults that
  differ from transformers' (gradient_checkpointing=True, bf16=True, logging_steps=10, lr=2e-5) are
  overridden to ours; checkpoints are not written inside `train()` on either side; no reporting backend.
* Same model: the recipe's `setup_base_model` (the converted SmolLM2 folder, fp32, `use_cache=False`); ours
  wraps it with peft's `get_peft_model`, TRL with the recipe's same `lora_config()` passed as `peft_config`
  (TRL's documented way).
* Timed: only `trainer.train()` (model loading, masking, TRL's dataset preparation and saving excluded on
  both sides), each side in its own fresh child process (so each has its own memory peak), run one after
  the other, never at the same time; `--repeats R` (default 3) runs each side R times, the order alternating
  from one repeat to the next (ours first, then TRL first, ...), and reports medians with their range.

Not identical, by design of each library (see `notes` in the JSON): TRL computes its loss with its own LM
head path and logs entropy / token accuracy every step; ours (train.supervised_logits_only, the default)
projects onto the vocabulary only the positions whose next token is supervised and computes the same
cross-entropy there (tests/test_packing.py proves loss and gradients equal). That is exactly what is being
compared.
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
import provenance
import repeats
import train_timing
import workers

NAME = "train_throughput"


def _overrides(args) -> list[str]:
    return [
        f"cache_dir={args.cache_dir}",
        "logger=none",
        "train=lora",
        f"train.max_length={args.max_length}",
        f"train.per_device_train_batch_size={args.batch_size}",
        f"train.gradient_accumulation_steps={args.grad_accum}",
        "train.num_train_epochs=1",
        "train.max_steps=-1",
        # no checkpoint inside the timed train() (TRL side: save_strategy=no)
        "train.save_steps=1000000000",
        f"seed={args.seed}",
    ]


# ------------------------------------------------------------------------------------------------ workers


def worker_ours(args) -> dict:
    return train_timing.our_training_worker(Path(args.run_dir), _overrides(args))


def worker_trl(args) -> dict:
    """TRL's SFTTrainer on what our recipe's own steps build: the same masked rows (`setup_data`), base model
    (`setup_base_model`), LoRA config (`lora_config`, handed to TRL as `peft_config`, its documented way) and
    TrainingArguments values (`training_arguments`, train/options.py)."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from atlas_exp.config import compose
    from atlas_exp.run_dir import RunDir
    from atlas_exp.train.options import training_arguments
    from atlas_exp.train.trainer import MaskedSFTRecipe

    cfg = compose(_overrides(args))
    recipe = MaskedSFTRecipe(cfg, RunDir(Path(args.run_dir)), progress=False)
    tokenizer = recipe.setup_tokenizer()
    data = recipe.setup_data(tokenizer)
    ds = Dataset.from_dict({"input_ids": [r["input_ids"] for r in data.rows], "labels": [r["labels"] for r in data.rows]})
    sft = SFTConfig(
        # the very values our trainer passes to its TrainingArguments (precision: fp32 on CPU, as ours resolves)
        **{**training_arguments(cfg.train, precision=recipe.precision, seed=int(cfg.seed), use_cpu=not torch.cuda.is_available()),
           "save_strategy": "no"},
        output_dir=str(Path(args.run_dir) / "trl_out"),
        report_to="none",
        disable_tqdm=True,
        # train on exactly our labels: no packing, no padding-free, no re-tokenizing
        packing=False,
        padding_free=False,
        max_length=int(cfg.train.max_length),
        shuffle_dataset=False,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(model=recipe.setup_base_model(), args=sft, train_dataset=ds, processing_class=tokenizer,
                         peft_config=recipe.lora_config())
    _, rec = train_timing.record_training(trainer)
    rec["dataset_columns"] = list(trainer.train_dataset.column_names)
    rec["dataset_rows"] = len(trainer.train_dataset)
    return {"record": rec, "masking_stats": data.stats}


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    p = common.base_parser(NAME, __doc__, n_default=200, n_quick=16, n_help="trajectories")
    p.add_argument("--env", default="textcraft", help="AgentTraj-L env file(s), comma-separated (default textcraft)")
    p.add_argument("--ratio", type=float, default=0.3, help="share of steps selected (random selector)")
    p.add_argument("--max-length", type=int, default=2048, help="train.max_length (conf/train/lora.yaml: 2048)")
    p.add_argument("--batch-size", type=int, default=1, help="train.per_device_train_batch_size (conf: 1)")
    p.add_argument("--grad-accum", type=int, default=4, help="train.gradient_accumulation_steps (conf: 4)")
    repeats.add_repeats_option(p)
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse_hidden())
    p.add_argument("--worker-out", type=Path, help=argparse_hidden())
    p.add_argument("--run-dir", type=Path, help=argparse_hidden())
    args = p.parse_args()
    common.setup_env(args.threads)
    if args.worker:
        common.torch_threads(args.threads)
        res = worker_ours(args) if args.worker == "ours" else worker_trl(args)
        res["machine"] = provenance.machine_info()
        args.worker_out.write_text(json.dumps(res, default=str))
        return

    started = time.time()
    n = common.resolve_n(args)
    envs = [e for e in args.env.split(",") if e]
    trajs = common.load_trajectories(args.data_dir, envs, n)
    from atlas_exp.selectors.random_steps import RandomSelector

    sels = list(RandomSelector(ratio=args.ratio, seed=args.seed).select(trajs))
    print(f"[{NAME}] {len(trajs)} trajectories of {envs}, random selection at ratio {args.ratio}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        runs: dict[str, list[dict]] = {"ours": [], "trl": []}
        for r, side in repeats.alternating(["ours", "trl"], args.repeats):
            rd = Path(tmp) / f"{side}{r}"
            rd.mkdir()
            common.write_trajectories(rd / "trajectories.jsonl", trajs)
            common.write_selections(rd / "selection.jsonl", sels)
            wargs = ["--worker", side, "--run-dir", str(rd), "--cache-dir", str(args.cache_dir), "--seed", str(args.seed),
                     "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
                     "--grad-accum", str(args.grad_accum), "--threads", str(args.threads)]
            print(f"[{NAME}] run {r + 1}/{args.repeats}: {side} ...", flush=True)
            res = workers.run_worker(Path(__file__), wargs, threads=args.threads, label=side)
            s = train_timing.trainer_summary(res["record"])
            print(f"[{NAME}]   {side}: {s['train_seconds']:.1f} s, {s['optimizer_steps']} steps, "
                  f"{s['tokens_per_s']:.1f} tok/s, {s['supervised_tokens_per_s']:.1f} sup tok/s, "
                  f"peak RSS {s['peak_rss_mb']:.0f} MB", flush=True)
            runs[side].append(res)

    ours0, trl0 = runs["ours"][0]["record"], runs["trl"][0]["record"]

    def digests(rec: dict) -> list:
        return [(b["ids"], b["labels"]) for b in rec["batches"]]

    same_batches = all(digests(x["record"]) == digests(ours0) for x in runs["ours"] + runs["trl"])
    arg_keys = set(ours0["args"]) - {"train_sampling_strategy"} | {"train_sampling_strategy"}
    args_diff = {k: (ours0["args"].get(k), trl0["args"].get(k)) for k in sorted(arg_keys) if ours0["args"].get(k) != trl0["args"].get(k)}
    same_steps = ours0["global_step"] == trl0["global_step"]

    def values(side: str, key: str) -> list[float]:
        return [train_timing.trainer_summary(x["record"])[key] for x in runs[side]]  # in repeat order

    keys = ("train_seconds", "tokens_per_s", "supervised_tokens_per_s", "peak_rss_mb", "peak_rss_increase_mb",
            "rss_before_mb", "step_seconds_median_after_first")
    spreads = {side: {k: repeats.spread(values(side, k)) for k in keys} for side in ("ours", "trl")}
    figs = {side: {k: v["median"] for k, v in spreads[side].items()} for side in spreads}

    def row(figure: str, key: str, **kw) -> dict:
        ours, trl = spreads["ours"][key], spreads["trl"][key]
        ratios = repeats.paired_ratios(values("ours", key), values("trl", key))
        return comparisons.comparison(figure, ours["median"], trl["median"], baseline_label="TRL SFTTrainer",
                                 ranges={"ours": [ours["min"], ours["max"]], "baseline": [trl["min"], trl["max"]],
                                         "ratio": [min(ratios), max(ratios)] if ratios else []}, **kw)

    per_run = {side: [train_timing.trainer_summary(x["record"]) | {"process_wall_seconds": x["_process_wall_seconds"]} for x in runs[side]]
               for side in ("ours", "trl")}
    figures = {
        "n_trajectories": len(trajs),
        "envs": envs,
        "median": figs,
        "spread": spreads,
        "runs": per_run,
        "same_batches": same_batches,
        "n_batches": len(ours0["batches"]),
        "optimizer_steps": {"ours": ours0["global_step"], "trl": trl0["global_step"]},
        "args_equal": not args_diff,
        "args_diff": args_diff,
        "args": ours0["args"],
        # a check that both sides optimise the same objective: same data, labels and optimizer give nearly the
        # same mean loss (not bit-equal: LoRA init and dropout draw from the RNG in a different order, and TRL's
        # fused LM head sums in another order)
        "train_loss": {"ours": ours0["train_loss"], "trl": trl0["train_loss"],
                       "abs_diff": abs(ours0["train_loss"] - trl0["train_loss"])},
        "tokens": ours0["tokens"],
        "supervised_tokens": ours0["supervised_tokens"],
        "trainable_params": {"ours": ours0["trainable_params"], "trl": trl0["trainable_params"]},
        "trl_collator": trl0.get("collator"),
        "trl_dataset_columns": trl0.get("dataset_columns"),
        "masking_stats": runs["trl"][0].get("masking_stats"),
        "first_batches": ours0["batches"][:3],
    }
    comps = [
        row("tokens/s (all real tokens)", "tokens_per_s", op=">=", target=1.0, unit="tok/s"),
        row("supervised tokens/s", "supervised_tokens_per_s", op=">=", target=1.0, unit="tok/s"),
        row("peak RSS during train()", "peak_rss_mb", op=None, target=None, unit="MB"),
    ]
    from atlas_exp.config import compose

    supervised_only = bool(compose(_overrides(args)).train.supervised_logits_only)
    notes = [
        "Timed: trainer.train() only, each side in its own child process, one after the other; "
        f"{args.repeats} run(s) per side, the order alternating (ours first in the first repeat); medians, "
        f"[min-max] their range (the ratio's: of the per-repeat ratios). Threads: {args.threads}.",
        "Same batches in the same order: " + ("verified by sha1 of every batch's input_ids and labels" if same_batches else "NOT verified: the batch digests differ"),
        "TRL's loss uses its own LM head path and it logs entropy / mean token accuracy at every step; ours "
        + ("projects only the supervised positions onto the vocabulary (train.supervised_logits_only=true, the default)"
           if supervised_only else "uses the model's own causal-LM loss over full logits (train.supervised_logits_only=false)")
        + ". These are each library's normal code paths.",
        "Peak memory is the RSS of the whole child process (model, optimizer state, Python, torch allocator caches), "
        "sampled every 20 ms during train(); it is a lower bound on the true peak.",
        "The issue sets the target on throughput only; the memory row is informational.",
        "The shared machine's load average is in machine.loadavg_1_5_15: other jobs can slow either side.",
    ]
    if not same_steps:
        notes.append(f"optimizer steps differ: ours {ours0['global_step']}, TRL {trl0['global_step']}")
    if args_diff:
        notes.append(f"training arguments differ: {args_diff}")
    comparisons.write_result(NAME, args, figures=figures, comparisons=comps, notes=notes, started=started)
    if not (same_batches and same_steps):
        raise SystemExit(f"[{NAME}] the two sides did not train on the same batches / steps: see notes")


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
