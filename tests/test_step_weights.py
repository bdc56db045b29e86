"""Soft step weights (`train.step_weights=score`, data `weight`): what each token weighs and how the loss uses it.

* `score`: a selected step weighs its score over the best selected score of its trajectory (the scale
  starting at the trajectory's lowest score when that is negative); equal scores weigh 1;
* a message's data `weight` multiplies the step's weight; weight 0 (a non-step since import) is never trained;
* the loss is `sum(w * nll) / sum(w)` over the optimizer step's supervised tokens, by hand on a tiny
  example, identical whichever layout computes it (padded, packed, full logits, supervised positions as
  integers or as a mask), and normalised over all micro-batches of a gradient-accumulation step;
* `binary` without data weights is exactly today's path: no weights at all reach the collator or the loss.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import read_agentgym
from test_app import app

from atlas_exp.data.trajectory import Trajectory, number_steps
from atlas_exp.errors import ConfigError
from atlas_exp.selectors.base import Selection, StepChoice
from atlas_exp.train.collator import MaskedCollator
from atlas_exp.train.loss import supervised_loss, weighted_loss
from atlas_exp.train.masking import IGNORE_INDEX, build_example, score_weights
from atlas_exp.train.turn_spans import tokenize_trajectory


def _sel(scores: list[float], chosen: set[int], tid: str = "t") -> Selection:
    return Selection(tid, "test", 0.5, [StepChoice(k, s, k in chosen) for k, s in enumerate(scores)])


# ------------------------------------------------------------------------------------------------ the rule


def test_score_weights_divide_by_the_best_selected_score():
    assert score_weights(_sel([0.2, 0.8, 0.4], {1, 2})) == {1: 1.0, 2: 0.5}


def test_negative_scores_start_the_scale_at_the_trajectory_lowest():
    # lo = -1 (step 0, unselected): (0.5 + 1) / (1 + 1) = 0.75
    assert score_weights(_sel([-1.0, 0.5, 1.0], {1, 2})) == {1: 0.75, 2: 1.0}
    w = score_weights(_sel([-3.0, -2.0, -1.0], {1, 2}))
    assert w == {1: 0.5, 2: 1.0} and all(x >= 0 for x in w.values())


def test_equal_scores_and_a_single_selected_step_weigh_one():
    assert score_weights(_sel([1.0, 1.0, 1.0], {0, 1, 2})) == {0: 1.0, 1: 1.0, 2: 1.0}
    assert score_weights(_sel([0.1, 0.9, 0.3], {1})) == {1: 1.0}
    assert score_weights(_sel([-2.0, -2.0], {0, 1})) == {0: 1.0, 1: 1.0}
    assert score_weights(_sel([0.0, 0.0], set())) == {}


# ------------------------------------------------------------------------------------------------ token weights


def _react(tid: str, weights: list[float | None]) -> Trajectory:
    turns = [("user", "You are in a room.", True, None)]
    for k, w in enumerate(weights):
        turns += [("assistant", f"Thought:\nstep {k}.\n\nAction:\nlook {k}", True, w), ("user", f"You see {k}.", True, None)]
    return Trajectory(id=tid, env="synthetic", messages=number_steps(turns, source=tid))


def test_token_weights_are_score_times_data_weight(smollm2_tokenizer):
    t = _react("w-1", [None, 0.5, 1.0])
    sel = _sel([0.2, 0.8, 0.4], {1, 2}, "w-1")
    spans = tokenize_trajectory(smollm2_tokenizer, t).step_spans
    ex = build_example(smollm2_tokenizer, t, sel, None, step_weights="score")
    want = [0.0] * len(ex.input_ids)
    for k, w in ((1, 1.0 * 0.5), (2, 0.5 * 1.0)):  # score weight x data weight
        a, b = spans[k]
        want[a:b] = [w] * (b - a)
    assert ex.weights == want
    assert [j for j, x in enumerate(ex.labels) if x != IGNORE_INDEX] == [j for j, w in enumerate(want) if w > 0]
    # binary honours the data weight alone
    ex = build_example(smollm2_tokenizer, t, sel, None)
    a, b = spans[1]
    assert ex.weights[a:b] == [0.5] * (b - a) and ex.weights[spans[2][0]] == 1.0


def test_binary_without_data_weights_carries_no_weights(smollm2_tokenizer):
    t = _react("w-2", [None, None, 1.0])
    sel = _sel([0.2, 0.8, 0.4], {1, 2}, "w-2")
    ex = build_example(smollm2_tokenizer, t, sel, None)
    assert ex.weights is None
    # equal scores: score weighs like binary
    assert build_example(smollm2_tokenizer, t, _sel([1.0] * 3, {1, 2}, "w-2"), None, step_weights="score").weights is None


def test_a_step_weighing_zero_is_not_supervised(smollm2_tokenizer):
    t = _react("w-3", [None, None, None])
    sel = _sel([0.0, 0.0, 2.0], {0, 2}, "w-3")  # step 0 sits at the bottom of the scale: weight 0
    ex = build_example(smollm2_tokenizer, t, sel, None, step_weights="score")
    spans = tokenize_trajectory(smollm2_tokenizer, t).step_spans
    a, b = spans[0]
    assert all(x == IGNORE_INDEX for x in ex.labels[a:b]) and ex.n_supervised == spans[2][1] - spans[2][0]


@pytest.mark.parametrize("key,value,match", [("step_weights", "soft", "train.step_weights"),
                                              ("supervise", "thoughts", "train.supervise"),
                                              ("on_missing_part", "drop", "train.on_missing_part")])
def test_bad_options_are_config_errors_naming_them(smollm2_tokenizer, key, value, match):
    t = _react("w-4", [None])
    with pytest.raises(ConfigError, match=match):
        build_example(smollm2_tokenizer, t, _sel([1.0], {0}, "w-4"), None, **{key: value})


# ------------------------------------------------------------------------------------------------ the loss


def test_weighted_loss_is_the_hand_computed_weighted_mean():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[-100, 3, 1, -100, 6]])
    weights = torch.tensor([[0.0, 0.5, 1.0, 0.0, 0.25]], dtype=torch.float64)
    # position t predicts labels[t + 1]
    logp = logits[0].log_softmax(-1)
    nll = {1: -logp[0, 3], 2: -logp[1, 1], 4: -logp[3, 6]}
    w = {1: 0.5, 2: 1.0, 4: 0.25}
    want = sum(w[j] * nll[j] for j in nll) / sum(w.values())
    got = weighted_loss({"logits": logits}, labels, weights)
    assert got.item() == pytest.approx(want.item(), abs=1e-12)
    # with the accumulated batch's total weight given, that is the denominator
    assert weighted_loss({"logits": logits}, labels, weights, num_items_in_batch=torch.tensor(3.5)).item() == \
        pytest.approx((want * 1.75 / 3.5).item(), abs=1e-12)
    # unit weights: the plain mean over supervised tokens, as the unweighted loss computes it
    ones = (labels != -100).double()
    plain = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
    assert weighted_loss({"logits": logits}, labels, ones).item() == pytest.approx(plain.item(), abs=1e-12)


@pytest.fixture(scope="module")
def tiny_model(smollm2_tokenizer):
    """A random 2-layer Llama over SmolLM2's vocabulary, float64: layouts are compared, not quality."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    m = LlamaForCausalLM(cfg).double()
    m.config.use_cache = False
    return m.eval()


@pytest.fixture(scope="module")
def weighted_features(agenttraj_dir, smollm2_tokenizer):
    """Three short real TextCraft trajectories, scores 0..n-1 with every other step selected: uneven weights."""
    trajs = sorted(read_agentgym(agenttraj_dir / "textcraft.jsonl", limit=40), key=lambda t: sum(len(m.content) for m in t.messages))
    out = []
    for t in (trajs[0], trajs[5], trajs[10]):
        sel = Selection(t.id, "test", 0.5, [StepChoice(k, float(k + 1), k % 2 == 0) for k in range(t.n_steps)])
        ex = build_example(smollm2_tokenizer, t, sel, None, step_weights="score")
        assert ex.weights is not None and len(set(ex.weights) - {0.0}) > 1
        out.append({"input_ids": ex.input_ids, "labels": ex.labels, "weights": ex.weights})
    return out


def _loss(model, batch):
    batch = dict(batch)
    labels, weights = batch.pop("labels"), batch.pop("label_weights")
    with torch.no_grad():
        return weighted_loss(model(**batch), labels, weights).item()


def test_score_weights_give_the_same_loss_padded_packed_and_supervised_only(tiny_model, weighted_features, smollm2_tokenizer):
    pad = smollm2_tokenizer.pad_token_id
    layouts = {
        "padded": MaskedCollator(pad, weighted=True),
        "packed": MaskedCollator(pad, pack=True, weighted=True),
        "padded, positions": MaskedCollator(pad, weighted=True, supervised_logits_only=True, logits_positions=True),
        "packed, positions": MaskedCollator(pad, pack=True, weighted=True, supervised_logits_only=True, logits_positions=True),
        "padded, mask": MaskedCollator(pad, weighted=True, supervised_logits_only=True),
        "packed, mask": MaskedCollator(pad, pack=True, weighted=True, supervised_logits_only=True),
    }
    losses = {name: _loss(tiny_model, c(weighted_features)) for name, c in layouts.items()}
    print(losses)
    # the hand computation: each sequence alone, weighted sum over all of them, over their total weight
    num = den = 0.0
    for f in weighted_features:
        with torch.no_grad():
            logp = tiny_model(input_ids=torch.tensor([f["input_ids"]])).logits[0].log_softmax(-1)
        for j in range(1, len(f["input_ids"])):
            if f["labels"][j] != -100:
                num += -f["weights"][j] * logp[j - 1, f["labels"][j]].item()
                den += f["weights"][j]
    for name, v in losses.items():
        assert v == pytest.approx(losses["padded"], abs=1e-12), name
        assert v == pytest.approx(num / den, rel=1e-6), name  # the collator keeps weights in float32
    # and the weights matter: the unweighted mean differs
    plain = MaskedCollator(pad)([{k: f[k] for k in ("input_ids", "labels")} for f in weighted_features])
    with torch.no_grad():
        unweighted = tiny_model(**plain).loss.item()
    assert abs(unweighted - num / den) > 1e-4


def test_binary_is_todays_path_exactly(tiny_model, weighted_features, smollm2_tokenizer):
    """binary without data weights: the collator's batch is the unweighted one, key for key and bit for bit,
    and unit weights would give the same loss as `supervised_loss` (the normalisations agree)."""
    pad = smollm2_tokenizer.pad_token_id
    feats = [{k: f[k] for k in ("input_ids", "labels")} for f in weighted_features]
    for kw in ({}, {"pack": True}, {"supervised_logits_only": True, "logits_positions": True}):
        a, b = MaskedCollator(pad, **kw)(feats), MaskedCollator(pad, weighted=False, **kw)(feats)
        assert a.keys() == b.keys() and "label_weights" not in a and all(torch.equal(a[k], b[k]) for k in a)
    batch = MaskedCollator(pad, weighted=True, supervised_logits_only=True, logits_positions=True)(feats)
    assert set(batch["label_weights"].unique().tolist()) == {0.0, 1.0}
    labels, weights = batch.pop("labels"), batch.pop("label_weights")
    with torch.no_grad():
        out = tiny_model(**batch)
    assert weighted_loss(out, labels, weights).item() == pytest.approx(supervised_loss(out, labels).item(), abs=1e-12)


def test_gradient_accumulation_normalises_by_the_step_total_weight(tiny_model, weighted_features, smollm2_tokenizer, tmp_path):
    """Two micro-batches of one optimizer step: the trainer's denominator is their total weight, so the
    micro-batch losses add up to the weighted mean over both (not to the mean of their means)."""
    from transformers import TrainingArguments

    from atlas_exp.train.hf_trainer import WeightedLossTrainer

    pad = smollm2_tokenizer.pad_token_id
    collate = MaskedCollator(pad, weighted=True)
    micro = [collate(weighted_features[:1]), collate(weighted_features[1:])]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=1)
    trainer = WeightedLossTrainer(model=tiny_model, args=args, data_collator=collate)
    batches, total = trainer.get_batch_samples(iter(micro), 2, torch.device("cpu"))
    want_total = sum(sum(f["weights"][1:]) for f in weighted_features)
    assert float(total) == pytest.approx(want_total, rel=1e-6)
    with torch.no_grad():
        summed = sum(trainer.compute_loss(tiny_model, dict(b), num_items_in_batch=total).item() for b in batches)
    together = _loss(tiny_model, collate(weighted_features))
    assert summed == pytest.approx(together, abs=1e-6)
    halves = sum(_loss(tiny_model, b) for b in micro) / 2
    assert abs(halves - together) > 1e-5  # the mean of the micro-batch means is a different number


def test_the_app_trains_with_score_weights_on_the_packed_supervised_only_path(tmp_path):
    """The app end to end with step_weights=score on the path with the most moving parts (packed rows,
    supervised positions only, gradient accumulation over two micro-batches): training runs and logs a finite
    loss. That this loss equals the padded full-logits one is shown above without the app, layout by layout."""
    rd = tmp_path / "run"
    p = app(f"run_dir={rd}", "logger=none", "eval=none", "data.sources.0.n=2", "selector=random", "ratio=0.5",
            "train.step_weights=score", "train.max_steps=1", "train.per_device_train_batch_size=1", "train.gradient_accumulation_steps=2",
            "train.packing=true", "train.supervised_logits_only=true", "train.save_steps=100")
    assert p.returncode == 0, p.stderr[-3000:]
    losses = json.loads((rd / "model" / "training_summary.json").read_text())["losses"]
    assert len(losses) == 1 and math.isfinite(losses[0]) and losses[0] > 0


def test_the_collators_docstring_example_holds():
    import doctest

    import atlas_exp.train.collator

    result = doctest.testmod(atlas_exp.train.collator)
    assert result.attempted >= 4 and result.failed == 0
