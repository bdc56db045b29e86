"""Supervised logits at integer positions (what the trainer hands the model) are exact and add no host sync:
the same loss and gradients as the model's own loss over full logits, padded or packed, and no more
operations whose output size or value the host must wait for (a boolean index's `nonzero`, `.item()`) than
the model's own forward and loss run (transformers' mask construction has a couple); the boolean mask adds
some, which on a GPU make the host wait for the device once per micro-batch.
Real AgentTraj-L records (tests/test_packing.py's fixture) and the first 4 of SmolLM2's 30 layers with their
real weights, in float64 (so that rounding noise cannot hide a real difference; the whole model in float64
needs about 8 GB here)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TEST_CACHE
from torch.utils._python_dispatch import TorchDispatchMode

from atlas_exp.models import load_model
from atlas_exp.train.collator import MaskedCollator, logits_positions_supported
from atlas_exp.train.loss import next_token_supervised, supervised_loss, supervised_positions


@pytest.fixture(scope="module")
def model64(smollm2_spec, smollm2_dir):
    m = load_model(smollm2_spec, TEST_CACHE, dtype=torch.float64)
    m.model.layers = m.model.layers[:4]
    m.config.num_hidden_layers = 4
    m.config.use_cache = False
    return m


def test_positions_and_targets_of_a_batch():
    labels = torch.tensor([[-100, -100, 7, 8, -100, 9], [-100, 5, -100, -100, -100, -100]])
    pos, tgt = supervised_positions(labels)
    assert pos.tolist() == [[1, 2, 4], [0, 0, 0]]
    assert tgt.tolist() == [[-100, 7, 8, 9], [-100, 5, -100, -100]]
    # the Trainer counts supervised tokens over labels[..., 1:]: the same count as the mask's
    assert int(tgt[..., 1:].ne(-100).sum()) == int(next_token_supervised(labels).sum()) == 4


def test_this_transformers_takes_integer_positions():
    assert logits_positions_supported()


class _Ops(TorchDispatchMode):
    """Records the name of every aten operation that runs; an indexing with a boolean mask as `bool_index`
    (its output size is the mask's count: on a GPU the host waits for it)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if name.split(".")[0] in ("index", "index_put", "_index_put_impl_") and any(
                torch.is_tensor(i) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) if i is not None):
            name = "bool_index"
        self.names.append(name)
        return func(*args, **(kwargs or {}))


def _full_logits_loss(model, batch):
    """The causal-LM loss over full logits, in float64 (the model's own loss casts logits to float32)."""
    labels = batch.pop("labels")
    logits = model(**batch).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")
    return loss / labels[:, 1:].ne(-100).sum()


def _loss_grads_ops(model, batch, *, standard: bool | str, keep_grads: bool = False):
    """(loss, gradients if asked else None, the data-dependent operations that ran); gradients stay in
    `model`'s .grad until the next call. `standard`: the model's own loss, or the float64 full-logits
    loss with standard="float64"."""
    model.zero_grad(set_to_none=True)
    batch = dict(batch)
    with _Ops() as ops:
        if standard == "float64":
            loss = _full_logits_loss(model, batch)
        else:
            labels = batch.pop("labels")
            loss = model(**batch, labels=labels).loss if standard else supervised_loss(model(**batch), labels)
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None} if keep_grads else None
    return loss.detach(), grads, sorted(o for o in ops.names if o.split(".")[0] in DATA_DEPENDENT)


#: operations whose output size (or a Python value) depends on tensor data: each is a host sync on a GPU
DATA_DEPENDENT = ("nonzero", "masked_select", "bool_index", "_local_scalar_dense", "item")


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_integer_positions_give_the_same_loss_and_gradients_without_data_dependent_ops(model64, features,
                                                                                         smollm2_tokenizer, pack):
    pad = smollm2_tokenizer.pad_token_id
    reference = MaskedCollator(pad_token_id=pad)(features)
    batch = MaskedCollator(pad_token_id=pad, pack=pack, supervised_logits_only=True, logits_positions=True)(features)
    n_supervised = sum(sum(x != -100 for x in f["labels"]) for f in features)
    rows = 1 if pack else len(features)
    assert batch["logits_to_keep"].dtype == torch.long and batch["logits_to_keep"].shape[0] == rows
    assert batch["labels"].shape == (rows, 1 + batch["logits_to_keep"].shape[1])
    assert int(batch["labels"][..., 1:].ne(-100).sum()) == n_supervised

    # the model's own loss on the same layout (padded or packed rows): the syncs transformers makes anyway
    own = MaskedCollator(pad_token_id=pad, pack=pack)(features)
    _, _, own_ops = _loss_grads_ops(model64, own, standard=True)
    l_ref, g_ref, _ = _loss_grads_ops(model64, reference, standard="float64", keep_grads=True)
    l_new, _, ops = _loss_grads_ops(model64, batch, standard=False)
    g_new = {n: p.grad for n, p in model64.named_parameters() if p.grad is not None}
    print(f"{'packed' if pack else 'padded'}: logits at {batch['logits_to_keep'].numel()} positions for "
          f"{n_supervised} supervised tokens; loss {l_ref.item():.10f} vs {l_new.item():.10f}")
    assert torch.allclose(l_ref, l_new, atol=1e-9, rtol=0)
    assert g_ref.keys() == g_new.keys() and len(g_ref) == 2 + 4 * 9  # embeddings, final norm, 9 per layer
    worst = max((g_ref[k] - g_new[k]).abs().max().item() for k in g_ref)
    print(f"largest gradient difference {worst:.2e}")
    assert worst <= 1e-9
    print(f"data-dependent operations: model's own loss {own_ops}, integer positions {ops}")
    assert ops == own_ops


def test_the_boolean_mask_path_has_a_data_dependent_op(model64, features, smollm2_tokenizer):
    """What the integer positions remove: the check above can fail."""
    pad = smollm2_tokenizer.pad_token_id
    _, _, own_ops = _loss_grads_ops(model64, MaskedCollator(pad_token_id=pad)(features), standard=True)
    batch = MaskedCollator(pad_token_id=pad, supervised_logits_only=True)(features)
    _, _, ops = _loss_grads_ops(model64, batch, standard=False)
    print(f"data-dependent operations: model's own loss {own_ops}, boolean mask {ops}")
    assert len(ops) > len(own_ops) and "bool_index" in ops
