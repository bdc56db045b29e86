"""gpu_train: tokens/s and MFU of our trainer on real model architectures with random weights, vs TRL.

What is measured: optimizer-step throughput of our training path (transformers Trainer + `MaskedCollator` +
`supervised_loss`, i.e. what `run_training` builds, with `train.supervised_logits_only` on: the supervised
positions as integers, or with `--logits-keep mask` as the boolean mask of earlier versions) and of TRL's
`SFTTrainer` on the same synthetic batches, for an architecture built from its config with random weights
(no download): `8b` = Llama-3.1-8B, `1b` = Llama-3.2-1B, `smollm2` = SmolLM2-135M, `tiny` = a 2-layer toy
for checking the script on a CPU. LoRA (r 16, all linear layers) or full finetuning (optionally under one of
our DeepSpeed configs, e.g. `--deepspeed zero3_offload` for 8B full on one GPU), bf16 on a GPU, sequence
length 4096 by default, batch 1 x grad_accum 4 by default.

    python experiments/bench/gpu_train.py --size 8b --mode lora            # the issue's headline figure
    python experiments/bench/gpu_train.py --size 8b --mode full --deepspeed zero3_offload
    python experiments/bench/gpu_train.py --size tiny --steps 3 --warmup 1  # a CPU check that it runs

Batches: `--n` sequences of exactly `--seq` random tokens; in each, random spans covering `--ratio` (0.3)
of the tokens are supervised (labels), the rest -100, like critical steps in a trajectory. Both trainers get
the same pre-tokenized `input_ids`/`labels` in the same order (no shuffling differences: both sample with
the same seed over the same dataset; every sequence has the same length so batches cost the same).

Timing: the first `--warmup` optimizer steps are excluded (CUDA kernels autotune, allocator warms up);
tokens/s = tokens of the timed steps / their wall time. Each trainer runs in its own child process (own
memory peak: `torch.cuda.max_memory_allocated`), `--repeats` times (default 3), the order alternating from one
repeat to the next (ours first, then TRL first, ...); figures are medians, reported with their range.

MFU = model FLOPs per token x tokens/s / the device's peak dense bf16 FLOP/s (table below; `--peak-tflops`
to set it). Model FLOPs per token, with N the parameters that take part in matmuls (all but the input
embedding), L layers, d the hidden size, T the sequence length, attention counted causally (half of T x T):
full finetuning 6N + 6LdT; LoRA 4N + 6LdT (the frozen weights get no weight gradients; the adapters' own
FLOPs are negligible). These are the FLOPs of the standard computation; ours skips the vocabulary
projection at unsupervised positions, so it does less work for the same tokens, and the MFU figure counts
that as throughput (the question users ask: how many training tokens per second per GPU).

Without a GPU (as in this project's CI and development machine) the script runs on the CPU at whatever
size is asked and reports tokens/s with MFU = null: no GPU figures are made up.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import comparisons
import repeats
import train_timing
import workers

from atlas_exp.train.masking import IGNORE_INDEX  # no torch import: the bench sets threads first

NAME = "gpu_train"

#: dense bf16 peak FLOP/s by device name fragment (vendor data sheets; first match wins)
PEAK_BF16 = [
    ("H200", 989.4e12),
    ("H100 PCIe", 756.0e12),
    ("H100 NVL", 835.0e12),
    ("H100", 989.4e12),  # SXM / HBM3
    ("A100", 312.0e12),
    ("L40S", 362.1e12),
    ("L4", 121.0e12),
]

ARCHS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True, rope_theta=10000.0),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
}


def peak_flops(device_name: str | None, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if not device_name:
        return None
    for frag, peak in PEAK_BF16:
        if frag in device_name:
            return peak
    return None


def flops_per_token(arch: dict, n_matmul_params: int, seq: int, mode: str) -> float:
    attn = 6.0 * arch["num_hidden_layers"] * arch["hidden_size"] * seq
    return (6.0 if mode == "full" else 4.0) * n_matmul_params + attn


def synthetic_dataset(n: int, seq: int, vocab: int, ratio: float, seed: int):
    """`n` sequences of `seq` random tokens; spans of 40-120 tokens supervised until `ratio` is covered."""
    import random

    rng = random.Random(seed)
    rows = {"input_ids": [], "labels": []}
    for _ in range(n):
        ids = [rng.randrange(3, vocab) for _ in range(seq)]
        labels = [IGNORE_INDEX] * seq
        covered = 0
        while covered < ratio * seq:
            span = rng.randint(40, 120)
            start = rng.randrange(1, max(2, seq - span))
            for t in range(start, min(seq, start + span)):
                if labels[t] == IGNORE_INDEX:
                    labels[t] = ids[t]
                    covered += 1
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
    return rows


def worker(args) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, LlamaConfig, TrainingArguments

    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    arch = ARCHS[args.size]
    cfg = LlamaConfig(max_position_embeddings=max(8192, args.seq), **arch)
    cfg.use_cache = False
    attn = args.attn or ("sdpa")
    torch.manual_seed(args.seed)
    with torch.device("cuda" if on_gpu and not args.deepspeed else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
    n_matmul = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    if arch["tie_word_embeddings"]:
        n_matmul += model.get_input_embeddings().weight.numel()  # the tied matrix is also the LM head
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    data = synthetic_dataset(args.n, args.seq, arch["vocab_size"], args.ratio, args.seed)
    common_args = dict(
        output_dir=str(Path(args.run_dir) / args.worker), max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=1e-5 if args.mode == "full" else 2e-4, lr_scheduler_type="constant", warmup_steps=0,
        bf16=dtype == torch.bfloat16, use_cpu=not on_gpu, logging_steps=1, save_strategy="no",
        report_to="none", seed=args.seed, disable_tqdm=True, activation_checkpointing=args.activation_checkpointing,
        deepspeed=_deepspeed_config(args.deepspeed) if args.deepspeed else None,
        torch_compile=args.compile,
    )
    if args.worker == "ours":
        from datasets import Dataset

        from atlas_exp.train.collator import MaskedCollator, logits_positions_supported
        from atlas_exp.train.loss import supervised_loss

        positions = args.logits_keep == "positions"
        if positions and not logits_positions_supported():
            raise SystemExit("--logits-keep positions: this transformers does not take integer logits_to_keep [rows, K]")

        if args.mode == "lora":
            from peft import get_peft_model

            model = get_peft_model(model, lora)
        from transformers import Trainer

        trainer = Trainer(model=model, args=TrainingArguments(remove_unused_columns=False, **common_args),
                      train_dataset=Dataset.from_dict(data),
                      data_collator=MaskedCollator(pad_token_id=0, supervised_logits_only=True,
                                                   logits_positions=positions),
                      compute_loss_func=supervised_loss)
    else:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        tok = _tokenizer_stub(arch["vocab_size"])
        trainer = SFTTrainer(model=model, args=SFTConfig(packing=False, padding_free=False, max_length=args.seq,
                                                  shuffle_dataset=False, dataset_num_proc=None, **common_args),
                      train_dataset=Dataset.from_dict(data), processing_class=tok,
                      peft_config=lora if args.mode == "lora" else None)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    _, rec = train_timing.record_training(trainer)
    step_s = rec["step_seconds"][args.warmup:]
    tokens_per_step = args.batch_size * args.grad_accum * args.seq
    tps = tokens_per_step * len(step_s) / sum(step_s) if step_s else None
    return {
        "tokens_per_s": tps,
        "timed_steps": len(step_s),
        "step_seconds": rec["step_seconds"],
        "n_matmul_params": n_matmul,
        "trainable_params": rec["trainable_params"],
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None,
        "peak_rss_mb": rec["memory"],
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "attn_implementation": attn,
        "train_loss": rec["train_loss"],
        "torch_compile": args.compile,
        "logits_keep": args.logits_keep if args.worker == "ours" else None,
        "matmul_tflops_measured": _matmul_tflops() if on_gpu and args.worker == "ours" else None,
    }


def _matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    """The device's achieved dense bf16 rate on one large square matrix product (mean of `reps` after three
    warm-ups): the practical ceiling to read an MFU figure against (MFU itself is against the data sheet)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return round(2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12, 1)


def _variant(args, defaults) -> str:
    """What sets this run apart from the parser's `defaults`, for the figure's name: ` (compiled, batch 2x2)`."""
    def changed(*names: str) -> bool:
        return any(getattr(args, n) != defaults.get_default(n) for n in names)

    parts = []
    if args.compile:
        parts.append("compiled")
    if changed("batch_size", "grad_accum"):
        parts.append(f"batch {args.batch_size}x{args.grad_accum}")
    if changed("seq"):
        parts.append(f"seq {args.seq}")
    if args.activation_checkpointing:
        parts.append("activation ckpt")
    if args.deepspeed:
        parts.append(args.deepspeed)
    if changed("logits_keep"):
        parts.append(f"logits_to_keep as a {args.logits_keep}")
    return f" ({', '.join(parts)})" if parts else ""


def _deepspeed_config(name: str) -> dict:
    """One of conf/deepspeed/<name>.yaml's `config` (its "auto" values are filled by the Trainer)."""
    from omegaconf import OmegaConf

    path = common.REPO / "conf" / "deepspeed" / f"{name}.yaml"
    if not path.exists():
        raise SystemExit(f"--deepspeed {name}: no {path}")
    node = OmegaConf.load(path)
    for parent in node.get("defaults", []):
        if isinstance(parent, str) and parent != "_self_":
            node = OmegaConf.merge(OmegaConf.load(path.with_name(f"{parent}.yaml")), node)
    return OmegaConf.to_container(node.config, resolve=True)


def _tokenizer_stub(vocab: int):
    """TRL wants a processing class; the data is already token ids, so a word-level tokenizer of the right
    vocabulary size (built in memory) is enough: it is only asked for its pad and eos ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab_map = {f"t{i}": i for i in range(vocab)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab_map, unk_token="t2")),
                                  pad_token="t0", eos_token="t1", unk_token="t2")
    return tok


def main() -> None:
    p = common.base_parser(NAME, __doc__, n_default=0, n_quick=0, n_help="sequences (default: enough for the steps)")
    p.add_argument("--size", choices=sorted(ARCHS), default="8b")
    p.add_argument("--mode", choices=["lora", "full"], default="lora")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps run before timing")
    p.add_argument("--ratio", type=float, default=0.3, help="share of supervised tokens per sequence")
    p.add_argument("--attn", default=None, help="attn_implementation (default sdpa; flash_attention_2 if installed)")
    p.add_argument("--activation-checkpointing", action="store_true", help="TrainingArguments.activation_checkpointing")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (TrainingArguments.torch_compile)")
    p.add_argument("--deepspeed", default=None, help="a conf/deepspeed/<name>.yaml config (zero2, zero3, zero3_offload)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if not in the table")
    p.add_argument("--no-trl", action="store_true", help="only ours")
    p.add_argument("--logits-keep", choices=["positions", "mask"], default="positions",
                   help="ours: supervised positions as integers (the trainer's path) or as a boolean mask (before)")
    repeats.add_repeats_option(p)
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.size, args.seq, args.steps, args.warmup = "tiny", min(args.seq, 256), 3, 1
    if not args.n:
        args.n = args.batch_size * args.grad_accum * (args.steps + args.warmup)
    common.setup_env(args.threads)
    if args.worker:
        import json

        res = worker(args)
        args.worker_out.write_text(json.dumps(res))
        return
    started = time.time()
    import tempfile

    sides = ["ours"] if args.no_trl else ["ours", "trl"]
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    argv = [a for a in sys.argv[1:] if a != "--quick"]
    if args.quick:
        argv += ["--size", "tiny", "--seq", str(args.seq), "--steps", "3", "--warmup", "1"]
    with tempfile.TemporaryDirectory(prefix="gpu-train-") as tmp:
        for r, side in repeats.alternating(sides, args.repeats):
            print(f"[{NAME}] run {r + 1}/{args.repeats}, {side}: {args.size} {args.mode}, seq {args.seq}, "
                  f"{args.warmup}+{args.steps} steps ...", flush=True)
            res = workers.run_worker(Path(__file__), [*argv, "--worker", side, "--run-dir", tmp, "--n", str(args.n)],
                                    threads=args.threads, label=side, max_rss_gb=None)
            runs[side].append(res)
            print(f"[{NAME}]   {res['tokens_per_s']:.1f} tokens/s on {res['device']}", flush=True)
    ours = runs["ours"][0]
    peak = peak_flops(ours["device"] if ours["device"] != "cpu" else None, args.peak_tflops)
    fpt = flops_per_token(ARCHS[args.size], ours["n_matmul_params"], args.seq, args.mode)
    for res in (x for side in sides for x in runs[side]):
        res["mfu"] = round(fpt * res["tokens_per_s"] / peak, 4) if peak and res["tokens_per_s"] else None
    rate = {side: repeats.spread([x["tokens_per_s"] for x in runs[side]]) for side in sides}
    mfu = {side: repeats.spread([x["mfu"] for x in runs[side]]) for side in sides}
    variant = _variant(args, p)
    headline = args.size == "8b" and args.mode == "lora"
    comps = [comparisons.comparison(f"MFU, {args.size} {args.mode}{variant}", mfu["ours"]["median"], None, op=">=" if headline else None,
                               target=0.4 if headline else None, unit="", ratio=mfu["ours"]["median"],
                               ranges={"ours": [mfu["ours"]["min"], mfu["ours"]["max"]]} if mfu["ours"]["n"] else None)]
    if "trl" in runs:
        ratios = repeats.paired_ratios([x["tokens_per_s"] for x in runs["ours"]], [x["tokens_per_s"] for x in runs["trl"]])
        comps.append(comparisons.comparison(f"tokens/s, {args.size} {args.mode}{variant}", round(rate["ours"]["median"], 2),
                                       round(rate["trl"]["median"], 2), op=">=", target=1.0, unit="tokens/s",
                                       baseline_label="TRL SFTTrainer",
                                       ranges={"ours": [rate["ours"]["min"], rate["ours"]["max"]],
                                               "baseline": [rate["trl"]["min"], rate["trl"]["max"]],
                                               "ratio": [min(ratios), max(ratios)] if ratios else []}))
    notes = [
        f"model FLOPs per token {fpt:.4g} ({'6N' if args.mode == 'full' else '4N'} + 6LdT, N = {ours['n_matmul_params']:,} matmul parameters)",
        "random weights built from the architecture's config; synthetic tokens, 30% supervised in spans",
        f"{args.repeats} run(s) per side, each its own child process, the order alternating from one repeat to the next "
        "(ours first in the first); figures are medians, [min-max] their range (the ratio's: of the per-repeat ratios)",
    ]
    if ours.get("matmul_tflops_measured"):
        notes.append(f"the device's measured 8192^3 bf16 matmul rate: {ours['matmul_tflops_measured']} TFLOP/s "
                     f"(MFU is against the data-sheet peak {peak / 1e12 if peak else '?'} TFLOP/s)")
    if args.mode == "full" and not args.deepspeed and ours["device"] != "cpu":
        notes.append("full finetuning without DeepSpeed: weights, gradients and AdamW states all in bf16 on the GPU")
    if peak is None:
        notes.append("no GPU with a known peak: MFU is null (tokens/s only)" if ours["device"] == "cpu"
                     else f"device {ours['device']!r} has no entry in PEAK_BF16: pass --peak-tflops")
    comparisons.write_result(NAME, args, figures={"sides": {side: x[0] for side, x in runs.items()}, "runs": runs,
                                             "tokens_per_s": rate, "mfu": mfu, "flops_per_token": fpt, "peak_flops": peak},
                        comparisons=comps, notes=notes, started=started)


if __name__ == "__main__":
    main()
