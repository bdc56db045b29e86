"""What a model's chat template writes around an assistant turn, measured once per tokenizer.

Exact per-turn token spans (`turn_spans.py`), hence the loss masks (`masking.py`) and the perplexity
selectors' step tokens, rest on a few texts of the template. They are measured on a probe conversation
`[user P, assistant Q]`, never guessed per model family:

* the *turn header* and *turn suffix* are the texts the template writes before and after an assistant
  content within that message's render: `<|im_start|>assistant\\n` and `<|im_end|>\\n` for ChatML,
  `<|start_header_id|>assistant<|end_header_id|>\\n\\n` and `<|eot_id|>` for Llama-3.
* the *end-of-turn text* is the turn suffix cut right after its FIRST special token (any of the
  tokenizer's special tokens or added tokens marked special): `<|im_end|>` for ChatML, `<|eot_id|>`
  for Llama-3, `" </s>"` for Llama-2-style `' ' + eos_token`. What follows it (ChatML's newline, the
  next header) is fixed by the template, not chosen by the model, and a model stops generating at the
  end-of-turn token anyway. A template whose suffix holds no special token is refused
  (`TemplateError`): a model trained on it could never learn to end its turn.

Tool calling is probed once per template too: whether it writes `tool_calls` with its own syntax (a
probed call's function name must appear in the render), renders role `tool`, and writes `tools`
definitions (`apply_chat_template(tools=...)`). `chat_messages` hands the template each of them in its own
syntax where it has one; otherwise `tool` turns are rendered as user turns, tool definitions as text at the
start of the first non-assistant turn, and a call as its text form (`content`, `<tool_call>{...}</tool_call>`
blocks).
"""

from __future__ import annotations

import hashlib
import logging
import os
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from atlas_exp.data.trajectory import Trajectory
from atlas_exp.errors import TemplateError

log = logging.getLogger(__name__)

# Sentinels for the probe conversation; unlikely to be merged with template text by any tokenizer
# because we only look at characters here.
_PROBE_USER = "ATLAS-PROBE-USER-8d1c"
_PROBE_ASSISTANT = "ATLAS-PROBE-ASSISTANT-5e2b"
_PROBE_FN = "atlas_probe_fn_3f9a"
_PROBE_TOOL_RESULT = "ATLAS-PROBE-TOOL-RESULT-77c1"
_PROBE_TOOL_DEF = "atlas_probe_tooldef_c04e"


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


class _CachedInfo(NamedTuple):
    #: (template, vocabulary size): a tokenizer whose template or vocabulary changed is analysed again
    key: tuple[str, int]
    info: TemplateInfo


class _SpecialAt(NamedTuple):
    """A special token found in a text, and where."""

    position: int
    token: str


class _ToolSupport(NamedTuple):
    """What a template writes of tool calling (the TemplateInfo fields of the same names)."""

    tool_calls: bool
    tool_role: bool
    tools: bool


# --------------------------------------------------------------------------------------------------
# template analysis (cached per tokenizer)

# tokenizer -> its analysis. Weak keys: a cache must not keep tokenizers alive.
_INFO_CACHE: "weakref.WeakKeyDictionary[Any, _CachedInfo]" = weakref.WeakKeyDictionary()


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


def _first_special(text: str, specials: Iterable[str]) -> _SpecialAt | None:
    """Earliest special token occurring in `text` (the longest one when several start there)."""
    best: _SpecialAt | None = None
    for special in specials:
        position = text.find(special)
        if position < 0:
            continue
        if (best is None or position < best.position
                or (position == best.position and len(special) > len(best.token))):
            best = _SpecialAt(position, special)
    return best


def common_prefix_length(before: str, after: str) -> int:
    """How many leading characters two texts share: where `after` stops extending `before`."""
    return len(os.path.commonprefix([before, after]))


def render_conversations(
    tokenizer: Any, conversations: list[list[dict[str, Any]]], tools: list[dict] | None = None
) -> list[str]:
    """`apply_chat_template(tokenize=False)` of several conversations, always a list of texts."""
    out = tokenizer.apply_chat_template(conversations, tools=tools, tokenize=False, add_generation_prompt=False)
    if isinstance(out, str):  # defensive: a single conversation
        out = [out]
    return list(out)


def fast_renders_checked(
    tokenizer: Any,
    fast_render: Callable[..., str] | None,
    conversations: Sequence[list[dict[str, Any]]],
    tools: list[dict] | None = None,
    *,
    expected_last: str | None = None,
) -> list[str] | None:
    """`fast_render` of each conversation, trusted only when its render of the last one is exactly
    apply_chat_template's (`expected_last`, when the caller has rendered it already): None when there is no
    fast path, when it raises, or when it disagrees. So the shortcut changes speed, never output."""
    if fast_render is None:
        return None
    try:
        renders = [fast_render(conversation, tools) for conversation in conversations]
        last = renders[-1]
        if expected_last is None:
            expected_last = render_conversations(tokenizer, [conversations[-1]], tools)[0]
    except Exception:
        return None
    return renders if last == expected_last else None


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
        cached = _INFO_CACHE.get(tokenizer)
    except TypeError:  # an unhashable tokenizer: no cache
        cached = None
    if cached is not None and cached.key == key:
        return cached.info
    info = _analyze_template(tokenizer, template)
    try:
        _INFO_CACHE[tokenizer] = _CachedInfo(key, info)
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
        (text,) = render_conversations(tokenizer, [probe])
    except Exception as e:  # Jinja errors of any kind: name the template
        raise TemplateError(f"{name}: rendering a [user, assistant] conversation failed: {e!r}") from e
    if text.count(_PROBE_ASSISTANT) != 1:
        raise TemplateError(f"{name}: the template does not render assistant content verbatim exactly once: {text!r}")
    try:
        (user_only,) = render_conversations(tokenizer, [probe[:1]])
    except Exception as e:
        raise TemplateError(f"{name}: rendering a [user] conversation failed: {e!r}") from e
    at = text.index(_PROBE_ASSISTANT)
    if not text.startswith(user_only) or len(user_only) > at:
        raise prefix_error(name, "the probe conversation [user, assistant]", probe, 1, 0, user_only, text)
    header = text[len(user_only) : at]
    suffix = text[at + len(_PROBE_ASSISTANT) :]
    specials = frozenset(special_token_strings(tokenizer))
    eot = _first_special(suffix, specials)
    if eot is None:
        raise TemplateError(
            f"{name}: the template writes no special token after an assistant turn (turn suffix {suffix!r}); "
            f"a model trained on it could never learn to end its turn. Set model.chat_template."
        )
    eot_token = eot.token
    eot_id = tokenizer.convert_tokens_to_ids(eot_token)
    if not isinstance(eot_id, int):
        raise TemplateError(f"{name}: end-of-turn token {eot_token!r} has no single id")
    ours = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    theirs = tokenizer.apply_chat_template(probe, tokenize=True, return_dict=False)
    if ours != list(theirs):
        raise TemplateError(f"{name}: tokenizing the rendered text does not reproduce apply_chat_template(tokenize=True)")
    fast = _make_fast_render(tokenizer, template)
    if fast_renders_checked(tokenizer, fast, [probe], expected_last=text) is None:
        fast = None
    return TemplateInfo(
        name=name,
        turn_header=header,
        turn_suffix=suffix,
        eot_text=suffix[: eot.position + len(eot_token)],
        eot_token=eot_token,
        eot_token_id=eot_id,
        specials=specials,
        fast_render=fast,
        **_probe_tool_support(tokenizer)._asdict(),
    )


def _probe_tool_support(tokenizer: Any) -> _ToolSupport:
    """Whether the template writes tool calls, tool turns and tool definitions (each: the probe's marker
    appears in the render; a template that raises on them does not support them)."""

    def renders(conversation: list[dict[str, Any]], marker: str, tools: list[dict] | None = None) -> bool:
        try:
            return marker in render_conversations(tokenizer, [conversation], tools=tools)[0]
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
    return _ToolSupport(tool_calls=tool_calls, tool_role=tool_role, tools=tools)


def chat_messages(traj: Trajectory, info: TemplateInfo) -> tuple[list[dict[str, Any]], list[dict] | None]:
    """The messages (and `tools`) to hand the chat template for `traj`, as the module docstring says: tool
    calls, tool turns and tool definitions in the template's own syntax where it has one, else as text."""
    msgs: list[dict[str, Any]] = []
    for m in traj.messages:
        if m.tool_calls and info.tool_calls:
            msgs.append({"role": "assistant", "content": m.raw_content or "",
                         "tool_calls": [dict(call) for call in m.tool_calls]})
        elif m.role == "tool":
            if info.tool_role:
                tool_turn: dict[str, Any] = {"role": "tool", "content": m.content}
                if m.tool_call_id is not None:
                    tool_turn["tool_call_id"] = m.tool_call_id
                if m.name is not None:
                    tool_turn["name"] = m.name
                msgs.append(tool_turn)
            else:
                msgs.append({"role": "user", "content": m.content})
        else:
            msgs.append({"role": m.role, "content": m.content})
    tools = traj.tools or None
    if tools and not info.tools:
        import json

        first_turn = next((i for i, m in enumerate(msgs) if m["role"] != "assistant"), None)
        if first_turn is not None:
            listing = "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools)
            msgs[first_turn] = {**msgs[first_turn],
                                "content": f"Available tools:\n{listing}\n\n{msgs[first_turn]['content']}"}
        tools = None
    return msgs, tools


#: characters of each rendering quoted from where two renderings diverge
_QUOTED_CHARS = 40


def prefix_error(name: str, where: str, msgs: list[dict[str, str]], i: int, k: int, before: str, after: str) -> TemplateError:
    """Adding message i to `where` changed the already rendered text of message k."""
    j = common_prefix_length(before, after)
    return TemplateError(
        f"{name}: the chat template does not render a conversation as the concatenation of its turns (prefix "
        f"property): in {where}, adding message {i} ({msgs[i]['role']}) changes the rendering of message {k} "
        f"({msgs[k]['role']}) at character {j}: {before[j:j + _QUOTED_CHARS]!r} becomes "
        f"{after[j:j + _QUOTED_CHARS]!r}. Per-turn token spans are undefined; use a template whose earlier turns "
        f"do not depend on later ones (model.chat_template)."
    )
