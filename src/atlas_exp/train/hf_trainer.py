"""What the train stage adds to the transformers Trainer: the weighted-loss subclass and two callbacks.

Kept apart from the recipe (train/trainer.py) because importing transformers costs seconds: the recipe imports
this module only when it builds a Trainer, so that checking whether a run is up to date does not pay for it.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import Trainer, TrainerCallback

from atlas_exp.train.loss import weighted_loss


class WeightedLossTrainer(Trainer):
    """A Trainer normalising the loss by the total label weight of an optimizer step, not its token count.

    The Trainer counts the supervised tokens of all micro-batches of a step (`get_batch_samples`, summed over
    ranks when it averages tokens across devices) and hands that count to the loss; here the same place
    sums the collator's `label_weights` instead. `compute_loss` takes the weights out of the inputs (the
    model must not see them) for `weighted_loss`, and leaves everything else (gradient-accumulation and
    multi-rank scaling) to the Trainer.
    """

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


class StepCounter(TrainerCallback):
    """Counts the optimizer steps this process actually ran (a resumed run skips the finished ones)."""

    def __init__(self) -> None:
        self.steps_run = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps_run += 1


class RunStatsToWandb(TrainerCallback):
    """Puts the run's config and its supervised-token share and selection stats on the W&B run (config and
    summary), when W&B is the reporting backend (the config is resolved only then)."""

    def __init__(self, config: DictConfig, run_stats: dict[str, Any]):
        self.config = config
        self.run_stats = run_stats

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and "wandb" in args.report_to:
            import wandb

            if wandb.run is not None:
                wandb.run.config.update({"atlas": OmegaConf.to_container(self.config, resolve=True)}, allow_val_change=True)
                wandb.run.summary.update(self.run_stats)
