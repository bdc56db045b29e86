"""The causal-LM loss computed only where it is defined: at positions whose next token is supervised.

With critical-step training most tokens are context, not targets. The standard loss still projects every
position onto the vocabulary (for SmolLM2, 49k x 576 per token: a fifth of the forward FLOPs; for
Llama-3.1-8B a 128k-wide float32 logits tensor, 2 GB at 4,096 tokens) and then ignores most of it. Passing
the model `logits_to_keep` (a boolean mask, see train/collator.py) makes it project only the supervised
positions; `supervised_loss` is then the same token-summed cross-entropy the model's own loss computes,
normalised the same way (by the supervised tokens of the whole accumulated batch when the Trainer gives
that count), so loss and gradients are equal to the standard path (tests/test_packing.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def next_token_supervised(labels: torch.Tensor) -> torch.Tensor:
    """Boolean mask [batch, length]: position t predicts a supervised token (labels[t + 1] != -100)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    return keep


def supervised_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """Cross-entropy of logits computed at `next_token_supervised(labels)` only (shape [n, vocab])."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    keep = next_token_supervised(labels)
    targets = labels[:, 1:][keep[:, :-1]]
    if logits.dim() != 2 or logits.shape[0] != targets.numel():
        raise ValueError(
            f"supervised_loss: the model returned logits of shape {tuple(logits.shape)} for {targets.numel()} "
            "supervised positions; does this model's forward take a boolean logits_to_keep mask? "
            "(set train.supervised_logits_only=false)"
        )
    loss = F.cross_entropy(logits.float(), targets.to(logits.device), reduction="sum")
    if num_items_in_batch is None:
        return loss / max(targets.numel(), 1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
