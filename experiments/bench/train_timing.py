"""Timing a Trainer's `train()`: ours, built by the app's own recipe steps, and TRL's SFTTrainer alike.

`our_training_worker` runs the app's train stage with its recipe steps (`MaskedSFTRecipe` of
`atlas_exp.train.trainer`, what `run_training` runs); `record_training` times the `train()` of any Trainer
object, instrumenting that object (its collator wrapped by `RecordingCollator`, a step clock added as a
callback): nothing of transformers is patched. Imports no torch at module level (common.setup_env first).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import RSSSampler, max_rss_mb

from atlas_exp.train.masking import IGNORE_INDEX  # no torch import: the bench sets threads first


def _tensor_digest(t) -> str:
    return hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def causal_lm_labels(batch: dict[str, Any]):
    """A batch's labels laid out as a causal LM's, [rows, length] (unshifted, -100 where nothing is learned),
    whatever form the collator gave them: our collator's supervised positions as integers come with compact
    targets, `[rows, 1 + K]` (atlas_exp.train.collator), which are put back at the positions they follow."""
    import torch

    labels, keep = batch["labels"], batch.get("logits_to_keep")
    if not isinstance(keep, torch.Tensor) or keep.dtype == torch.bool or keep.dim() != 2:
        return labels
    full = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    rows = torch.arange(len(keep))[:, None].expand_as(keep)
    full[rows[valid], keep[valid] + 1] = targets[valid]
    return full


class RecordingCollator:
    """Wraps a data collator: per batch, a digest of input_ids/labels (as a causal LM's, `causal_lm_labels`)
    and its real / supervised token counts.

    Identical digest lists on two trainers prove that they saw the same batches in the same order."""

    def __init__(self, inner: Callable):
        self.inner = inner
        self.batches: list[dict[str, Any]] = []

    def __call__(self, features):
        out = self.inner(features)
        ids, labels = out["input_ids"], causal_lm_labels(out)
        mask = out.get("attention_mask")
        self.batches.append({
            "ids": _tensor_digest(ids),
            "labels": _tensor_digest(labels),
            "shape": list(ids.shape),
            "tokens": int(mask.sum()) if mask is not None else int(ids.numel()),
            "padded_tokens": int(ids.numel()),
            # labels are unshifted (the model shifts): each label not IGNORE_INDEX is one supervised prediction
            "supervised": int((labels != IGNORE_INDEX).sum()),
        })
        return out


#: the TrainingArguments recorded with every timed train(), to check that two sides trained alike
RECORDED_ARGS = (
    "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps", "learning_rate",
    "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "bf16", "fp16", "activation_checkpointing",
    "seed", "train_sampling_strategy", "dataloader_num_workers", "logging_steps", "use_cpu",
)


def record_training(trainer: Any, train: Callable[[], Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """Run `train()` (default: `trainer.train`) with `trainer` instrumented; return its result and a record of
    wall time, optimizer-step times, peak RSS and every batch (through `RecordingCollator`).

    The trainer object is instrumented (its collator wrapped, a step clock added as a callback), not its class,
    so any Trainer runs as built. Only `train()` is timed: model loading, masking, TRL's dataset preparation and
    saving are not; the collator and the per-step logging both sides do are."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter())

    collator, clock = RecordingCollator(trainer.data_collator), StepClock()
    trainer.data_collator = collator
    trainer.add_callback(clock)
    with RSSSampler() as mem:
        t0 = time.perf_counter()
        result = (train or trainer.train)()
        seconds = time.perf_counter() - t0
    steps = [t - t0 for t in clock.times]
    batches = collator.batches
    record = {
        "trainer": f"{type(trainer).__module__}.{type(trainer).__name__}",
        "collator": f"{type(collator.inner).__module__}.{type(collator.inner).__name__}",
        "train_seconds": seconds,
        "global_step": int(trainer.state.global_step),
        "step_seconds": [b - a for a, b in zip([0.0] + steps[:-1], steps)],
        "n_batches": len(batches),
        "tokens": sum(b["tokens"] for b in batches),
        "padded_tokens": sum(b["padded_tokens"] for b in batches),
        "supervised_tokens": sum(b["supervised"] for b in batches),
        "batches": batches,
        "train_loss": float(getattr(result, "training_loss", float("nan"))),
        "memory": mem.as_dict(),
        "max_rss_process_mb": round(max_rss_mb(), 1),
        "args": {k: getattr(trainer.args, k, None) for k in RECORDED_ARGS},
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }
    return result, record


def trainer_summary(rec: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of one recorded `train()`."""
    s = rec["train_seconds"]
    steps = rec["step_seconds"]
    steady = steps[1:] if len(steps) > 1 else steps
    return {
        "train_seconds": round(s, 3),
        "optimizer_steps": rec["global_step"],
        "batches": rec["n_batches"],
        "tokens": rec["tokens"],
        "padded_tokens": rec["padded_tokens"],
        "supervised_tokens": rec["supervised_tokens"],
        "tokens_per_s": round(rec["tokens"] / s, 2) if s else None,
        "supervised_tokens_per_s": round(rec["supervised_tokens"] / s, 2) if s else None,
        "step_seconds_median": round(sorted(steps)[len(steps) // 2], 3) if steps else None,
        "step_seconds_median_after_first": round(sorted(steady)[len(steady) // 2], 3) if steady else None,
        "train_loss": rec["train_loss"],
        "trainable_params": rec["trainable_params"],
        **rec["memory"],
        "max_rss_process_mb": rec["max_rss_process_mb"],
    }


def our_training_worker(run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """The app's train stage on `run_dir` (trajectories.jsonl + selection.jsonl) with the config that
    `conf/config.yaml` + `overrides` composes to, run by the same recipe steps as `run_training`
    (`MaskedSFTRecipe`: setup, train, save), its `train()` recorded; returns the record and the summary."""
    from atlas_exp.config import compose
    from atlas_exp.run_dir import RunDir
    from atlas_exp.train.trainer import MaskedSFTRecipe

    recipe = MaskedSFTRecipe(compose(list(overrides)), RunDir(Path(run_dir))).setup()
    result, record = record_training(recipe.trainer, recipe.train)
    summary = recipe.save(result)
    keep = ("global_step", "train_loss", "n_examples", "seconds")
    return {"record": record, "run_training_summary": {k: v for k, v in summary.items() if k in keep or k.startswith("data/")}}
