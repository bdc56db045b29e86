"""Exact per-turn token spans from the model's own chat template, and loss masks for selected steps.

ATLaS trains only on the tokens of the *selected* (critical) assistant turns; every other token is
context. Getting the mask wrong by one token silently trains the model on a role header or on the
environment's reply, so the spans are derived from the template itself and checked, never guessed:

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
   template and the message where it broke instead of producing a wrong mask.
3. Character spans become token spans through the offset mapping. A span boundary that falls inside a
   token (BPE merged text of two regions) raises `TemplateError`: there is no exact token mask then.

The supervised span of an assistant turn (the definition every count in this module uses):

    supervised span = rendered content  +  end-of-turn text

* the *turn header* and *turn suffix* are the texts the template writes before and after an assistant
  content within that message's render, measured once per template on a probe conversation
  `[user P, assistant Q]`: `<|im_start|>assistant\\n` and `<|im_end|>\\n` for ChatML,
  `<|start_header_id|>assistant<|end_header_id|>\\n\\n` and `<|eot_id|>` for Llama-3.
* *rendered content* is the message content as the template renders it, found in each assistant
  message's render as the text between exactly the turn header and exactly the turn suffix (a turn
  where that fails raises `TemplateError`). Templates that `trim` the content are supported: we try
  the content verbatim, then stripped / right-stripped / left-stripped. Requiring the header too is
  what keeps a content starting with "\\n" under a trimming template whose header ends in "\\n\\n"
  from claiming the header's last newline.
* the *end-of-turn text* is the turn suffix cut right after its FIRST special token (any of the
  tokenizer's special tokens or added tokens marked special): `<|im_end|>` for ChatML, `<|eot_id|>`
  for Llama-3, `" </s>"` for Llama-2-style `' ' + eos_token`. What follows it (ChatML's newline, the
  next header) is not supervised: it is fixed by the template, not chosen by the model, and a model
  stops generating at the end-of-turn token anyway. A template whose suffix holds no special token is
  refused (`TemplateError`): a model trained on it could never learn to end its turn.
* the role header (`<|im_start|>assistant\\n`) is never supervised: at inference it is the generation
  prompt, written by the caller.

Tool calling: an assistant turn with `tool_calls` is rendered through the template's own tool-call syntax
when it has one (probed once per template: a call's function name must appear in the render), and then
its supervised span is everything its render writes after the assistant header (the part it shares with
the probed header) up to and including the end-of-turn text. `tool` turns keep their role where the
template renders it (else they are rendered as user turns), and a trajectory's `tools` go to the
template (`apply_chat_template(tools=...)`) where it writes them, else as text at the start of the first
non-assistant turn. A template without tool-call syntax renders the turn's text form (`content`,
`<tool_call>{...}</tool_call>` blocks). Consecutive non-assistant turns that a template renders as one
block (parallel tool results in one user turn) share that block: the prefix property is required only
where an assistant turn starts or ends.

The last supervised token is checked to be that special token's id. Assistant turns that are not steps
(AgentTraj-L's "OK. I'll follow your instructions" turn, `trainable=False`) get a span too but are never
supervised. Labels are not shifted: Hugging Face causal LMs shift them internally.
"""

from __future__ import annotations

import hashlib
import logging
import os
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from atlas_exp.data.selection import Selection
from atlas_exp.data.trajectory import Trajectory
from atlas_exp.errors import ConfigError, DataError, TemplateError

log = logging.getLogger(__name__)

#: label value ignored by the cross-entropy loss of Hugging Face models
IGNORE_INDEX = -100

# Sentinels for the probe conversation; unlikely to be merged with template text by any tokenizer
# because we only look at characters here.
_PROBE_USER = "ATLAS-PROBE-USER-8d1c"
_PROBE_ASSISTANT = "ATLAS-PROBE-ASSISTANT-5e2b"
_PROBE_FN = "atlas_probe_fn_3f9a"
_PROBE_TOOL_RESULT = "ATLAS-PROBE-TOOL-RESULT-77c1"
_PROBE_TOOL_DEF = "atlas_probe_tooldef_c04e"

OnEmpty = Literal["error", "skip"]


@dataclass(frozen=True)
class TemplateInfo:
    """What one chat template writes around an assistant turn (see the module docstring)."""

    #: tokenizer name and template hash, for error messages
    name: str
    #: text of an assistant message's render before its content (role header), as seen on the probe
    turn_header: str
    #: text after an assistant content up to the end of that message's render
    turn_suffix: str
    #: the supervised leading part of `turn_suffix`, ending with `eot_token`
    eot_text: str
    #: the special token that closes an assistant turn
    eot_token: str
    eot_token_id: int
    #: strings the tokenizer encodes as special tokens; none may occur inside a message content
    specials: frozenset[str] = frozenset()
    #: renders one conversation like `apply_chat_template(tokenize=False)` minus its per-call overhead, or
    #: None when that shortcut is unavailable or disagreed with apply_chat_template on the probe
    fast_render: Callable[..., str] | None = field(default=None, compare=False, repr=False)
    #: the template writes `tool_calls` with its own syntax / renders role `tool` / writes `tools` definitions
    tool_calls: bool = False
    tool_role: bool = False
    tools: bool = False


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
# template analysis (cached per tokenizer)

# tokenizer -> ((template, vocab size), TemplateInfo). Weak keys: a cache must not keep tokenizers alive.
_INFO_CACHE: "weakref.WeakKeyDictionary[Any, tuple[tuple[str, int], TemplateInfo]]" = weakref.WeakKeyDictionary()


def _chat_template(tokenizer: Any) -> str:
    try:
        template = tokenizer.get_chat_template()
    except (ValueError, AttributeError) as e:
        raise TemplateError(f"{_tok_name(tokenizer)}: no usable chat template ({e})") from None
    if not isinstance(template, str) or not template:
        raise TemplateError(f"{_tok_name(tokenizer)}: no chat template")
    return template


def _tok_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def template_name(tokenizer: Any) -> str:
    """`model-path (chat template <sha1>)`: names the template in errors, since a config may override it."""
    digest = hashlib.sha1(_chat_template(tokenizer).encode()).hexdigest()[:10]
    return f"{_tok_name(tokenizer)} (chat template sha1:{digest})"


def special_token_strings(tokenizer: Any) -> set[str]:
    """Every string the tokenizer encodes as one special token: the named special tokens (bos, eos, pad,
    ...) and the added tokens flagged special (Llama-3's `<|eot_id|>` is only the latter)."""
    out = {t for t in getattr(tokenizer, "all_special_tokens", []) if t}
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False) and tok.content:
            out.add(tok.content)
    return out


def _first_special(text: str, specials: Iterable[str]) -> tuple[int, str] | None:
    """Earliest special token occurring in `text` (the longest one when several start there)."""
    best: tuple[int, str] | None = None
    for s in specials:
        j = text.find(s)
        if j < 0:
            continue
        if best is None or j < best[0] or (j == best[0] and len(s) > len(best[1])):
            best = (j, s)
    return best


def _render(tokenizer: Any, conversations: list[list[dict[str, Any]]], tools: list[dict] | None = None) -> list[str]:
    out = tokenizer.apply_chat_template(conversations, tools=tools, tokenize=False, add_generation_prompt=False)
    if isinstance(out, str):  # defensive: a single conversation
        out = [out]
    return list(out)


def _make_fast_render(tokenizer: Any, template: str) -> Callable[[list[dict[str, str]]], str] | None:
    """Render with transformers' compiled (sandboxed, cached) Jinja template directly.

    Why: `apply_chat_template` re-normalizes and deep-copies every message of every conversation; on the k
    prefixes of a k-message trajectory that is O(k^2) Python work and dominated masking time (about 2.5x
    slower on SciWorld). The template and its variables are the same ones apply_chat_template passes, and
    every trajectory's full render is still compared with apply_chat_template's, falling back to it on
    any difference, so this changes speed, never output. Uses a private transformers helper, hence the
    guard.
    """
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        compiled = _compile_jinja_template(template)
    except Exception:  # private API moved: use the public path
        return None
    variables = dict(tokenizer.special_tokens_map)

    def render(conversation: list[dict[str, Any]], tools: list[dict] | None = None) -> str:
        return compiled.render(
            messages=conversation, tools=tools, documents=None, add_generation_prompt=False, **variables
        )

    return render


def get_template_info(tokenizer: Any) -> TemplateInfo:
    """Analyse the tokenizer's chat template once (cached per tokenizer, template and vocabulary).

    Renders the probe `[user P, assistant Q]`, takes the text after Q as the turn suffix, and its part up
    to the first special token as the end-of-turn text. Also checks that tokenizing the rendered text the
    way this module does gives exactly `apply_chat_template(tokenize=True)`.
    """
    template = _chat_template(tokenizer)
    key = (template, len(tokenizer))
    try:
        hit = _INFO_CACHE.get(tokenizer)
    except TypeError:  # an unhashable tokenizer: no cache
        hit = None
    if hit is not None and hit[0] == key:
        return hit[1]
    info = _analyze_template(tokenizer, template)
    try:
        _INFO_CACHE[tokenizer] = (key, info)
    except TypeError:
        pass
    log.debug("chat template %s: turn suffix %r, end of turn %r", info.name, info.turn_suffix, info.eot_text)
    return info


def _analyze_template(tokenizer: Any, template: str) -> TemplateInfo:
    name = template_name(tokenizer)
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError(f"{name}: exact token spans need a fast tokenizer (offset mapping); got {type(tokenizer).__name__}")
    probe = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ASSISTANT}]
    try:
        (text,) = _render(tokenizer, [probe])
    except Exception as e:  # Jinja errors of any kind: name the template
        raise TemplateError(f"{name}: rendering a [user, assistant] conversation failed: {e!r}") from e
    if text.count(_PROBE_ASSISTANT) != 1:
        raise TemplateError(f"{name}: the template does not render assistant content verbatim exactly once: {text!r}")
    try:
        (user_only,) = _render(tokenizer, [probe[:1]])
    except Exception as e:
        raise TemplateError(f"{name}: rendering a [user] conversation failed: {e!r}") from e
    at = text.index(_PROBE_ASSISTANT)
    if not text.startswith(user_only) or len(user_only) > at:
        raise _prefix_error(name, "the probe conversation [user, assistant]", probe, 1, 0, user_only, text)
    header = text[len(user_only) : at]
    suffix = text[at + len(_PROBE_ASSISTANT) :]
    specials = frozenset(special_token_strings(tokenizer))
    first = _first_special(suffix, specials)
    if first is None:
        raise TemplateError(
            f"{name}: the template writes no special token after an assistant turn (turn suffix {suffix!r}); "
            f"a model trained on it could never learn to end its turn. Set model.chat_template."
        )
    pos, eot_token = first
    eot_id = tokenizer.convert_tokens_to_ids(eot_token)
    if not isinstance(eot_id, int):
        raise TemplateError(f"{name}: end-of-turn token {eot_token!r} has no single id")
    ours = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    theirs = tokenizer.apply_chat_template(probe, tokenize=True, return_dict=False)
    if ours != list(theirs):
        raise TemplateError(f"{name}: tokenizing the rendered text does not reproduce apply_chat_template(tokenize=True)")
    fast = _make_fast_render(tokenizer, template)
    if fast is not None:
        try:
            if fast(probe) != text:
                fast = None
        except Exception:
            fast = None
    tool_calls, tool_role, tools = _probe_tool_support(tokenizer)
    return TemplateInfo(
        name=name,
        turn_header=header,
        turn_suffix=suffix,
        eot_text=suffix[: pos + len(eot_token)],
        eot_token=eot_token,
        eot_token_id=eot_id,
        specials=specials,
        fast_render=fast,
        tool_calls=tool_calls,
        tool_role=tool_role,
        tools=tools,
    )


def _probe_tool_support(tokenizer: Any) -> tuple[bool, bool, bool]:
    """Whether the template writes tool calls, tool turns and tool definitions (each: the probe's marker
    appears in the render; a template that raises on them does not support them)."""

    def renders(conv: list[dict[str, Any]], marker: str, tools: list[dict] | None = None) -> bool:
        try:
            return marker in _render(tokenizer, [conv], tools=tools)[0]
        except Exception:
            return False

    user = {"role": "user", "content": _PROBE_USER}
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call12345", "type": "function", "function": {"name": _PROBE_FN, "arguments": {"x": 1}}}]}
    result = {"role": "tool", "content": _PROBE_TOOL_RESULT, "tool_call_id": "call12345", "name": _PROBE_FN}
    tool_calls = renders([user, call], _PROBE_FN)
    before = [user, call] if tool_calls else [user, {"role": "assistant", "content": _PROBE_ASSISTANT}]
    tool_role = renders(before + [result], _PROBE_TOOL_RESULT)
    tool_def = {"type": "function", "function": {"name": _PROBE_TOOL_DEF, "description": "probe",
                                                 "parameters": {"type": "object", "properties": {}}}}
    tools = renders([user], _PROBE_TOOL_DEF, tools=[tool_def])
    return tool_calls, tool_role, tools


def chat_messages(traj: Trajectory, info: TemplateInfo) -> tuple[list[dict[str, Any]], list[dict] | None]:
    """The messages (and `tools`) to hand the chat template for `traj`, as the module docstring says: tool
    calls, tool turns and tool definitions in the template's own syntax where it has one, else as text."""
    msgs: list[dict[str, Any]] = []
    for m in traj.messages:
        if m.tool_calls and info.tool_calls:
            msgs.append({"role": "assistant", "content": m.raw_content or "",
                         "tool_calls": [dict(c) for c in m.tool_calls]})
        elif m.role == "tool":
            if info.tool_role:
                d: dict[str, Any] = {"role": "tool", "content": m.content}
                if m.tool_call_id is not None:
                    d["tool_call_id"] = m.tool_call_id
                if m.name is not None:
                    d["name"] = m.name
                msgs.append(d)
            else:
                msgs.append({"role": "user", "content": m.content})
        else:
            msgs.append({"role": m.role, "content": m.content})
    tools = traj.tools or None
    if tools and not info.tools:
        import json

        i = next((i for i, m in enumerate(msgs) if m["role"] != "assistant"), None)
        if i is not None:
            listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
            msgs[i] = {**msgs[i], "content": f"Available tools:\n{listing}\n\n{msgs[i]['content']}"}
        tools = None
    return msgs, tools


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
            if renders[-1] == _render(tokenizer, [msgs], tools)[0]:
                return renders
        except Exception:
            pass  # the public path below names the failing message
    try:
        return _render(tokenizer, convs, tools)
    except Exception:
        pass
    # find which prefix fails, to name it
    for i, conv in enumerate(convs):
        try:
            _render(tokenizer, [conv], tools)
        except Exception as e:
            raise TemplateError(
                f"{info.name}: rendering messages[:{i + 1}] of trajectory {traj_id!r} failed at message {i} "
                f"({msgs[i]['role']}): {e!r}"
            ) from e
    raise TemplateError(f"{info.name}: rendering the prefixes of trajectory {traj_id!r} failed")


def _prefix_error(name: str, where: str, msgs: list[dict[str, str]], i: int, k: int, before: str, after: str) -> TemplateError:
    """Adding message i to `where` changed the already rendered text of message k."""
    j = len(os.path.commonprefix([before, after]))
    return TemplateError(
        f"{name}: the chat template does not render a conversation as the concatenation of its turns (prefix "
        f"property): in {where}, adding message {i} ({msgs[i]['role']}) changes the rendering of message {k} "
        f"({msgs[k]['role']}) at character {j}: {before[j:j + 40]!r} becomes {after[j:j + 40]!r}. Per-turn token "
        f"spans are undefined; use a template whose earlier turns do not depend on later ones (model.chat_template)."
    )


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
            raise _prefix_error(info.name, f"trajectory {traj.id!r}", msgs, i, k, prev, r)
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
    )


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
