"""Exact per-turn token spans of a trajectory rendered by the model's own chat template.

Selection (the perplexity selectors score a step on exactly its tokens), training (loss only on selected
steps, `masking.py`) and evaluation (expert steps) all need to know which tokens belong to which turn.
Getting that wrong by one token silently trains or scores a model on a role header or on the environment's
reply, so the spans are derived from the template itself and checked, never guessed:

1. The trajectory is rendered ONCE with `tokenizer.apply_chat_template` (roles system/user/assistant, no
   generation prompt) and that text is tokenized ONCE, exactly as `apply_chat_template(tokenize=True)`
   does it (`add_special_tokens=False`), with the fast tokenizer's offset mapping. `input_ids` are
   therefore identical to what the template gives at inference time.
2. Every prefix `messages[:i+1]` is rendered as text (Jinja only, no tokenizer call; the full render
   is also compared with `apply_chat_template`'s) and each must be a prefix of the next (*prefix
   property*). Then message i owns the characters
   `[len(render(messages[:i])), len(render(messages[:i+1])))` of the full text, header and end-of-turn
   included. A template that renders an earlier turn differently once later turns exist (strips
   reasoning from old turns, renders the last turn specially via `loop.last`, appends something only at
   the end of the conversation) has no well-defined per-turn spans: we raise `TemplateError` naming the
   template and the message where it broke instead of producing a wrong span.
3. Character spans become token spans through the offset mapping. A span boundary that falls inside a
   token (BPE merged text of two regions) raises `TemplateError`: there is no exact token span then.

The supervised span of an assistant turn (the definition every count of the project uses):

    supervised span = rendered content  +  end-of-turn text

with the turn header, turn suffix and end-of-turn text measured per template (`chat_template.py`).
* *rendered content* is the message content as the template renders it, found in each assistant
  message's render as the text between exactly the turn header and exactly the turn suffix (a turn
  where that fails raises `TemplateError`). Templates that `trim` the content are supported: we try
  the content verbatim, then stripped / right-stripped / left-stripped. Requiring the header too is
  what keeps a content starting with "\\n" under a trimming template whose header ends in "\\n\\n"
  from claiming the header's last newline.
* the role header (`<|im_start|>assistant\\n`) is never supervised: at inference it is the generation
  prompt, written by the caller; what follows the end-of-turn token is fixed by the template.
* an assistant turn with `tool_calls` rendered through the template's own tool-call syntax supervises
  everything its render writes after the assistant header (the part it shares with the probed header) up
  to and including the end-of-turn text. Consecutive non-assistant turns that a template renders as one
  block (parallel tool results in one user turn) share that block: the prefix property is required only
  where an assistant turn starts or ends.

The last supervised token is checked to be the end-of-turn token's id. Assistant turns that are not steps
(AgentTraj-L's "OK. I'll follow your instructions" turn, `trainable=False`) get a span too, but no step
number.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from atlas_exp.data.trajectory import Trajectory
from atlas_exp.errors import DataError, TemplateError
from atlas_exp.train.chat_template import (
    TemplateInfo,
    chat_messages,
    common_prefix_length,
    fast_renders_checked,
    get_template_info,
    prefix_error,
    render_conversations,
)

#: characters quoted on each side of a span boundary that falls inside a token
_CONTEXT_CHARS = 20
#: characters quoted from each end of an assistant message whose content cannot be found
_QUOTED_CHARS = 80


@dataclass
class TokenizedTrajectory:
    """A trajectory rendered by the chat template, tokenized once, with every turn's span.

    All spans are half-open `[start, end)`; token spans index `input_ids`, char spans index `text`.
    """

    id: str
    text: str
    input_ids: list[int]
    #: per message: its whole render (header, content, end-of-turn, separator); message 0 also owns what
    #: the template writes before it (BOS, a default system prompt like SmolLM2's)
    message_spans: list[tuple[int, int]]
    message_char_spans: list[tuple[int, int]]
    #: per message: the supervised span for assistant turns, None for system/user turns
    supervised_spans: list[tuple[int, int] | None]
    supervised_char_spans: list[tuple[int, int] | None]
    #: per step (indexed by step number): the supervised span of that step
    step_spans: list[tuple[int, int]]
    #: the tokenizer's offset mapping of `text` (char span of each token), to map further char spans
    offsets: list[tuple[int, int]] = field(default_factory=list, repr=False)



# --------------------------------------------------------------------------------------------------
# one trajectory -> token spans


class _CharToToken:
    """Maps a character position of the text to the index of the token starting there, or None when the
    position falls inside a token.

    A position p is a clean boundary iff the tokens before it end exactly at p and the tokens after it
    start at or after p. Requiring the previous token to end *exactly* at p (not before) keeps this
    safe for tokenizers whose offsets omit whitespace: a boundary in such a gap is refused rather than
    guessed.
    """

    def __init__(self, offsets: Sequence[Sequence[int]], name: str):
        self.starts = [int(start) for start, _ in offsets]
        self.ends = [int(end) for _, end in offsets]
        for positions, which in ((self.starts, "start"), (self.ends, "end")):
            if any(x > y for x, y in zip(positions, positions[1:])):
                raise TemplateError(f"{name}: token offsets are not monotonic ({which}s); cannot map spans to tokens")

    def __call__(self, position: int) -> int | None:
        token = bisect_left(self.starts, position)
        prev_end = self.ends[token - 1] if token > 0 else 0
        if prev_end != position:
            return None
        return token


def _content_candidates(content: str) -> list[str]:
    """The content as a template may render it: verbatim, then stripped, right- and left-stripped."""
    out: list[str] = []
    for candidate in (content, content.strip(), content.rstrip(), content.lstrip()):
        if candidate and candidate not in out:
            out.append(candidate)
    return out


def _render_prefixes(tokenizer: Any, msgs: list[dict[str, Any]], info: TemplateInfo, traj_id: str,
                     tools: list[dict] | None = None) -> list[str]:
    """The render of every prefix `msgs[:i+1]` (the fast path where it agrees with apply_chat_template)."""
    prefixes = [msgs[: i + 1] for i in range(len(msgs))]
    renders = fast_renders_checked(tokenizer, info.fast_render, prefixes, tools)
    if renders is not None:
        return renders
    # the public path; where it fails, it names the failing message
    try:
        return render_conversations(tokenizer, prefixes, tools)
    except Exception:
        pass
    # find which prefix fails, to name it
    for i, prefix in enumerate(prefixes):
        try:
            render_conversations(tokenizer, [prefix], tools)
        except Exception as e:
            raise TemplateError(
                f"{info.name}: rendering messages[:{i + 1}] of trajectory {traj_id!r} failed at message {i} "
                f"({msgs[i]['role']}): {e!r}"
            ) from e
    raise TemplateError(f"{info.name}: rendering the prefixes of trajectory {traj_id!r} failed")


def tokenize_trajectory(tokenizer: Any, traj: Trajectory) -> TokenizedTrajectory:
    """Render `traj` with the chat template, tokenize it once, and derive every turn's exact span.

    Cost: one batched Jinja render of the k prefixes (characters, quadratic but cheap) and ONE tokenizer
    call over the full text. Raises `TemplateError` when the template breaks the prefix property, when
    an assistant content cannot be found followed by the template's turn suffix, or when a span
    boundary falls inside a token.
    """
    info = get_template_info(tokenizer)
    msgs, tools = chat_messages(traj, info)
    for i, m in enumerate(msgs):
        for special in info.specials:
            if special in m["content"]:
                # It would be encoded as a control token (as apply_chat_template does by default): a fake
                # turn boundary in the input, or an end-of-turn in the middle of a supervised action.
                raise DataError(
                    f"content contains the special token {special!r} of {info.name}", source=traj.id,
                    field=f"messages[{i}].content",
                )
    renders = _render_prefixes(tokenizer, msgs, info, traj.id, tools)

    # A turn boundary must be stable where an assistant turn starts or ends; between two non-assistant turns
    # a template may render both as one block (then the first one's span is empty, the next one owns it).
    n = len(renders)
    roles = [m.role for m in traj.messages]
    boundary = [i == n - 1 or roles[i] == "assistant" or roles[i + 1] == "assistant" for i in range(n)]
    ends: list[int] = []  # per message: where its characters end in the full text
    prev = ""
    for i, render in enumerate(renders):
        if not boundary[i]:
            next_boundary = renders[boundary.index(True, i + 1)]
            if render.startswith(prev) and next_boundary.startswith(render):
                ends.append(len(render))
                prev = render
            else:
                ends.append(len(prev))
            continue
        if not render.startswith(prev):
            j = common_prefix_length(prev, render)
            k = bisect_left(ends, j + 1)  # the message whose characters contain position j
            raise prefix_error(info.name, f"trajectory {traj.id!r}", msgs, i, k, prev, render)
        ends.append(len(render))
        prev = render
    text = renders[-1]

    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    char_to_token = _CharToToken(encoding["offset_mapping"], info.name)

    def token_at(position: int, what: str, i: int) -> int:
        token = char_to_token(position)
        if token is None:
            lo, hi = max(0, position - _CONTEXT_CHARS), min(len(text), position + _CONTEXT_CHARS)
            raise TemplateError(
                f"{info.name}: in trajectory {traj.id!r}, the {what} of message {i} ({msgs[i]['role']}) at "
                f"character {position} falls inside a token ({text[lo:position]!r} | {text[position:hi]!r}): the "
                f"tokenizer merges text across it, so no exact token mask exists (often leading whitespace in the "
                f"content)."
            )
        return token

    message_char_spans: list[tuple[int, int]] = []
    message_spans: list[tuple[int, int]] = []
    supervised_char_spans: list[tuple[int, int] | None] = []
    supervised_spans: list[tuple[int, int] | None] = []
    step_spans: list[tuple[int, int]] = []
    header, suffix = info.turn_header, info.turn_suffix
    for i, m in enumerate(traj.messages):
        start = ends[i - 1] if i else 0
        end = ends[i]
        message_char_spans.append((start, end))
        message_spans.append((token_at(start, "start", i), token_at(end, "end", i)))
        if m.role != "assistant":
            supervised_char_spans.append(None)
            supervised_spans.append(None)
            continue
        span = None
        own_call_syntax = bool(m.tool_calls and info.tool_calls)
        if own_call_syntax:
            # the template's own call syntax: all it writes after the (shared part of the) assistant header
            content_start = start + common_prefix_length(text[start:end], header)
            if text.endswith(suffix, start, end) and end - len(suffix) > content_start:
                span = (content_start, end - len(suffix) + len(info.eot_text))
        for candidate in [] if span is not None or own_call_syntax else _content_candidates(m.content):
            content_start = end - len(suffix) - len(candidate)
            # Both sides must match: with the suffix alone, "\nAction" under a header ending in "\n\n"
            # and a trimming template would wrongly claim the header's last newline as content.
            if (content_start - len(header) >= start and text.endswith(candidate + suffix, content_start, end)
                    and text.endswith(header, start, content_start)):
                span = (content_start, content_start + len(candidate) + len(info.eot_text))
                break
        if span is None:
            rendered = text[start:end]
            raise TemplateError(
                f"{info.name}: cannot find the content of message {i} (assistant) of trajectory {traj.id!r} "
                f"between the template's assistant header {header!r} and turn suffix {suffix!r} "
                f"(as rendered on a probe); the message renders as "
                f"{rendered[:_QUOTED_CHARS]!r}...{rendered[-_QUOTED_CHARS:]!r}"
            )
        span_start, span_end = span
        first_token = token_at(span_start, "content start", i)
        end_token = token_at(span_end, "end of turn", i)
        if end_token <= first_token or input_ids[end_token - 1] != info.eot_token_id:
            raise TemplateError(
                f"{info.name}: in trajectory {traj.id!r}, message {i} (assistant) does not tokenize to end with "
                f"the end-of-turn token {info.eot_token!r}"
            )
        supervised_char_spans.append(span)
        supervised_spans.append((first_token, end_token))
        if m.is_step:
            step_spans.append((first_token, end_token))
    return TokenizedTrajectory(
        id=traj.id,
        text=text,
        input_ids=input_ids,
        message_spans=message_spans,
        message_char_spans=message_char_spans,
        supervised_spans=supervised_spans,
        supervised_char_spans=supervised_char_spans,
        step_spans=step_spans,
        offsets=[(int(start), int(end)) for start, end in encoding["offset_mapping"]],
    )


# --------------------------------------------------------------------------------------------------
# one step -> its Thought / Action part (train.supervise=thought|action)

#: where a ReAct reply's action part starts: "Action:" at the start of the content or of a line
_ACTION_MARK = re.compile(r"(?m)^Action[ \t]*:")

Part = Literal["thought", "action"]


def step_part_spans(tokenizer: Any, traj: Trajectory, tt: TokenizedTrajectory, part: Part,
                    on_missing: Literal["error", "skip"] = "error") -> list[tuple[int, int] | None]:
    """Per step, the token span of its `Thought:` or `Action:` part, inside its supervised span.

    A ReAct step renders as `Thought:\n<thought>\n\nAction:\n<action>` + end-of-turn. The action part runs
    from the FIRST "Action:" that starts a line (the one AgentGym's clients executed) to the end of the
    supervised span, so the end-of-turn token stays with the action: the model must still learn to stop
    after acting. The thought part is everything before that marker (the "Thought:" marker and the blank
    line included), so thought + action tile the step exactly. The marker boundary is mapped to a token
    like the turn boundaries (offset mapping; inside a token raises `TemplateError`).

    A step without the part asked for (no "Action:" line, or nothing before it for `thought`: AgentTraj-L's
    movie_118 has such a final step) raises `DataError` naming the trajectory and step, or is None with
    `on_missing="skip"` (the caller counts it; `train.on_missing_part`). Erroring is the default because
    quietly training such a step's whole turn, or nothing of it, changes what the run learns unseen. A
    tool-call turn has no ReAct text at all: always an error (use `supervise=step`).
    """
    info = get_template_info(tokenizer)
    char_to_token = _CharToToken(tt.offsets, info.name)
    out: list[tuple[int, int] | None] = []
    for i, m in enumerate(traj.messages):
        if not m.is_step:
            continue
        where = f"messages[{i}] (step {m.step})"
        if m.tool_calls:
            raise DataError(f"train.supervise={part} needs ReAct text steps (Thought:/Action:); this step makes "
                            "tool calls: use train.supervise=step", source=traj.id, field=where)
        content_start, supervised_end = tt.supervised_char_spans[i]
        content_end = supervised_end - len(info.eot_text)
        mark = _ACTION_MARK.search(tt.text, content_start, content_end)
        if mark is None or (part == "thought" and not tt.text[content_start : mark.start()].strip()):
            if on_missing == "skip":
                out.append(None)
                continue
            what = "'Action:' line" if mark is None else "thought before its 'Action:' line"
            raise DataError(f"train.supervise={part}: the step has no {what} (content "
                            f"{tt.text[content_start:content_end][:_QUOTED_CHARS]!r}); train.on_missing_part=skip leaves such steps "
                            "unsupervised (counted)", source=traj.id, field=where)
        part_start, part_end = (content_start, mark.start()) if part == "thought" else (mark.start(), supervised_end)
        first_token, end_token = char_to_token(part_start), char_to_token(part_end)
        if first_token is None or end_token is None:
            quoted = tt.text[max(0, mark.start() - _CONTEXT_CHARS):mark.start() + _CONTEXT_CHARS]
            raise TemplateError(f"{info.name}: in trajectory {traj.id!r}, {where}: the {part} part's boundary at "
                                f"character {mark.start()} falls inside a token ({quoted!r}); "
                                "no exact token span exists")
        out.append((first_token, end_token))
    return out
