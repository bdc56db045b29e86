"""Batching masked examples: padded rows, or one packed row with per-sequence attention boundaries.

Labels not to learn are `IGNORE_INDEX` (-100, what PyTorch's cross-entropy skips; train/masking.py).

- Padded (default): input_ids right-padded with the pad token, labels with IGNORE_INDEX, an attention mask.
- Packed (`train.packing`): the micro-batch's sequences laid end to end in one row, no padding at all.
  `position_ids` restart at 0 for each sequence and no attention mask is passed, from which transformers
  builds a block-diagonal causal mask (and FlashAttention its varlen boundaries): no token attends across
  sequences (tests/test_packing.py proves the logits equal each sequence's alone). The first label of each
  sequence is IGNORE_INDEX so that no sequence is trained to predict the next one's first token.
- `supervised_logits_only`: also hand the model `logits_to_keep`, the positions whose next token is supervised,
  so that the vocabulary projection (and its softmax) runs only where the loss needs it: at ratio 0.3 that is
  a small share of the tokens. The loss is then `supervised_loss` (train/loss.py). Two forms:
  - `logits_positions=True` (what the trainer uses): integer positions `[rows, K]`, K = the most supervised
    positions of any row (shorter rows repeat position 0), and `labels` replaced by those positions' targets,
    `[rows, 1 + K]` (column 0 and the repeats are IGNORE_INDEX). The model gathers the positions
    (`torch.take_along_dim`) and the loss reads its targets as they are: no boolean indexing happens on the
    device, so nothing waits for the GPU to learn how many positions there are (a host sync per micro-batch,
    which shows when kernels are as short as a 135M model's). The leading IGNORE_INDEX column keeps the Trainer's
    count of supervised tokens (over `labels[..., 1:]`) right. Exact (tests/test_logits_positions.py).
  - otherwise: a boolean mask `[rows, length]`; the model returns the logits of its True positions flattened.
- `weighted` (`train.step_weights=score`, or data weights other than 1): also `label_weights`, float32, the
  shape of the `labels` it is returned with (after any of the transforms above), the weight of each label
  (an example's `weights`, 1.0 for a label without), 0.0 wherever the label is IGNORE_INDEX. `weighted_loss` reads it.

Why not transformers' `DataCollatorWithFlattening`: it flattens `input_ids`, `labels` and `position_ids`
exactly like `_packed` (boundary label IGNORE_INDEX, positions restarting at 0), but nothing else; the label
weights would still need flattening by hand with the same boundary rule, and the padded path and the
supervised-position transforms would stay ours. One collator that lays out labels and their weights
together keeps the two from ever disagreeing.

>>> c = MaskedCollator(pad_token_id=0, pack=True, weighted=True)
>>> b = c([{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7], "weights": [0.0, 0.5, 0.5]},
...        {"input_ids": [8, 9], "labels": [8, 9]}])
>>> b["input_ids"].tolist(), b["position_ids"].tolist()
([[5, 6, 7, 8, 9]], [[0, 1, 2, 0, 1]])
>>> b["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]  # the second one's first: the boundary
True
>>> b["label_weights"].tolist()
[[0.0, 0.5, 0.5, 0.0, 1.0]]
>>> padded = MaskedCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
...                                          {"input_ids": [8], "labels": [8]}])
>>> padded["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from atlas_exp.train.loss import next_token_supervised, supervised_positions
from atlas_exp.train.masking import IGNORE_INDEX


@dataclass
class MaskedCollator:
    """Collates a list of {"input_ids", "labels"}; padding is never attended nor supervised.

    `pad_to_multiple_of` (padded mode) rounds the row length up, which helps tensor cores on a GPU.
    `logits_positions` (with `supervised_logits_only`): integer positions and compact labels instead of a
    boolean mask (see the module's docstring). `weighted`: also `label_weights` (same).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    pack: bool = False
    supervised_logits_only: bool = False
    logits_positions: bool = False
    weighted: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self._packed(features) if self.pack else self._padded(features)
        weights = None
        if self.weighted:
            weights = self._weights(features, batch["labels"].shape)
            weights = torch.where(batch["labels"] != IGNORE_INDEX, weights, torch.zeros(()))
        if self.supervised_logits_only:
            if self.logits_positions:
                positions, targets = supervised_positions(batch["labels"])
                if weights is not None:
                    # the weight of the token each kept position predicts, in the targets' layout
                    kept = torch.gather(weights[:, 1:], 1, positions) * (targets[:, 1:] != IGNORE_INDEX)
                    weights = torch.cat([torch.zeros((len(kept), 1)), kept], dim=1)
                batch["logits_to_keep"], batch["labels"] = positions, targets
            else:
                batch["logits_to_keep"] = next_token_supervised(batch["labels"])
        if weights is not None:
            batch["label_weights"] = weights
        return batch

    def _weights(self, features: list[dict[str, Any]], shape: torch.Size) -> torch.Tensor:
        """Each example's `weights` (1.0 where it has none) laid out like `_padded` / `_packed` lay labels."""
        rows = [torch.as_tensor(f["weights"], dtype=torch.float32) if f.get("weights") is not None
                else torch.ones(len(f["input_ids"]), dtype=torch.float32) for f in features]
        if self.pack:
            return torch.cat(rows)[None]
        out = torch.zeros(shape, dtype=torch.float32)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out

    def _padded(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        n = len(features)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, longest), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            input_ids[i, :k] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[i, :k] = torch.as_tensor(f["labels"], dtype=torch.long)
            attention_mask[i, :k] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    def _packed(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, labels, positions = [], [], []
        for f in features:
            k = len(f["input_ids"])
            ids.append(torch.as_tensor(f["input_ids"], dtype=torch.long))
            lab = torch.as_tensor(f["labels"], dtype=torch.long).clone()
            lab[0] = IGNORE_INDEX  # the boundary: the previous sequence's last token does not predict this one
            labels.append(lab)
            positions.append(torch.arange(k, dtype=torch.long))
        return {"input_ids": torch.cat(ids)[None], "labels": torch.cat(labels)[None],
                "position_ids": torch.cat(positions)[None]}


def logits_positions_supported() -> bool:
    """Whether this transformers version's models take `logits_to_keep` as integer positions `[rows, K]`
    (`slice_logits_to_keep`, used by Llama-family models: a 2-D integer tensor is gathered per row).
    Older versions index `hidden[:, positions, :]`, which would mix rows: there the boolean mask is used."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:
        return False
    hidden = torch.arange(12.0).view(2, 3, 2)
    try:
        out = slice_logits_to_keep(hidden, torch.tensor([[2], [0]]))
    except Exception:
        return False
    return tuple(out.shape) == (2, 1, 2) and out[0, 0, 0].item() == 4.0 and out[1, 0, 0].item() == 6.0
