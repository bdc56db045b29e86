"""The causal-LM loss computed only where it is defined: at positions whose next token is supervised.

With critical-step training most tokens are context, not targets. The standard loss still projects every
position onto the vocabulary (for SmolLM2, 49k x 576 per token: a fifth of the forward FLOPs; for
Llama-3.1-8B a 128k-wide float32 logits tensor, 2 GB at 4,096 tokens) and then ignores most of it. Passing
the model `logits_to_keep` (see train/collator.py) makes it project only the supervised positions;
`supervised_loss` is then the same token-summed cross-entropy the model's own loss computes, normalised the
same way (by the supervised tokens of the whole accumulated batch when the Trainer gives that count), so
loss and gradients are equal to the standard path (tests/test_packing.py, tests/test_logits_positions.py).

`logits_to_keep` comes in two forms, and `supervised_loss` reads either:
- integer positions `[rows, K]` (`supervised_positions`): the collator also replaces `labels` by the targets
  of those positions, so the loss needs no indexing at all. Nothing on the device has a data-dependent
  size, so the host never waits for the GPU (what a boolean mask costs once per micro-batch).
- a boolean mask `[rows, length]` (`next_token_supervised`): the model returns `[n_true, vocab]` and the loss
  picks the targets with the same mask.

`weighted_loss` is the weighted form (`train.step_weights`, data weights): `sum_t w_t * nll_t / sum_t w_t`
over the supervised tokens, the denominator being the total weight of the whole accumulated batch (the
trainer counts it where the Trainer counts tokens). With every weight 1 the total weight is the token count,
so this is the same mean as the unweighted loss; a long step still weighs as many tokens as it has, each
scaled by its step's weight. It also reads full logits (no `logits_to_keep`), since the model's own loss
cannot weight tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from atlas_exp.train.masking import IGNORE_INDEX


def next_token_supervised(labels: torch.Tensor) -> torch.Tensor:
    """Boolean mask [batch, length]: position t predicts a supervised token (labels[t + 1] != -100)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer positions of `next_token_supervised(labels)` and their targets, computed on the host.

    Returns `positions` [rows, K] (K = the largest count of any row; a shorter row is filled with position
    0) and `targets` [rows, 1 + K]: column 0 is -100, column 1 + j the token that `positions[:, j]`
    predicts, -100 at the fill. The leading column mirrors a causal LM's labels, whose position 0 is never
    a target: the Trainer counts supervised tokens over `labels[..., 1:]`, and gets them all.
    """
    rows = labels.shape[0]
    per_row = [torch.nonzero(labels[r, 1:] != IGNORE_INDEX).flatten() for r in range(rows)]
    k = max((len(p) for p in per_row), default=0)
    positions = torch.zeros((rows, k), dtype=torch.long)
    targets = torch.full((rows, 1 + k), IGNORE_INDEX, dtype=labels.dtype)
    for r, p in enumerate(per_row):
        positions[r, : len(p)] = p
        targets[r, 1 : 1 + len(p)] = labels[r, p + 1]
    return positions, targets


def _normalise(loss: torch.Tensor, n_targets: Any, num_items_in_batch: Any) -> torch.Tensor:
    if num_items_in_batch is None:
        if torch.is_tensor(n_targets):
            return loss / n_targets.clamp(min=1)
        return loss / max(n_targets, 1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def supervised_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """Cross-entropy of logits computed at the supervised positions only.

    Positions form: logits [rows, K, vocab] and `labels` the collator's targets [rows, 1 + K].
    Mask form: logits [n, vocab] at `next_token_supervised(labels)`, `labels` the usual [rows, length].
    """
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    if logits.dim() == 3 and labels.dim() == 2 and logits.shape[:2] == (labels.shape[0], labels.shape[1] - 1):
        targets = labels[:, 1:].to(logits.device)
        # in float32 (float64 logits stay float64, so that tests can check exactness to 1e-9)
        flat = logits.flatten(0, 1)
        flat = flat if flat.dtype == torch.float64 else flat.float()
        loss = F.cross_entropy(flat, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        return _normalise(loss, targets.ne(IGNORE_INDEX).sum(), num_items_in_batch)
    keep = next_token_supervised(labels)
    targets = labels[:, 1:][keep[:, :-1]]
    if logits.dim() != 2 or logits.shape[0] != targets.numel():
        raise ValueError(
            f"supervised_loss: the model returned logits of shape {tuple(logits.shape)} for labels of shape "
            f"{tuple(labels.shape)} ({targets.numel()} supervised positions as a mask); does this model's forward "
            "take logits_to_keep as integer positions [rows, K] or a boolean mask? "
            "(set train.supervised_logits_only=false)"
        )
    loss = F.cross_entropy(logits.float(), targets.to(logits.device), reduction="sum")
    return _normalise(loss, targets.numel(), num_items_in_batch)


def weighted_loss(outputs: Any, labels: torch.Tensor, weights: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """`sum(w_t * nll_t) / W` over the supervised tokens; `W` is `num_items_in_batch` (the accumulated batch's
    total weight, from the trainer) or, without it, this batch's own total weight.

    `weights` has the layout of `labels` (the collator's `label_weights`, 0 where the label is -100). Three
    forms of logits: positions `[rows, K, vocab]` with labels `[rows, 1 + K]`, full `[rows, length, vocab]`
    with labels `[rows, length]` (shifted here, as the model's loss does), or a mask's `[n, vocab]`.
    """
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    weights = weights.to(logits.device)
    if logits.dim() == 3 and logits.shape[:2] == (labels.shape[0], labels.shape[1] - 1):
        flat, targets, w = logits.flatten(0, 1), labels[:, 1:], weights[:, 1:]
    elif logits.dim() == 3 and logits.shape[:2] == labels.shape:
        flat, targets, w = logits[:, :-1].flatten(0, 1), labels[:, 1:], weights[:, 1:]
    else:
        keep = next_token_supervised(labels)[:, :-1]
        flat, targets, w = logits, labels[:, 1:][keep], weights[:, 1:][keep.to(weights.device)]
        if logits.dim() != 2 or logits.shape[0] != targets.numel():
            raise ValueError(f"weighted_loss: logits of shape {tuple(logits.shape)} do not fit labels of shape "
                             f"{tuple(labels.shape)}; set train.supervised_logits_only=false")
    flat = flat if flat.dtype == torch.float64 else flat.float()
    nll = F.cross_entropy(flat, targets.flatten().to(logits.device), ignore_index=IGNORE_INDEX, reduction="none")
    w = w.flatten().to(nll.dtype)
    loss = (nll * w).sum()
    if num_items_in_batch is None:
        return loss / w.sum().clamp(min=torch.finfo(w.dtype).tiny)
    return _normalise(loss, None, num_items_in_batch)
