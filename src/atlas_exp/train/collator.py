"""Batching masked examples: right-pad input_ids with the pad token and labels with -100."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class MaskedCollator:
    """Pads a list of {"input_ids", "labels"} to the longest in the batch (optionally to a multiple of
    `pad_to_multiple_of`, which helps tensor cores on GPU). Padding is never attended nor supervised."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        n = len(features)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, longest), -100, dtype=torch.long)
        attention_mask = torch.zeros((n, longest), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            input_ids[i, :k] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[i, :k] = torch.as_tensor(f["labels"], dtype=torch.long)
            attention_mask[i, :k] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
