"""The report's statistics: bootstrap intervals over episodes and seeds, the paired comparison with the
`all steps` row, the Jaccard agreement with the oracle, category counts per env and the compute figures,
on small fake run dirs whose episode outcomes are known, checked against hand computations."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from atlas_exp.eval.results import TaskInfo, summarize
from atlas_exp.report.agreement import jaccard
from atlas_exp.report.collect import read_run
from atlas_exp.report.compare import agreement_with_oracle, paired_vs_all
from atlas_exp.report.stats import bootstrap, cluster_units, episode_units, rng_for
from atlas_exp.report.table import aggregate

TARGET = {"oracle": "atlas_exp.selectors.oracle.OracleSelector", "random": "atlas_exp.selectors.random.RandomSelector",
          "all": "atlas_exp.selectors.all.AllStepsSelector"}


def _dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) + "\n")


def fake_run(root: Path, selector: str, ratio: float, seed: int, *, env_eps: dict[str, bool] | None = None,
             steps: dict[str, list[bool]] | None = None, selected: dict[str, set[int]] | None = None,
             categories: bool = False, episode_files: bool = True, train_seconds: float = 10.0,
             n_tokens: int = 1000) -> Path:
    """A run dir with the artifacts the report reads: a `textcraft` env task (episode id -> success), an
    offline `steps` task (trajectory id -> action_correct per step), a selection of 3 trajectories of 4
    steps (id -> selected steps), summaries; results.json made by the eval stage's own summarize."""
    d = root / f"ratio={ratio},seed={seed},selector={selector}"
    cfg = {"selector": {"_target_": TARGET[selector]}, "ratio": ratio, "seed": seed, "model": {"name": "m"},
           "train": {"num_train_epochs": 2, "max_steps": -1, "per_device_train_batch_size": 1,
                     "gradient_accumulation_steps": 1}}
    _dump(d / ".hydra" / "config.yaml", cfg)  # JSON is YAML
    _dump(d / ".hydra" / "overrides.yaml", [f"selector={selector}", f"ratio={ratio}", f"seed={seed}"])
    selected = selected or {"t0": {0}, "t1": {1}, "t2": {2}}
    trajs = [{"id": t, "env": "textcraft" if t != "t2" else "babyai"} for t in selected]
    (d / "trajectories.jsonl").write_text("".join(json.dumps(t) + "\n" for t in trajs))
    lines = []
    cats = ("Plan Creation", "Critical Action")
    for t, sel in selected.items():
        st = [{"step": k, "score": 0.0, "selected": k in sel, **({"category": cats[k % 2]} if categories and k in sel else {})}
              for k in range(4)]
        lines.append({"id": t, "selector": selector, "ratio": ratio, "n_steps": 4, "steps": st})
    (d / "selection.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    n_sel = sum(len(s) for s in selected.values())
    _dump(d / "selection_summary.json", {
        "selector": selector, "ratio": ratio, "seconds": 2.0 * seed, "achieved_ratio": n_sel / 12,
        "per_env": {"textcraft": {"achieved_ratio": 0.25}, "babyai": {"achieved_ratio": 0.5}},
        "categories": {"Plan Creation": 1} if categories else {}})
    _dump(d / "model" / "training_summary.json", {
        "seconds": train_seconds, "global_step": 3, "world_size": 1, "n_examples": 3, "data/n_tokens": n_tokens,
        "data/n_supervised_tokens": n_tokens // 4})
    env_eps = {"e0": True, "e1": False, "e2": True, "e3": True} if env_eps is None else env_eps
    steps = {"t0": [True, False, True], "t1": [True, True]} if steps is None else steps
    records = []
    for ep, ok in env_eps.items():
        records.append({"task": "textcraft", "episode": ep, "env": "TextCraftEnv", "success": ok,
                        "score": float(ok), "reward": float(ok), "turns": 3, "invalid_actions": 0, "end": "done"})
    for ep, st in steps.items():
        score = sum(st) / len(st)
        records.append({"task": "steps", "episode": ep, "env": "expert_steps", "success": all(st), "score": score,
                        "reward": score, "turns": len(st), "invalid_actions": 0, "end": "done",
                        "steps": [{"step": k, "nll": 1.0, "action": "x", "action_correct": ok} for k, ok in enumerate(st)]})
    if episode_files:
        for r in records:
            _dump(d / "eval" / r["task"] / f"{r['episode']}.json", {"fingerprint": "fp1", **r})
    tasks = [TaskInfo("textcraft", "TextCraftEnv", "held_in", "success", len(env_eps)),
             TaskInfo("steps", "expert_steps", "offline", "score", len(steps))]
    _dump(d / "eval" / "results.json", summarize(records, tasks))
    return d


def _rows(root: Path):
    from atlas_exp.report.collect import collect_sweep

    return collect_sweep(root)


# ------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_by_hand_on_two_units_and_two_seeds():
    # one run, units {0, 1}: a resample's mean is 0 (1/4), 0.5 (1/2) or 1 (1/4) -> 95% interval [0, 1]
    iv = bootstrap([[episode_units([0.0, 1.0])]], rng_for(0, "a"), 2000)
    assert (iv.mean, iv.lo, iv.hi, iv.n) == (0.5, 0.0, 1.0, 2)
    # two seeds with no unit noise (all 0, all 1): only the seed draw varies -> 0, 0.5 or 1
    iv = bootstrap([[episode_units([0.0] * 5)], [episode_units([1.0] * 5)]], rng_for(0, "b"), 2000, scale=100)
    assert (iv.mean, iv.lo, iv.hi, iv.n) == (50.0, 0.0, 100.0, 10)
    # no noise at all: a point
    iv = bootstrap([[episode_units([1.0] * 3)], [episode_units([1.0] * 4)]], rng_for(0, "c"), 500)
    assert (iv.lo, iv.hi) == (1.0, 1.0)
    # clusters: the mean is over units (steps), not over clusters: (1 + 0 + 1 + 1 + 1) / 5
    iv = bootstrap([[cluster_units([[1, 0], [1, 1, 1]])]], rng_for(0, "d"), 500)
    assert math.isclose(iv.mean, 0.8) and iv.n == 5 and iv.lo <= 0.8 <= iv.hi
    # seeded: the same draws for the same names, other draws for another cell
    a = bootstrap([[episode_units(np.linspace(0, 1, 17))]], rng_for(3, "x"), 300)
    assert a == bootstrap([[episode_units(np.linspace(0, 1, 17))]], rng_for(3, "x"), 300)
    assert a != bootstrap([[episode_units(np.linspace(0, 1, 17))]], rng_for(3, "y"), 300)


def test_intervals_contain_the_mean_and_fall_back_without_episode_files(tmp_path):
    fake_run(tmp_path, "random", 0.3, 1)
    fake_run(tmp_path, "random", 0.3, 2, env_eps={"e0": False, "e1": False, "e2": True, "e3": True},
             steps={"t0": [False, False, True], "t1": [True, False]})
    fake_run(tmp_path, "all", 1.0, 1, episode_files=False)
    t = aggregate(_rows(tmp_path), b=1000, seed=0)
    rnd = next(r for r in t.rows if r.key.selector == "random")
    tc = rnd.cells["held_in/textcraft"]
    assert math.isclose(tc.mean, 62.5) and tc.lo <= 62.5 <= tc.hi and tc.units == 8  # (75 + 50) / 2
    assert 0.0 <= tc.lo < tc.hi <= 100.0
    off = rnd.cells["offline/steps"]
    # seed 1: (2/3 + 1) / 2 = 83.33; seed 2: (1/3 + 1/2) / 2 = 41.67 -> 62.5, by trajectory
    assert math.isclose(off.mean, 62.5) and off.lo <= off.mean <= off.hi and off.units == 4
    assert rnd.cells["offline/average"].has_ci and rnd.cells["held_in/average"].has_ci
    a = next(r for r in t.rows if r.key.selector == "all")
    assert not a.cells["held_in/textcraft"].has_ci and "no episode files" in a.cells["held_in/textcraft"].no_ci
    assert math.isclose(a.cells["held_in/textcraft"].mean, 75.0)
    # compute: epochs 2 x 1000 tokens; train seconds 10 per seed; selection 2 s x seed
    assert math.isclose(rnd.compute["tokens_processed"].mean, 2000.0)
    assert math.isclose(rnd.compute["select_seconds"].mean, 3.0) and rnd.compute["select_seconds"].lo == 2.0


def test_stale_episode_files_of_another_config_are_not_counted(tmp_path):
    d = fake_run(tmp_path, "random", 0.3, 1)
    _dump(d / "eval" / "textcraft" / "old.json", {"fingerprint": "fp0", "task": "textcraft", "episode": "old",
                                                    "success": False, "score": 0.0})
    row = read_run(d, tmp_path)
    assert sorted(row.episodes["textcraft"]) == ["e0", "e1", "e2", "e3"]
    # files that do not reproduce results.json: no episodes for that task, and a note why
    for p in (d / "eval" / "steps").glob("*.json"):
        rec = json.loads(p.read_text())
        rec["score"] = 0.0
        p.write_text(json.dumps(rec))
    row = read_run(d, tmp_path)
    assert "steps" not in row.episodes and "do not reproduce results.json" in row.episode_notes["steps"]


# ---------------------------------------------------------------------------------------- paired


def test_paired_difference_by_hand(tmp_path):
    # seed 1 only in both; the row: e0..e3 = 1,0,1,1; all: 0,0,1,0 -> differences 1,0,0,1 -> +50 pp
    fake_run(tmp_path, "random", 0.3, 1)
    fake_run(tmp_path, "all", 1.0, 1, env_eps={"e0": False, "e1": False, "e2": True, "e3": False, "e9": True},
             steps={"t0": [False, False, False], "t1": [True, False], "t5": [True]})
    t = aggregate(_rows(tmp_path), b=500)
    (p,) = paired_vs_all(t, 1000, 0)
    assert p.seeds == "matched: 1"
    env = p.cells["held_in/textcraft"]
    assert math.isclose(env.mean, 50.0) and env.n == 4 and env.lo <= 50.0 <= env.hi  # e9 not in the row
    # steps: t0 (1-0, 0-0, 1-0), t1 (1-1, 1-0): (1 + 0 + 1 + 0 + 1) / 5 = 60 pp over 5 steps; t5 not shared
    st = p.cells["offline/steps"]
    assert math.isclose(st.mean, 60.0) and st.n == 5 and st.lo <= 60.0 <= st.hi


def test_paired_on_units_when_no_seed_is_shared(tmp_path):
    fake_run(tmp_path, "random", 0.3, 3)
    fake_run(tmp_path, "all", 1.0, 1, env_eps={"e0": False, "e1": False, "e2": False, "e3": False})
    fake_run(tmp_path, "all", 1.0, 2, env_eps={"e0": True, "e1": True, "e2": False, "e3": False})
    (p,) = paired_vs_all(aggregate(_rows(tmp_path), b=200), 500, 0)
    assert p.seeds.startswith("none shared")
    # all's mean per episode: 0.5, 0.5, 0, 0; row 1, 0, 1, 1 -> (0.5 - 0.5 + 1 + 1) / 4 = 50 pp
    assert math.isclose(p.cells["held_in/textcraft"].mean, 50.0)


def test_paired_seeds_are_those_with_episode_files(tmp_path):
    fake_run(tmp_path, "random", 0.3, 1)
    fake_run(tmp_path, "random", 0.3, 2)
    fake_run(tmp_path, "all", 1.0, 1, env_eps={"e0": False, "e1": False, "e2": True, "e3": False})
    fake_run(tmp_path, "all", 1.0, 2, episode_files=False)  # results.json only: nothing to pair on
    (p,) = paired_vs_all(aggregate(_rows(tmp_path), b=200), 500, 0)
    assert p.seeds == "matched: 1" and p.cells["held_in/textcraft"].n == 4


# --------------------------------------------------------------------------------------- agreement


def test_jaccard_with_the_oracle_by_hand(tmp_path):
    fake_run(tmp_path, "oracle", 0.3, 1, selected={"t0": {0, 1}, "t1": {2}, "t2": set()}, categories=True)
    fake_run(tmp_path, "random", 0.3, 1, selected={"t0": {1, 2}, "t1": {2}, "t2": {3}})
    fake_run(tmp_path, "random", 0.3, 2, selected={"t0": {0, 1}, "t1": {0}, "t2": set()})
    fake_run(tmp_path, "random", 0.5, 1)  # no oracle at 0.5: not compared
    agree = agreement_with_oracle(_rows(tmp_path))
    (cells,) = agree.values()
    c = cells[("random", "", 0.3)]
    # seed 1: t0 {0,1} vs {1,2} = 1/3, t1 = 1, t2 {} vs {3} = 0 -> 4/9; seed 2 (oracle seed 1): 1, 0, 1 (both empty) -> 2/3
    assert [round(x[1], 6) for x in c.per_seed] == [round(4 / 9, 6), round(2 / 3, 6)]
    assert math.isclose(c.mean, (4 / 9 + 2 / 3) / 2) and c.oracle_seeds == (1, 1)
    assert set(cells) == {("random", "", 0.3)}
    assert jaccard({0, 1}, {1, 2}) == 1 / 3


# ---------------------------------------------------------------------------------------- the CLI


def test_report_md_and_csv_have_intervals_paired_agreement_categories_compute(tmp_path):
    sweep = tmp_path / "sweep"
    fake_run(sweep, "oracle", 0.3, 1, categories=True)
    fake_run(sweep, "random", 0.3, 1)
    fake_run(sweep, "random", 0.3, 2, env_eps={"e0": False, "e1": True})  # a task with fewer episodes
    fake_run(sweep, "all", 1.0, 1, env_eps={"e0": False, "e1": False, "e2": True, "e3": False})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    r = subprocess.run([sys.executable, "-m", "atlas_exp.report", str(sweep), "--bootstrap", "300"], cwd=REPO,
                       capture_output=True, text=True, env=env, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    md = (sweep / "report.md").read_text()
    assert "percentile bootstrap, 300 replicates" in md
    main = md.split("## Main table", 1)[1].split("\n## ", 1)[0]
    line = next(x for x in main.splitlines() if x.startswith("| random | 0.3 |"))
    assert "[" in line and "]" in line
    for section in ("## Paired comparison with all steps", "## Agreement with the oracle's selection",
                    "## Categories of the selected steps per env", "## Compute"):
        assert section in md
    paired = md.split("## Paired comparison with all steps", 1)[1].split("\n## ", 1)[0]
    assert "matched: 1" in paired and "(n=" in paired
    cats = md.split("## Categories of the selected steps per env", 1)[1].split("\n## ", 1)[0]
    assert "| textcraft | oracle | 0.3 | 1 | 0.250 |" in cats and "Plan Creation" in cats
    assert "](categories.png)" in md
    runs_head = next(x for x in md.split("## Complete runs", 1)[1].splitlines() if x.startswith("| run"))
    assert "| held-in avg | held-out avg | offline (expert steps) avg | achieved ratio |" in runs_head
    with open(sweep / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    head = list(rows[0])
    for col in ("held_in/textcraft_lo", "held_in/textcraft_hi", "offline/steps_units", "offline/average_lo",
                "tokens_processed_mean", "train_seconds_lo", "select_seconds_hi", "supervised_tokens_lo"):
        assert col in head, col
    rnd = next(x for x in rows if x["selector"] == "random")
    assert float(rnd["held_in/textcraft_lo"]) <= float(rnd["held_in/textcraft_mean"]) <= float(rnd["held_in/textcraft_hi"])
    assert rnd["held_in/textcraft_units"] == "6"
    # --bootstrap 0: no intervals, nothing crashes
    r = subprocess.run([sys.executable, "-m", "atlas_exp.report", str(sweep), "--bootstrap", "0", "--out",
                        str(tmp_path / "b0")], cwd=REPO, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert "No confidence intervals" in (tmp_path / "b0" / "report.md").read_text()


@pytest.mark.parametrize("bad", ["-1", "x"])
def test_bad_bootstrap_flag_is_one_line(tmp_path, bad):
    r = subprocess.run([sys.executable, "-m", "atlas_exp.report", str(tmp_path), "--bootstrap", bad], cwd=REPO,
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("names", [("num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps"),
                                   ("epochs", "per_device_batch_size", "grad_accum")])
def test_tokens_processed_reads_the_trainingarguments_names_and_the_old_ones(names):
    """Run dirs written before the options took TrainingArguments' names still get their compute figure."""
    from atlas_exp.report.collect import tokens_processed

    epochs, batch, accum = names
    summary = {"data/n_tokens": 1000, "n_examples": 10, "global_step": 3, "world_size": 2}
    assert tokens_processed(summary, {epochs: 2, "max_steps": -1, batch: 4, accum: 5}) == 2000
    # max_steps > 0: global_step x global batch (4 x 5 x 2 ranks) / 10 examples = 12 epochs of 1000 tokens
    assert tokens_processed(summary, {epochs: 2, "max_steps": 3, batch: 4, accum: 5}) == 12000
