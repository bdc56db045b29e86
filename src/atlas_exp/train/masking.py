"""Training labels for critical steps: the whole trajectory is the input, the loss is only on selected steps.

ATLaS trains only on the tokens of the *selected* (critical) assistant turns; every other token is
context. A selected step's labels are exactly its *supervised span* (rendered content plus end-of-turn
token, as `turn_spans.py` derives it from the chat template): never its role header, never the text
the template writes after the end-of-turn token, never a user turn or an unselected step. Assistant
turns that are not steps (`trainable=False`) are never supervised. Labels are not shifted: Hugging Face
causal LMs shift them internally.

Two options refine that (`train.step_weights`, `train.supervise`; README "Soft weights and sub-step spans"):

* *step weights*: every supervised token carries a weight, the product of its step's data weight (a
  trajectory's per-message `weight`, OpenAI fine-tuning style; absent = 1; weight 0 already made the turn a
  non-step at import) and, with `step_weights=score`, its step's normalised selector score (`score_weights`).
  A token of weight 0 gets no label. When every supervised token weighs 1 the example carries no weights
  (`weights=None`) and training takes the unweighted path, bit for bit the one without this option.
* *supervised part*: `supervise=step` labels a selected step's whole supervised span; `thought` / `action`
  only its `Thought:` / `Action:` part (`turn_spans.step_part_spans`; the end-of-turn token goes with the
  action). A selected step without that part is an error, or with `on_missing_part="skip"` not supervised
  and counted (`n_steps_missing_part`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from atlas_exp.data.selection import Selection
from atlas_exp.data.trajectory import Trajectory
from atlas_exp.errors import ConfigError, DataError
from atlas_exp.train.chat_template import get_template_info
from atlas_exp.train.turn_spans import step_part_spans, tokenize_trajectory

#: label value ignored by the cross-entropy loss of Hugging Face models
IGNORE_INDEX = -100

OnEmpty = Literal["error", "skip"]
StepWeights = Literal["binary", "score"]
Supervise = Literal["step", "thought", "action"]
OnMissingPart = Literal["error", "skip"]


@dataclass
class MaskedExample:
    """One training sequence: every token of the (truncated) trajectory, loss only on selected steps."""

    input_ids: list[int]
    #: `IGNORE_INDEX` everywhere except on the supervised tokens of selected steps (unshifted)
    labels: list[int]
    #: len(input_ids), after truncation
    n_tokens: int
    #: tokens with a label, after truncation
    n_supervised: int
    #: supervised tokens of selected steps that truncation to max_length cut off
    n_selected_tokens_lost: int
    #: supervised tokens of all steps, selected or not, before truncation
    n_assistant_tokens: int
    #: token span of each step's supervised span in the full (untruncated) sequence
    step_spans: list[tuple[int, int]]
    traj_id: str = ""
    #: supervised tokens of selected steps before truncation
    n_selected_tokens: int = 0
    #: length of the full rendered trajectory before any truncation
    n_tokens_full: int = 0
    #: per token: the loss weight of its label (0.0 where there is none), or None when every label weighs 1
    weights: list[float] | None = None
    #: selected steps left unsupervised because they lack the part `supervise` asks for (on_missing_part=skip)
    n_steps_missing_part: int = 0



# --------------------------------------------------------------------------------------------------
# masks


def score_weights(selection: Selection) -> dict[int, float]:
    """The `step_weights=score` weight of each selected step: its score over the best selected score.

    Per trajectory: `w = (s - lo) / (best - lo)`, `best` the highest score among its selected steps and
    `lo = min(0, lowest score of any of its steps)`. With non-negative scores (losses, judge ratings,
    random) that is `s / best`: the most critical step weighs 1 and ratios between scores are kept. With
    negative scores (advantages) the scale starts at the trajectory's lowest score instead of 0, so no
    weight is negative. A selection whose selected scores are all equal (a single selected step, the `all`
    selector) weighs 1 everywhere. A selected step at the bottom of the scale weighs 0 and is not trained.
    """
    chosen = [c for c in selection.steps if c.selected]
    if not chosen:
        return {}
    best = max(c.score for c in chosen)
    lo = min(0.0, min(c.score for c in selection.steps))
    if all(c.score == best for c in chosen) or best == lo:
        return {c.step: 1.0 for c in chosen}
    return {c.step: (c.score - lo) / (best - lo) for c in chosen}


def _check_options(max_length: int | None, on_empty: str, step_weights: str = "binary", supervise: str = "step",
                   on_missing_part: str = "error") -> None:
    if on_empty not in ("error", "skip"):
        raise ConfigError(f"on_empty must be 'error' or 'skip', got {on_empty!r}")
    if step_weights not in ("binary", "score"):
        raise ConfigError(f"train.step_weights must be 'binary' or 'score', got {step_weights!r}")
    if supervise not in ("step", "thought", "action"):
        raise ConfigError(f"train.supervise must be 'step', 'thought' or 'action', got {supervise!r}")
    if on_missing_part not in ("error", "skip"):
        raise ConfigError(f"train.on_missing_part must be 'error' or 'skip', got {on_missing_part!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ConfigError(f"max_length must be a positive integer (or None for no limit), got {max_length!r}")


def _build(
    tokenizer: Any,
    traj: Trajectory,
    selection: Selection,
    max_length: int | None,
    truncate_after_last_selected: bool,
    step_weights: StepWeights = "binary",
    supervise: Supervise = "step",
    on_missing_part: OnMissingPart = "error",
) -> MaskedExample:
    selection.check_matches(traj, source=f"selection of {traj.id}")
    tt = tokenize_trajectory(tokenizer, traj)
    ids = tt.input_ids
    spans: list[tuple[int, int] | None] = list(tt.step_spans)
    if supervise != "step":
        spans = step_part_spans(tokenizer, traj, tt, supervise, on_missing_part)
    data_w = [1.0 if m.weight is None else float(m.weight) for m in traj.steps]
    score_w = score_weights(selection) if step_weights == "score" else {}
    # (span, weight) of each selected step that weighs something; a weight-0 step is not supervised
    chosen = [(spans[k], data_w[k] * score_w.get(k, 1.0)) for k in selection.selected_steps]
    n_missing = sum(sp is None for sp, _ in chosen)
    chosen = [(sp, w) for sp, w in chosen if sp is not None and w > 0]
    selected = [sp for sp, _ in chosen]
    n_selected = sum(b - a for a, b in selected)
    cut = len(ids)
    if truncate_after_last_selected and selected:
        # A causal LM's loss at position j depends only on tokens <= j: tokens after the last selected
        # span change nothing but cost compute.
        cut = max(b for _, b in selected)
    if max_length is not None:
        cut = min(cut, max_length)
    labels = [IGNORE_INDEX] * cut
    weighted = any(w != 1.0 for _, w in chosen)
    weights = [0.0] * cut if weighted else None
    n_sup = 0
    for (a, b), w in chosen:
        b = min(b, cut)
        if b > a:
            labels[a:b] = ids[a:b]
            if weights is not None:
                weights[a:b] = [w] * (b - a)
            n_sup += b - a
    return MaskedExample(
        input_ids=ids[:cut],
        labels=labels,
        n_tokens=cut,
        n_supervised=n_sup,
        # the tail cut of truncate_after_last_selected never removes selected tokens, so every selected
        # token missing here was cut by max_length
        n_selected_tokens_lost=n_selected - n_sup,
        n_assistant_tokens=sum(b - a for a, b in tt.step_spans),
        step_spans=list(tt.step_spans),
        traj_id=traj.id,
        n_selected_tokens=n_selected,
        n_tokens_full=len(ids),
        weights=weights,
        n_steps_missing_part=n_missing,
    )


def _empty_error(ex: MaskedExample, max_length: int | None) -> DataError:
    if ex.n_selected_tokens == 0:
        why = "the selection marks no step of this trajectory (with a weight above 0)"
    else:
        why = (
            f"all {ex.n_selected_tokens} tokens of its selected steps lie beyond max_length={max_length} "
            f"(the trajectory has {ex.n_tokens_full} tokens); raise train.max_length, or set "
            f"train.on_empty=skip to leave such trajectories out (they are counted)"
        )
    return DataError(f"no supervised token after truncation: {why}", source=ex.traj_id, field="selection")


def build_example(
    tokenizer: Any,
    traj: Trajectory,
    selection: Selection,
    max_length: int | None,
    on_empty: OnEmpty = "error",
    *,
    truncate_after_last_selected: bool = False,
    step_weights: StepWeights = "binary",
    supervise: Supervise = "step",
    on_missing_part: OnMissingPart = "error",
) -> MaskedExample | None:
    """Input ids and labels for one trajectory: loss only on the supervised spans of selected steps.

    Truncation to `max_length` keeps the BEGINNING (the task instruction must stay; the model is trained
    on what it saw). `truncate_after_last_selected` also drops every token after the last selected span,
    which cannot change a causal LM's loss; it is off here so that callers decide (packing and
    evaluation may want whole trajectories). A trajectory left with no supervised token raises a
    `DataError` naming it, or returns None with `on_empty="skip"` (the caller counts those).
    `step_weights`, `supervise` and `on_missing_part`: see the module docstring.
    """
    _check_options(max_length, on_empty, step_weights, supervise, on_missing_part)
    ex = _build(tokenizer, traj, selection, max_length, truncate_after_last_selected, step_weights, supervise,
                on_missing_part)
    if ex.n_supervised == 0:
        if on_empty == "skip":
            return None
        raise _empty_error(ex, max_length)
    return ex


def build_examples(
    tokenizer: Any,
    trajs: Sequence[Trajectory],
    selections: Sequence[Selection],
    max_length: int | None,
    on_empty: OnEmpty = "error",
    *,
    truncate_after_last_selected: bool = False,
    step_weights: StepWeights = "binary",
    supervise: Supervise = "step",
    on_missing_part: OnMissingPart = "error",
    progress: bool = True,
    desc: str = "masking",
) -> tuple[list[MaskedExample], dict[str, Any]]:
    """`build_example` over aligned lists (selection i describes trajectory i), with a progress bar.

    Returns the examples and stats: n_trajectories, n_examples, n_skipped_empty, n_truncated (sequences
    cut by max_length), n_tokens and n_supervised_tokens (kept examples, after truncation),
    n_assistant_tokens and n_selected_tokens (before truncation, all trajectories),
    n_selected_tokens_lost (cut by max_length, skipped trajectories included), n_steps_missing_part
    (selected steps without the part `supervise` asks for, with on_missing_part=skip) and supervised_share
    (n_supervised_tokens / n_tokens).
    """
    from tqdm.auto import tqdm

    _check_options(max_length, on_empty, step_weights, supervise, on_missing_part)
    trajs = list(trajs)
    selections = list(selections)
    if len(trajs) != len(selections):
        raise DataError(f"{len(trajs)} trajectories but {len(selections)} selections; they must be aligned", source="selection")
    get_template_info(tokenizer)  # fail on a bad template before the progress bar starts
    examples: list[MaskedExample] = []
    stats = dict.fromkeys(
        (
            "n_skipped_empty",
            "n_truncated",
            "n_tokens",
            "n_supervised_tokens",
            "n_assistant_tokens",
            "n_selected_tokens",
            "n_selected_tokens_lost",
            "n_steps_missing_part",
        ),
        0,
    )
    for traj, sel in tqdm(zip(trajs, selections), total=len(trajs), desc=desc, unit="traj", disable=not progress):
        ex = _build(tokenizer, traj, sel, max_length, truncate_after_last_selected, step_weights, supervise,
                    on_missing_part)
        stats["n_steps_missing_part"] += ex.n_steps_missing_part
        stats["n_assistant_tokens"] += ex.n_assistant_tokens
        stats["n_selected_tokens"] += ex.n_selected_tokens
        stats["n_selected_tokens_lost"] += ex.n_selected_tokens_lost
        if max_length is not None and ex.n_tokens_full > max_length:
            stats["n_truncated"] += 1
        if ex.n_supervised == 0:
            if on_empty == "error":
                raise _empty_error(ex, max_length)
            stats["n_skipped_empty"] += 1
            continue
        stats["n_tokens"] += ex.n_tokens
        stats["n_supervised_tokens"] += ex.n_supervised
        examples.append(ex)
    out: dict[str, Any] = {"n_trajectories": len(trajs), "n_examples": len(examples), **stats}
    out["supervised_share"] = stats["n_supervised_tokens"] / stats["n_tokens"] if stats["n_tokens"] else 0.0
    return examples, out
