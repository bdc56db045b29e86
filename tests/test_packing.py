"""Packing and supervised-only logits change how a batch is computed, never what is learned.

- A packed row (sequences end to end, position ids restarting, no attention mask) gives every sequence
  exactly the logits it gets alone: no token attends across a boundary. A row with the same tokens but
  running position ids (plain concatenation) does not, which shows the check can fail.
- Logits only at supervised positions (`logits_to_keep` + `supervised_loss`) give the loss and gradients of
  the model's own loss over full logits, padded or packed.
Real SmolLM2 weights, real AgentTraj-L TextCraft records, float64 (so that rounding noise cannot hide a
real difference).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TEST_CACHE
from test_app import app

from atlas_exp.models import load_model
from atlas_exp.train.collator import MaskedCollator
from atlas_exp.train.loss import next_token_supervised, supervised_loss


@pytest.fixture(scope="module")
def model64(smollm2_spec, smollm2_dir):
    torch.manual_seed(0)
    m = load_model(smollm2_spec, TEST_CACHE, dtype=torch.float64)
    m.config.use_cache = False
    return m


def test_a_packed_row_gives_each_sequence_its_own_logits(model64, features, smollm2_tokenizer):
    pad = smollm2_tokenizer.pad_token_id
    packed = MaskedCollator(pad_token_id=pad, pack=True)(features)
    assert packed["input_ids"].shape == (1, sum(len(f["input_ids"]) for f in features)) and "attention_mask" not in packed
    with torch.no_grad():
        together = model64(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        concatenated = model64(input_ids=packed["input_ids"],
                               position_ids=torch.arange(packed["input_ids"].shape[1])[None]).logits[0]
        start, worst, leak = 0, 0.0, 0.0
        for f in features:
            k = len(f["input_ids"])
            alone = model64(input_ids=torch.tensor([f["input_ids"]])).logits[0]
            worst = max(worst, (together[start:start + k] - alone).abs().max().item())
            if start:
                leak = max(leak, (concatenated[start:start + k] - alone).abs().max().item())
            start += k
    print(f"packed vs alone: {worst:.1e}; plain concatenation vs alone: {leak:.1e}")
    assert worst <= 1e-9
    assert leak > 1e-3  # without the boundaries the later sequences see the earlier ones


def _loss_and_grads(model, batch, *, supervised_only: bool):
    model.zero_grad(set_to_none=True)
    batch = dict(batch)
    labels = batch.pop("labels")
    if supervised_only:
        out = model(**batch)  # the collator's logits_to_keep goes in with the batch, as in the Trainer
        assert out.logits.shape[0] == int(next_token_supervised(labels).sum())  # only those positions
        loss = supervised_loss(out, labels)
    else:
        loss = model(**batch, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


#: how far apart two float32 computations of the same loss (and of its gradients) may be when only their
#: summation order differs
FLOAT32_REL = 1e-6
FLOAT32_REL_GRAD = 1e-6


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_supervised_only_logits_give_the_same_loss_and_gradients(model64, features, smollm2_tokenizer, pack):
    pad = smollm2_tokenizer.pad_token_id
    reference = MaskedCollator(pad_token_id=pad)(features)  # padded batch, the model's own loss
    batch = MaskedCollator(pad_token_id=pad, pack=pack, supervised_logits_only=True)(features)
    l_ref, g_ref = _loss_and_grads(model64, reference, supervised_only=False)
    l_new, g_new = _loss_and_grads(model64, batch, supervised_only=True)
    kept = int(batch["logits_to_keep"].sum())
    print(f"{'packed' if pack else 'padded'}: logits at {kept} of {batch['input_ids'].numel()} positions; "
          f"loss {l_ref.item():.8f} vs {l_new.item():.8f}")
    assert kept == sum(sum(x != -100 for x in f["labels"]) for f in features)
    # Equal up to float32 rounding: the two paths project different sets of rows onto the vocabulary, and a
    # CPU's matmul kernel may block (so round) those differently (bit-equal on an AMD EPYC; the loss 1e-7 and the
    # gradients 4e-8 relative apart on an AVX-512 Xeon). A lost or shifted token moves this mean over 101
    # tokens by about a hundredth of a token's loss, four orders above the bound.
    assert abs(l_ref.item() - l_new.item()) <= FLOAT32_REL * abs(l_ref.item())
    assert g_ref.keys() == g_new.keys() and len(g_ref) > 100
    worst = max(((g_ref[k] - g_new[k]).abs().max() / g_ref[k].abs().max().clamp_min(1e-30)).item() for k in g_ref)
    print(f"largest gradient difference, relative to its tensor's largest gradient {worst:.2e}")
    assert worst <= FLOAT32_REL_GRAD


def test_training_with_packing_and_supervised_logits_matches_the_standard_path(tmp_path):
    """The Trainer path (compute_loss_func, gradient accumulation's token count): same logged losses."""
    losses = {}
    for name, extra in (("standard", ["train.packing=false", "train.supervised_logits_only=false"]),
                        ("packed", ["train.packing=true", "train.supervised_logits_only=true"])):
        rd = tmp_path / name
        # 8 trajectories = 2 optimizer steps of 2 x 2: the second step sees other data and updated weights
        p = app(f"run_dir={rd}", "logger=none", "eval=none", "data.sources.0.n=8", "selector=random", "ratio=0.5",
                "train.max_steps=2", "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=2", "train.lora.dropout=0.0",
                "train.warmup_steps=0", "train.save_steps=100", *extra)
        assert p.returncode == 0, p.stderr[-3000:]
        losses[name] = json.loads((rd / "model" / "training_summary.json").read_text())["losses"]
    print(losses)
    assert len(losses["standard"]) == 2 and losses["standard"][0] != losses["standard"][1]
    # step 1: the same weights see the same data, the losses agree to float32 rounding
    assert losses["packed"][0] == pytest.approx(losses["standard"][0], abs=1e-5)
    # step 2 follows an Adam update, whose normalisation turns float32 rounding in near-zero gradients into
    # full-size steps: close (a wrong normalisation would be off by a factor), not bit-equal
    assert losses["packed"][1] == pytest.approx(losses["standard"][1], rel=2e-3)
