"""`selector=perplexity_delta` and `selector=perplexity`: score steps by a language model's loss on them.

Why: a step that the trajectory's history makes easy to predict teaches the model little; a step that stays
hard *even given the history* is where the agent had to decide something. Following IFD ("instruction
following difficulty", Li et al. 2024) the delta selector scores step k of a trajectory as

    score_k = loss(step_k | history_<k) / loss(step_k alone)          (metric: ratio, perplexity_delta)

and the perplexity baseline of the ATLaS paper as the conditioned loss alone

    score_k = loss(step_k | history_<k)                               (metric: loss, perplexity)

Higher = more critical; the top `ratio` of the steps is selected. Both share this one class.

Definitions (every loss is the mean per-token cross-entropy, in float32, of a causal LM):

* **Tokens of a step**: its *supervised span* exactly as `train/turn_spans.py` defines it (the rendered
  content plus the end-of-turn token, no role header), so a step is scored on precisely the tokens that
  training would supervise.
* **Conditioned loss** `loss_cond`: the trajectory rendered once with the model's chat template (the same
  rendering training uses), one forward pass over the whole sequence, per-token CE, mean over each step's
  span. A causal LM's prediction at a position depends only on the tokens before it, so this equals scoring
  each step separately on its history truncated right after the step (tests prove it to 1e-4).
* **Step alone** `loss_alone`: the step's content as the ONLY message of a conversation,
  `[{"role": "assistant", "content": step}]`, rendered by the same chat template and spanned by the same
  rule. Whatever the template writes before the first message (BOS, SmolLM2's default system prompt
  "You are a helpful AI assistant named SmolLM...") is kept: a trajectory without a system message gets
  exactly that preamble in its conditioned rendering too, so the two renderings differ only by the
  trajectory's history, which is what the ratio should measure. Templates that refuse a conversation
  starting with an assistant turn (Mistral, Llama-2: "roles must alternate") need `alone_prompt`: a
  fixed user message placed before the step (e.g. "Continue."); it is then part of the "alone" context
  for every step alike. The alone loss depends only on the content, so it is computed once per distinct
  content (AgentTraj repeats actions like "inventory" a lot).
* `score = loss_cond / max(loss_alone, 1e-6)`. A step whose loss is not finite (a broken model or an
  overflow in half precision) gets score -1.0, below every real score (losses and ratios are >= 0), so it
  is selected last, and its reason says so.

Selection (`scope`):

* `trajectory` (default): the top `n_to_select(n_steps, ratio)` steps of each trajectory (round-half-up, at
  least one), ties to the earlier step: exactly the count the random baseline selects.
* `global`: the top ratio of ALL steps of the dataset, with at least one step per trajectory. Rule: each
  trajectory first gets its best step; the remaining `K - T` slots (K = n_to_select(total steps, ratio),
  T = number of trajectories) go to the highest remaining scores over the whole dataset (ties: earlier
  trajectory, then earlier step). The total is exactly max(K, T): when there are more trajectories than
  K, every trajectory still gets its one step and the achieved ratio exceeds `ratio`. Scores of different
  trajectories are comparable for the ratio metric (it is normalised per step); for the plain loss they
  are comparable as per-token losses.

Long trajectories (`max_length`, tokens; null = the model's `max_position_embeddings`): every step still
gets a real score, computed with as much history as fits, deterministically:

* steps whose span ends within the first `max_length` tokens are scored from that prefix (full history);
* any later step is scored in a *window*: the trajectory's prompt (every token before the first step's
  message: template preamble, instructions, task) followed by the most recent WHOLE messages that fit,
  up to and including the step, i.e. the conversation with its middle turns dropped. Because spans are
  exact at message boundaries and the template renders turns independently (checked by turn_spans.py), this is
  token for token what the chat template gives for that shortened conversation (tested). One window
  serves every later step that fits in it. If the prompt and the step's own message do not fit together,
  the prompt is dropped too; if the step's message alone does not fit, the window is the `max_length`
  tokens ending at the step's end. Meta `history_dropped` lists, per windowed step, how many history
  tokens were dropped, so users can see which scores rest on a shortened history.
* a step so long that its alone rendering exceeds `max_length` is scored (both losses) on the first tokens
  of its span that fit.

Sliding windows keep the selection independent of the training stage's own truncation and score late steps
by what the model can actually condition on; giving them NaN/lowest instead would make "critical" depend on
position, which is not what the metric means.

Compute: conditioned sequences (one per trajectory, plus windows) and alone sequences go together, across
trajectories, through the span scorer (`selectors/span_scorer.py`: sorted by length, right-padded, at most
`batch_size` sequences and `max_batch_tokens` padded tokens per forward pass, only span logits; scores do
not depend on the batch, tested). The model is loaded once per process and shared with other selectors
that score with it (`selectors/model_pool.py`). `device: auto` picks CUDA when present; `dtype: auto` is bf16 on a GPU that has it, else fp32; all under
`torch.inference_mode()`. Trajectories are scored in chunks of `chunk_size` so that per-trajectory
selections stream out and memory stays bounded; the global scope needs every score before selecting.

Recorded per trajectory: each step's `score`, and `meta = {"metric", "loss_cond": [...], "loss_alone":
[...] (ratio metric only), "history_dropped"?: [[step, tokens], ...]}`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from atlas_exp.artifacts import fingerprint
from atlas_exp.data.trajectory import Trajectory
from atlas_exp.device import get_device, get_dtype
from atlas_exp.errors import ConfigError
from atlas_exp.selectors.base import Selection, Selector, StepChoice, n_to_select, top_k
from atlas_exp.selectors.model_pool import SCORING_MODELS, adapter_identity, is_adapter_dir, model_spec
from atlas_exp.selectors.span_scorer import ScoredSeq, SpanScorer
from atlas_exp.selectors.step_scores import StepScores, check_scope, positive_int, select_global
from atlas_exp.selectors.step_sequences import (
    AloneKey,
    AloneRendering,
    ScoringPlan,
    plan_sequences,
    render_step_alone,
)

log = logging.getLogger(__name__)

#: `ratio`: loss_cond / loss_alone (perplexity_delta); `loss`: loss_cond (perplexity)
RATIO, LOSS = "ratio", "loss"
METRICS = (RATIO, LOSS)
#: floor of the alone loss in the ratio, so a step the model predicts perfectly alone gives a finite score
ALONE_EPS = 1e-6
#: the score of a step whose loss is not finite: below every real score
UNSCORED = -1.0
#: alone-loss cache entries kept across chunks before the cache is cleared (bounded memory)
_ALONE_CACHE_MAX = 200_000


class PerplexitySelector(Selector):
    """Scores steps by a causal LM's loss on them (see the module docstring for every definition)."""

    def __init__(
        self,
        ratio: float = 0.3,
        seed: int = 0,
        metric: str = RATIO,
        scope: str = "trajectory",
        model: Any = None,
        cache_dir: str = "outputs/.cache",
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        max_batch_tokens: int = 8192,
        max_length: int | None = None,
        alone_prompt: str | None = None,
        chunk_size: int = 256,
        progress: bool = True,
        score_cache: bool = True,
        adapter: str | None = None,
    ):
        super().__init__(ratio=ratio, seed=seed)
        if metric not in METRICS:
            raise ConfigError(f"selector.metric must be one of {METRICS}, got {metric!r}")
        check_scope(scope)
        if max_length is not None:
            max_length = positive_int("max_length", max_length, minimum=8)
        batch_size = positive_int("batch_size", batch_size)
        max_batch_tokens = positive_int("max_batch_tokens", max_batch_tokens)
        chunk_size = positive_int("chunk_size", chunk_size)
        if alone_prompt is not None and not str(alone_prompt).strip():
            raise ConfigError("selector.alone_prompt must be a non-empty string or null")
        if adapter is not None and not is_adapter_dir(adapter):
            raise ConfigError(f"selector.adapter={adapter}: not a LoRA adapter folder (no adapter_config.json in it)")
        self.metric = metric
        self.scope = scope
        self.name = "perplexity_delta" if metric == RATIO else "perplexity"
        self.spec = model_spec(model)
        self.cache_dir = str(cache_dir)
        self.device = get_device(device)
        self.dtype = get_dtype(dtype, self.device, option="selector.dtype")
        self.batch_size = int(batch_size)
        self.max_batch_tokens = int(max_batch_tokens)
        self._max_length = None if max_length is None else int(max_length)
        self.alone_prompt = None if alone_prompt is None else str(alone_prompt)
        self.chunk_size = int(chunk_size)
        self.progress = bool(progress)
        #: a LoRA adapter folder merged into `model` before scoring (excess_loss's reference: a trained run)
        self.adapter = None if adapter is None else str(adapter)
        self._adapter_id: str | None = None
        #: the progress bar's label (a selector that scores with several models names each pass)
        self.progress_desc = f"{self.name} scoring"
        self._key: tuple | None = None
        self.model: Any = None
        self.tokenizer: Any = None
        self.scorer: SpanScorer | None = None
        self.max_length: int | None = self._max_length
        self._alone_tok: dict[str, AloneRendering] = {}
        self._alone_loss: dict[str, float] = {}
        self._score_cache: Any = None
        self._use_score_cache = bool(score_cache)
        self.cache_hits = 0
        self.scored = 0
        #: cost of what was computed (not read from the score cache): tokens scored, forwarded, seconds
        self.tokens_scored = 0
        self.tokens_forwarded = 0
        self.seconds = 0.0

    @property
    def _uses_alone(self) -> bool:
        """Whether scores need the step-alone loss (the ratio metric)."""
        return self.metric == RATIO

    # ---- resources

    def load(self) -> None:
        """Load (or share) the scoring model and tokenizer; called on first use."""
        if self.model is not None:
            return
        self._key, self.model, self.tokenizer = SCORING_MODELS.acquire(
            self.spec, self.cache_dir, self.device, self.dtype, adapter=self.adapter
        )
        pad = self.tokenizer.pad_token_id
        self.scorer = SpanScorer(
            self.model,
            pad_id=0 if pad is None else pad,
            batch_size=self.batch_size,
            max_batch_tokens=self.max_batch_tokens,
        )
        if self._max_length is None:
            positions = getattr(self.model.config, "max_position_embeddings", None)
            self.max_length = int(positions) if isinstance(positions, int) and positions > 0 else None

    def close(self) -> None:
        if self._key is not None:
            SCORING_MODELS.release(self._key)
        self._key = None
        self.model = self.tokenizer = self.scorer = None
        self._alone_tok.clear()
        self._alone_loss.clear()
        if self._score_cache is not None:
            self._score_cache.close()
            self._score_cache = None

    def stats(self) -> dict[str, Any]:
        return {"trajectories_scored": self.scored, "score_cache_hits": self.cache_hits}

    # ---- sequences

    def _alone(self, content: str) -> AloneRendering:
        """The step-alone rendering of `content` (`render_step_alone`), cached per content."""
        cached = self._alone_tok.get(content)
        if cached is not None:
            return cached
        rendering = render_step_alone(self.tokenizer, content, alone_prompt=self.alone_prompt, max_length=self.max_length)
        if len(self._alone_tok) >= _ALONE_CACHE_MAX:
            self._alone_tok.clear()
        self._alone_tok[content] = rendering
        return rendering

    def _plan(self, traj_index: int, traj: Trajectory) -> tuple[ScoringPlan, list[ScoredSeq]]:
        """The conditioned sequences of one trajectory (the whole prefix, plus windows past max_length)."""
        return plan_sequences(self.tokenizer, traj, traj_index, self.max_length,
                              alone=self._alone if self._uses_alone else None)

    # ---- scoring

    def _cache_key(self, traj: Trajectory) -> str:
        """Everything a step's score depends on; not the ratio, seed or scope, which only choose among scores."""
        spec = self.spec
        if self.adapter is not None and self._adapter_id is None:
            self._adapter_id = adapter_identity(self.adapter)  # its content: a retrained adapter is a new model
        adapter = [("adapter", self._adapter_id)] if self.adapter is not None else []  # keys without one unchanged
        return fingerprint(
            "step-scores", 1, self.metric, spec.name, spec.name_or_path, spec.gguf_file, spec.revision,
            spec.chat_template, self._max_length, self.alone_prompt, str(self.dtype),
            [(m.role, m.content, m.step) for m in traj.messages], *adapter,
        )

    def score_chunk(self, trajs: Sequence[Trajectory], offset: int = 0) -> list[StepScores]:
        """Scores, meta and per-step reasons of each trajectory of `trajs`.

        Scores do not depend on the ratio, so they are kept on disk (`<cache_dir>/step_scores/<name>.jsonl`,
        keyed by model, metric and trajectory content; `selector.score_cache=false` turns it off): a sweep
        over ratios, seeds or the non-critical complement scores each trajectory once, and a crashed
        selection resumes where it stopped.
        """
        if not self._use_score_cache:
            return self._compute_chunk(trajs, offset)
        if self._score_cache is None:
            from atlas_exp.llm.client import ReplyCache

            self._score_cache = ReplyCache(Path(self.cache_dir) / "step_scores" / f"{self.name}.jsonl")
        keys = [self._cache_key(t) for t in trajs]
        out: list[Any] = [None] * len(trajs)
        missing = []
        for i, key in enumerate(keys):
            record = self._score_cache.get(key)
            if record is not None and len(record["scores"]) == trajs[i].n_steps:
                out[i] = StepScores(record["scores"], record["meta"], record["reasons"])
                self.cache_hits += 1
            else:
                missing.append(i)
        if missing:
            computed = self._compute_chunk([trajs[i] for i in missing], offset)
            for i, scored in zip(missing, computed):
                out[i] = scored
                self._score_cache.put(keys[i], {"scores": scored.scores, "meta": scored.meta, "reasons": scored.reasons})
        return out

    def _compute_chunk(self, trajs: Sequence[Trajectory], offset: int = 0) -> list[StepScores]:
        """Scores, meta and per-step reasons of each trajectory of `trajs` (one batched computation)."""
        self.scored += len(trajs)
        self.load()
        assert self.scorer is not None
        plans: list[ScoringPlan] = []
        seqs: list[ScoredSeq] = []
        for i, traj in enumerate(trajs):
            plan, traj_seqs = self._plan(offset + i, traj)
            plans.append(plan)
            seqs.extend(traj_seqs)
        if self._uses_alone:
            new = sorted({step.content for t in trajs for step in t.steps if step.content not in self._alone_loss})
            for content in new:
                rendering = self._alone(content)
                seqs.append(ScoredSeq(rendering.input_ids, [rendering.span], [AloneKey(content)]))
        started, span_tokens, forwarded = time.perf_counter(), self.scorer.span_tokens, self.scorer.tokens
        losses = self.scorer.score(seqs, progress=self.progress, desc=self.progress_desc)
        self.seconds += time.perf_counter() - started
        self.tokens_scored += self.scorer.span_tokens - span_tokens
        self.tokens_forwarded += self.scorer.tokens - forwarded
        for key, loss in losses.items():
            if isinstance(key, AloneKey):
                self._alone_loss[key.content] = loss
        if len(self._alone_loss) > _ALONE_CACHE_MAX:
            self._alone_loss.clear()
        out = []
        for plan in plans:
            cond = [losses[key] for key in plan.cond_keys]
            alone = [self._alone_loss.get(key.content, losses.get(key, math.nan)) for key in plan.alone_keys]
            scores: list[float] = []
            reasons: list[str | None] = []
            for k in range(plan.n_steps):
                score = cond[k] / max(alone[k], ALONE_EPS) if self._uses_alone else cond[k]
                why = None
                if not math.isfinite(score):
                    score, why = UNSCORED, "not finite: the model gave a non-finite loss"
                elif k in plan.dropped:
                    why = f"scored in a window: {plan.dropped[k]} history tokens dropped (max_length={self.max_length})"
                scores.append(score)
                reasons.append(why)
            meta: dict[str, Any] = {"metric": self.metric, "loss_cond": cond}
            if self._uses_alone:
                meta["loss_alone"] = alone
            if plan.dropped:
                meta["history_dropped"] = [[k, n] for k, n in sorted(plan.dropped.items())]
            out.append(StepScores(scores, meta, reasons))
        return out

    def _selection(self, traj: Trajectory, scored: StepScores, chosen: set[int]) -> Selection:
        scores, meta, reasons = scored
        steps = [StepChoice(step=k, score=score, selected=k in chosen, reason=reason)
                 for k, (score, reason) in enumerate(zip(scores, reasons))]
        return Selection(id=traj.id, selector=self.name, ratio=self.ratio, steps=steps, meta=meta)

    def select(self, trajectories: Sequence[Trajectory]) -> Iterator[Selection]:
        trajs = list(trajectories)
        if self.scope == "trajectory":
            for i in range(0, len(trajs), self.chunk_size):
                chunk = trajs[i : i + self.chunk_size]
                for traj, scored in zip(chunk, self.score_chunk(chunk, offset=i)):
                    yield self._selection(traj, scored, top_k(scored.scores, n_to_select(traj.n_steps, self.ratio)))
            return
        all_scored: list[StepScores] = []
        for i in range(0, len(trajs), self.chunk_size):
            all_scored.extend(self.score_chunk(trajs[i : i + self.chunk_size], offset=i))
        chosen = select_global([scored.scores for scored in all_scored], self.ratio)
        for traj, scored, picked in zip(trajs, all_scored, chosen):
            yield self._selection(traj, scored, picked)

    def select_one(self, traj: Trajectory) -> Selection:
        """One trajectory alone (global scope degenerates to per-trajectory: the dataset is this one)."""
        (sel,) = self.select([traj])
        return sel
