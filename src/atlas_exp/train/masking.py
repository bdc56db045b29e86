"""Training labels for critical steps: the whole trajectory is the input, the loss is only on selected steps.

ATLaS trains only on the tokens of the *selected* (critical) assistant turns; every other token is
context. A selected step's labels are exactly its *supervised span* (rendered content plus end-of-turn
token, as `turn_spans.py` derives it from the chat template): never its role header, never the text
the template writes after the end-of-turn token, never a user turn or an unselected step. Assistant
turns that are not steps (`trainable=False`) are never supervised. Labels are not shifted: Hugging Face
causal LMs shift them internally.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from atlas_exp.data.selection import Selection
from atlas_exp.data.trajectory import Trajectory
from atlas_exp.errors import ConfigError, DataError
from atlas_exp.train.chat_template import get_template_info
from atlas_exp.train.turn_spans import tokenize_trajectory

#: label value ignored by the cross-entropy loss of Hugging Face models
IGNORE_INDEX = -100

OnEmpty = Literal["error", "skip"]


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



# --------------------------------------------------------------------------------------------------
# masks


def _check_options(max_length: int | None, on_empty: str) -> None:
    if on_empty not in ("error", "skip"):
        raise ConfigError(f"on_empty must be 'error' or 'skip', got {on_empty!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ConfigError(f"max_length must be a positive integer (or None for no limit), got {max_length!r}")


def _build(
    tokenizer: Any,
    traj: Trajectory,
    selection: Selection,
    max_length: int | None,
    truncate_after_last_selected: bool,
) -> MaskedExample:
    selection.check_matches(traj, source=f"selection of {traj.id}")
    tt = tokenize_trajectory(tokenizer, traj)
    ids = tt.input_ids
    selected = [tt.step_spans[s] for s in selection.selected_steps]
    n_selected = sum(b - a for a, b in selected)
    cut = len(ids)
    if truncate_after_last_selected and selected:
        # A causal LM's loss at position j depends only on tokens <= j: tokens after the last selected
        # span change nothing but cost compute.
        cut = max(b for _, b in selected)
    if max_length is not None:
        cut = min(cut, max_length)
    labels = [IGNORE_INDEX] * cut
    n_sup = 0
    for a, b in selected:
        b = min(b, cut)
        if b > a:
            labels[a:b] = ids[a:b]
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
    )


def _empty_error(ex: MaskedExample, max_length: int | None) -> DataError:
    if ex.n_selected_tokens == 0:
        why = "the selection marks no step of this trajectory"
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
) -> MaskedExample | None:
    """Input ids and labels for one trajectory: loss only on the supervised spans of selected steps.

    Truncation to `max_length` keeps the BEGINNING (the task instruction must stay; the model is trained
    on what it saw). `truncate_after_last_selected` also drops every token after the last selected span,
    which cannot change a causal LM's loss; it is off here so that callers decide (packing and
    evaluation may want whole trajectories). A trajectory left with no supervised token raises a
    `DataError` naming it, or returns None with `on_empty="skip"` (the caller counts those).
    """
    _check_options(max_length, on_empty)
    ex = _build(tokenizer, traj, selection, max_length, truncate_after_last_selected)
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
    progress: bool = True,
    desc: str = "masking",
) -> tuple[list[MaskedExample], dict[str, Any]]:
    """`build_example` over aligned lists (selection i describes trajectory i), with a progress bar.

    Returns the examples and stats: n_trajectories, n_examples, n_skipped_empty, n_truncated (sequences
    cut by max_length), n_tokens and n_supervised_tokens (kept examples, after truncation),
    n_assistant_tokens and n_selected_tokens (before truncation, all trajectories),
    n_selected_tokens_lost (cut by max_length, skipped trajectories included) and supervised_share
    (n_supervised_tokens / n_tokens).
    """
    from tqdm.auto import tqdm

    _check_options(max_length, on_empty)
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
        ),
        0,
    )
    for traj, sel in tqdm(zip(trajs, selections), total=len(trajs), desc=desc, unit="traj", disable=not progress):
        ex = _build(tokenizer, traj, sel, max_length, truncate_after_last_selected)
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
