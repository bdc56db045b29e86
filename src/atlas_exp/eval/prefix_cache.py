"""Reuse each episode's key/value cache from one turn to the next.

An agent episode's prompt only grows: turn t+1's prompt is turn t's prompt, the reply the model just
generated, and one new observation. Prefilling the whole conversation again every turn makes the cost of
an episode quadratic in its turns, and on a CPU that prefill dominates evaluation. So after each `generate`
the policy keeps, per conversation, the attention keys/values of every token it has seen (prompt + reply);
the next call looks each new prompt up by its longest common token prefix with a kept entry and prefills
only the rest.

Matching by token prefix, not by episode id, keeps the policy stateless for its callers (a conversation is
just a list of messages) and is exact by construction: a kept entry is only ever used for the tokens it was
computed from. Where the chat template re-tokenizes the decoded reply differently from the generated tokens,
the match simply stops earlier and more is prefilled.

Rows of one batch reuse different lengths. They are laid out as
`[pad | reused prefix | pad | new tokens]`: the reused keys/values are left-padded to the longest reused
prefix, the new tokens to the longest new part, and the attention mask hides both paddings. Positions come
from the mask's running count (what `generate` does for left padding), so every real token keeps the
position it had when its keys were computed (rotary embeddings are baked into cached keys).

Only the last call's entries are kept: an episode that did not come back (it ended) frees its memory at the
next call. Memory per kept token: layers x 2 x kv_heads x head_dim x dtype bytes (46 KB for SmolLM2-135M
in float32; 128 KB for Llama-3.1-8B in bf16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

#: per layer a (keys, values) pair, each [batch, kv_heads, tokens, head_dim]
Layers = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Entry:
    """The keys/values of `ids` (one sequence): per layer a (key, value) pair of shape [1, heads, len, dim].

    `from_past`: how many of its leading tokens were computed by an earlier call (all of them for an entry
    kept from the last call; for a prefix prefilled in this call, what that prefill itself reused). Only those
    count as reused in `stats`; the rest were prefilled in this call and are counted there.
    """

    ids: list[int]
    layers: Layers
    from_past: int = 0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x = torch.tensor(a[:n])
    y = torch.tensor(b[:n])
    diff = (x != y).nonzero()
    return int(diff[0, 0]) if len(diff) else n


@dataclass
class Row:
    """One prompt of a batch: its tokens, the entry it reuses (or none) and how many tokens it reuses."""

    ids: list[int]
    entry: Entry | None = None
    reused: int = 0

    @property
    def new(self) -> list[int]:
        return self.ids[self.reused:]


class PrefixCache:
    """Keys/values of the last call's sequences, looked up by longest common token prefix."""

    def __init__(self, min_reuse: int = 16):
        #: below this many shared tokens a match is not worth the bookkeeping (every episode of one env
        #: shares the instruction prompt, so any entry matches a little)
        self.min_reuse = int(min_reuse)
        self.entries: list[Entry] = []
        self._next: list[Entry] = []
        #: reused_tokens: prompt tokens whose keys/values an earlier call computed; prefilled_tokens: prompt
        #: tokens run through the model in this call (a prefix several prompts share counts once)
        self.stats = {"reused_tokens": 0, "prefilled_tokens": 0}

    def match(self, ids: list[int]) -> Row:
        best, best_n = None, 0
        for e in self.entries:
            n = common_prefix(e.ids, ids)
            if n > best_n:
                best, best_n = e, n
        # at least the last prompt token is fed: its logits give the first reply token
        best_n = min(best_n, len(ids) - 1)
        if best is None or best_n < self.min_reuse:
            return Row(ids)
        return Row(ids, best, best_n)

    def shared_prefixes(self, rows: list[Row]) -> list[list[int]]:
        """Token prefixes that several rows share beyond what they reuse: each worth one prefill, not many.

        Episodes of one env start with the same instruction turn, so on the first round (nothing kept yet)
        sixteen episodes would prefill the same few hundred tokens sixteen times. Rows are sorted by their
        tokens; runs of neighbours whose common prefix (beyond each one's match) is at least `min_reuse`
        tokens form a group, and the group's common prefix is returned, to be prefilled once and matched.
        """
        order = sorted(rows, key=lambda r: r.ids)
        out: list[list[int]] = []
        i = 0
        while i < len(order):
            j, common = i, None
            while j + 1 < len(order):
                n = min(common_prefix(order[j].ids, order[j + 1].ids), len(order[j + 1].ids) - 1, len(order[i].ids) - 1)
                if n < self.min_reuse:
                    break
                common = n if common is None else min(common, n)
                j += 1
            if common is not None and common > max(r.reused for r in order[i:j + 1]) + self.min_reuse:
                out.append(order[i].ids[:common])
            i = j + 1
        return out

    def add_prefix(self, ids: list[int], cache: Any, base: Row | None = None) -> None:
        """Keep the keys/values of a prefix prefilled on its own (batch of one), for this call's matches.

        `base` is the row whose reused keys/values the prefill continued from (its first `base.reused` tokens
        came from that row's entry), or None for a prefill from scratch. The prefill's own tokens are counted.
        """
        from_past = min(base.reused, base.entry.from_past) if base is not None and base.entry is not None else 0
        self.entries.append(Entry(list(ids), [(k[:1], v[:1]) for k, v in _layers(cache)], from_past))
        self.stats["prefilled_tokens"] += len(ids) - (base.reused if base is not None else 0)

    def layout(self, rows: list[Row], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, Layers | None]:
        """`layout(rows, pad_id)`, counting the tokens reused and prefilled."""
        for r in rows:
            self.stats["reused_tokens"] += min(r.reused, r.entry.from_past) if r.entry is not None else 0
            self.stats["prefilled_tokens"] += len(r.new)
        return layout(rows, pad_id)

    def keep(self, cache: Any, mask: torch.Tensor, rows: list[Row], generated: list[list[int]]) -> None:
        """Store each row's keys/values for its prompt plus the generated tokens the cache holds.

        `mask` is the attention mask of the prompt layout; `generated[i]` are row i's reply tokens up to and
        including its stop token. The cache holds every fed token: the layout and all generated tokens but
        the last one of the call.
        """
        width = mask.shape[1]
        cached = _layers(cache)
        total = cached[0][0].shape[2]
        for i, r in enumerate(rows):
            k_gen = min(len(generated[i]), total - width)
            pos = mask[i].nonzero().flatten().tolist() + list(range(width, width + k_gen))
            idx = torch.tensor(pos, device=cached[0][0].device)
            layers = [(k[i:i + 1].index_select(2, idx), v[i:i + 1].index_select(2, idx)) for k, v in cached]
            ids = r.ids + generated[i][:k_gen]
            self._next.append(Entry(ids, layers, from_past=len(ids)))  # matched by the next call: all from the past

    def commit(self) -> None:
        """End of a `generate` call: the entries kept in it replace the previous call's."""
        self.entries, self._next = self._next, []

    def clear(self) -> None:
        self.entries, self._next = [], []


def layout(rows: list[Row], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, Layers | None]:
    """Input ids, attention mask and per-layer (keys, values) of the reused part (None when nothing is
    reused) for one batch of `rows`.

    Row i is `[pad, reused_i, pad, new_i]`; the reused part is in the cache, the rest is fed. Rows that reuse
    nothing make this plain left padding.
    """
    reused_w = max(r.reused for r in rows)
    new_w = max(len(r.new) for r in rows)
    b = len(rows)
    input_ids = torch.full((b, reused_w + new_w), pad_id, dtype=torch.long)
    mask = torch.zeros((b, reused_w + new_w), dtype=torch.long)
    for i, r in enumerate(rows):
        if r.reused:
            input_ids[i, reused_w - r.reused:reused_w] = torch.tensor(r.ids[:r.reused])
            mask[i, reused_w - r.reused:reused_w] = 1
        new = r.new
        input_ids[i, reused_w + new_w - len(new):] = torch.tensor(new)
        mask[i, reused_w + new_w - len(new):] = 1
    if reused_w == 0:
        return input_ids, mask, None
    ref = next(r.entry for r in rows if r.entry is not None)
    layers = []
    for li, (k0, v0) in enumerate(ref.layers):
        k = k0.new_zeros((b, k0.shape[1], reused_w, k0.shape[3]))
        v = v0.new_zeros((b, v0.shape[1], reused_w, v0.shape[3]))
        for i, r in enumerate(rows):
            if r.reused:
                ek, ev = r.entry.layers[li]
                k[i, :, reused_w - r.reused:] = ek[0, :, :r.reused]
                v[i, :, reused_w - r.reused:] = ev[0, :, :r.reused]
        layers.append((k, v))
    return input_ids, mask, layers


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(k, v) for k, v in cache]  # legacy tuple caches
