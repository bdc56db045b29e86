"""`selector=excess_loss`: Rho-1's selective language modelling (Lin et al. 2024, "Not All Tokens Are What
You Need") at the level of steps.

Rho-1 trains a reference model on data it trusts, then trains only on the tokens whose loss under the
model being trained exceeds their loss under the reference. A token both models find hard is noise (the
reference could not learn it either); one both find easy is already known; the excess picks what is
learnable and not yet learnt. At step level, with every loss the mean per-token cross-entropy of the step's
supervised span given its history (the conditioned loss of `selector=perplexity`, same definitions, same
windows past `max_length`, see `selectors/perplexity.py`):

    score_k = loss_model(step_k | history_<k) - loss_reference(step_k | history_<k)

The top `ratio` of the steps is selected, per trajectory or over the dataset (`scope`, the rules of
`perplexity`), ties broken by a draw seeded with `seed` and the trajectory id (not by position, which the
score says nothing about), then by the earlier step.

Which reference reproduces Rho-1's intent: the model being trained, finetuned on the trajectories you
trust, i.e. the LoRA adapter of a `selector=all` run over the same `model`:
`selector.reference=<that run_dir>/model` (an adapter folder is merged into a private copy of
`selector.model`; a full-weights folder, e.g. of `train.mode=full`, or a Hub name is loaded as it is). The
scoring model is then the base before training (Rho-1 scores with the current model during training; a
selection is made once, before, so "current" is the start). Training the reference on the very
trajectories it scores makes part of the excess memorisation; a reference trained on a disjoint split
(or on other environments' trajectories) is closer to Rho-1's separate high-quality corpus. A larger model
as reference measures a capability gap instead, including steps the small model cannot learn: usable, but
not Rho-1's rule.

Cost: two scoring passes of the perplexity kind (one forward per trajectory plus windows), one per model,
run one after the other so the two models are never in memory together: the first pass scores every
trajectory with `model`, then it is released and the reference scores and selections stream out. Both
passes keep their losses in the step score cache under the conditioned-loss selector's name, keyed by the
model (an adapter by a hash of its files, a full-weights folder by its path), so a sweep over ratios and seeds scores once and the model's
pass is shared with `selector=perplexity` runs.

Recorded per trajectory: `meta = {"loss_model": [...], "loss_reference": [...],
"history_dropped_model"? / "history_dropped_reference"?: [[step, tokens], ...]}`; a step whose loss is
not finite under either model gets score UNSCORED, below every real excess, and its reason says so.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from collections.abc import Iterator, Sequence
from typing import Any

from atlas_exp.data.trajectory import Trajectory
from atlas_exp.errors import ConfigError
from atlas_exp.models import ModelSpec
from atlas_exp.selectors.base import Selection, Selector, StepChoice, n_to_select, top_k
from atlas_exp.selectors.model_pool import is_adapter_dir, model_spec
from atlas_exp.selectors.perplexity import PerplexitySelector
from atlas_exp.selectors.step_scores import SCOPES, select_global

#: the score of a step with a non-finite loss under either model. Excess losses can be negative, so it is
#: far below any real one (a difference of two mean cross-entropies), and stays valid JSON (not -inf)
UNSCORED = -1e9

Scored = tuple[list[float], dict[str, Any], list[str | None]]


def _identity(spec: ModelSpec, adapter: str | None) -> tuple:
    """What makes two model options the same weights under the same template."""
    p = os.path.expanduser(spec.name_or_path)
    where = os.path.realpath(p) if os.path.exists(p) else spec.name_or_path
    return (where, spec.gguf_file, spec.revision or None, spec.chat_template,
            None if adapter is None else os.path.realpath(os.path.expanduser(adapter)))


class ExcessLossSelector(Selector):
    """Steps whose loss under `model` most exceeds their loss under `reference` (module docstring)."""

    name = "excess_loss"

    def __init__(
        self,
        ratio: float = 0.3,
        seed: int = 0,
        model: Any = None,
        reference: Any = None,
        scope: str = "trajectory",
        cache_dir: str = "outputs/.cache",
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        max_batch_tokens: int = 8192,
        max_length: int | None = None,
        chunk_size: int = 256,
        progress: bool = True,
        score_cache: bool = True,
    ):
        super().__init__(ratio=ratio, seed=seed)
        if scope not in SCOPES:
            raise ConfigError(f"selector.scope must be one of {SCOPES}, got {scope!r}")
        spec = model_spec(model)
        if reference is None or (isinstance(reference, str) and not reference.strip()):
            raise ConfigError(
                "selector.reference is required: the model whose loss is subtracted, e.g. the LoRA adapter of a "
                "selector=all run (selector.reference=<run_dir>/model), a model folder or a Hub name"
            )
        if is_adapter_dir(reference):
            ref_spec, adapter = spec, str(reference)
        else:
            ref_spec, adapter = model_spec(reference, option="selector.reference"), None
        if _identity(spec, None) == _identity(ref_spec, adapter):
            raise ConfigError(
                f"selector.reference is the same model as selector.model ({spec.name_or_path}): every step's excess "
                "loss would be 0. Set selector.reference to a model trained on the trajectories you trust, e.g. the "
                "adapter of a selector=all run: selector.reference=<run_dir>/model"
            )
        self.scope = scope
        self.chunk_size = int(chunk_size)
        common = dict(ratio=ratio, seed=seed, metric="loss", scope=scope, cache_dir=cache_dir, device=device,
                      dtype=dtype, batch_size=batch_size, max_batch_tokens=max_batch_tokens, max_length=max_length,
                      chunk_size=chunk_size, progress=progress, score_cache=score_cache)
        #: the conditioned losses under each model: two perplexity scorers (their options are validated there)
        self.model_pass = PerplexitySelector(model=spec, **common)
        self.reference_pass = PerplexitySelector(model=ref_spec, adapter=adapter, **common)
        self.model_pass.progress_desc = "excess_loss scoring (model)"
        self.reference_pass.progress_desc = "excess_loss scoring (reference)"

    def close(self) -> None:
        self.model_pass.close()
        self.reference_pass.close()

    def stats(self) -> dict[str, Any]:
        def one(p: PerplexitySelector) -> dict[str, Any]:
            return {"trajectories_scored": p.scored, "score_cache_hits": p.cache_hits, "tokens_scored": p.tokens_scored,
                    "tokens_forwarded": p.tokens_forwarded, "seconds": round(p.seconds, 3)}

        m, r = one(self.model_pass), one(self.reference_pass)
        return {"tokens_scored": m["tokens_scored"] + r["tokens_scored"], "seconds": round(m["seconds"] + r["seconds"], 3),
                "model": m, "reference": r}

    # ---- scoring

    def _ties(self, traj: Trajectory) -> list[float]:
        """A seeded draw per step that orders equal scores; depends only on the seed and the trajectory id."""
        digest = hashlib.sha256(f"{self.seed}\x00{traj.id}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        return [rng.random() for _ in range(traj.n_steps)]

    @staticmethod
    def _excess(traj: Trajectory, m: Scored, r: Scored) -> Scored:
        lm, lr = m[1]["loss_cond"], r[1]["loss_cond"]
        scores: list[float] = []
        reasons: list[str | None] = []
        for k in range(traj.n_steps):
            v = lm[k] - lr[k]
            notes = [f"{who}: {why}" for who, why in (("model", m[2][k]), ("reference", r[2][k])) if why]
            if not math.isfinite(v):
                v, notes = UNSCORED, ["not finite: a model gave a non-finite loss", *notes]
            scores.append(v)
            reasons.append("; ".join(notes) or None)
        meta: dict[str, Any] = {"loss_model": lm, "loss_reference": lr}
        for who, sc in (("model", m), ("reference", r)):
            if "history_dropped" in sc[1]:
                meta[f"history_dropped_{who}"] = sc[1]["history_dropped"]
        return scores, meta, reasons

    def _check_not_all_zero(self, scored: Sequence[Scored]) -> None:
        """Two different models never agree to the last bit on every step: all-zero excesses mean the reference
        is the model itself under another name (a copy of its folder, an adapter that was never trained)."""
        values = [v for s in scored for v in s[0]]
        if values and all(v == 0.0 for v in values):
            raise ConfigError(
                f"selector.reference scores every step exactly like selector.model (all {len(values)} excess losses "
                "are 0): it holds the same weights (a copy, or an untrained adapter). Set selector.reference to a "
                "model trained on the trajectories you trust"
            )

    def _selection(self, traj: Trajectory, scored: Scored, chosen: set[int]) -> Selection:
        scores, meta, reasons = scored
        steps = [StepChoice(step=k, score=s, selected=k in chosen, reason=w) for k, (s, w) in enumerate(zip(scores, reasons))]
        return Selection(id=traj.id, selector=self.name, ratio=self.ratio, steps=steps, meta=meta)

    def select(self, trajectories: Sequence[Trajectory]) -> Iterator[Selection]:
        trajs = list(trajectories)
        starts = range(0, len(trajs), self.chunk_size)
        first: list[Scored] = []
        for i in starts:
            first.extend(self.model_pass.score_chunk(trajs[i : i + self.chunk_size], offset=i))
        self.model_pass.close()  # one model in memory at a time
        if self.scope == "trajectory":
            for i in starts:
                chunk = trajs[i : i + self.chunk_size]
                ref = self.reference_pass.score_chunk(chunk, offset=i)
                scored = [self._excess(t, m, r) for t, m, r in zip(chunk, first[i : i + len(chunk)], ref)]
                self._check_not_all_zero(scored)
                for t, sc in zip(chunk, scored):
                    yield self._selection(t, sc, top_k(sc[0], n_to_select(t.n_steps, self.ratio), self._ties(t)))
            return
        second: list[Scored] = []
        for i in starts:
            second.extend(self.reference_pass.score_chunk(trajs[i : i + self.chunk_size], offset=i))
        scored = [self._excess(t, m, r) for t, m, r in zip(trajs, first, second)]
        self._check_not_all_zero(scored)
        chosen = select_global([s[0] for s in scored], self.ratio, [self._ties(t) for t in trajs])
        for t, sc, c in zip(trajs, scored, chosen):
            yield self._selection(t, sc, c)

    def select_one(self, traj: Trajectory) -> Selection:
        """One trajectory alone (global scope degenerates to per-trajectory: the dataset is this one)."""
        (sel,) = self.select([traj])
        return sel
