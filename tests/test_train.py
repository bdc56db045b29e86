"""Masked finetuning end to end, run as a user runs it: `python -m atlas_exp ...` on real AgentTraj-L
records with the real SmolLM2-135M model, single process, 2-rank DeepSpeed ZeRO-2/3 on the CPU, and a
resume after a killed run; and the train options: transformers' TrainingArguments names, any of its fields
passed through, the names of before refused with the new one."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TEST_CACHE
from omegaconf import OmegaConf

# small, fast, and strong enough that the loss must fall on a handful of trajectories
FAST = [
    "selector=random",
    "ratio=0.5",
    "train.max_length=768",
    "train.per_device_train_batch_size=1",
    "train.gradient_accumulation_steps=1",
    "train.learning_rate=2e-3",
    "train.warmup_steps=0",
    "train.lr_scheduler_type=constant",
    "train.logging_steps=1",
    "train.save_steps=100",
]


@pytest.fixture(scope="module")
def short_textcraft(agenttraj_dir, tmp_path_factory) -> Path:
    """The 8 shortest real AgentTraj-L TextCraft records (about 400-450 tokens each), so that a CPU run
    of a dozen optimizer steps takes seconds, not minutes."""
    lines = (agenttraj_dir / "textcraft.jsonl").read_text().splitlines()
    f = tmp_path_factory.mktemp("data") / "textcraft.jsonl"
    f.write_text("\n".join(sorted(lines, key=len)[:8]) + "\n")
    return f


def run_app(run_dir: Path, *overrides: str, data: Path, n: int = 8, check: bool = True, extra_env=None):
    cmd = [
        sys.executable,
        "-m",
        "atlas_exp",
        f"run_dir={run_dir}",
        f"cache_dir={TEST_CACHE}",
        "data=local",
        f"data.path={data}",
        f"data.max_per_env={n}",
        *FAST,
        # the eval stage is tested in test_eval.py and once end to end below; here it would only cost time
        *([] if any(o.startswith(("eval", "policy")) for o in overrides) else ["eval=none"]),
        *overrides,
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **(extra_env or {})}
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nSTDOUT:\n{p.stdout[-4000:]}\nSTDERR:\n{p.stderr[-8000:]}")
    return p


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "model" / "training_summary.json").read_text())


def assert_loss_fell(s: dict) -> None:
    losses = s["losses"]
    assert len(losses) >= 6, losses
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    print(f"loss {first:.3f} -> {last:.3f} over {len(losses)} steps")
    assert last < 0.8 * first, losses


def assert_labels_cover_only_selected_steps(run_dir: Path, tokenizer) -> None:
    """Re-derive the supervised text from the artifacts: it is exactly the selected steps' content."""
    from atlas_exp.run_dir import read_selections, read_trajectories
    from atlas_exp.train.masking import build_example

    trajs = read_trajectories(run_dir / "trajectories.jsonl")
    sels = read_selections(run_dir / "selection.jsonl")
    for t, s in list(zip(trajs, sels))[:3]:
        ex = build_example(tokenizer, t, s, max_length=100_000)
        text = tokenizer.decode([tok for tok, lab in zip(ex.input_ids, ex.labels) if lab != -100])
        expected = "".join(t.steps[k].content + "<|im_end|>" for k in s.selected_steps)
        assert text == expected


@pytest.mark.slow
def test_lora_single_process_trains_on_selected_steps_and_reloads(tmp_path, short_textcraft, smollm2_tokenizer, smollm2_dir):
    rd = tmp_path / "run"
    run_app(rd, "train.max_steps=12", "logger=wandb",
            # stage=all ends with the eval stage: the trained adapter as the agent, a few short episodes
            "eval.tasks.textcraft.episodes.count=2", "eval.tasks.babyai.episodes.count=1",
            "eval.tasks.textcraft.max_turns=2", "eval.tasks.babyai.max_turns=2", "policy.max_new_tokens=32",
            "eval.tasks.sciworld.episodes.limit=1", "eval.tasks.sciworld.max_turns=1",
            data=short_textcraft)
    for name in ("trajectories.jsonl", "selection.jsonl", "selection_summary.json", "data_summary.json", ".hydra/config.yaml"):
        assert (rd / name).exists(), name
    s = summary(rd)
    assert s["global_step"] == 12 and s["mode"] == "lora"
    assert 0 < s["data/supervised_share"] < 1
    assert s["selection/selector"] == "random"
    assert_loss_fell(s)
    assert_labels_cover_only_selected_steps(rd, smollm2_tokenizer)
    # W&B offline run with our stats on it
    runs = list((rd / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    record = b"".join(r.read_bytes() for r in runs)
    for key in (b"data/supervised_share", b"selection/achieved_ratio", b"train/steps_run", b"loss"):
        assert key in record, key
    res = json.loads((rd / "eval" / "results.json").read_text())
    assert res["policy"]["adapter"] == str(rd / "model") and res["policy"]["model"] == "run"
    assert res["tasks"]["textcraft"]["n"] == 2 and res["tasks"]["babyai"]["n"] == 1 and res["tasks"]["sciworld"]["n"] == 1
    assert res["selection"]["selector"] == "random" and res["training"]["global_step"] == 12
    assert res["model"]["trained"]  # the eval is tied to these trained weights
    eval_runs = list((rd / "logs" / "wandb").glob("offline-run-*"))
    assert len(eval_runs) == 2  # the training run and the eval run

    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(rd / "model")
    adapter = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert adapter
    ids = smollm2_tokenizer("Thought:\nI need", return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()


@pytest.mark.slow
def test_rerun_of_a_finished_run_does_nothing(tmp_path, short_textcraft, smollm2_dir):
    rd = tmp_path / "run"
    run_app(rd, "train.max_steps=2", "logger=none", data=short_textcraft, n=4)
    before = {p: p.stat().st_mtime_ns for p in rd.rglob("*") if p.is_file() and ".hydra" not in p.parts}
    p = run_app(rd, "train.max_steps=2", "logger=none", data=short_textcraft, n=4)
    assert "up to date" in p.stdout + p.stderr
    after = {p: p.stat().st_mtime_ns for p in rd.rglob("*") if p.is_file() and ".hydra" not in p.parts and not p.name.endswith(".log")}
    assert all(before[k] == v for k, v in after.items() if k in before)


@pytest.mark.slow
def test_full_finetuning_saves_a_model_that_reloads(tmp_path, short_textcraft, smollm2_dir):
    rd = tmp_path / "run"
    run_app(rd, "train=full", "train.max_steps=8", "train.learning_rate=1e-4", "logger=none", data=short_textcraft, n=4)
    s = summary(rd)
    assert s["mode"] == "full"
    assert_loss_fell(s)
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(rd / "model")
    assert sum(p.numel() for p in m.parameters()) > 100_000_000


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_rank_deepspeed_on_cpu(tmp_path, short_textcraft, zero, smollm2_dir):
    rd = tmp_path / "run"
    run_app(
        rd,
        f"deepspeed={zero}",
        "launcher.nproc_per_node=2",
        "train.max_steps=8",
        "train.per_device_train_batch_size=1",
        "logger=none",
        data=short_textcraft,
    )
    s = summary(rd)
    assert s["world_size"] == 2 and s["deepspeed_stage"] == int(zero[-1])
    assert_loss_fell(s)
    # one run dir for both ranks: nothing else was created beside it
    assert sorted(x.name for x in tmp_path.iterdir()) == ["run"]
    adapter = rd / "model" / "adapter_model.safetensors"
    assert adapter.exists()
    from safetensors.torch import load_file

    weights = load_file(adapter)
    assert weights and all(v.numel() > 0 for v in weights.values()), {k: v.shape for k, v in weights.items()}
    from peft import AutoPeftModelForCausalLM

    AutoPeftModelForCausalLM.from_pretrained(rd / "model")


@pytest.mark.slow
def test_resume_after_a_killed_run_continues_from_its_last_checkpoint(tmp_path, short_textcraft, smollm2_dir):
    rd = tmp_path / "run"
    args = ["train.max_steps=8", "train.save_steps=2", "logger=none"]
    cmd = [
        sys.executable, "-m", "atlas_exp", f"run_dir={rd}", f"cache_dir={TEST_CACHE}", "data=local",
        f"data.path={short_textcraft}", "data.max_per_env=8", *FAST, *args,
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not (rd / "checkpoints" / "checkpoint-4" / "trainer_state.json").exists():
            assert proc.poll() is None, "the run ended before it could be interrupted"
            assert time.time() < deadline
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (rd / "model" / "training_summary.json").exists()

    run_app(rd, *args, "resume=true", data=short_textcraft)
    s = summary(rd)
    assert s["resumed_from"] is not None
    resumed_at = int(Path(s["resumed_from"]).name.split("-")[1])
    assert resumed_at >= 4
    assert s["global_step"] == 8
    # only the steps after the checkpoint were trained again, and the loss log is continuous
    assert s["steps_run"] == 8 - resumed_at
    assert s["loss_steps"] == list(range(1, 9))


# ------------------------------------------------------------------------------------------------------------
# the train options: transformers' TrainingArguments names, any of its fields, the old names refused


def _recipe(tmp_path: Path, *overrides: str):
    """A recipe over the run dir `tmp_path`, empty unless it has data (its options and TrainingArguments need none)."""
    from atlas_exp.config import compose
    from atlas_exp.run_dir import RunDir
    from atlas_exp.train.trainer import MaskedSFTRecipe

    for name in ("trajectories.jsonl", "selection.jsonl"):
        if not (tmp_path / name).exists():
            (tmp_path / name).write_text("")
    return MaskedSFTRecipe(compose(["logger=none", *overrides]), RunDir(tmp_path))


@pytest.mark.parametrize("old", ["lr", "epochs", "per_device_batch_size", "grad_accum", "lr_scheduler", "warmup_ratio",
                                 "group_by_length", "gradient_checkpointing", "gradient_checkpointing_kwargs"])
def test_an_option_name_of_before_is_refused_with_the_name_that_replaced_it(old):
    from atlas_exp.config import compose
    from atlas_exp.errors import ConfigError
    from atlas_exp.train.options import RENAMED, check_train_options, training_arguments_fields

    new = RENAMED[old][0]
    assert new in training_arguments_fields()  # the new name is transformers' own
    with pytest.raises(ConfigError, match=rf"^train\.{old} is now train\.{new}, transformers' TrainingArguments name: "
                                          rf"set train\.{new}="):
        check_train_options(compose([f"+train.{old}=1"]).train)


def test_an_old_name_in_a_preset_stops_the_training_before_it_loads_anything(tmp_path):
    """Not silently ignored (a preset's `train: {lr: ...}` composes without a `+`): refused first thing."""
    from atlas_exp.config import compose
    from atlas_exp.errors import ConfigError
    from atlas_exp.run_dir import RunDir
    from atlas_exp.train.options import check_train_options
    from atlas_exp.train.trainer import run_training

    preset_train = {**OmegaConf.to_container(compose([]).train), "grad_accum": 8}
    with pytest.raises(ConfigError, match=r"^train\.grad_accum is now train\.gradient_accumulation_steps, .*"
                                          r"set train\.gradient_accumulation_steps=8$"):
        check_train_options(preset_train)
    # an empty run dir: were the options checked after anything else, this would be another error
    with pytest.raises(ConfigError, match=r"^train\.lr is now train\.learning_rate, .* set train\.learning_rate=0\.0001$"):
        run_training(compose(["+train.lr=1e-4"]), RunDir(tmp_path))


def test_an_old_name_on_the_command_line_is_refused_with_the_new_name_before_hydra():
    from atlas_exp.errors import ConfigError
    from atlas_exp.train.options import check_override_names

    with pytest.raises(ConfigError, match=r"^train\.grad_accum is now train\.gradient_accumulation_steps, .* "
                                          r"set train\.gradient_accumulation_steps=8$"):
        check_override_names(["ratio=0.3", "train.grad_accum=8"])
    with pytest.raises(ConfigError, match=r"^train\.seed is not set under train: it comes from seed=N"):
        check_override_names(["+train.seed=3"])
    # current names, fields to add with `+`, and other groups' keys are Hydra's business
    check_override_names(["train.learning_rate=1e-4", "+train.adam_beta2=0.9", "train.lora.r=8", "data.max_steps=3",
                          "selector.lr=1"])


@pytest.mark.parametrize("key, where", [("seed", "seed=N"), ("bf16", "train.precision=bf16"), ("deepspeed", "deepspeed=<"),
                                        ("output_dir", "run_dir="), ("report_to", "logger=wandb|none"),
                                        ("resume_from_checkpoint", "resume=true")])
def test_a_training_argument_another_option_sets_is_refused_with_that_option(key, where):
    from atlas_exp.config import compose
    from atlas_exp.errors import ConfigError
    from atlas_exp.train.options import check_train_options

    with pytest.raises(ConfigError, match=rf"^train\.{key} is not set under train: it comes from {re.escape(where)}"):
        check_train_options(compose([f"+train.{key}=1"]).train)


def test_an_unknown_option_is_refused_with_the_closest_names():
    from atlas_exp.config import compose
    from atlas_exp.errors import ConfigError
    from atlas_exp.train.options import check_train_options

    with pytest.raises(ConfigError, match=r"^train\.lerning_rate: not an atlas_exp train option nor a field of "
                                          r"transformers' TrainingArguments; did you mean train\.learning_rate( or [\w. ]+)?\?$"):
        check_train_options(compose(["+train.lerning_rate=1e-4"]).train)
    with pytest.raises(ConfigError, match=r"^train\.zzz: not an atlas_exp train option nor a field of transformers' "
                                          r"TrainingArguments$"):
        check_train_options(compose(["+train.zzz=1"]).train)


def test_every_train_config_and_preset_uses_only_current_names():
    from atlas_exp.config import CONF_DIR, compose, group_options
    from atlas_exp.train.options import OUR_OPTIONS, check_train_options, training_arguments_fields

    configs = [compose([f"train={t}"]) for t in group_options("train")]
    configs += [compose([f"experiment={p}"]) for p in group_options("experiment")]
    for cfg in configs:
        check_train_options(cfg.train)
    fields = training_arguments_fields()
    assert {k for cfg in configs for k in cfg.train} - OUR_OPTIONS <= fields
    assert not OUR_OPTIONS & fields  # ours never shadow one of transformers' names
    assert (CONF_DIR / "train" / "lora.yaml").exists()


def test_the_default_options_reach_the_training_arguments_as_before(tmp_path):
    args = _recipe(tmp_path).training_arguments([])
    assert (args.learning_rate, args.num_train_epochs, args.max_steps) == (2e-4, 1, -1)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (1, 4)
    assert (str(args.lr_scheduler_type.value), args.warmup_steps, args.weight_decay, args.max_grad_norm) == ("cosine", 0.03, 0.0, 1.0)
    assert (args.train_sampling_strategy, args.activation_checkpointing) == ("random", False)
    assert (args.logging_steps, args.save_steps, args.save_total_limit, str(args.save_strategy.value)) == (1, 50, 2, "steps")
    assert (args.seed, args.bf16, args.fp16, args.remove_unused_columns, args.report_to) == (42, False, False, False, [])
    assert args.output_dir == str(tmp_path / "checkpoints") and args.dataloader_num_workers == 0
    full = _recipe(tmp_path, "train=full").training_arguments([])
    assert (full.learning_rate, full.num_train_epochs) == (1e-5, 3)


def test_any_other_training_argument_passes_through_and_a_bad_value_names_the_options(tmp_path):
    from atlas_exp.errors import ConfigError

    args = _recipe(tmp_path, "+train.adam_beta2=0.95", "+train.optim=adafactor", "seed=7",
                   "train.train_sampling_strategy=group_by_length").training_arguments([])
    assert (args.adam_beta2, str(args.optim.value), args.seed, args.train_sampling_strategy) == (
        0.95, "adafactor", 7, "group_by_length")
    with pytest.raises(ConfigError, match=r"^train: transformers' TrainingArguments refuses these options: .*bogus"):
        _recipe(tmp_path, "+train.optim=bogus").training_arguments([])


@pytest.mark.slow
def test_the_recipe_steps_train_a_lora_model_with_activation_checkpointing(tmp_path, agenttraj_dir, smollm2_dir):
    """The steps as a benchmark calls them (experiments/bench/common.py), one optimizer step; the Trainer
    switches activation checkpointing on (`train.activation_checkpointing`, a TrainingArguments field)."""
    from helpers import read_agentgym

    from atlas_exp.artifacts import write_jsonl
    from atlas_exp.selectors.random_steps import RandomSelector

    trajs = sorted(read_agentgym(agenttraj_dir / "textcraft.jsonl", limit=40), key=lambda t: len(str(t.to_dict())))[:2]
    write_jsonl(tmp_path / "trajectories.jsonl", [t.to_dict() for t in trajs])
    write_jsonl(tmp_path / "selection.jsonl", [s.to_dict() for s in RandomSelector(ratio=0.5, seed=0).select(trajs)])
    recipe = _recipe(tmp_path, f"cache_dir={TEST_CACHE}", "train.activation_checkpointing=true", "train.max_steps=1",
                     "train.gradient_accumulation_steps=1", "train.save_steps=100")
    recipe.setup()
    assert len(recipe.data.rows) == 2 and not recipe.data.weighted and recipe.data.stats["n_supervised_tokens"] > 0
    assert not recipe.model.is_activation_checkpointing
    result = recipe.train()
    assert recipe.model.is_activation_checkpointing and recipe.trainer.state.global_step == 1
    summary = recipe.save(result)
    assert summary["steps_run"] == 1 and summary["n_examples"] == 2 and (tmp_path / "model" / "adapter_model.safetensors").exists()
