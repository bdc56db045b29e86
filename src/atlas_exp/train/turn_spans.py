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

import os
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
    get_template_info,
    prefix_error,
    render_conversations,
)


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
        self.starts = [int(o[0]) for o in offsets]
        self.ends = [int(o[1]) for o in offsets]
        for a, b in ((self.starts, "start"), (self.ends, "end")):
            if any(x > y for x, y in zip(a, a[1:])):
                raise TemplateError(f"{name}: token offsets are not monotonic ({b}s); cannot map spans to tokens")

    def __call__(self, p: int) -> int | None:
        t = bisect_left(self.starts, p)
        prev_end = self.ends[t - 1] if t > 0 else 0
        if prev_end != p:
            return None
        return t


def _content_candidates(content: str) -> list[str]:
    out: list[str] = []
    for c in (content, content.strip(), content.rstrip(), content.lstrip()):
        if c and c not in out:
            out.append(c)
    return out


def _render_prefixes(tokenizer: Any, msgs: list[dict[str, Any]], info: TemplateInfo, traj_id: str,
                     tools: list[dict] | None = None) -> list[str]:
    convs = [msgs[: i + 1] for i in range(len(msgs))]
    if info.fast_render is not None:
        try:
            renders = [info.fast_render(c, tools) for c in convs]
            if renders[-1] == render_conversations(tokenizer, [msgs], tools)[0]:
                return renders
        except Exception:
            pass  # the public path below names the failing message
    try:
        return render_conversations(tokenizer, convs, tools)
    except Exception:
        pass
    # find which prefix fails, to name it
    for i, conv in enumerate(convs):
        try:
            render_conversations(tokenizer, [conv], tools)
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
        for sp in info.specials:
            if sp in m["content"]:
                # It would be encoded as a control token (as apply_chat_template does by default): a fake
                # turn boundary in the input, or an end-of-turn in the middle of a supervised action.
                raise DataError(
                    f"content contains the special token {sp!r} of {info.name}", source=traj.id, field=f"messages[{i}].content"
                )
    renders = _render_prefixes(tokenizer, msgs, info, traj.id, tools)

    # A turn boundary must be stable where an assistant turn starts or ends; between two non-assistant turns
    # a template may render both as one block (then the first one's span is empty, the next one owns it).
    n = len(renders)
    roles = [m.role for m in traj.messages]
    boundary = [i == n - 1 or roles[i] == "assistant" or roles[i + 1] == "assistant" for i in range(n)]
    ends: list[int] = []
    prev = ""
    for i, r in enumerate(renders):
        if not boundary[i]:
            nxt = renders[boundary.index(True, i + 1)]
            if r.startswith(prev) and nxt.startswith(r):
                ends.append(len(r))
                prev = r
            else:
                ends.append(len(prev))
            continue
        if not r.startswith(prev):
            j = len(os.path.commonprefix([prev, r]))
            k = bisect_left(ends, j + 1)  # the message whose characters contain position j
            raise prefix_error(info.name, f"trajectory {traj.id!r}", msgs, i, k, prev, r)
        ends.append(len(r))
        prev = r
    text = renders[-1]

    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(enc["input_ids"])
    to_tok = _CharToToken(enc["offset_mapping"], info.name)

    def tok_index(p: int, what: str, i: int) -> int:
        t = to_tok(p)
        if t is None:
            lo, hi = max(0, p - 20), min(len(text), p + 20)
            raise TemplateError(
                f"{info.name}: in trajectory {traj.id!r}, the {what} of message {i} ({msgs[i]['role']}) at "
                f"character {p} falls inside a token ({text[lo:p]!r} | {text[p:hi]!r}): the tokenizer merges "
                f"text across it, so no exact token mask exists (often leading whitespace in the content)."
            )
        return t

    message_char: list[tuple[int, int]] = []
    message_tok: list[tuple[int, int]] = []
    sup_char: list[tuple[int, int] | None] = []
    sup_tok: list[tuple[int, int] | None] = []
    step_spans: list[tuple[int, int]] = []
    header, suffix = info.turn_header, info.turn_suffix
    for i, m in enumerate(traj.messages):
        s = ends[i - 1] if i else 0
        e = ends[i]
        message_char.append((s, e))
        message_tok.append((tok_index(s, "start", i), tok_index(e, "end", i)))
        if m.role != "assistant":
            sup_char.append(None)
            sup_tok.append(None)
            continue
        span = None
        if m.tool_calls and info.tool_calls:
            # the template's own call syntax: all it writes after the (shared part of the) assistant header
            c0 = s + len(os.path.commonprefix([text[s:e], header]))
            if text.endswith(suffix, s, e) and e - len(suffix) > c0:
                span = (c0, e - len(suffix) + len(info.eot_text))
        for cand in [] if span is not None or (m.tool_calls and info.tool_calls) else _content_candidates(m.content):
            c0 = e - len(suffix) - len(cand)
            # Both sides must match: with the suffix alone, "\nAction" under a header ending in "\n\n"
            # and a trimming template would wrongly claim the header's last newline as content.
            if c0 - len(header) >= s and text.endswith(cand + suffix, c0, e) and text.endswith(header, s, c0):
                span = (c0, c0 + len(cand) + len(info.eot_text))
                break
        if span is None:
            raise TemplateError(
                f"{info.name}: cannot find the content of message {i} (assistant) of trajectory {traj.id!r} "
                f"between the template's assistant header {header!r} and turn suffix {suffix!r} "
                f"(as rendered on a probe); the message renders as {text[s:e][:80]!r}...{text[s:e][-80:]!r}"
            )
        a = tok_index(span[0], "content start", i)
        b = tok_index(span[1], "end of turn", i)
        if b <= a or input_ids[b - 1] != info.eot_token_id:
            raise TemplateError(
                f"{info.name}: in trajectory {traj.id!r}, message {i} (assistant) does not tokenize to end with "
                f"the end-of-turn token {info.eot_token!r}"
            )
        sup_char.append(span)
        sup_tok.append((a, b))
        if m.is_step:
            step_spans.append((a, b))
    return TokenizedTrajectory(
        id=traj.id,
        text=text,
        input_ids=input_ids,
        message_spans=message_tok,
        message_char_spans=message_char,
        supervised_spans=sup_tok,
        supervised_char_spans=sup_char,
        step_spans=step_spans,
        offsets=[(int(a), int(b)) for a, b in enc["offset_mapping"]],
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
    to_tok = _CharToToken(tt.offsets, info.name)
    out: list[tuple[int, int] | None] = []
    for i, m in enumerate(traj.messages):
        if not m.is_step:
            continue
        where = f"messages[{i}] (step {m.step})"
        if m.tool_calls:
            raise DataError(f"train.supervise={part} needs ReAct text steps (Thought:/Action:); this step makes "
                            "tool calls: use train.supervise=step", source=traj.id, field=where)
        c0, c1 = tt.supervised_char_spans[i]
        content_end = c1 - len(info.eot_text)
        mark = _ACTION_MARK.search(tt.text, c0, content_end)
        if mark is None or (part == "thought" and not tt.text[c0 : mark.start()].strip()):
            if on_missing == "skip":
                out.append(None)
                continue
            what = "'Action:' line" if mark is None else "thought before its 'Action:' line"
            raise DataError(f"train.supervise={part}: the step has no {what} (content "
                            f"{tt.text[c0:content_end][:80]!r}); train.on_missing_part=skip leaves such steps "
                            "unsupervised (counted)", source=traj.id, field=where)
        a, b = (c0, mark.start()) if part == "thought" else (mark.start(), c1)
        ta, tb = to_tok(a), to_tok(b)
        if ta is None or tb is None:
            raise TemplateError(f"{info.name}: in trajectory {traj.id!r}, {where}: the {part} part's boundary at "
                                f"character {mark.start()} falls inside a token ({tt.text[max(0, mark.start() - 20):mark.start() + 20]!r}); "
                                "no exact token span exists")
        out.append((ta, tb))
    return out
