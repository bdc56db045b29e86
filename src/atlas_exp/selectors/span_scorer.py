"""The span scorer: mean per-token cross-entropy of a causal LM over token spans, many sequences batched.

Every loss-based selector reduces to "run these token sequences through the model and give me the mean
CE over these spans of each": `perplexity`/`perplexity_delta` (a trajectory's step spans, and each step
alone) and `excess_loss` (the same spans under two models). This module does exactly that and nothing
about trajectories, templates or selection, so tests can score arbitrary sequences with exactly the code
the selectors use.

How (all under `torch.inference_mode()`):

* sequences are sorted by length and batched, longest first, at most `batch_size` sequences and
  `max_batch_tokens` padded tokens per forward pass (a longer sequence runs alone). Sorting keeps padding
  small; longest first makes an out-of-memory show at the start, not after an hour;
* right padding with an attention mask: a causal LM's real tokens never attend to right padding, so a
  span's loss does not depend on what it was batched with (tested);
* only the logits of span positions are computed (`logits_to_keep`, in whichever form this transformers
  version accepts: a per-row boolean mask, else shared positions, else all logits), which bounds memory at
  about `max_batch_tokens * share_of_span_tokens * vocab` floats;
* CE in float32, in slices of 4096 positions (bounded extra memory on a large vocabulary), summed per
  span in float64.

It lives among the selectors because only selectors score spans: the offline expert-step evaluation
(`eval/expert_steps.py`) makes its own single forward pass, since it needs the argmax predictions as well
as the losses.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from atlas_exp.errors import AtlasError, ConfigError

log = logging.getLogger(__name__)


@dataclass
class ScoredSeq:
    """One sequence to run through the model and the token spans whose mean CE we want from it.

    `spans` are half-open token spans of `ids`, disjoint, each with start >= 1 (the first token has no
    prediction); `keys` name each span's result.
    """

    ids: list[int]
    spans: list[tuple[int, int]]
    keys: list[Hashable]


def _batches(seqs: Sequence[ScoredSeq], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Indices of `seqs` grouped into batches, longest first: at most `batch_size` sequences and
    `max_batch_tokens` padded tokens each (a longer sequence runs alone). Sorting by length keeps padding
    small; longest first makes an out-of-memory show at the start, not after an hour."""
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i].ids), i))
    out: list[list[int]] = []
    cur: list[int] = []
    width = 0
    for i in order:
        n = len(seqs[i].ids)
        w = max(width, n)
        if cur and (len(cur) >= batch_size or w * (len(cur) + 1) > max_batch_tokens):
            out.append(cur)
            cur, w = [], n
        cur.append(i)
        width = w
    if cur:
        out.append(cur)
    return out


class SpanScorer:
    """Mean per-token cross-entropy of a causal LM over token spans, batched (see the module docstring).

    `tokens` and `span_tokens` count what it has run so far (real tokens forwarded, tokens scored): the
    cost figures a selector reports.
    """

    def __init__(self, model: Any, *, pad_id: int = 0, batch_size: int = 8, max_batch_tokens: int = 8192):
        import torch

        if int(batch_size) < 1:
            raise ConfigError(f"selector.batch_size must be >= 1, got {batch_size!r}")
        if int(max_batch_tokens) < 1:
            raise ConfigError(f"selector.max_batch_tokens must be >= 1, got {max_batch_tokens!r}")
        self.model = model
        self.pad_id = int(pad_id)
        self.batch_size = int(batch_size)
        self.max_batch_tokens = int(max_batch_tokens)
        self.device = next(model.parameters()).device
        self._torch = torch
        # how `logits_to_keep` works for this model: "mask" (2-D boolean, per row), "union" (1-D positions
        # shared by the batch), "full" (not supported: all logits). Found on the first batch.
        self._keep_mode: str | None = None
        self.tokens = 0
        self.span_tokens = 0

    def score(self, seqs: Sequence[ScoredSeq], *, progress: bool = False, desc: str = "scoring") -> dict[Hashable, float]:
        """Return {key: mean CE over its span} for every span of every sequence."""
        from tqdm.auto import tqdm

        for s in seqs:
            for a, b in s.spans:
                if not (1 <= a < b <= len(s.ids)):
                    raise ValueError(f"bad span {(a, b)} for a sequence of {len(s.ids)} tokens")
        out: dict[Hashable, float] = {}
        batches = _batches(seqs, self.batch_size, self.max_batch_tokens)
        bar = tqdm(total=len(seqs), desc=desc, unit="seq", disable=not progress, leave=False)
        try:
            with self._torch.inference_mode():
                for idx in batches:
                    batch = [seqs[i] for i in idx]
                    for s, losses in zip(batch, self._forward(batch)):
                        out.update(zip(s.keys, losses))
                        self.tokens += len(s.ids)
                        self.span_tokens += sum(b - a for a, b in s.spans)
                    bar.update(len(idx))
        finally:
            bar.close()
        return out

    def _logits(self, ids, mask, rows: list[list[int]]):
        """Logits at the given positions of each row, flattened row-major: shape [sum(len(rows[r])), V]."""
        torch = self._torch
        B, L = ids.shape
        n_true = sum(len(r) for r in rows)
        modes = [self._keep_mode] if self._keep_mode else ["mask", "union", "full"]
        for mode in modes:
            if mode == "mask":
                keep = torch.zeros((B, L), dtype=torch.bool)
                for r, pos in enumerate(rows):
                    keep[r, pos] = True
                keep = keep.to(self.device)
            elif mode == "union":
                union = sorted({p for pos in rows for p in pos})
                keep = torch.tensor(union, dtype=torch.long, device=self.device)
            else:
                keep = None
            kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
            if keep is not None:
                kwargs["logits_to_keep"] = keep
            try:
                logits = self.model(**kwargs).logits
            except (TypeError, ValueError, IndexError, RuntimeError):
                if self._keep_mode or mode == "full":
                    raise
                continue
            if mode == "mask":
                if logits.dim() != 2 or logits.shape[0] != n_true:
                    continue  # this transformers version does not know per-row masks
                flat = logits
            else:
                if logits.dim() != 3 or logits.shape[0] != B:
                    continue
                if mode == "union":
                    if logits.shape[1] != len(union):
                        if logits.shape[1] != L:
                            continue
                        logits = logits[:, keep]  # the model ignored logits_to_keep
                    col = {p: j for j, p in enumerate(union)}
                    flat = torch.cat([logits[r, [col[p] for p in pos]] for r, pos in enumerate(rows)])
                else:
                    flat = torch.cat([logits[r, pos] for r, pos in enumerate(rows)])
            if self._keep_mode is None:
                self._keep_mode = mode
                log.debug("span scorer: logits_to_keep mode %s", mode)
            return flat
        raise AtlasError("span scorer: the model returned logits of an unexpected shape")

    def _forward(self, batch: list[ScoredSeq]) -> list[list[float]]:
        torch = self._torch
        B = len(batch)
        L = max(len(s.ids) for s in batch)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        rows: list[list[int]] = []
        targets: list[int] = []
        seg: list[int] = []
        n_seg = 0
        for r, s in enumerate(batch):
            ids[r, : len(s.ids)] = torch.tensor(s.ids, dtype=torch.long)
            mask[r, : len(s.ids)] = 1
            pos: list[int] = []
            for a, b in sorted(s.spans):
                # the logit at position p predicts token p+1
                pos.extend(range(a - 1, b - 1))
                targets.extend(s.ids[a:b])
                seg.extend([n_seg] * (b - a))
                n_seg += 1
            rows.append(pos)
        # spans were sorted per row above; map results back to each sequence's own span order
        logits = self._logits(ids.to(self.device), mask.to(self.device), rows)
        tgt = torch.tensor(targets, dtype=torch.long, device=logits.device)
        ce = torch.empty(len(targets), dtype=torch.float32, device=logits.device)
        step = 4096  # fp32 log-softmax in slices: bounded extra memory on a large vocabulary
        for i in range(0, len(targets), step):
            ce[i : i + step] = torch.nn.functional.cross_entropy(
                logits[i : i + step].float(), tgt[i : i + step], reduction="none"
            )
        seg_t = torch.tensor(seg, dtype=torch.long, device=ce.device)
        sums = torch.zeros(n_seg, dtype=torch.float64, device=ce.device).index_add_(0, seg_t, ce.double())
        counts = torch.zeros(n_seg, dtype=torch.float64, device=ce.device).index_add_(
            0, seg_t, torch.ones_like(ce, dtype=torch.float64)
        )
        means = (sums / counts).tolist()
        out: list[list[float]] = []
        j = 0
        for s in batch:
            order = sorted(range(len(s.spans)), key=lambda i: s.spans[i])
            vals = [0.0] * len(s.spans)
            for i in order:
                vals[i] = means[j]
                j += 1
            out.append(vals)
        return out
