"""The token sequences that score each step: the trajectory's prefix, windows past `max_length`, the step alone.

Why a module of its own: this is the geometry of `perplexity.py`'s definitions (its docstring, "Tokens of a
step", "Step alone" and "Long trajectories", is the specification), as functions of a tokenizer and a
trajectory only. The selector keeps the model, the caches and the choice among scores. Spans come from
`train/turn_spans.py`, so a step is scored on exactly the tokens training supervises.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from atlas_exp.data.trajectory import Message, Trajectory
from atlas_exp.errors import ConfigError, TemplateError
from atlas_exp.selectors.span_scorer import ScoredSeq
from atlas_exp.train.turn_spans import tokenize_trajectory


class ConditionedKey(NamedTuple):
    """The span scorer's key of a step's conditioned loss: the trajectory's index in the dataset, the step."""

    trajectory: int
    step: int


class AloneKey(NamedTuple):
    """The span scorer's key of a step's alone loss: its content (the loss depends on nothing else)."""

    content: str


class AloneRendering(NamedTuple):
    """A step's content rendered as the only message of a conversation (`render_step_alone`)."""

    #: token ids up to the end of the scored span
    input_ids: list[int]
    #: the step's supervised span in `input_ids`, half-open
    span: tuple[int, int]
    #: whether max_length cut the span (then only its first tokens are scored)
    cut: bool


@dataclass
class ScoringPlan:
    """What to compute for one trajectory: the keys of its losses, and the steps scored in a window."""

    n_steps: int
    cond_keys: list[ConditionedKey]
    #: one per step with the ratio metric, none with the plain loss
    alone_keys: list[AloneKey]
    #: per windowed step: history tokens dropped
    dropped: dict[int, int]


def render_step_alone(tokenizer: Any, content: str, *, alone_prompt: str | None, max_length: int | None) -> AloneRendering:
    """Token ids of the step-alone rendering, the step's supervised span in it, and whether `max_length` cut
    that span. `alone_prompt`: a user message placed before the step (templates that refuse a leading
    assistant turn)."""
    messages = [Message("assistant", content, step=0)]
    if alone_prompt is not None:
        messages.insert(0, Message("user", alone_prompt))
    alone = Trajectory(id="step-alone", env="-", messages=messages)
    try:
        tokenized = tokenize_trajectory(tokenizer, alone)
    except TemplateError as e:
        if alone_prompt is None:
            raise ConfigError(
                f"selector: the chat template cannot render a step alone (a conversation that is one assistant "
                f"turn): {e}. Set selector.alone_prompt to a fixed user message placed before each step "
                f"(e.g. selector.alone_prompt=Continue.)"
            ) from None
        raise
    start, end = tokenized.step_spans[0]
    cut = max_length is not None and end > max_length
    if cut:
        if start >= max_length:
            raise ConfigError(
                f"selector.max_length={max_length} leaves no room for a step after the {start} tokens the template "
                f"writes before it when rendered alone"
            )
        end = max_length
    return AloneRendering(tokenized.input_ids[:end], (start, end), cut)


def plan_sequences(
    tokenizer: Any,
    traj: Trajectory,
    traj_index: int,
    max_length: int | None,
    alone: Callable[[str], AloneRendering] | None = None,
) -> tuple[ScoringPlan, list[ScoredSeq]]:
    """The conditioned sequences of one trajectory: the whole prefix, plus windows past `max_length`.

    `alone` (the ratio metric only): a step's alone rendering; a step whose alone span was cut is scored on
    the same first tokens in context. `traj_index` keys the losses (`ConditionedKey`).
    """
    tokenized = tokenize_trajectory(tokenizer, traj)
    ids = tokenized.input_ids
    steps = traj.steps
    message_of_step = traj.step_message_index()
    message_starts = [start for start, _ in tokenized.message_spans]
    spans: list[tuple[int, int]] = []
    for k, (start, end) in enumerate(tokenized.step_spans):
        if max_length is not None:
            if alone is not None:
                rendering = alone(steps[k].content)
                if rendering.cut:  # scored alone on its first tokens only: the same tokens in context
                    alone_start, alone_end = rendering.span
                    end = min(end, start + (alone_end - alone_start))
            end = min(end, start + max_length - 1)  # room for at least one token of context
        spans.append((start, end))
    cond_keys = [ConditionedKey(traj_index, k) for k in range(len(spans))]
    alone_keys = [AloneKey(step.content) for step in steps] if alone is not None else []
    seqs: list[ScoredSeq] = []
    dropped: dict[int, int] = {}

    in_prefix = [k for k, (_, end) in enumerate(spans) if max_length is None or end <= max_length]
    if in_prefix:
        end = max(spans[k][1] for k in in_prefix)  # tokens after the last scored span change nothing
        seqs.append(ScoredSeq(ids[:end], [spans[k] for k in in_prefix], [cond_keys[k] for k in in_prefix]))
    remaining = [k for k in range(len(spans)) if k not in set(in_prefix)]
    prompt_end = message_starts[message_of_step[0]]  # the prompt: everything before the agent's first action
    while remaining:
        assert max_length is not None  # every step fits the prefix without a max_length
        k = remaining[0]
        step_end = spans[k][1]
        message_start = message_starts[message_of_step[k]]
        if prompt_end + (step_end - message_start) <= max_length:
            # the prompt, then the most recent whole messages that fit with it
            start = min(x for x in message_starts
                        if prompt_end <= x <= message_start and prompt_end + (step_end - x) <= max_length)
            prefix, room = ids[:prompt_end], max_length - prompt_end
        elif step_end - message_start <= max_length:
            # no room for the prompt: the most recent whole messages alone
            start = min(x for x in message_starts if x <= message_start and step_end - x <= max_length)
            prefix, room = [], max_length
        else:  # the step's message alone does not fit: the max_length tokens ending at the step's end
            prefix, start, room = [], step_end - max_length, max_length
        covered = [j for j in remaining if spans[j][0] >= start and spans[j][1] <= start + room]
        end = max(spans[j][1] for j in covered)
        window = prefix + ids[start:end]
        shift = len(prefix) - start
        seqs.append(
            ScoredSeq(window, [(spans[j][0] + shift, spans[j][1] + shift) for j in covered], [cond_keys[j] for j in covered])
        )
        for j in covered:
            dropped[j] = start - len(prefix)
        covered_set = set(covered)
        remaining = [j for j in remaining if j not in covered_set]
    return ScoringPlan(len(spans), cond_keys, alone_keys, dropped), seqs
