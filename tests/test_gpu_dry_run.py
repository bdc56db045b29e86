"""experiments/gpu: the GPU experiment's preset, its transport (the model split over two device calls and
joined with every hash checked), and its dry run on the CPU: every phase (two of the selector rows through
`python -m atlas_exp`, DeepSpeed ZeRO-2/3 on one process, the training benchmark, eval speed) at tiny sizes,
with what would come back from the device machine."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import time

import pytest
from conftest import REPO, SHARED_DATA, TEST_CACHE
from omegaconf import OmegaConf

from atlas_exp.config import CONF_DIR, compose

sys.path.insert(0, str(REPO / "experiments" / "gpu"))
import job_runner  # noqa: E402
import pack  # noqa: E402
import run as gpu_run  # noqa: E402


def test_preset_is_the_issue_s_experiment():
    c = compose(["experiment=gpu_agenttraj"])
    assert [p.rsplit("/", 1)[-1] for p in c.data.path] == ["babyai.jsonl", "textcraft.jsonl"]
    assert c.train.mode == "full" and c.train.precision == "bf16" and c.train.num_train_epochs >= 2 and c.ratio == 0.3
    assert c.train.packing and c.train.supervised_logits_only
    tasks = {k: v for k, v in c.eval.tasks.items() if v is not None}
    assert {k: (t.split, t.episodes.count) for k, t in tasks.items()} == {"textcraft": ("held_in", 100), "babyai": ("held_in", 90)}
    assert c.eval.batch_size >= 190 and c.policy._target_.endswith("HFPolicy")
    sweep = OmegaConf.load(CONF_DIR / "experiment" / "gpu_agenttraj.yaml").hydra.sweeper.params
    assert sweep.selector.split(",") == list(gpu_run.ROWS)  # the plain multirun has run.py's rows, in its order
    judge = [p.rsplit("/", 1)[-1] for p in c.judge_replies]
    assert judge == ["babyai.batch_output.jsonl", "textcraft.batch_output.jsonl"]
    oracle = compose(["experiment=gpu_agenttraj", "selector=oracle"]).selector
    assert list(oracle.batch.read) == list(c.judge_replies) and oracle.judge_ratio == 0.5
    nco = compose(["experiment=gpu_agenttraj", "selector=non_critical_oracle"]).selector
    assert nco.base._target_.endswith("OracleSelector") and list(nco.base.batch.read) == list(c.judge_replies)


def test_the_model_is_split_and_joined_with_every_hash_checked(tmp_path):
    src = tmp_path / "m.gguf"
    src.write_bytes(os.urandom(3 * pack.MIB + 7))
    a, b = tmp_path / "a", tmp_path / "b"
    pack.split(src, pack.MIB + 3, a / "gguf.part1", b / "gguf.part2")
    manifest = {"sha256": pack.sha256(src), "parts": [
        {"name": n, "bytes": (d / n).stat().st_size, "sha256": pack.sha256(d / n)} for d, n in ((a, "gguf.part1"), (b, "gguf.part2"))]}
    out = pack.join(manifest, [tmp_path / "nowhere", a, b], tmp_path / "model" / "m.gguf")
    assert out.read_bytes() == src.read_bytes()
    with (b / "gguf.part2").open("r+b") as f:  # one flipped byte
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(SystemExit, match="sha256"):
        pack.join(manifest, [a, b], tmp_path / "again.gguf")
    assert not (tmp_path / "again.gguf").exists()


def test_overrides_quote_paths_with_equals_signs(tmp_path):
    args = gpu_run.parse_args(["--dry-run", "--out", str(tmp_path), "--data-root", str(tmp_path / "d")])
    over = gpu_run.run_overrides(args, tmp_path / "sweep" / "selector=all", "selector=all")
    assert f"run_dir='{tmp_path}/sweep/selector=all'" in over and "data.max_per_env=2" in over
    assert any(o.startswith("judge_replies=['") for o in over)


def test_default_rows_and_budget_are_the_paper_s_five_in_540_s(tmp_path):
    args = gpu_run.parse_args(["--out", str(tmp_path)])
    assert args.rows == list(gpu_run.ROWS) and args.budget == 540.0 and args.limits == {}
    assert not set(gpu_run.OPTIONAL_ROWS) & set(gpu_run.ROWS)
    d = gpu_run.Driver(args)
    assert d.limits == gpu_run.FULL_LIMITS
    for row, job in d.row_jobs().items():  # a default row's run: the preset, its dir, the common overrides, its selector
        assert job.cmd[3:] == [gpu_run.PRESET, "hydra.mode=RUN", f"run_dir='{tmp_path}/sweep/selector={row}'",
                               f"cache_dir='{tmp_path}/cache'", f"selector={row}"] and job.after is None


def test_optional_rows_plan_excess_loss_after_all_and_rollout_value_sized(tmp_path):
    """The optional rows' runs, without running them: excess_loss's Rho-1 reference is the all row's model and it
    waits for that row; rollout_value gets its sizes (full and dry run), which compose into a selector."""
    from atlas_exp.selectors.rollout_value import RolloutValueSelector
    from atlas_exp.selectors.stage import build_selector

    args = gpu_run.parse_args(["--out", str(tmp_path), "--rows", "excess_loss,oracle,all,rollout_value",
                               "--limit", "rows=450"])
    d = gpu_run.Driver(args)
    assert d.limits == {**gpu_run.FULL_LIMITS, "rows": 450.0}
    jobs = d.row_jobs()
    assert list(jobs) == ["excess_loss", "oracle", "all", "rollout_value"]
    ex, rv = jobs["excess_loss"], jobs["rollout_value"]
    assert ex.after == "all" and rv.after is None and jobs["oracle"].after is None
    reference = f"{tmp_path}/sweep/selector=all/model"
    assert ex.cmd[-2:] == ["selector=excess_loss", f"reference_model='{reference}'"]
    assert rv.cmd[-8:] == ["selector=rollout_value", *gpu_run.OPTIONAL_ROWS["rollout_value"]["full"]]
    assert compose(["experiment=gpu_agenttraj", *ex.cmd[-2:]]).selector.reference == reference
    sel = build_selector(compose(["experiment=gpu_agenttraj", *rv.cmd[-8:]]))  # no model loads before a rollout
    assert isinstance(sel, RolloutValueSelector) and sel._policy is None
    assert (sel.rollouts, sel.temperature, sel.max_turns, sel.batch_size) == (1, 0.0, 4, 256)
    assert sel._policy_spec.batch_size == 256 and sel._policy_spec.max_new_tokens == 128
    dry = gpu_run.Driver(gpu_run.parse_args(["--dry-run", "--out", str(tmp_path), "--rows", "all,rollout_value"]))
    rv_dry = dry.row_jobs()["rollout_value"].cmd
    assert rv_dry[-7:] == ["selector=rollout_value", *gpu_run.OPTIONAL_ROWS["rollout_value"]["dry"]]
    assert "data.max_per_env=2" in rv_dry  # the dry run's sizes still apply


def test_excess_loss_without_the_all_row_is_refused_unless_its_model_exists(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_run.parse_args(["--out", str(tmp_path), "--rows", "excess_loss"])
    assert "--rows excess_loss needs the all row's trained model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_run.parse_args(["--out", str(tmp_path), "--limit", "rows"])
    assert "--limit 'rows': expected PHASE=SECONDS" in capsys.readouterr().err
    model = tmp_path / "sweep" / "selector=all" / "model"
    model.mkdir(parents=True)
    (model / "training_summary.json").write_text("{}")  # a call before trained it (same --out)
    assert gpu_run.parse_args(["--out", str(tmp_path), "--rows", "excess_loss"]).rows == ["excess_loss"]


def test_a_row_that_needs_another_starts_after_it_and_not_after_a_failure(tmp_path):
    """run_jobs with tiny processes: `b` (after `a`) starts once `a` is done, `c` behind it starts meanwhile;
    `e` (after `f`, which fails) never starts and says why."""
    def job(name, code, after=None):
        return job_runner.Job(name, [sys.executable, "-c", code], tmp_path / f"{name}.log", dict(os.environ), after=after)

    a, b, c = job("a", "import time; time.sleep(1.5)"), job("b", "pass", after="a"), job("c", "pass")
    f, e = job("f", "raise SystemExit(3)"), job("e", "pass", after="f")
    ended = []
    job_runner.run_jobs([b, a, c, e, f], parallel=2, deadline=time.time() + 60, on_done=lambda j: ended.append(j.name))
    assert [j.status for j in (a, b, c, f)] == ["done", "done", "done", "failed (exit 3)"]
    assert b.started >= a.started + a.seconds - 0.01 and c.started < a.started + a.seconds
    assert e.status == "not started (f failed (exit 3))" and e.proc is None
    assert ended.index("a") < ended.index("b") and ended.index("f") < ended.index("e")


@pytest.mark.slow
def test_dry_run_runs_every_phase_and_exports_what_the_device_returns(tmp_path, shared_data):
    """Every phase at tiny sizes (the deepspeed phase with ZeRO-3 only). Two of the five rows (the judge's files and the plain run eval_speed reuses):
    a row is the same `python -m atlas_exp` call with another selector, and each selector's run through the
    app is tested on its own (tests/test_app.py, test_oracle_batch.py, test_perplexity_selectors.py)."""
    out, export = tmp_path / "out", tmp_path / "export"
    rows = ("oracle", "all")
    p = subprocess.run([sys.executable, "experiments/gpu/run.py", "--dry-run", "--out", str(out), "--export", str(export),
                        "--rows", ",".join(rows), "--deepspeed-stages", "zero3",
                        "--cache-dir", str(TEST_CACHE), "--data-root", str(SHARED_DATA)],
                       cwd=REPO, capture_output=True, text=True, timeout=9000,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    s = json.loads((out / "summary.json").read_text())
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    assert {k: v["status"] for k, v in s["phases"].items()} == dict.fromkeys(gpu_run.PHASES, "done")
    assert set(s["rows"]) == set(rows)
    for row in rows:
        r = s["rows"][row]
        assert r["status"] == "done" and r["train.global_step"] == 1, (row, r)
        assert {t: v["n"] for t, v in r["eval"].items()} == {"textcraft": 1, "babyai": 1}, (row, r)
    assert set(s["deepspeed"]) == {"zero3"}  # ZeRO-2 through the app: tests/test_train.py (2 CPU ranks)
    for stage, n in (("zero3", 3),):
        d = s["deepspeed"][stage]
        assert d["status"] == "done" and d["train.deepspeed_stage"] == n and d["eval"]["textcraft"]["n"] == 2, d
    assert [v["status"] for v in s["bench"].values()] == ["done", "done"]
    assert all(v["ours.tokens_per_s"] for v in s["bench"].values())
    assert {k: v["status"] for k, v in s["eval_speed"].items()} == {"batched": "done", "one_at_a_time": "done"}
    report = (out / "sweep" / "report.md").read_text()
    assert all(name in report for name in ("all steps", "oracle"))
    # what comes back from the device's $OUT: at most 8 plain files of at most 16 MiB, names of letters,
    # digits, '.', '_' and '-'; the runs without weights
    files = sorted(export.iterdir())
    assert {f.name for f in files} == {"summary.json", "report.md", "log.txt", "runs.tar.gz"}
    assert all(f.is_file() and f.stat().st_size < 16 * pack.MIB and re.fullmatch(r"[A-Za-z0-9._-]+", f.name) for f in files)
    with tarfile.open(export / "runs.tar.gz") as tar:
        names = tar.getnames()
    assert any(n.endswith("selector=oracle/eval/results.json") for n in names)
    assert not [n for n in names if n.endswith((".safetensors", ".gguf")) or "/checkpoints/" in n]
