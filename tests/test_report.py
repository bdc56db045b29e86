"""The sweep report: a sweep dir in the exact on-disk formats of real runs (copied from a real tiny
multirun: config composed from conf/, results.json, selection/training summaries, selection.jsonl,
trajectories.jsonl), reported by the CLI as a subprocess; numbers checked against means and stds worked
out by hand; bad input ends with one line and exit 2.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from omegaconf import OmegaConf

from atlas_exp.config import compose
from atlas_exp.eval.results import TaskInfo, summarize
from atlas_exp.report.collect import read_run
from atlas_exp.report.rows import RunRow
from atlas_exp.report.table import aggregate
from atlas_exp.report.variants import mark_variants
from atlas_exp.report.wandb_runs import row_from_wandb
from atlas_exp.run_dir import RunDir

TASKS = (("textcraft", "held_in"), ("babyai", "held_in"), ("alfworld", "held_out"))
CATS = ("Plan Creation", "Critical Observation", "Critical Action", "Self Correction")
N_TRAJ, N_STEPS = 10, 5  # trajectories 0-4 textcraft, 5-9 babyai; 50 steps per run

# (selector, ratio, seed) -> (textcraft, babyai, alfworld) in percent, selected steps (of 50), supervised tokens
RUNS = {
    ("oracle", 0.1, 1): ((40.0, 20.0, 10.0), 5, 100),
    ("oracle", 0.1, 2): ((50.0, 30.0, 20.0), 6, 120),
    ("oracle", 0.3, 1): ((60.0, 40.0, 30.0), 14, 300),
    ("oracle", 0.3, 2): ((70.0, 60.0, 20.0), 16, 340),
    ("random", 0.1, 1): ((30.0, 10.0, 10.0), 5, 90),
    ("random", 0.1, 2): ((20.0, None, 0.0), 5, 110),  # babyai: no episode finished -> null, not 0
    ("random", 0.3, 1): ((50.0, 30.0, 20.0), 15, 280),
    ("random", 0.3, 2): ((40.0, 30.0, 30.0), 15, 320),
    ("all", 0.1, 1): ((55.0, 35.0, 25.0), 50, 1000),  # `all` ignores the ratio: one row for both
    ("all", 0.3, 2): ((45.0, 45.0, 35.0), 50, 1000),
    ("non_critical", 0.3, 1): ((35.0, 25.0, 15.0), 15, 290),
}
INCOMPLETE = ("oracle", 0.3, 3)  # crashed after the data stage


def _run_name(selector: str, ratio: float, seed: int) -> str:
    """Hydra's override_dirname: the job's overrides sorted by key, comma-joined."""
    return f"ratio={ratio},seed={seed},selector={selector}"


def _trajectories() -> list[dict]:
    out = []
    for i in range(N_TRAJ):
        env = "textcraft" if i < 5 else "babyai"
        msgs = [{"role": "user", "content": f"Task {i}: reach the goal."}]
        for k in range(N_STEPS):
            msgs.append({"role": "assistant", "content": f"Thought: step {k}.\nAction: go {k}", "step": k})
            msgs.append({"role": "user", "content": f"Observation: state {k}"})
        out.append({"id": f"{env}_{i}", "env": env, "source": f"test.jsonl:{i + 1}", "messages": msgs})
    return out


def _selections(selector: str, ratio: float, k: int) -> list[dict]:
    """k of the 50 steps selected, spread over the trajectories; the oracle's with categories, plan, reasons."""
    chosen = {(j % N_TRAJ, j // N_TRAJ) for j in range(k)}
    lines, c = [], 0
    for t in _trajectories():
        i = int(t["id"].rsplit("_", 1)[1])
        steps = []
        for s in range(N_STEPS):
            sel = (i, s) in chosen
            d = {"step": s, "score": 1.0 if sel else 0.0, "selected": sel}
            if selector == "oracle" and sel:
                d["category"] = CATS[c % 4]
                d["reason"] = "decides the next sub-goal"
                c += 1
            steps.append(d)
        line = {"id": t["id"], "selector": selector, "ratio": 1.0 if selector == "all" else ratio,
                "n_steps": N_STEPS, "steps": steps}
        if selector == "oracle":
            line["plan"] = "1. find the items 2. craft the goal"
        lines.append(line)
    return lines


def _selection_summary(selector: str, ratio: float, lines: list[dict]) -> dict:
    """As atlas_exp.selectors.stage writes it (selectors.base.summarize + identity + stats)."""
    per_env: dict[str, list[int]] = {}
    cats: dict[str, int] = {}
    for line in lines:
        env = line["id"].rsplit("_", 1)[0]
        pe = per_env.setdefault(env, [0, 0])
        for s in line["steps"]:
            pe[1] += 1
            if s["selected"]:
                pe[0] += 1
                if "category" in s:
                    cats[s["category"]] = cats.get(s["category"], 0) + 1
    n_sel, n_all = sum(v[0] for v in per_env.values()), sum(v[1] for v in per_env.values())
    stats = {} if selector != "oracle" else {
        "model": "gpt-4o", "embedded_server": False, "response_format": "json_schema", "on_failure": "random",
        "judged": N_TRAJ, "failed": 0, "requests": N_TRAJ, "cache_hits": 0, "prompt_tokens": 12000,
        "completion_tokens": 900, "cost_usd": 0.039}
    return {
        "schema_version": 1, "fingerprint": "9757c2001700037c", "selector": selector,
        "ratio": 1.0 if selector == "all" else ratio, "seconds": 0.001, "n_trajectories": N_TRAJ,
        "n_steps": n_all, "n_selected": n_sel, "achieved_ratio": n_sel / n_all,
        "per_env": {e: {"n_steps": v[1], "n_selected": v[0], "achieved_ratio": v[0] / v[1]} for e, v in sorted(per_env.items())},
        "categories": dict(sorted(cats.items(), key=lambda kv: -kv[1])), "selector_stats": stats,
    }


def _training_summary(sel_sum: dict, tokens: int) -> dict:
    """As atlas_exp.train.trainer.run_training writes it."""
    return {
        "schema_version": 1, "fingerprint": "4dfc437712d8a818", "mode": "lora",
        "base_model": "outputs/.cache/gguf/SmolLM2-135M-Instruct.Q4_1-98362432-1795615630", "model": "smollm2_135m",
        "precision": "fp32", "world_size": 1, "deepspeed_stage": None, "resumed_from": None, "global_step": 3,
        "train_loss": 1.25, "steps_run": 3, "losses": [1.3, 1.25, 1.2], "loss_steps": [1, 2, 3], "seconds": 22.29,
        "n_examples": N_TRAJ, "data/n_trajectories": N_TRAJ, "data/n_examples": N_TRAJ, "data/n_skipped_empty": 0,
        "data/n_truncated": 0, "data/n_tokens": 2341, "data/n_supervised_tokens": tokens,
        "data/n_assistant_tokens": 1000, "data/n_selected_tokens": tokens, "data/n_selected_tokens_lost": 0,
        "data/supervised_share": tokens / 2341,
        **{f"selection/{k}": sel_sum[k] for k in ("selector", "ratio", "achieved_ratio", "n_steps", "n_selected")},
    }


def _task_entry(env: str, split: str, value: float | None) -> dict:
    n = 0 if value is None else 4
    return {
        "env": env, "split": split, "metric": "success", "value": value, "n": n, "n_planned": 4,
        "success_rate": None if value is None else value / 100, "mean_score": None if value is None else value / 100,
        "mean_reward": None if value is None else value / 100, "mean_turns": None if value is None else 7.5,
        "invalid_actions": 0, "ends": {} if value is None else {"done": 2, "max_turns": 2},
    }


def _results(run_dir: Path, sel_sum: dict, train_sum: dict, values: tuple) -> dict:
    """As atlas_exp.eval.stage.run_eval_stage writes it (summary shapes from eval.results.summarize)."""
    tasks = {name: _task_entry(name, split, v) for (name, split), v in zip(TASKS, values)}
    splits = {}
    for split in ("held_in", "held_out"):
        vs = [t["value"] for t in tasks.values() if t["split"] == split]
        splits[split] = {"average": None if None in vs else round(sum(vs) / len(vs), 4),
                         "tasks": [n for n, t in tasks.items() if t["split"] == split]}
    return {
        "schema_version": 1, "fingerprint": "e674e37c4b3ba901", "run_dir": str(run_dir), "eval": "smoke",
        "policy": {"policy": "hf", "model": "run", "base": "smollm2_135m", "adapter": str(run_dir / "model"),
                   "max_new_tokens": 16, "temperature": 0.0, "top_p": 1.0, "max_context": 4096,
                   "stats": {"calls": 1, "replies": 2, "prompt_tokens": 804, "completion_tokens": 32, "context_limit": 0}},
        "model": {"policy": {"_target_": "atlas_exp.eval.policy.HFPolicy", "model": "run", "max_new_tokens": 16,
                             "temperature": 0.0, "top_p": 1.0, "max_context": 4096, "dtype": "auto"},
                  "trained": "801857e2f0cfbf6c"},
        "selection": {k: sel_sum[k] for k in ("selector", "ratio", "achieved_ratio", "n_steps", "n_selected")},
        "training": {k: train_sum[k] for k in ("mode", "model", "global_step", "train_loss", "world_size")},
        "tasks": tasks,
        "splits": splits,
        "seconds": 3.679,
    }


def _dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


_CFG: dict[str, tuple[str, str]] = {}


def _config_yaml(selector: str, ratio: float, seed: int) -> tuple[str, str]:
    """The composed app config, unresolved, as Hydra saves it in .hydra/config.yaml, and the Hydra node
    (.hydra/hydra.yaml: exclude_keys, choices)."""
    if selector not in _CFG:
        from hydra import compose as hydra_compose
        from hydra import initialize_config_dir

        from atlas_exp.config import CONF_DIR

        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            full = hydra_compose(config_name="config", overrides=[f"selector={selector}", "logger=none"],
                                 return_hydra_config=True)
        hydra_node = OmegaConf.to_yaml(OmegaConf.create({"hydra": OmegaConf.to_container(full.hydra, resolve=False)}))
        _CFG[selector] = (OmegaConf.to_yaml(compose([f"selector={selector}", "logger=none"])), hydra_node)
    app_yaml, hydra_yaml = _CFG[selector]
    cfg = yaml.safe_load(app_yaml)
    cfg["ratio"], cfg["seed"] = ratio, seed
    return yaml.safe_dump(cfg, sort_keys=False), hydra_yaml


def make_run(sweep: Path, selector: str, ratio: float, seed: int, *, stages: str = "all") -> Path:
    d = sweep / _run_name(selector, ratio, seed)
    (d / ".hydra").mkdir(parents=True)
    app_yaml, hydra_yaml = _config_yaml(selector, ratio, seed)
    (d / ".hydra" / "config.yaml").write_text(app_yaml)
    (d / ".hydra" / "hydra.yaml").write_text(hydra_yaml)
    overrides = [f"selector={selector}", f"ratio={ratio}", f"seed={seed}", "logger=none", "eval=smoke"]
    if (selector, ratio, seed) == ("random", 0.3, 2):
        # relaunched with another cache dir and W&B online: neither changes results, so no row of its own
        overrides += ["cache_dir=/scratch/cache", "logger.mode=online"]
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    _jsonl(d / "trajectories.jsonl", _trajectories())
    if stages == "data":
        return d
    values, k, tokens = RUNS[(selector, ratio, seed)]
    lines = _selections(selector, ratio, k)
    _jsonl(d / "selection.jsonl", lines)
    sel_sum = _selection_summary(selector, ratio, lines)
    _dump(d / "selection_summary.json", sel_sum)
    train_sum = _training_summary(sel_sum, tokens)
    _dump(d / "model" / "training_summary.json", train_sum)
    _dump(RunDir(d).results, _results(d, sel_sum, train_sum, values))
    return d


def report(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "atlas_exp.report", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=120, check=False)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report") / "multirun_2026-01-01_10-00-00"
    for key in RUNS:
        make_run(root, *key)
    make_run(root, *INCOMPLETE, stages="data")
    (root / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")  # the sweep's own file: not a run
    return root


@pytest.fixture(scope="module")
def reported(sweep, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report_out")
    r = report(sweep, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "report.md" in r.stdout
    return out


def _csv_rows(out: Path) -> dict[tuple[str, str, str], dict[str, str]]:
    with open(out / "report.csv", newline="") as f:
        return {(r["selector"], r["variant"], r["ratio"]): r for r in csv.DictReader(f)}


def _close(cell: str, expected: float | None) -> bool:
    if expected is None:
        return cell == ""
    return math.isclose(float(cell), expected, rel_tol=1e-5, abs_tol=1e-6)


SQRT2 = math.sqrt(2)


def test_csv_means_and_stds_by_hand(reported):
    rows = _csv_rows(reported)
    assert set(rows) == {("all", "", ""), ("oracle", "", "0.1"), ("oracle", "", "0.3"), ("random", "", "0.1"),
                         ("random", "", "0.3"), ("non_critical", "base=perplexity_delta", "0.3")}
    # oracle 0.3, seeds 1 and 2: textcraft 60, 70; babyai 40, 60; held-in avg 50, 65; alfworld 30, 20
    o = rows[("oracle", "", "0.3")]
    assert o["n_runs"] == "2" and o["seeds"] == "1 2" and o["model"] == "smollm2_135m"
    expect = {
        "held_in/textcraft": (65.0, 5 * SQRT2, 2),      # sample std of (60, 70) = sqrt(50)
        "held_in/babyai": (50.0, 10 * SQRT2, 2),        # (40, 60): sqrt(200)
        "held_in/average": (57.5, 7.5 * SQRT2, 2),      # (50, 65): sqrt(112.5)
        "held_out/alfworld": (25.0, 5 * SQRT2, 2),
        "held_out/average": (25.0, 5 * SQRT2, 2),
    }
    for col, (m, s, n) in expect.items():
        assert _close(o[f"{col}_mean"], m) and _close(o[f"{col}_std"], s) and o[f"{col}_n"] == str(n), col
    assert _close(o["supervised_tokens_mean"], 320.0) and _close(o["supervised_tokens_std"], 20 * SQRT2)  # 300, 340
    assert _close(o["achieved_ratio_mean"], 0.30) and _close(o["achieved_ratio_std"], 0.02 * SQRT2)    # 14/50, 16/50
    assert o["paper_row"] == "ATLaS (oracle) 30%"
    assert _close(o["paper_held_in_average"], 65.91) and _close(o["paper_held_out_average"], 38.36)

    # random 0.1: seed 2 has no babyai value, so babyai and the held-in average rest on seed 1 alone
    r = rows[("random", "", "0.1")]
    assert _close(r["held_in/babyai_mean"], 10.0) and r["held_in/babyai_std"] == "" and r["held_in/babyai_n"] == "1"
    assert _close(r["held_in/average_mean"], 20.0) and r["held_in/average_n"] == "1"
    assert _close(r["held_in/textcraft_mean"], 25.0) and _close(r["held_in/textcraft_std"], 5 * SQRT2)
    assert _close(r["held_out/average_mean"], 5.0) and _close(r["held_out/average_std"], 5 * SQRT2)  # 10, 0
    assert r["paper_row"] == "" and r["paper_held_in_average"] == ""  # the paper has no 10% random row

    # `all` at ratio 0.1 (seed 1) and 0.3 (seed 2) is one row: it trains every step whatever the ratio
    a = rows[("all", "", "")]
    assert a["n_runs"] == "2" and a["seeds"] == "1 2"
    assert _close(a["held_in/textcraft_mean"], 50.0) and _close(a["held_in/textcraft_std"], 5 * SQRT2)
    assert _close(a["held_in/average_mean"], 45.0) and _close(a["held_in/average_std"], 0.0)  # 45, 45
    assert _close(a["achieved_ratio_mean"], 1.0) and _close(a["supervised_tokens_mean"], 1000.0)
    assert a["paper_row"] == "all steps" and _close(a["paper_held_in_average"], 60.52)

    nc = rows[("non_critical", "base=perplexity_delta", "0.3")]
    assert nc["n_runs"] == "1" and nc["held_in/average_std"] == "" and _close(nc["held_in/average_mean"], 30.0)
    assert nc["paper_row"] == "non-critical 30%" and _close(nc["paper_held_out_average"], 29.88)

    rand3 = rows[("random", "", "0.3")]
    assert _close(rand3["paper_held_in_average"], 59.90) and _close(rand3["paper_held_out_average"], 38.04)
    # the paper's column layout: held-in tasks, held-in avg, held-out tasks, held-out avg
    with open(reported / "report.csv", newline="") as f:
        head = next(csv.reader(f))
    means = [h[: -len("_mean")] for h in head if h.endswith("_mean") and "/" in h]
    assert means == ["held_in/textcraft", "held_in/babyai", "held_in/average", "held_out/alfworld", "held_out/average"]


def test_markdown_has_table_paper_numbers_provenance_and_incomplete_runs(reported, sweep):
    md = (reported / "report.md").read_text()
    # provenance
    assert f"- source: `{sweep.resolve()}`" in md
    assert "python -m atlas_exp.report" in md and "--out" in md
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip()
    if commit:
        assert f"- code: git {commit}" in md
    assert "- date: 20" in md and "UTC" in md
    # the main table: one line per row, cells mean ± std; the paper's numbers beside the matching rows
    table = md.split("## Main table", 1)[1].split("##", 1)[0]
    head = next(line for line in table.splitlines() if line.startswith("| selector"))
    assert "| textcraft | babyai | held-in avg | alfworld | held-out avg |" in head
    assert "paper† held-in avg" in head and "paper† held-out avg" in head
    oracle = next(line for line in table.splitlines() if line.startswith("| oracle | 0.3 |"))
    # no eval/<task>/<episode>.json in these runs: results.json's mean ± std, marked as having no interval
    assert "| 65.00 ± 7.07 ‡ | 50.00 ± 14.14 ‡ | 57.50 ± 10.61 ‡ | 25.00 ± 7.07 ‡ | 25.00 ± 7.07 ‡ |" in oracle
    assert oracle.rstrip().endswith("| ATLaS (oracle) 30% | 65.91 | 38.36 |")
    rnd = next(line for line in table.splitlines() if line.startswith("| random | 0.1 |"))
    assert "10.00 ‡ (n=1)" in rnd  # the missing babyai value is not a 0
    nc = next(line for line in table.splitlines() if line.startswith("| non_critical (base=perplexity_delta) | 0.3 |"))
    assert "| non-critical 30% (complement of the GPT-4o judge's choice) | 56.17 | 29.88 |" in nc  # not the same base
    assert "The paper's published numbers, not from this sweep" in table
    # the paper's rows, all of them, labelled as the paper's
    paper = md.split("## The paper's published numbers", 1)[1].split("## Plots", 1)[0]
    assert "Llama-3.1-8B-Instruct" in paper and "Not produced by this sweep" in paper
    for label, hi, ho in (("all steps", "60.52", "36.18"), ("ATLaS (oracle) 30%", "65.91", "38.36"),
                          ("random 30%", "59.90", "38.04"), ("non-critical 30%", "56.17", "29.88"),
                          ("perplexity top-30%", "53.21", "22.13")):
        assert f"| {label} | {hi} | {ho} |" in paper
    # incomplete runs are listed, not dropped
    incomplete = md.split("## Incomplete runs", 1)[1].split("##", 1)[0]
    assert f"`{_run_name(*INCOMPLETE)}`" in incomplete and "has: trajectories" in incomplete
    assert "12 found, 11 complete, 1 incomplete" in md
    for p in ("avg_vs_ratio.png", "tokens_vs_held_in.png", "categories.png"):
        assert f"]({p})" in md


def test_plots_are_valid_pngs(reported):
    from PIL import Image

    for name in ("avg_vs_ratio.png", "tokens_vs_held_in.png", "categories.png"):
        p = reported / name
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.size[0] > 300 and im.size[1] > 200


def test_categories_per_env_from_selection_and_trajectories(sweep):
    row = read_run(sweep / _run_name("oracle", 0.3, 1), sweep)
    # 14 selected steps, categories cycled in order; steps j = 0..13 fall on trajectory j % 10
    # (0-4 textcraft, 5-9 babyai): textcraft gets j in {0-4, 10-13}, babyai j in {5-9}
    expected = {"textcraft": {}, "babyai": {}}
    for j in range(14):
        env = "textcraft" if j % 10 < 5 else "babyai"
        expected[env][CATS[j % 4]] = expected[env].get(CATS[j % 4], 0) + 1
    assert row.categories == expected
    assert "cache_dir" in row.ignored_keys  # the app's own "does not change results" keys (hydra.yaml)
    assert read_run(sweep / _run_name("random", 0.3, 1), sweep).categories == {}


def test_results_at_the_run_dir_top_from_earlier_versions_still_count(sweep, tmp_path):
    run = tmp_path / "old"
    shutil.copytree(sweep / _run_name("oracle", 0.1, 1), run)
    old = run / "results.json"
    if RunDir(run).results != old:
        RunDir(run).results.rename(old)
    row = read_run(run, tmp_path)
    assert row.complete and row.split_averages == {"held_in": 30.0, "held_out": 10.0}


def test_results_fixture_has_the_real_shape():
    """The test's results.json tasks/splits have exactly the keys the eval stage's summarize writes."""
    recs = [{"task": "textcraft", "success": True, "score": 1.0, "reward": 1.0, "turns": 3, "invalid_actions": 0,
             "end": "done"}]
    real = summarize(recs, [TaskInfo("textcraft", "textcraft", "held_in", "success", 1)])
    ours = _task_entry("textcraft", "held_in", 100.0)
    assert set(ours) == set(real["tasks"]["textcraft"])
    assert set(real["splits"]["held_in"]) == {"average", "tasks"}


def test_no_categories_skips_that_plot_with_a_note(sweep, tmp_path):
    small = tmp_path / "sweep"
    shutil.copytree(sweep / _run_name("random", 0.3, 1), small / _run_name("random", 0.3, 1))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "categories.png").write_bytes(b"stale")  # an earlier report's figure goes
    r = report(small, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "out" / "report.md").read_text()
    assert "category plot skipped" in md and "](categories.png)" not in md
    assert not (tmp_path / "out" / "categories.png").exists()
    assert "Incomplete runs\n\nNone." in md


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_bad_input_is_one_line_exit_2(sweep, tmp_path):
    missing = tmp_path / "nope"
    assert str(missing) in _one_line_error(report(missing))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    assert "no runs found" in _one_line_error(report(tmp_path / "empty"))
    bad = tmp_path / "bad"
    shutil.copytree(sweep / _run_name("random", 0.3, 2), bad / "r1")
    results = RunDir(bad.resolve() / "r1").results
    results.write_text('{"tasks": {')
    line = _one_line_error(report(bad))
    assert str(results) in line and "invalid JSON" in line
    assert not (bad / "report.md").exists()
    results.write_text('[1, 2]')
    assert "results.json" in _one_line_error(report(bad))
    assert "sweep dir" in _one_line_error(report())  # no arguments


# ---------------------------------------------------------------------------------------------- W&B


def _wandb_eval_run(selector: str, ratio: float, seed: int, values: tuple) -> tuple[dict, dict]:
    """(config, summary) of the eval stage's W&B run as `_log_wandb` makes them: config
    {"experiment": resolved app config}, summary = the flat eval/<split>/<task> dict + W&B's own keys."""
    cfg = compose([f"selector={selector}", f"ratio={ratio}", f"seed={seed}", "logger=wandb"])
    config = {"experiment": OmegaConf.to_container(cfg, resolve=True)}
    res = _results(Path("/runs/x"), {"selector": selector, "ratio": ratio, "achieved_ratio": 0.3, "n_steps": 50,
                                     "n_selected": 15},
                   {"mode": "lora", "model": "smollm2_135m", "global_step": 1, "train_loss": 1.0, "world_size": 1}, values)
    flat = {f"eval/{t['split']}/{n}": t["value"] for n, t in res["tasks"].items()}
    flat.update({f"eval/{s}/average": v["average"] for s, v in res["splits"].items()})
    summary = {"_step": 1, "_runtime": 12.5, "_timestamp": 1764081000.1, "_wandb": {"runtime": 12}, **flat,
               "eval/table": {"_type": "table-file", "ncols": 5, "nrows": 3, "path": "media/table/eval/table_1_3f2a.table.json",
                              "sha256": "3f2a", "size": 412}}
    return config, summary


def test_wandb_run_converts_to_the_same_row_as_disk(sweep):
    config, summary = _wandb_eval_run("random", 0.3, 1, RUNS[("random", 0.3, 1)][0])
    train = {"train/loss": 1.25, "train/global_step": 3, "data/n_supervised_tokens": 280,
             "selection/selector": "random", "selection/achieved_ratio": 0.3, "selection/ratio": 0.3}
    w = row_from_wandb(config, summary, run_id="ent/proj/abc123", train_summary=train)
    d = read_run(sweep / _run_name("random", 0.3, 1), sweep)
    for f in ("selector", "ratio", "seed", "model", "split_averages", "achieved_ratio", "supervised_tokens", "complete"):
        assert getattr(w, f) == getattr(d, f), f
    assert list(w.tasks) == list(d.tasks) == ["textcraft", "babyai", "alfworld"]
    assert [(t.split, t.value) for t in w.tasks.values()] == [(t.split, t.value) for t in d.tasks.values()]
    # the raw (wrapped) config form and a run without a train run: selector from the config's _target_
    nc_cfg, nc_sum = _wandb_eval_run("non_critical", 0.3, 2, (35.0, 25.0, None))
    w2 = row_from_wandb({"experiment": {"value": nc_cfg["experiment"], "desc": None}}, nc_sum, run_id="r2")
    assert (w2.selector, w2.variant, w2.seed, w2.supervised_tokens) == ("non_critical", "base=perplexity_delta", 2, None)
    assert w2.split_averages == {"held_in": 30.0, "held_out": None}
    table = aggregate([w, w2])
    assert [r.key.selector for r in table.rows] == ["random", "non_critical"]
    assert table.rows[0].paper is not None and table.rows[0].paper.held_in == 59.90


def test_variant_splits_rows_only_on_overrides_not_shared_by_the_sweep():
    def run(sel, seed, *extra):
        return RunRow(run_id=f"{sel}{seed}{extra}", selector=sel, ratio=0.3, seed=seed, model="m", complete=True,
                      split_averages={"held_in": 10.0 * seed},
                      overrides=[f"selector={sel}", "ratio=0.3", f"seed={seed}", "logger=none", *extra])
    rows = [run("random", 1, "train.learning_rate=1e-5"), run("random", 2, "train.learning_rate=1e-5"), run("random", 1, "train.learning_rate=2e-5")]
    mark_variants(rows)
    assert [r.variant for r in rows] == ["train.learning_rate=1e-5", "train.learning_rate=1e-5", "train.learning_rate=2e-5"]
    t = aggregate(rows)
    assert [(r.key.variant, r.n) for r in t.rows] == [("train.learning_rate=1e-5", 2), ("train.learning_rate=2e-5", 1)]
