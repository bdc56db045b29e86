"""excess_loss (Rho-1 at step level) on the real SmolLM2 model and real AgentTraj-L TextCraft trajectories.

The reference is a LoRA adapter over SmolLM2 saved by the test, as a `selector=all` run saves one in
`<run_dir>/model`: randomly initialised (init_lora_weights=False) so that it really differs from the base;
a second one left at peft's default initialisation (B = 0) is the base model under another name. Expected
scores are computed independently: one plain forward pass per step with full logits under each model, a
hand-written cross-entropy over the step's supervised span, and the difference.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TEST_CACHE
from test_perplexity_selectors import app, as_trajectories, one_thread, reference_loss, trimmed_records, write_jsonl

from atlas_exp.data.trajectory import Message, Trajectory
from atlas_exp.errors import ConfigError
from atlas_exp.selectors.base import n_to_select
from atlas_exp.selectors.excess_loss import ExcessLossSelector
from atlas_exp.train.turn_spans import tokenize_trajectory

__all__ = ["one_thread"]  # the module-wide one-torch-thread fixture (autouse), see test_perplexity_selectors


@pytest.fixture(scope="module")
def adapters(smollm2_spec, smollm2_dir, tmp_path_factory):
    """(base model, the trained-like adapter as a PeftModel, its folder, an untrained adapter's folder)."""
    from peft import LoraConfig, get_peft_model

    from atlas_exp.models import load_model

    out = tmp_path_factory.mktemp("adapters")
    untrained = get_peft_model(load_model(smollm2_spec, TEST_CACHE), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    untrained.save_pretrained(out / "untrained")
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(load_model(smollm2_spec, TEST_CACHE), cfg).eval()
    peft_model.save_pretrained(out / "trained")
    base = load_model(smollm2_spec, TEST_CACHE).eval()
    return base, peft_model, str(out / "trained"), str(out / "untrained")


@pytest.fixture(scope="module")
def trajs(agenttraj_dir, tmp_path_factory):
    return as_trajectories(tmp_path_factory.mktemp("excess"), trimmed_records(agenttraj_dir / "textcraft.jsonl", 2, 2))


def selector(smollm2_spec, reference, **kw) -> ExcessLossSelector:
    return ExcessLossSelector(model=smollm2_spec, reference=reference, cache_dir=str(TEST_CACHE), progress=False, **kw)


def test_scores_are_model_loss_minus_reference_loss(adapters, trajs, smollm2_spec, smollm2_tokenizer):
    base, peft_model, trained, _ = adapters
    sel = selector(smollm2_spec, trained, ratio=0.5, score_cache=False)
    try:
        out = list(sel.select(trajs))
    finally:
        sel.close()
    for t, s in zip(trajs, out):
        tt = tokenize_trajectory(smollm2_tokenizer, t)
        assert s.selector == "excess_loss" and s.n_steps == t.n_steps
        for k, span in enumerate(tt.step_spans):
            ids = tt.input_ids[: span[1]]
            lm, lr = reference_loss(base, ids, span), reference_loss(peft_model, ids, span)
            assert s.meta["loss_model"][k] == pytest.approx(lm, abs=1e-4)
            assert s.meta["loss_reference"][k] == pytest.approx(lr, abs=1e-4)
            assert s.steps[k].score == pytest.approx(lm - lr, abs=2e-4)
        assert len(s.selected_steps) == n_to_select(t.n_steps, 0.5)
        best = max(range(t.n_steps), key=lambda k: s.steps[k].score)
        assert best in s.selected_steps
    stats = sel.stats()
    assert stats["model"]["trajectories_scored"] == stats["reference"]["trajectories_scored"] == len(trajs)
    assert stats["model"]["tokens_scored"] == stats["reference"]["tokens_scored"] > 0  # same tokenizer, same spans
    assert stats["tokens_scored"] == 2 * stats["model"]["tokens_scored"] and stats["seconds"] > 0


def _toy(tid: str, n: int) -> Trajectory:
    msgs = [Message("user", "task")]
    for k in range(n):
        msgs += [Message("assistant", f"act {k}", step=k), Message("user", f"obs {k}")]
    return Trajectory(id=tid, env="toy", messages=msgs[:-1])


def _fake_losses(sel: ExcessLossSelector, model: dict[str, list[float]], reference: dict[str, list[float]]) -> None:
    """Replace both scoring passes by given conditioned losses (the selection rule alone, no model)."""
    def fake(losses):
        return lambda trajs, offset=0: [([*losses[t.id]], {"metric": "loss", "loss_cond": losses[t.id]}, [None] * t.n_steps)
                                        for t in trajs]
    sel.model_pass.score_chunk = fake(model)
    sel.reference_pass.score_chunk = fake(reference)


def test_top_ratio_with_seeded_ties(smollm2_spec, adapters):
    trained = adapters[2]
    t = _toy("t0", 5)
    model = {"t0": [3.0, 2.0, 2.0, 2.0, 0.5]}
    reference = {"t0": [1.0, 1.0, 1.0, 1.0, 1.0]}  # excess: 2, 1, 1, 1, -0.5
    picks = set()
    for seed in range(12):
        sel = selector(smollm2_spec, trained, ratio=0.4, seed=seed)  # 2 of 5: the best, then one of the 3 tied
        _fake_losses(sel, model, reference)
        (s,) = list(sel.select([t]))
        assert [c.score for c in s.steps] == [2.0, 1.0, 1.0, 1.0, -0.5]
        chosen = set(s.selected_steps)
        assert 0 in chosen and len(chosen) == 2 and 4 not in chosen
        assert chosen == set(next(iter(sel.select([t]))).selected_steps)  # the same seed draws the same tie
        picks |= chosen - {0}
    assert len(picks) > 1  # ties do not always go to the earlier step


def test_global_scope_and_non_finite_losses(smollm2_spec, adapters):
    trained = adapters[2]
    ts = [_toy("a", 2), _toy("b", 2)]
    sel = selector(smollm2_spec, trained, ratio=0.75, scope="global")  # 3 of 4 steps, >= 1 per trajectory
    _fake_losses(sel, {"a": [5.0, math.nan], "b": [1.0, 4.0]}, {"a": [1.0, 1.0], "b": [1.0, 1.0]})
    a, b = list(sel.select(ts))
    assert [c.score for c in a.steps] == [4.0, -1e9] and "not finite" in a.steps[1].reason
    assert [c.score for c in b.steps] == [0.0, 3.0]
    # each trajectory's best (a0 = 4, b1 = 3), then the best remaining (b0 = 0); the unscored step comes last
    assert set(a.selected_steps) == {0} and set(b.selected_steps) == {0, 1}


def test_a_reference_that_is_the_model_is_a_config_error(smollm2_spec, smollm2_dir, adapters, trajs):
    with pytest.raises(ConfigError, match="selector.reference is required"):
        selector(smollm2_spec, None)
    with pytest.raises(ConfigError, match="selector.reference is the same model as selector.model"):
        selector(smollm2_spec, smollm2_spec)
    with pytest.raises(ConfigError, match="selector.scope"):
        selector(smollm2_spec, adapters[2], scope="dataset")
    # the same weights under another name (an adapter never trained): caught once scored
    sel = selector(smollm2_spec, adapters[3], score_cache=False)
    try:
        with pytest.raises(ConfigError, match="excess losses are 0"):
            list(sel.select(trajs[:1]))
    finally:
        sel.close()


def test_app_select_stage_excess_loss(agenttraj_dir, adapters, tmp_path):
    data = write_jsonl(tmp_path / "textcraft.jsonl", trimmed_records(agenttraj_dir / "textcraft.jsonl", 3, 2))
    rd = tmp_path / "run"
    assert (p := app(f"run_dir={rd}", "stage=data", "data=local", f"data.path={data}")).returncode == 0, p.stderr
    cache = tmp_path / "cache"  # a fresh score cache (the converted model is linked, not copied)
    cache.mkdir()
    (cache / "gguf").symlink_to((TEST_CACHE / "gguf").resolve())

    def run(ratio: float):
        p = app(f"run_dir={rd}", f"cache_dir={cache}", "stage=select", "selector=excess_loss",
                f"selector.reference={adapters[2]}", f"ratio={ratio}")
        assert p.returncode == 0, p.stderr
        sels = [json.loads(line) for line in (rd / "selection.jsonl").read_text().splitlines()]
        return sels, json.loads((rd / "selection_summary.json").read_text())

    sels, summary = run(0.5)
    assert len(sels) == 3 and summary["selector"] == "excess_loss"
    for s in sels:
        assert s["selector"] == "excess_loss"
        assert sum(c["selected"] for c in s["steps"]) == n_to_select(s["n_steps"], 0.5)
        for c, lm, lr in zip(s["steps"], s["meta"]["loss_model"], s["meta"]["loss_reference"]):
            assert math.isfinite(c["score"]) and c["score"] == pytest.approx(lm - lr)
    st = summary["selector_stats"]
    assert st["model"]["trajectories_scored"] == st["reference"]["trajectories_scored"] == 3 and st["tokens_scored"] > 0
    # another ratio: both passes come from the score cache, no model loaded
    sels2, summary2 = run(0.3)
    st = summary2["selector_stats"]
    assert st["model"]["score_cache_hits"] == st["reference"]["score_cache_hits"] == 3 and st["tokens_scored"] == 0
    assert [[c["score"] for c in s["steps"]] for s in sels2] == [[c["score"] for c in s["steps"]] for s in sels]
    assert Path(cache / "step_scores" / "perplexity.jsonl").is_file()  # the model's pass is shared with selector=perplexity
