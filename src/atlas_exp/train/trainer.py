"""Masked SFT on the selected steps: trajectories.jsonl + selection.jsonl -> model/ (+ checkpoints/).

Readable and linear, in the order a run happens: tokenize with masks, build the model (LoRA or full),
set up the transformers Trainer (DeepSpeed when configured), train (resuming when asked), save.

The loss is the mean over supervised tokens of the whole optimizer step: the Trainer counts the
supervised tokens of all micro-batches of a step (across ranks too) and the model's causal-LM loss
divides the summed token losses by that count, so a long selected step weighs as many tokens as it has,
whatever the batch layout. With token weights (`train.step_weights=score`, or data weights other than 1)
the same holds with weights for counts: `sum(w * nll)` over the total weight of the optimizer step
(`_weighted_trainer`, `train/loss.py`'s `weighted_loss`); with all weights 1 that is the same mean.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from atlas_exp.artifacts import SCHEMA_VERSION, file_fingerprint, fingerprint, summary_matches, write_json
from atlas_exp.device import get_precision
from atlas_exp.errors import AtlasError, ConfigError
from atlas_exp.models import ModelSpec, load_model, load_tokenizer, materialize
from atlas_exp.run_dir import RunDir

log = logging.getLogger(__name__)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def train_fingerprint(cfg: DictConfig, rd: RunDir) -> str:
    def c(node):
        return OmegaConf.to_container(node, resolve=True) if node is not None else None

    return fingerprint(
        "train",
        SCHEMA_VERSION,
        file_fingerprint(rd.trajectories),
        file_fingerprint(rd.selection),
        c(cfg.model),
        c(cfg.train),
        c(cfg.deepspeed),
        int(cfg.seed),
        int(cfg.launcher.nproc_per_node),
    )


def is_up_to_date(cfg: DictConfig, rd: RunDir) -> bool:
    if not (rd.trajectories.exists() and rd.selection.exists()):
        return False
    return summary_matches(rd.training_summary, train_fingerprint(cfg, rd), rd.model)


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest `checkpoint-N` whose trainer_state.json exists (the Trainer writes it last, so a
    checkpoint interrupted mid-save is never picked)."""
    if not folder.is_dir():
        return None
    cands = []
    for p in folder.glob("checkpoint-*"):
        suffix = p.name.split("-", 1)[1]
        if suffix.isdigit() and (p / "trainer_state.json").exists():
            cands.append((int(suffix), p))
    return str(max(cands)[1]) if cands else None


def build_model(cfg: DictConfig, spec: ModelSpec, precision: str):
    mode = str(cfg.train.mode)
    if mode not in ("lora", "full"):
        raise ConfigError(f"train.mode={mode!r}; choose lora or full")
    # LoRA freezes the base, so it can sit in bf16; full finetuning keeps fp32 master weights
    # (DeepSpeed or autocast does the bf16 compute).
    dtype = torch.bfloat16 if (mode == "lora" and precision == "bf16") else torch.float32
    model = load_model(spec, cfg.cache_dir, dtype=dtype)
    model.config.use_cache = False
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        lc = cfg.train.lora
        if lc is None:
            raise ConfigError("train.mode=lora needs train.lora (r, alpha, dropout, target_modules)")
        target = lc.target_modules
        target = list(target) if OmegaConf.is_list(target) else str(target)
        peft_cfg = LoraConfig(
            r=int(lc.r),
            lora_alpha=int(lc.alpha),
            lora_dropout=float(lc.dropout),
            target_modules=target,
            task_type="CAUSAL_LM",
        )
        if cfg.train.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, peft_cfg)
    return model


def _wandb_env(cfg: DictConfig, rd: RunDir) -> list[str]:
    """Configure W&B through its environment variables (what the Trainer's callback reads)."""
    lg = cfg.logger
    if str(lg.report_to) != "wandb":
        return []
    rd.logs.mkdir(parents=True, exist_ok=True)
    os.environ["WANDB_DIR"] = str(rd.logs)
    os.environ["WANDB_PROJECT"] = str(lg.project)
    os.environ["WANDB_MODE"] = str(lg.mode)
    if lg.entity:
        os.environ["WANDB_ENTITY"] = str(lg.entity)
    if lg.group:
        os.environ["WANDB_RUN_GROUP"] = str(lg.group)
    if lg.job_type:
        os.environ["WANDB_JOB_TYPE"] = str(lg.job_type)
    if lg.tags:
        os.environ["WANDB_TAGS"] = ",".join(map(str, lg.tags))
    os.environ.setdefault("WANDB_SILENT", "true")
    return ["wandb"]


def _selection_stats(rd: RunDir) -> dict[str, Any]:
    if rd.selection_summary.exists():
        s = json.loads(rd.selection_summary.read_text())
        return {k: s[k] for k in ("selector", "ratio", "achieved_ratio", "n_steps", "n_selected") if k in s}
    return {}


def optimisation_arguments(cfg: DictConfig, precision: str) -> dict[str, Any]:
    """The TrainingArguments that decide what is learned (schedule, batch, precision, order, seed).

    One definition for the trainer and for the benchmarks that compare it with other trainers
    (experiments/bench/train_throughput.py hands the same values to TRL's SFTConfig), so that a comparison
    is fair by construction. Where checkpoints go and what is logged are the trainer's own business.
    """
    tc = cfg.train
    warm = float(tc.warmup_ratio)
    return {
        "num_train_epochs": float(tc.epochs),
        "max_steps": int(tc.max_steps),
        "per_device_train_batch_size": int(tc.per_device_batch_size),
        "gradient_accumulation_steps": int(tc.grad_accum),
        "learning_rate": float(tc.lr),
        "lr_scheduler_type": str(tc.lr_scheduler),
        "warmup_steps": warm if warm < 1 else int(warm),
        "weight_decay": float(tc.weight_decay),
        "max_grad_norm": float(tc.max_grad_norm),
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "use_cpu": not torch.cuda.is_available(),
        "train_sampling_strategy": "group_by_length" if tc.group_by_length else "random",
        "logging_steps": int(tc.logging_steps),
        "seed": int(cfg.seed),
        "dataloader_num_workers": int(tc.dataloader_num_workers),
    }


def _weighted_trainer(trainer_cls: type) -> type:
    """`trainer_cls` normalising the loss by the total label weight of an optimizer step, not its token count.

    The Trainer counts the supervised tokens of all micro-batches of a step (`get_batch_samples`, summed over
    ranks when it averages tokens across devices) and hands that count to the loss; here the same place
    sums the collator's `label_weights` instead. `compute_loss` takes the weights out of the inputs (the
    model must not see them) for `weighted_loss`, and leaves everything else (gradient-accumulation and
    multi-rank scaling) to the Trainer.
    """
    from atlas_exp.train.loss import weighted_loss

    class WeightedLossTrainer(trainer_cls):
        _label_weights: torch.Tensor | None = None

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, compute_loss_func=self._weighted_loss, **kwargs)

        def _weighted_loss(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
            return weighted_loss(outputs, labels, self._label_weights, num_items_in_batch)

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, n = super().get_batch_samples(epoch_iterator, num_batches, device)
            if n is None or not batches:
                return batches, n
            total = sum(b["label_weights"][..., 1:].sum() for b in batches).to(device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                total = self.accelerator.gather(total).sum()
            return batches, total

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self._label_weights = inputs.pop("label_weights")
            try:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            finally:
                self._label_weights = None

    return WeightedLossTrainer


def run_training(cfg: DictConfig, rd: RunDir) -> dict[str, Any]:
    """Train on this process (one rank of a torchrun job, or alone). Only rank 0 writes artifacts."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from atlas_exp.run_dir import read_selections, read_trajectories
    from atlas_exp.train.collator import MaskedCollator, logits_positions_supported
    from atlas_exp.train.loss import supervised_loss
    from atlas_exp.train.masking import build_examples

    t0 = time.time()
    is_main = rank() == 0
    fp = train_fingerprint(cfg, rd)
    tc = cfg.train
    spec = ModelSpec.from_cfg(cfg.model)
    precision = get_precision(tc.precision)

    # 1. masked examples: the whole trajectory is the input, only selected steps are supervised
    tok = load_tokenizer(spec, cfg.cache_dir)
    trajs = read_trajectories(rd.trajectories)
    sels = read_selections(rd.selection)
    if len(trajs) != len(sels):
        raise AtlasError(
            f"{rd.selection} has {len(sels)} lines for {len(trajs)} trajectories: rerun the select stage"
        )
    step_weights = str(tc.get("step_weights", "binary"))
    examples, stats = build_examples(
        tok,
        trajs,
        sels,
        max_length=int(tc.max_length),
        on_empty=str(tc.on_empty),
        truncate_after_last_selected=bool(tc.truncate_after_last_selected),
        step_weights=step_weights,
        supervise=str(tc.get("supervise", "step")),
        on_missing_part=str(tc.get("on_missing_part", "error")),
        progress=is_main,
    )
    if not examples:
        raise AtlasError("no trajectory has a supervised token to train on (all were skipped)")
    if stats.get("n_selected_tokens_lost", 0):
        log.warning(
            "train: %d selected tokens were cut by max_length=%d (see training_summary.json)",
            stats["n_selected_tokens_lost"],
            tc.max_length,
        )
    # token weights: the weighted loss as soon as any label weighs other than 1 (else the unweighted path, unchanged)
    weighted = step_weights == "score" or any(e.weights is not None for e in examples)
    train_data = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    if weighted:
        for d, e in zip(train_data, examples):
            d["weights"] = e.weights

    # 2. the model
    model = build_model(cfg, spec, precision)

    # 3. the Trainer
    report_to = _wandb_env(cfg, rd)
    ds_cfg = OmegaConf.to_container(cfg.deepspeed.config, resolve=True) if cfg.deepspeed.enabled else None
    args = TrainingArguments(
        **optimisation_arguments(cfg, precision),
        output_dir=str(rd.checkpoints),
        run_name=f"{cfg.experiment_name}/{rd.root.name}",
        save_strategy="steps",
        save_steps=int(tc.save_steps),
        save_total_limit=int(tc.save_total_limit) if tc.save_total_limit else None,
        report_to=report_to,
        deepspeed=ds_cfg,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False if world_size() > 1 else None,
        disable_tqdm=not is_main,
    )

    run_stats = {
        "n_examples": len(examples),
        **{f"data/{k}": v for k, v in stats.items()},
        **{f"selection/{k}": v for k, v in _selection_stats(rd).items()},
    }

    class _CountSteps(TrainerCallback):
        """Counts the optimizer steps this process actually ran (a resumed run skips the finished ones)."""

        steps_run = 0

        def on_step_end(self, args, state, control, **kwargs):
            _CountSteps.steps_run += 1

    class _LogRunStats(TrainerCallback):
        """Put the supervised-token share and selection stats on the W&B run (config + summary)."""

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero and "wandb" in report_to:
                import wandb

                if wandb.run is not None:
                    wandb.run.config.update({"atlas": OmegaConf.to_container(cfg, resolve=True)}, allow_val_change=True)
                    wandb.run.summary.update(run_stats)

    supervised_only = bool(tc.get("supervised_logits_only", False))
    trainer = (_weighted_trainer(Trainer) if weighted else Trainer)(
        model=model,
        args=args,
        train_dataset=train_data,
        # supervised positions as integers (no boolean indexing, so no host sync, per micro-batch) where the
        # installed transformers takes them; else as a boolean mask (train/collator.py)
        data_collator=MaskedCollator(pad_token_id=tok.pad_token_id, pack=bool(tc.get("packing", False)),
                                     supervised_logits_only=supervised_only,
                                     logits_positions=supervised_only and logits_positions_supported(),
                                     weighted=weighted),
        # with logits only at supervised positions the model cannot compute its own loss; this is the same loss
        # (the weighted trainer brings its own)
        **({} if weighted else {"compute_loss_func": supervised_loss if supervised_only else None}),
        processing_class=tok,
        callbacks=[_LogRunStats(), _CountSteps()],
    )

    # 4. train, resuming from the last complete checkpoint of this run dir when asked
    resume_from = None
    last = last_complete_checkpoint(rd.checkpoints)
    if cfg.resume:
        if last is None:
            log.warning("resume=true but %s has no complete checkpoint: starting from scratch", rd.checkpoints)
        else:
            log.info("resuming from %s", last)
            resume_from = last
    elif last is not None and is_main:
        log.warning("%s holds checkpoints of an earlier run; pass resume=true to continue from %s", rd.checkpoints, last)
    result = trainer.train(resume_from_checkpoint=resume_from)

    # 5. save (save_model gathers ZeRO-3 shards and writes on rank 0 only)
    trainer.save_model(str(rd.model))
    logged = [h for h in trainer.state.log_history if "loss" in h]
    losses = [h["loss"] for h in logged]
    summary = {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": fp,
        "mode": str(tc.mode),
        "base_model": materialize(spec, cfg.cache_dir),
        "model": spec.name,
        "precision": precision,
        "world_size": world_size(),
        "deepspeed_stage": (ds_cfg or {}).get("zero_optimization", {}).get("stage"),
        "resumed_from": resume_from,
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "steps_run": _CountSteps.steps_run,
        "losses": losses,
        "loss_steps": [h["step"] for h in logged],
        "seconds": round(time.time() - t0, 2),
        **run_stats,
    }
    if is_main:
        tok.save_pretrained(str(rd.model))
        write_json(rd.training_summary, summary)
        log.info(
            "train: %d steps, loss %.4f -> %.4f, model -> %s",
            trainer.state.global_step,
            losses[0] if losses else float("nan"),
            losses[-1] if losses else float("nan"),
            rd.model,
        )
        if "wandb" in report_to:
            import wandb

            if wandb.run is not None:
                wandb.run.summary.update({"train/steps_run": _CountSteps.steps_run})
                wandb.finish()
    return summary
