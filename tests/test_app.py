"""The app: configs compose, stages run alone from the previous stage's artifacts, and bad input or
options stop the run with one line naming the file, record, field or option."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TEST_CACHE

from atlas_exp.config import CONF_DIR, compose


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
    assert cfg.train.mode == "full" and cfg.train.lora is None and cfg.train.learning_rate == 1e-5


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


# --- config and startup errors: one line `atlas_exp: error: ...`, exit 2, before any stage runs -------------


def one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr and "HYDRA_FULL_ERROR" not in p.stderr, p.stderr[-3000:]
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("atlas_exp: error: "), p.stderr[-3000:]
    return line


@pytest.mark.parametrize("group,choices", [("selector", "oracle, perplexity"), ("model", "qwen25_7b_instruct"),
                                           ("eval", "held_in, held_out")])
def test_an_unknown_group_option_lists_the_valid_ones(tmp_path, group, choices):
    line = one_line_error(app(f"run_dir={tmp_path}/r", f"{group}=bogus"))
    assert f"{group}=bogus: no such option" in line and choices in line
    assert not (tmp_path / "r").exists()  # refused before Hydra made the run dir
    # in a sweep too
    line = one_line_error(app("-m", f"{group}={options(group)[0]},bogus", "stage=data"))
    assert f"{group}=bogus: no such option" in line


def test_an_override_that_does_not_compose_is_one_line(tmp_path):
    line = one_line_error(app(f"run_dir={tmp_path}/r", "data.bogus=1"))
    assert "Could not override 'data.bogus'" in line and "+data.bogus=1" in line


def test_data_local_without_a_path(tmp_path):
    line = one_line_error(app(f"run_dir={tmp_path}/r", "data=local", "stage=data"))
    assert line == ("atlas_exp: error: data.path is required: the files or folders to read (data=local), "
                    "e.g. data.path=data/my_trajectories.jsonl")


@pytest.mark.parametrize("overrides,message", [
    (["model.name_or_path=/no/such/model", "model.gguf_file=null"], "model.name_or_path=/no/such/model: no such folder"),
    (["model.name_or_path=atlas-test-org/not-a-cached-model", "model.gguf_file=null"],
     "model.name_or_path=atlas-test-org/not-a-cached-model: not in the local Hugging Face cache"),
    (["model.gguf_file=nope.gguf"], "model.gguf_file=nope.gguf: no such file in"),
    (["selector=perplexity_delta", "selector.model=/no/scorer"], "selector.model.name_or_path=/no/scorer: no such folder"),
])
def test_a_model_that_cannot_load_is_reported_before_the_data_stage(tmp_path, agenttraj_dir, overrides, message):
    rd = tmp_path / "r"
    p = app(f"run_dir={rd}", "data=local", f"data.path={agenttraj_dir / 'babyai.jsonl'}", *overrides)
    assert message in one_line_error(p)
    assert not (rd / "trajectories.jsonl").exists()


def test_model_name_is_a_label_not_a_model_choice(tmp_path):
    line = one_line_error(app(f"run_dir={tmp_path}/r", "model.name=qwen25_7b_instruct"))
    assert "is only a label" in line and "Did you mean model=qwen25_7b_instruct?" in line
    # as a label of a model chosen by path, or of the chosen config, it is fine
    from atlas_exp.preflight import check_model_label

    cfg = compose(["model.name_or_path=/m", "model.name=mine"])
    check_model_label(cfg, ["model.name_or_path=/m", "model.name=mine"])
    check_model_label(compose(["model=qwen25_7b_instruct"]), ["model=qwen25_7b_instruct", "model.name=qwen25_7b_instruct"])


# --- one process per run dir ---------------------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from atlas_exp.run_dir import RunDirLock
RunDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_run_dir_is_written_by_one_live_process(tmp_path, agenttraj_dir):
    from atlas_exp.run_dir import RunDirInUse, RunDirLock

    rd = tmp_path / "r"
    (rd / ".hydra").mkdir(parents=True)
    (rd / ".hydra" / "config.yaml").write_text("the live run's config\n")
    data = [f"run_dir={rd}", "stage=data", "data=local", f"data.path={agenttraj_dir / 'maze.jsonl'}", "data.max_per_env=3"]
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(rd)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = one_line_error(app(*data))
        assert f"run dir {rd} is in use by process {holder.pid}" in line and "choose another run_dir" in line
        # refused before Hydra wrote anything: the live run's recorded config and artifacts are untouched
        assert (rd / ".hydra" / "config.yaml").read_text() == "the live run's config\n"
        assert not (rd / "trajectories.jsonl").exists()
        # the lock taken inside a run (run dirs given by interpolation, sweep jobs) refuses the same way
        with pytest.raises(RunDirInUse, match=f"in use by process {holder.pid}"):
            RunDirLock(rd).acquire()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock file is taken over, with a warning naming it
    assert (rd / ".lock").exists()
    p = app(*data)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"taking over the lock of process {holder.pid}" in p.stderr and "no longer running" in p.stderr
    assert (rd / "trajectories.jsonl").exists() and not (rd / ".lock").exists()


def test_the_error_messages_the_readme_quotes_are_the_real_ones(tmp_path):
    """Each scenario's one-line error stands in the README as it is printed (paths relative to the data)."""
    quoted = {line.strip() for line in (REPO / "README.md").read_text().splitlines()
              if line.strip().startswith("atlas_exp: error: ")}
    dialog = {"id": "babyai_3", "dialog": [{"speaker": "env", "text": "Your goal: go to the red ball."},
                                           {"speaker": "agent", "text": "Action: move forward"}]}
    (tmp_path / "dialogs.jsonl").write_text(json.dumps(dialog) + "\n")
    (tmp_path / "data2").mkdir()
    (tmp_path / "data2" / "a.jsonl").write_text("")
    (tmp_path / "data2" / "B.JSONL").write_text(json.dumps(dialog) + "\n")
    local = ["stage=data", "data=local"]
    scenarios = [
        ["selector=bogus"],
        [*local],
        ["model.name_or_path=/no/such/model", "model.gguf_file=null"],
        [*local, "data.path=dialogs.jsonl"],
        [*local, "data.path=dialogs.jsonl", "data.messages_key=dialog"],
        [*local, "data.path=dialogs.jsonl", "data.messages_key=dialog", "data.role_key=speaker"],
        [*local, "data.path=data2"],
        ["train.lr=1e-4"],
    ]
    for i, over in enumerate(scenarios):
        line = one_line_error(app(f"run_dir={tmp_path}/r{i}", *over, cwd=tmp_path))
        assert line in quoted, line


def test_a_train_option_that_is_no_trainingarguments_field_stops_the_run_before_the_data_stage(tmp_path):
    """A preset's misspelt `train.*` key (here added on the command line with `+`) is refused by preflight,
    naming it and the closest TrainingArguments names, before any stage writes anything."""
    rd = tmp_path / "r"
    line = one_line_error(app(f"run_dir={rd}", "+train.adam_betaa=0.9", "logger=none", cwd=tmp_path))
    assert "train.adam_betaa" in line and "adam_beta1" in line, line
    assert not (rd / "trajectories.jsonl").exists()


def test_config_plain_turns_config_nodes_into_dicts_and_lists():
    """`config.plain`, the one converter the selectors, data sources and trainer use: its docstring example."""
    import doctest

    import atlas_exp.config

    assert doctest.testmod(atlas_exp.config).attempted >= 1 and doctest.testmod(atlas_exp.config).failed == 0
