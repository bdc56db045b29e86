"""The app: configs compose, stages run alone from the previous stage's artifacts, and bad input or
options stop the run with one line naming the file, record, field or option."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from atlas_exp.config import CONF_DIR, compose
from conftest import REPO, TEST_CACHE


def app(*overrides: str, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, "-m", "atlas_exp", f"cache_dir={TEST_CACHE}", *overrides],
        cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout,
    )


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_default_config_is_the_embedded_cpu_run():
    cfg = compose()
    assert cfg.stage == "all" and cfg.ratio == 0.3
    assert cfg.data.name == "textcraft_expert"
    assert cfg.model.gguf_file.endswith(".gguf")
    assert Path(cfg.model.name_or_path, cfg.model.gguf_file).exists()
    assert cfg.train.mode == "lora" and cfg.deepspeed.enabled is False
    assert cfg.selector.ratio == cfg.ratio  # the top-level ratio reaches the selector


@pytest.mark.parametrize(
    "group",
    ["data", "selector", "model", "train", "deepspeed", "launcher", "logger"],
)
def test_every_option_of_every_group_composes(group):
    for opt in options(group):
        over = [f"{group}={opt}"]
        if group == "data" and opt == "local":
            over.append("data.path=/tmp/x.jsonl")
        cfg = compose(over)
        node = cfg[group]
        assert node is not None
        if group == "selector":
            assert node._target_.startswith("atlas_exp.selectors.")
        if group == "deepspeed" and node.enabled:
            assert node.config.zero_optimization.stage in (2, 3)
            assert node.config.train_micro_batch_size_per_gpu == "auto"
        if group == "model":
            assert node.name == opt


def test_zero3_offload_extends_zero3():
    cfg = compose(["deepspeed=zero3_offload"])
    z = cfg.deepspeed.config.zero_optimization
    assert z.stage == 3 and z.offload_optimizer.device == "cpu" and z.offload_param.device == "cpu"


def test_full_finetuning_preset_has_no_lora():
    cfg = compose(["train=full"])
    assert cfg.train.mode == "full" and cfg.train.lora is None and cfg.train.lr == 1e-5


def test_cfg_job_prints_the_composed_config_without_running():
    p = app("selector=all", "--cfg", "job")
    assert p.returncode == 0, p.stderr
    assert "AllStepsSelector" in p.stdout


def test_unknown_stage_names_the_option(tmp_path):
    p = app(f"run_dir={tmp_path}/r", "stage=bogus")
    assert p.returncode == 2
    assert "stage='bogus'" in p.stderr and "Traceback" not in p.stderr


def test_bad_record_is_reported_with_file_line_and_field(tmp_path, agenttraj_dir):
    lines = (agenttraj_dir / "textcraft.jsonl").read_text().splitlines()[:3]
    bad = json.loads(lines[1])
    bad["conversations"][3]["value"] = "   "
    lines[1] = json.dumps(bad)
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines) + "\n")
    p = app(f"run_dir={tmp_path}/r", "stage=data", "data=local", f"data.path={f}")
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip().splitlines()[-1]
    assert "bad.jsonl:2" in err and "conversations[3]" in err and "empty" in err, err
    assert "Traceback" not in p.stderr

    # with on_error=skip the run goes on and the summary counts and names the skipped record
    p = app(f"run_dir={tmp_path}/s", "stage=data", "data=local", f"data.path={f}", "data.on_error=skip")
    assert p.returncode == 0, p.stderr
    s = json.loads((tmp_path / "s" / "data_summary.json").read_text())
    assert s["n_skipped"] == 1 and s["n_train"] == 2
    assert "bad.jsonl:2" in json.dumps(s["skipped"])


def test_select_stage_alone_needs_the_data_stage_first(tmp_path):
    p = app(f"run_dir={tmp_path}/r", "stage=select")
    assert p.returncode == 2
    assert "stage=data" in p.stderr


def test_stages_run_one_at_a_time_from_the_previous_artifact(tmp_path, agenttraj_dir):
    rd = tmp_path / "r"
    common = [f"run_dir={rd}", "data=local", f"data.path={agenttraj_dir / 'babyai.jsonl'}", "data.max_per_env=30"]
    assert app(*common, "stage=data").returncode == 0
    assert not (rd / "selection.jsonl").exists()
    p = app(*common, "stage=select", "selector=random", "ratio=0.3")
    assert p.returncode == 0, p.stderr
    s = json.loads((rd / "selection_summary.json").read_text())
    assert s["n_trajectories"] == 30 and abs(s["achieved_ratio"] - 0.3) < 0.08
    first = (rd / "selection.jsonl").read_text()
    # a different selector on the same trajectories replaces the selection
    p = app(*common, "stage=select", "selector=all")
    assert p.returncode == 0, p.stderr
    assert (rd / "selection.jsonl").read_text() != first
    assert json.loads((rd / "selection_summary.json").read_text())["achieved_ratio"] == 1.0
