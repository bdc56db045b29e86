"""Masked finetuning end to end, run as a user runs it: `python -m atlas_exp ...` on real AgentTraj-L
records with the real SmolLM2-135M model, single process, 2-rank DeepSpeed ZeRO-2/3 on the CPU, and a
resume after a killed run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TEST_CACHE

pytestmark = pytest.mark.slow

# small, fast, and strong enough that the loss must fall on a handful of trajectories
FAST = [
    "selector=random",
    "ratio=0.5",
    "train.max_length=768",
    "train.per_device_batch_size=1",
    "train.grad_accum=1",
    "train.lr=2e-3",
    "train.warmup_ratio=0",
    "train.lr_scheduler=constant",
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


def test_rerun_of_a_finished_run_does_nothing(tmp_path, short_textcraft, smollm2_dir):
    rd = tmp_path / "run"
    run_app(rd, "train.max_steps=2", "logger=none", data=short_textcraft, n=4)
    before = {p: p.stat().st_mtime_ns for p in rd.rglob("*") if p.is_file() and ".hydra" not in p.parts}
    p = run_app(rd, "train.max_steps=2", "logger=none", data=short_textcraft, n=4)
    assert "up to date" in p.stdout + p.stderr
    after = {p: p.stat().st_mtime_ns for p in rd.rglob("*") if p.is_file() and ".hydra" not in p.parts and not p.name.endswith(".log")}
    assert all(before[k] == v for k, v in after.items() if k in before)


def test_full_finetuning_saves_a_model_that_reloads(tmp_path, short_textcraft, smollm2_dir):
    rd = tmp_path / "run"
    run_app(rd, "train=full", "train.max_steps=8", "train.lr=1e-4", "logger=none", data=short_textcraft, n=4)
    s = summary(rd)
    assert s["mode"] == "full"
    assert_loss_fell(s)
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(rd / "model")
    assert sum(p.numel() for p in m.parameters()) > 100_000_000


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_rank_deepspeed_on_cpu(tmp_path, short_textcraft, zero, smollm2_dir):
    rd = tmp_path / "run"
    run_app(
        rd,
        f"deepspeed={zero}",
        "launcher.nproc_per_node=2",
        "train.max_steps=8",
        "train.per_device_batch_size=1",
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
