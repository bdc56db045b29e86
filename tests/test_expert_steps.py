"""Offline evaluation on held-out expert trajectories (eval/expert_steps.py): what it reports is what the
model would do. `action_correct` must equal "greedy generation from the expert's prefix reproduces the
expert's action", and `nll` the model's own loss on that step; the eval stage reports the task as the
`offline` split, apart from the held-in / held-out averages."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TEST_CACHE
from test_app import app

from atlas_exp.data.sources import LocalFiles, load_trajectories
from atlas_exp.envs.textcraft_expert import TextCraftExpertSource
from atlas_exp.eval.expert_steps import _action_start, score_trajectory
from atlas_exp.models import load_model
from atlas_exp.train.turn_spans import tokenize_trajectory


@pytest.fixture(scope="module")
def model(smollm2_spec, smollm2_dir):
    m = load_model(smollm2_spec, TEST_CACHE, dtype=torch.float32)
    return m.eval()


def test_the_action_starts_at_the_first_token_whose_text_covers_the_last_action_marker(agenttraj_dir, smollm2_tokenizer):
    """`_action_start` bisects; it must give what trying every end token in turn gives, on real steps of every
    AgentTraj-L env (non-ASCII text, actions spanning several lines, steps without a marker)."""
    tok = smollm2_tokenizer
    files = sorted(agenttraj_dir.glob("*.jsonl"))
    trajs = load_trajectories([LocalFiles(str(f), limit=3) for f in files], progress=False).trajectories

    def by_every_token(ids, a, b):
        text = tok.decode(ids[a:b])
        if text.rfind("Action:") < 0:
            return None
        want = text.rfind("Action:") + len("Action:")
        for t in range(a, b):
            if len(tok.decode(ids[a:t + 1])) >= want:
                return t + 1 if t + 1 < b else None
        return None

    found = checked = 0
    for traj in trajs:
        tt = tokenize_trajectory(tok, traj)
        for a, b in tt.step_spans:
            want = by_every_token(tt.input_ids, a, b)
            assert _action_start(tok, tt.input_ids, a, b) == want, (traj.id, a, b)
            found += want is not None
            checked += 1
    assert checked > 100 and found > 0.9 * checked


def test_scores_are_what_generation_and_the_loss_say(model, smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    # one trajectory of 6 steps: each step is checked against its own loss and its own generation
    trajs = list(TextCraftExpertSource(n=1, seed=3, cache_dir=str(tmp_path)).iter_trajectories())
    checked = 0
    for traj in trajs:
        rec = score_trajectory(model, tok, traj, max_context=4096)
        tt = tokenize_trajectory(tok, traj)
        assert rec["n_steps_scored"] == traj.n_steps == len(rec["steps"]) and rec["end"] == "done"
        for step, (a, b) in zip(rec["steps"], tt.step_spans):
            ids = tt.input_ids
            # nll: the model's own loss with only this step's tokens as labels
            labels = torch.full((1, b), -100)
            labels[0, a:b] = torch.tensor(ids[a:b])
            with torch.no_grad():
                loss = model(input_ids=torch.tensor([ids[:b]]), labels=labels).loss.item()
            assert step["nll"] == pytest.approx(loss, abs=1e-4)
            # action_correct: greedy decoding from the expert's prefix up to "Action:" gives the expert's action
            act = _action_start(tok, ids, a, b)
            assert act is not None and step["action"] and step["action"] in traj.steps[step["step"]].content
            with torch.no_grad():
                gen = model.generate(input_ids=torch.tensor([ids[:act]]), attention_mask=torch.ones(1, act, dtype=torch.long),
                                     max_new_tokens=b - act, do_sample=False, temperature=None, top_p=None, top_k=None,
                                     eos_token_id=None, pad_token_id=tok.pad_token_id)
            assert step["action_correct"] == (gen[0, act:].tolist() == ids[act:b])
            checked += 1
        correct = sum(s["action_correct"] for s in rec["steps"])
        assert rec["score"] == pytest.approx(correct / traj.n_steps, abs=1e-6)
    assert checked >= 4


def test_eval_stage_reports_expert_steps_as_the_offline_split(tmp_path):
    rd = tmp_path / "run"
    task = "eval.tasks.tc_steps"
    args = [f"run_dir={rd}", "stage=eval", "policy.model=base", "logger=none", "policy.max_new_tokens=8",
            "eval.tasks.babyai=null", "eval.tasks.sciworld=null",
            "eval.tasks.textcraft.episodes.count=1", "eval.tasks.textcraft.max_turns=1",
            f"+{task}.split=offline", f"+{task}.metric=score", f"+{task}.kind=expert_steps",
            f"+{task}.trajectories._target_=atlas_exp.envs.textcraft_expert.TextCraftExpertSource",
            f"+{task}.trajectories.n=3", f"+{task}.trajectories.seed=9", f"+{task}.trajectories.cache_dir={tmp_path}",
            f"+{task}.episodes=[0,2]"]
    p = app(*args)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((rd / "eval" / "results.json").read_text())
    t = res["tasks"]["tc_steps"]
    assert t["split"] == "offline" and t["n"] == 2 and 0.0 <= t["value"] <= 100.0
    scores = [json.loads((rd / "eval" / "tc_steps" / f"{i}.json").read_text())["score"] for i in (0, 2)]
    assert all(0.0 <= x <= 1.0 for x in scores) and t["value"] == pytest.approx(100 * sum(scores) / 2, abs=1e-3)
    assert res["splits"]["held_in"]["tasks"] == ["textcraft"] and res["splits"]["offline"]["tasks"] == ["tc_steps"]
    ep = json.loads((rd / "eval" / "tc_steps" / "2.json").read_text())
    assert ep["env"] == "expert_steps" and ep["steps"] and all(s["nll"] > 0 for s in ep["steps"])
    # rerun: nothing to do
    p = app(*args)
    assert p.returncode == 0 and "up to date, skipping" in p.stdout + p.stderr


@pytest.mark.parametrize("override, expected", [
    ("+eval.tasks.x.kind=vibes", "eval.tasks.x.kind='vibes'"),
    ("+eval.tasks.x.kind=expert_steps", "eval.tasks.x.trajectories needs a _target_"),
])
def test_expert_steps_config_errors_name_the_option(tmp_path, override, expected):
    p = app(f"run_dir={tmp_path / 'r'}", "stage=eval", "policy.model=base", "logger=none", override)
    assert p.returncode == 2 and expected in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
