"""Dropping the tokens after the last selected step changes nothing a causal LM learns: the loss and
every gradient are equal (to 1e-5) with and without those tokens, on the real SmolLM2 model."""

from __future__ import annotations

import torch
from conftest import TEST_CACHE
from helpers import read_agentgym

from atlas_exp.models import load_model
from atlas_exp.selectors.base import Selection, StepChoice
from atlas_exp.train.collator import MaskedCollator
from atlas_exp.train.masking import build_example


def loss_and_grads(model, ex, pad_id):
    model.zero_grad(set_to_none=True)
    batch = MaskedCollator(pad_token_id=pad_id)([{"input_ids": ex.input_ids, "labels": ex.labels}])
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_tail_after_last_selected_step_does_not_change_loss_or_gradients(agenttraj_dir, smollm2_spec, smollm2_tokenizer, smollm2_dir):
    trajs = read_agentgym(agenttraj_dir / "textcraft.jsonl", limit=40)
    traj = min((t for t in trajs if t.n_steps >= 4), key=lambda t: sum(len(m.content) for m in t.messages))
    # select two early steps so that there is a real tail to drop
    sel = Selection(traj.id, "test", 0.5, [StepChoice(k, 1.0, k in (0, 1)) for k in range(traj.n_steps)])
    full = build_example(smollm2_tokenizer, traj, sel, max_length=None)
    cut = build_example(smollm2_tokenizer, traj, sel, max_length=None, truncate_after_last_selected=True)
    assert cut.n_tokens < full.n_tokens and cut.n_supervised == full.n_supervised
    assert cut.input_ids == full.input_ids[: cut.n_tokens]

    # float64: matmuls over different sequence lengths round differently in float32 (about 1e-5 here), which
    # is noise of the arithmetic, not of the method; in float64 any real dependence on the tail would show
    torch.manual_seed(0)
    model = load_model(smollm2_spec, TEST_CACHE, dtype=torch.float64)
    model.config.use_cache = False
    l_full, g_full = loss_and_grads(model, full, smollm2_tokenizer.pad_token_id)
    l_cut, g_cut = loss_and_grads(model, cut, smollm2_tokenizer.pad_token_id)
    print(f"tokens {full.n_tokens} -> {cut.n_tokens}; loss {l_full.item():.6f} vs {l_cut.item():.6f}")
    assert torch.allclose(l_full, l_cut, atol=1e-5, rtol=0)
    assert g_full.keys() == g_cut.keys() and len(g_full) > 100
    worst = max((g_full[k] - g_cut[k]).abs().max().item() for k in g_full)
    print(f"largest gradient difference {worst:.2e}")
    assert worst <= 1e-5
    assert worst <= 1e-9  # in fact equal up to float64 rounding
