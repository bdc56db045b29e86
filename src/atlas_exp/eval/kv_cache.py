"""A key/value cache that grows in place, so that decoding a batch does not copy the whole cache per token.

transformers' `DynamicCache` appends each new token's keys and values with `torch.cat`: every generated token
copies every layer's cache. For one conversation that is little; for 16 episodes of ~1,000 tokens each it is
16 x 1,000 x 46 KB (SmolLM2-135M, fp32) = 0.7 GB copied per generated token, which on a CPU costs more than
the forward pass of the token itself (measured: ~0.8 s per token against ~0.1 s for the forward). A batch of
one copies 1/16 of that, so the copy is what kept batched rollouts from paying off.

`GrowingCache` is a `DynamicCache` whose layers keep a buffer with room for `capacity` tokens: new keys are
written into it and attention reads a view of the filled part. Sized to the prompt plus `max_new_tokens`, a
`generate` call never reallocates; a longer one doubles the buffer (amortised O(1) copying per token).
Attention sees the same keys and values as with a `DynamicCache`, so replies are the same.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """One layer's keys/values in a preallocated buffer; `keys`/`values` are views of its filled part."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = max(1, int(capacity))
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._len = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._allocate(key_states.shape[0], key_states.shape[1], key_states.shape[-1], value_states.shape[-1],
                       key_states.dtype, max(self.capacity, key_states.shape[-2]))
        self.is_initialized = True

    def _allocate(self, batch: int, heads: int, k_dim: int, v_dim: int, dtype: torch.dtype, capacity: int) -> None:
        self._k = torch.empty((batch, heads, capacity, k_dim), dtype=dtype, device=self.device)
        self._v = torch.empty((batch, heads, capacity, v_dim), dtype=dtype, device=self.device)
        self._len = 0
        self._expose()

    def _expose(self) -> None:
        self.keys = self._k[:, :, :self._len]
        self.values = self._v[:, :, :self._len]

    def _adopt(self) -> None:
        """Someone (crop, batch selection, beam reordering) replaced `keys`/`values`: take them as the content."""
        keys, values = self.keys, self.values
        self._allocate(keys.shape[0], keys.shape[1], keys.shape[-1], values.shape[-1], keys.dtype,
                       max(self.capacity, keys.shape[-2]))
        self._k[:, :, :keys.shape[-2]] = keys
        self._v[:, :, :values.shape[-2]] = values
        self._len = keys.shape[-2]
        self._expose()

    def _grow(self, need: int) -> None:
        old_k, old_v, n = self._k, self._v, self._len
        self._allocate(old_k.shape[0], old_k.shape[1], old_k.shape[-1], old_v.shape[-1], old_k.dtype,
                       max(need, 2 * old_k.shape[-2]))
        self._k[:, :, :n] = old_k[:, :, :n]
        self._v[:, :, :n] = old_v[:, :, :n]
        self._len = n

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif self.keys.data_ptr() != self._k.data_ptr() or self.keys.shape[:2] != self._k.shape[:2] \
                or self.keys.shape[-2] != self._len:
            self._adopt()
        end = self._len + key_states.shape[-2]
        if end > self._k.shape[-2]:
            self._grow(end)
        self._k[:, :, self._len:end] = key_states
        self._v[:, :, self._len:end] = value_states
        self._len = end
        self._expose()
        return self.keys, self.values


class GrowingCache(DynamicCache):
    """A `DynamicCache` of `GrowingLayer`s, optionally filled with per-layer (keys, values) to continue from."""

    def __init__(self, capacity: int, layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        Cache.__init__(self, layer_class_to_replicate=lambda: GrowingLayer(capacity))
        for i, (k, v) in enumerate(layers or []):
            self.update(k, v, i)
