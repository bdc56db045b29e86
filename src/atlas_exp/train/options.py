"""The `train.*` options: ours, and Hugging Face TrainingArguments' under their own names.

`conf/train/*.yaml` holds two kinds of keys. Ours (`OUR_OPTIONS`) decide what is learned from a trajectory
and how the model is wrapped: the masking, batching, loss and LoRA options no library has. Every other key is a
field of transformers' `TrainingArguments` under its own name (`learning_rate`, `num_train_epochs`,
`per_device_train_batch_size`, ...), handed to it as it is, as TRL's `SFTConfig` does: the names a Hugging Face
user already knows, and any field of `TrainingArguments` can be set, e.g. `+train.adam_beta2=0.95` on the command
line (the `+` adds a key the config file does not list) or `adam_beta2: 0.95` under `train:` in a preset.

Refused, each as a ConfigError naming the option before anything is trained (`check_train_options`; on the
command line, before Hydra composes, `check_override_names`):

* the names of before (`train.lr`, `train.grad_accum`, ...): with the name that replaced them (`RENAMED`), so
  that an old preset or command line is never silently half-applied;
* TrainingArguments fields another option sets (`SET_ELSEWHERE`): `seed`, the precision flags, DeepSpeed,
  reporting, where checkpoints go, resuming;
* anything else: not ours, not a TrainingArguments field (with the closest names).
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from typing import Any

from omegaconf import DictConfig

from atlas_exp.config import plain
from atlas_exp.errors import ConfigError

#: the train options that are atlas_exp's own (no TrainingArguments field has these names)
OUR_OPTIONS = frozenset({
    "mode",                          # lora | full
    "lora",                          # r, alpha, dropout, target_modules (peft's LoraConfig)
    "max_length",                    # tokens; truncation keeps the beginning
    "precision",                     # auto | bf16 | fp16 | fp32 (sets TrainingArguments' bf16 / fp16)
    "packing",                       # a micro-batch as one row, attention kept within each sequence
    "supervised_logits_only",        # vocabulary projection only where the next token is supervised
    "on_empty",                      # a trajectory left with no supervised token: error | skip
    "truncate_after_last_selected",  # drop the tokens after the last selected step
    "step_weights",                  # binary | score
    "supervise",                     # step | thought | action
    "on_missing_part",               # error | skip
})

#: earlier names of options -> (the TrainingArguments name that replaced each, what to write instead)
RENAMED: dict[str, tuple[str, str]] = {
    "lr": ("learning_rate", "train.learning_rate={value}"),
    "epochs": ("num_train_epochs", "train.num_train_epochs={value}"),
    "per_device_batch_size": ("per_device_train_batch_size", "train.per_device_train_batch_size={value}"),
    "grad_accum": ("gradient_accumulation_steps", "train.gradient_accumulation_steps={value}"),
    "lr_scheduler": ("lr_scheduler_type", "train.lr_scheduler_type={value}"),
    # transformers 5 folded warmup_ratio into warmup_steps: a value below 1 is a share of the total steps
    "warmup_ratio": ("warmup_steps", "train.warmup_steps={value} (a value below 1 is a share of the total steps)"),
    # ... and group_by_length into the sampler choice
    "group_by_length": ("train_sampling_strategy",
                        "train.train_sampling_strategy=group_by_length (false: random, the default)"),
    # transformers 5 deprecates these two (aliases until v6); the new names say the same
    "gradient_checkpointing": ("activation_checkpointing", "train.activation_checkpointing={value}"),
    "gradient_checkpointing_kwargs": ("activation_checkpointing_kwargs", "train.activation_checkpointing_kwargs=..."),
}

#: TrainingArguments fields that another option decides -> that option
SET_ELSEWHERE: dict[str, str] = {
    "output_dir": "run_dir=... (checkpoints go to <run_dir>/checkpoints)",
    "run_name": "experiment_name=... (the run is named <experiment_name>/<run dir name>)",
    "report_to": "logger=wandb|none",
    "deepspeed": "deepspeed=<zero2|zero3|zero3_offload|none>",
    "seed": "seed=N (one seed for the whole run)",
    "bf16": "train.precision=bf16",
    "fp16": "train.precision=fp16",
    "use_cpu": "the device (a GPU when one is visible; CUDA_VISIBLE_DEVICES= trains on the CPU)",
    "resume_from_checkpoint": "resume=true (continues from the run dir's last complete checkpoint)",
    "local_rank": "launcher.nproc_per_node=N (the app starts its own ranks)",
    "remove_unused_columns": "nothing: the collator reads every column of its rows, so it is always false",
    "eval_strategy": "the eval stage (eval=...): the train stage has no evaluation set",
}


@lru_cache(maxsize=1)
def training_arguments_fields() -> frozenset[str]:
    """The names `transformers.TrainingArguments(...)` takes (its dataclass fields)."""
    import dataclasses

    from transformers import TrainingArguments

    return frozenset(f.name for f in dataclasses.fields(TrainingArguments) if f.init)




def check_train_options(train: DictConfig | dict[str, Any]) -> None:
    """Refuse a train option that is an earlier name, set by another option, or unknown (one ConfigError, the
    first such key in the config's order, naming what to write instead)."""
    fields = training_arguments_fields()
    for key, value in plain(train).items():
        if key in OUR_OPTIONS:
            continue
        if key in RENAMED:
            new, hint = RENAMED[key]
            raise ConfigError(f"train.{key} is now train.{new}, transformers' TrainingArguments name: "
                              f"set {hint.format(value=_shown(value))}")
        if key in SET_ELSEWHERE:
            raise ConfigError(f"train.{key} is not set under train: it comes from {SET_ELSEWHERE[key]}")
        if key not in fields:
            close = [f"train.{c}" for c in difflib.get_close_matches(key, sorted(OUR_OPTIONS | fields), n=3, cutoff=0.7)]
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(f"train.{key}: not an atlas_exp train option nor a field of transformers' "
                              f"TrainingArguments{hint}")


def check_override_names(overrides: list[str]) -> None:
    """Command-line overrides `train.<name of before>=...` or `train.<field another option sets>=...` refused as
    `check_train_options` refuses them. Hydra would refuse them first, as keys the config does not have, with
    advice to add them with a `+` (which `check_train_options` would then refuse): this says what to write instead
    at once. Other keys are left to Hydra (for a TrainingArguments field, `+train.<field>=...` is the right advice)."""
    for override in overrides:
        key, _, value = override.partition("=")
        parts = key.lstrip("+~").split(".")
        if len(parts) == 2 and parts[0] == "train" and (parts[1] in RENAMED or parts[1] in SET_ELSEWHERE):
            check_train_options({parts[1]: value})


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def training_arguments(train: DictConfig | dict[str, Any], *, precision: str, seed: int, use_cpu: bool) -> dict[str, Any]:
    """The TrainingArguments keyword arguments the config decides: every `train.*` key that is not ours, as it
    is, plus the precision flags (from `train.precision`, resolved), the device and the run's seed.

    One definition for the trainer and for the benchmarks that compare it with other trainers
    (experiments/bench/train_throughput.py hands the same values to TRL's SFTConfig), so that a comparison is
    fair by construction. Where checkpoints go and what is reported are the trainer's own business.
    """
    check_train_options(train)
    passed = {k: v for k, v in plain(train).items() if k not in OUR_OPTIONS}
    return {**passed, "bf16": precision == "bf16", "fp16": precision == "fp16", "use_cpu": use_cpu, "seed": int(seed)}
