"""Masked SFT on the selected steps: trajectories.jsonl + selection.jsonl -> model/ (+ checkpoints/).

A recipe in torchtune's style: `MaskedSFTRecipe` is the train stage as named steps, each small and usable on
its own, and `run_training` runs them in the order a run happens:

    setup_tokenizer -> setup_data (masked examples) -> setup_model (LoRA or full) -> setup_trainer
    (the transformers Trainer, DeepSpeed when configured) -> train (resuming when asked) -> save

The benchmarks of experiments/bench/ build their runs with these same steps (and time `train`), so what they
measure is this code, not a copy of it. The options are `train.*` (train/options.py: ours, and transformers'
TrainingArguments under their own names).

The loss is the mean over supervised tokens of the whole optimizer step: the Trainer counts the
supervised tokens of all micro-batches of a step (across ranks too) and the model's causal-LM loss
divides the summed token losses by that count, so a long selected step weighs as many tokens as it has,
whatever the batch layout. With token weights (`train.step_weights=score`, or data weights other than 1)
the same holds with weights for counts: `sum(w * nll)` over the total weight of the optimizer step
(`WeightedLossTrainer`, train/hf_trainer.py, and `weighted_loss`, train/loss.py); with all weights 1 that
is the same mean.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from atlas_exp.artifacts import SCHEMA_VERSION, file_fingerprint, fingerprint, summary_matches, write_json
from atlas_exp.config import plain
from atlas_exp.device import get_precision
from atlas_exp.errors import AtlasError, ConfigError
from atlas_exp.models import ModelSpec, load_model, load_tokenizer, materialize
from atlas_exp.run_dir import RunDir
from atlas_exp.train.options import check_train_options, training_arguments

log = logging.getLogger(__name__)

#: what `train.mode` may be
MODES = ("lora", "full")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))




def train_fingerprint(cfg: DictConfig, rd: RunDir) -> str:
    return fingerprint(
        "train",
        SCHEMA_VERSION,
        file_fingerprint(rd.trajectories),
        file_fingerprint(rd.selection),
        plain(cfg.model),
        plain(cfg.train),
        plain(cfg.deepspeed),
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
    found = []
    for p in folder.glob("checkpoint-*"):
        suffix = p.name.split("-", 1)[1]
        if suffix.isdigit() and (p / "trainer_state.json").exists():
            found.append((int(suffix), p))
    return str(max(found)[1]) if found else None


@dataclass
class MaskedData:
    """The training set `setup_data` builds: one row per trajectory kept, `{"input_ids", "labels"}` plus
    `"weights"` when `weighted` (some label weighs other than 1: the weighted loss is used), and the masking
    statistics that go into training_summary.json."""

    rows: list[dict[str, Any]]
    stats: dict[str, Any]
    weighted: bool


class MaskedSFTRecipe:
    """The train stage of one run dir, as steps (see the module's docstring); `setup()` runs the setup steps
    and keeps what they build (`tokenizer`, `data`, `model`, `trainer`), `train()` and `save()` use it.

    The options are checked when the recipe is made, before anything is loaded. Only rank 0 writes artifacts.
    `progress`: show the masking progress bar (default: on rank 0).
    """

    def __init__(self, cfg: DictConfig, rd: RunDir, *, progress: bool | None = None):
        check_train_options(cfg.train)
        self.mode = str(cfg.train.mode)
        if self.mode not in MODES:
            raise ConfigError(f"train.mode={self.mode!r}; choose lora or full")
        if self.mode == "lora" and cfg.train.lora is None:
            raise ConfigError("train.mode=lora needs train.lora (r, alpha, dropout, target_modules)")
        self.cfg, self.rd = cfg, rd
        self.spec = ModelSpec.from_cfg(cfg.model)
        self.precision = get_precision(cfg.train.precision)
        self.is_main = rank() == 0
        self.progress = self.is_main if progress is None else progress
        self.started = time.time()
        self.fingerprint = train_fingerprint(cfg, rd)
        self.deepspeed_config = plain(cfg.deepspeed.config) if cfg.deepspeed.enabled else None
        self.tokenizer: Any = None
        self.data: MaskedData | None = None
        self.model: Any = None
        self.trainer: Any = None
        self.step_counter: Any = None  # setup_trainer's StepCounter
        self.resumed_from: str | None = None

    def setup(self) -> MaskedSFTRecipe:
        self.tokenizer = self.setup_tokenizer()
        self.data = self.setup_data(self.tokenizer)
        self.model = self.setup_model()
        self.trainer = self.setup_trainer(self.model, self.tokenizer, self.data)
        return self

    # ---------------------------------------------------------------------------------------- setup steps

    def setup_tokenizer(self) -> Any:
        return load_tokenizer(self.spec, self.cfg.cache_dir)

    def setup_data(self, tokenizer: Any) -> MaskedData:
        """Masked examples: the whole trajectory is the input, only the selected steps are supervised."""
        from atlas_exp.run_dir import read_selections, read_trajectories
        from atlas_exp.train.masking import build_examples

        options, rd = self.cfg.train, self.rd
        trajs = read_trajectories(rd.trajectories)
        sels = read_selections(rd.selection)
        if len(trajs) != len(sels):
            raise AtlasError(f"{rd.selection} has {len(sels)} lines for {len(trajs)} trajectories: rerun the select stage")
        step_weights = str(options.step_weights)
        examples, stats = build_examples(
            tokenizer,
            trajs,
            sels,
            max_length=int(options.max_length),
            on_empty=str(options.on_empty),
            truncate_after_last_selected=bool(options.truncate_after_last_selected),
            step_weights=step_weights,
            supervise=str(options.supervise),
            on_missing_part=str(options.on_missing_part),
            progress=self.progress,
        )
        if not examples:
            raise AtlasError("no trajectory has a supervised token to train on (all were skipped)")
        if stats.get("n_selected_tokens_lost", 0):
            log.warning("train: %d selected tokens were cut by max_length=%d (see training_summary.json)",
                        stats["n_selected_tokens_lost"], options.max_length)
        # token weights: the weighted loss as soon as any label weighs other than 1 (else the unweighted path)
        weighted = step_weights == "score" or any(e.weights is not None for e in examples)
        rows = [{"input_ids": e.input_ids, "labels": e.labels, **({"weights": e.weights} if weighted else {})}
                for e in examples]
        return MaskedData(rows=rows, stats=stats, weighted=weighted)

    def setup_base_model(self) -> Any:
        """The model to finetune, before any LoRA adapter. LoRA freezes the base, so it can sit in bf16; full
        finetuning keeps fp32 master weights (DeepSpeed or autocast does the bf16 compute)."""
        dtype = torch.bfloat16 if (self.mode == "lora" and self.precision == "bf16") else torch.float32
        model = load_model(self.spec, self.cfg.cache_dir, dtype=dtype)
        model.config.use_cache = False
        return model

    def lora_config(self) -> Any:
        """peft's LoraConfig from `train.lora`."""
        from peft import LoraConfig

        lora = self.cfg.train.lora
        target = lora.target_modules
        return LoraConfig(
            r=int(lora.r),
            lora_alpha=int(lora.alpha),
            lora_dropout=float(lora.dropout),
            target_modules=list(target) if OmegaConf.is_list(target) else str(target),
            task_type="CAUSAL_LM",
        )

    def setup_model(self) -> Any:
        """The base model, with a LoRA adapter in `train.mode=lora`. (Activation checkpointing, when asked, is
        switched on by the Trainer: `train.activation_checkpointing` is a TrainingArguments field.)"""
        model = self.setup_base_model()
        if self.mode == "lora":
            from peft import get_peft_model

            model = get_peft_model(model, self.lora_config())
        return model

    def training_arguments(self, report_to: list[str]) -> Any:
        """transformers' TrainingArguments: the config's (train/options.py), then what the run dir, the
        logger, DeepSpeed and this process decide."""
        from transformers import TrainingArguments

        kwargs = {
            # defaults the config may change
            "disable_tqdm": not self.is_main,
            "ddp_find_unused_parameters": False if world_size() > 1 else None,
            **training_arguments(self.cfg.train, precision=self.precision, seed=int(self.cfg.seed),
                                 use_cpu=not torch.cuda.is_available()),
            # set by other options (train/options.py refuses them under train)
            "output_dir": str(self.rd.checkpoints),
            "run_name": f"{self.cfg.experiment_name}/{self.rd.root.name}",
            "report_to": report_to,
            "deepspeed": self.deepspeed_config,
            "remove_unused_columns": False,
        }
        try:
            return TrainingArguments(**kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"train: transformers' TrainingArguments refuses these options: {e}") from None

    def setup_trainer(self, model: Any, tokenizer: Any, data: MaskedData) -> Any:
        """The Trainer over `data` with the masked collator, the loss the options ask for and our callbacks."""
        from transformers import Trainer

        from atlas_exp.train.collator import MaskedCollator, logits_positions_supported
        from atlas_exp.train.hf_trainer import RunStatsToWandb, StepCounter, WeightedLossTrainer
        from atlas_exp.train.loss import supervised_loss

        options = self.cfg.train
        args = self.training_arguments(_wandb_env(self.cfg, self.rd))
        supervised_only = bool(options.supervised_logits_only)
        collator = MaskedCollator(
            pad_token_id=tokenizer.pad_token_id,
            pack=bool(options.packing),
            supervised_logits_only=supervised_only,
            # supervised positions as integers (no boolean indexing, so no host sync, per micro-batch) where the
            # installed transformers takes them; else as a boolean mask (train/collator.py)
            logits_positions=supervised_only and logits_positions_supported(),
            weighted=data.weighted,
        )
        if data.weighted:
            trainer_cls, loss = WeightedLossTrainer, {}  # it brings its own loss
        else:
            # with logits only at supervised positions the model cannot compute its own loss; this is the same loss
            trainer_cls, loss = Trainer, {"compute_loss_func": supervised_loss if supervised_only else None}
        self.step_counter = StepCounter()
        return trainer_cls(
            model=model,
            args=args,
            train_dataset=data.rows,
            data_collator=collator,
            processing_class=tokenizer,
            callbacks=[RunStatsToWandb(self.cfg, self.run_stats(data)), self.step_counter],
            **loss,
        )

    def run_stats(self, data: MaskedData) -> dict[str, Any]:
        """The masking and selection figures of this run (W&B summary, training_summary.json)."""
        return {
            "n_examples": len(data.rows),
            **{f"data/{k}": v for k, v in data.stats.items()},
            **{f"selection/{k}": v for k, v in _selection_stats(self.rd).items()},
        }

    # ------------------------------------------------------------------------------------ train and save

    def checkpoint_to_resume(self) -> str | None:
        """With `resume=true`, the run dir's last complete checkpoint (None, with a warning, when it has none)."""
        last = last_complete_checkpoint(self.rd.checkpoints)
        if self.cfg.resume:
            if last is None:
                log.warning("resume=true but %s has no complete checkpoint: starting from scratch", self.rd.checkpoints)
            else:
                log.info("resuming from %s", last)
            return last
        if last is not None and self.is_main:
            log.warning("%s holds checkpoints of an earlier run; pass resume=true to continue from %s",
                        self.rd.checkpoints, last)
        return None

    def train(self) -> Any:
        """`trainer.train()`, resuming from the last complete checkpoint of this run dir when asked."""
        self.resumed_from = self.checkpoint_to_resume()
        return self.trainer.train(resume_from_checkpoint=self.resumed_from)

    def save(self, result: Any) -> dict[str, Any]:
        """model/ (`save_model` gathers ZeRO-3 shards and writes on rank 0 only), the tokenizer and
        training_summary.json; returns the summary."""
        trainer = self.trainer
        trainer.save_model(str(self.rd.model))
        logged = [h for h in trainer.state.log_history if "loss" in h]
        losses = [h["loss"] for h in logged]
        summary = {
            "schema_version": SCHEMA_VERSION,
            "fingerprint": self.fingerprint,
            "mode": self.mode,
            "base_model": materialize(self.spec, self.cfg.cache_dir),
            "model": self.spec.name,
            "precision": self.precision,
            "world_size": world_size(),
            "deepspeed_stage": (self.deepspeed_config or {}).get("zero_optimization", {}).get("stage"),
            "resumed_from": self.resumed_from,
            "global_step": trainer.state.global_step,
            "train_loss": result.training_loss,
            "steps_run": self.step_counter.steps_run,
            "losses": losses,
            "loss_steps": [h["step"] for h in logged],
            "seconds": round(time.time() - self.started, 2),
            **self.run_stats(self.data),
        }
        if self.is_main:
            self.tokenizer.save_pretrained(str(self.rd.model))
            write_json(self.rd.training_summary, summary)
            log.info("train: %d steps, loss %.4f -> %.4f, model -> %s", trainer.state.global_step,
                     losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"), self.rd.model)
            if "wandb" in trainer.args.report_to:
                import wandb

                if wandb.run is not None:
                    wandb.run.summary.update({"train/steps_run": self.step_counter.steps_run})
                    wandb.finish()
        return summary


def run_training(cfg: DictConfig, rd: RunDir) -> dict[str, Any]:
    """Train on this process (one rank of a torchrun job, or alone); returns the training summary."""
    recipe = MaskedSFTRecipe(cfg, rd).setup()
    result = recipe.train()
    return recipe.save(result)


def _wandb_env(cfg: DictConfig, rd: RunDir) -> list[str]:
    """Configure W&B through its environment variables (what the Trainer's callback reads); the Trainer's
    `report_to`."""
    logger = cfg.logger
    if str(logger.report_to) != "wandb":
        return []
    rd.logs.mkdir(parents=True, exist_ok=True)
    os.environ["WANDB_DIR"] = str(rd.logs)
    os.environ["WANDB_PROJECT"] = str(logger.project)
    os.environ["WANDB_MODE"] = str(logger.mode)
    if logger.entity:
        os.environ["WANDB_ENTITY"] = str(logger.entity)
    if logger.group:
        os.environ["WANDB_RUN_GROUP"] = str(logger.group)
    if logger.job_type:
        os.environ["WANDB_JOB_TYPE"] = str(logger.job_type)
    if logger.tags:
        os.environ["WANDB_TAGS"] = ",".join(map(str, logger.tags))
    os.environ.setdefault("WANDB_SILENT", "true")
    return ["wandb"]


def _selection_stats(rd: RunDir) -> dict[str, Any]:
    if rd.selection_summary.exists():
        s = json.loads(rd.selection_summary.read_text())
        return {k: s[k] for k in ("selector", "ratio", "achieved_ratio", "n_steps", "n_selected") if k in s}
    return {}
