"""Experiment presets compose with the settings they promise; sweeps are planned, run, and rerun for free."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEST_CACHE

from atlas_exp.config import CONF_DIR, compose
from atlas_exp.plan import format_plan, plan

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def test_every_preset_is_tested_here():
    assert set(PRESETS) == {"paper_main", "paper_mistral", "paper_qwen", "paper_judge_llama70b", "ablation_ratio", "cpu_small",
                            "cpu_textcraft"} | {p for p in PRESETS if p.startswith("gpu_")}


@pytest.mark.parametrize(
    "preset, model, selector, mode, zero, ranks",
    [
        ("paper_main", "meta-llama/Llama-3.1-8B-Instruct", "oracle.OracleSelector", "full", 3, 8),
        ("paper_mistral", "mistralai/Mistral-7B-Instruct-v0.3", "oracle.OracleSelector", "full", 3, 8),
        ("paper_qwen", "Qwen/Qwen2.5-7B-Instruct", "oracle.OracleSelector", "full", 3, 8),
        ("paper_judge_llama70b", "meta-llama/Llama-3.1-8B-Instruct", "oracle.OracleSelector", "full", 3, 8),
        ("ablation_ratio", "meta-llama/Llama-3.1-8B-Instruct", "oracle.OracleSelector", "full", 3, 8),
    ],
)
def test_paper_presets(preset, model, selector, mode, zero, ranks):
    c = compose([f"experiment={preset}"])
    assert c.experiment_name == preset  # the preset's values win over config.yaml's
    assert c.model.name_or_path == model
    assert c.selector._target_.endswith(selector) and c.ratio == 0.3
    assert c.data.sources[0].name == "AgentGym/AgentTraj-L"
    assert c.train.mode == mode and c.train.learning_rate == 1e-5 and c.train.num_train_epochs == 3 and c.train.max_length == 4096
    assert c.deepspeed.enabled and c.deepspeed.config.zero_optimization.stage == zero
    assert c.launcher.nproc_per_node == ranks
    assert c.selector.client.model == ("meta-llama/Llama-3.1-70B-Instruct" if "70b" in preset else "gpt-4o")
    splits = {t.split for t in c.eval.tasks.values()}
    assert splits == {"held_in", "held_out"}
    assert c.eval.tasks.alfworld.env.split == "valid_train" and c.eval.tasks.alfworld.episodes.count == 200
    assert c.eval.tasks.sciworld.metric == "score"


def test_cpu_small_preset():
    c = compose(["experiment=cpu_small"])
    assert c.model.name == "smollm2_135m" and c.train.mode == "lora" and not c.deepspeed.get("enabled")
    assert c.data.sources[0].n == 200 and c.data.sources[0].seed == 0  # same data for every seed
    # trained on TextCraft only: the other envs are held out, as in the paper's sense of the word; held-out
    # expert trajectories scored teacher-forced are the offline split
    assert {k: t.split for k, t in c.eval.tasks.items()} == {
        "textcraft": "held_in", "babyai": "held_out", "sciworld": "held_out", "textcraft_steps": "offline"}
    steps = c.eval.tasks.textcraft_steps
    assert steps.kind == "expert_steps" and steps.trajectories.seed != c.data.sources[0].seed
    # the oracle row: the frontier judge's replies for exactly these trajectories, asked once at the 0.5 cap
    oracle = compose(["experiment=cpu_small", "selector=oracle", "ratio=0.1"]).selector
    assert oracle.judge_ratio == 0.5 and list(oracle.batch.read) == ["../shared/data/judge/cpu_small.batch_output.jsonl"]
    base = compose(["experiment=cpu_small", "selector=non_critical_oracle"]).selector.base
    assert base.judge_ratio == 0.5 and len(base.batch.read) == 1


def test_cpu_textcraft_preset():
    """Real AgentTraj-L TextCraft with the judge's row: one split for every run and seed, its held-out part
    scored offline, TextCraft episodes held-in and BabyAI held-out."""
    c = compose(["experiment=cpu_textcraft", "selector=non_critical_oracle"])
    assert c.data.path.endswith("agenttraj_l/textcraft.jsonl") and c.data.split_seed == 0 and c.data.val_size == 40
    assert c.selector.base.judge_ratio == 0.5 and list(c.selector.base.batch.read) == [
        "../shared/data/judge/textcraft.batch_output.jsonl"]
    tasks = {k: t for k, t in c.eval.tasks.items() if t is not None}
    assert {k: t.split for k, t in tasks.items()} == {"textcraft": "held_in", "babyai": "held_out", "textcraft_steps": "offline"}
    # resolved in the job, to the run dir Hydra gives it
    assert tasks["textcraft_steps"].trajectories._get_node("paths")._value() == "${hydra:runtime.output_dir}/val_trajectories.jsonl"


def test_a_judge_ratio_below_the_ratio_is_refused(tmp_path):
    p = subprocess.run([sys.executable, "-m", "atlas_exp", "stage=select", f"run_dir={tmp_path}", "selector=oracle",
                        "judge_ratio=0.1", "ratio=0.3"], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 2 and "judge_ratio=0.1 is below ratio=0.3" in p.stderr or "run the data stage first" in p.stderr


def test_ablation_plan_is_the_papers_grid(tmp_path):
    runs, multirun = plan(["experiment=ablation_ratio", f"hydra.sweep.dir={tmp_path}"])
    assert multirun and len(runs) == 20
    grid = {(r.selector.split("(")[0], r.ratio) for r in runs}
    assert grid == {(s, x) for s in ("OracleSelector", "PerplexitySelector", "RandomSelector", "NonCriticalSelector")
                    for x in (0.1, 0.2, 0.3, 0.5)} | {("PerplexitySelector", x) for x in (0.1, 0.2, 0.3, 0.5)}
    assert {r.selector for r in runs if r.selector.startswith("NonCritical")} == {"NonCriticalSelector(OracleSelector)"}
    assert all(r.ranks == 8 and r.deepspeed == "zero3" and r.status == "todo" for r in runs)
    assert len({r.run_dir for r in runs}) == 20
    (all_run,), _ = plan(["experiment=ablation_ratio", "selector=all", "ratio=1.0", f"hydra.sweep.dir={tmp_path}"])
    assert all_run.run_dir == tmp_path / "ratio=1.0,selector=all" and all_run.ratio == 1.0
    assert "20 run(s): 0 done" in format_plan(runs)


def test_plan_errors_name_the_override():
    p = subprocess.run([sys.executable, "-m", "atlas_exp.plan", "selector=bogus"], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 2 and "selector/bogus" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_tiny_sweep_runs_where_planned_and_a_rerun_does_no_work(tmp_path):
    """A real two-run multirun of the cpu_small preset, shrunk to seconds: each run lands in the directory
    the plan names and gets a results.json; relaunching the finished sweep skips every stage of every run."""
    sweep = tmp_path / "sweep"
    args = [
        "experiment=cpu_small", f"hydra.sweep.dir={sweep}", f"cache_dir={TEST_CACHE}", "logger=none",
        "selector=random,all", "ratio=0.5", "seed=1",
        "data.sources.0.n=3", "train.max_steps=1", "train.save_steps=1",
        "eval.tasks.textcraft.episodes.count=1", "eval.tasks.babyai.episodes.count=1",
        "eval.tasks.textcraft.max_turns=1", "eval.tasks.babyai.max_turns=1", "policy.max_new_tokens=8",
        "eval.tasks.sciworld.episodes.limit=1", "eval.tasks.sciworld.max_turns=1",
        "eval.tasks.textcraft_steps.trajectories.n=2", "eval.tasks.textcraft_steps.episodes.count=1",
    ]
    runs, multirun = plan(args)
    assert multirun and [r.status for r in runs] == ["todo", "todo"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    p = subprocess.run([sys.executable, "-m", "atlas_exp", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=1200)
    assert p.returncode == 0, p.stderr[-4000:]
    runs, _ = plan(args)
    assert [r.status for r in runs] == ["done", "done"]
    for r in runs:
        res = json.loads((r.run_dir / "eval" / "results.json").read_text())
        assert res["selection"]["selector"] in ("random", "all") and set(res["tasks"]) == {"textcraft", "babyai", "sciworld", "textcraft_steps"}
    watched = [f for r in runs for f in r.run_dir.rglob("*") if f.is_file() and ".hydra" not in f.parts and f.suffix != ".log"]
    before = {f: f.stat().st_mtime_ns for f in watched}
    p = subprocess.run([sys.executable, "-m", "atlas_exp", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=1200)
    assert p.returncode == 0, p.stderr[-4000:]
    out = p.stdout + p.stderr
    for stage in ("data", "select", "eval"):
        assert out.count(f"{stage}: ") >= 2 and "up to date, skipping" in out
    assert before == {f: f.stat().st_mtime_ns for f in watched}  # nothing was recomputed or rewritten


def test_slurm_launcher_preset_holds_the_gpus_of_the_torchrun_ranks():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        c = hydra_compose("config", overrides=["experiment=ablation_ratio", "hydra/launcher=slurm_gpu",
                                               "launcher.nproc_per_node=4"], return_hydra_config=True)
    la = c.hydra.launcher
    assert la._target_.endswith("SlurmLauncher")
    assert la.gpus_per_node == 4 and la.tasks_per_node == 1 and la.nodes == 1  # torchrun inside the job
    assert la.max_num_timeout > 0  # preempted jobs are resubmitted and resume
