"""The canonical trajectory: what every importer produces and every later stage reads.

A trajectory alternates observations (user/system/tool turns) and steps (assistant turns). Only trainable
assistant turns are *steps*: they carry a 0-based `step` index in order. Assistant turns that the source
marks as not trainable (AgentTraj-L's `"loss": false` "OK. I'll follow..." turn) stay in the input but
have no index and are never supervised.

Tool calling (OpenAI's layout): an assistant turn may carry `tool_calls`, each
`{"id"?, "type": "function", "function": {"name", "arguments": {...}}}` (arguments decoded from JSON);
`tool` turns are observations (the calls' results, `tool_call_id`/`name` optional); a trajectory may carry
the `tools` it was given (`[{"type": "function", "function": {"name", "description"?, "parameters"?}}]`).
The chat template renders them with its own tool syntax (`train/chat_template.py`). In memory, the `content` of
a turn with tool calls is its own text (`raw_content`, may be empty) followed by the calls in a text form
(`tool_calls_text`), so that everything that only reads `content` (selectors, reports) sees the action.

On disk (`trajectories.jsonl`) one trajectory is one JSON object per line:
    {"id", "env", "source", "messages": [{"role", "content", "step"?, "trainable"?, "weight"?,
     "tool_calls"?, "tool_call_id"?, "name"?}], "tools"?, "meta"?}
where a turn with `tool_calls` stores its own text as `content` (null when it has none), as OpenAI does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any

from atlas_exp.errors import DataError

ROLES = ("system", "user", "assistant", "tool")


def tool_calls_text(calls: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> str:
    """The text form of tool calls (what `content` shows, and what a template without tool-call syntax
    renders): one `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` block per call."""
    return "\n".join(
        "<tool_call>\n"
        + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False)
        + "\n</tool_call>"
        for c in calls
    )


def tool_call_content(text: str | None, calls: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> str:
    """`content` of a turn with tool calls: its own text (if any), a newline, then `tool_calls_text`."""
    return f"{text}\n{tool_calls_text(calls)}" if text and text.strip() else tool_calls_text(calls)


def normalize_tool_calls(calls: Any, *, source: str, field: str) -> tuple[dict[str, Any], ...]:
    """OpenAI `tool_calls` (or one legacy `function_call` object) as `({"id"?, "type": "function",
    "function": {"name", "arguments": dict}}, ...)`; JSON-string arguments are decoded. A DataError names
    the offending field."""
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise DataError(f"expected a non-empty list of tool calls, got {_type(calls)}", source=source, field=field)
    out = []
    for j, c in enumerate(calls):
        f = f"{field}[{j}]"
        if not isinstance(c, dict):
            raise DataError(f"expected a tool call object, got {_type(c)}", source=source, field=f)
        kind = c.get("type", "function")
        if kind != "function":
            raise DataError(f"tool call of type {kind!r}: only function calls are supported", source=source, field=f"{f}.type")
        fn = c.get("function", c)  # a legacy function_call / LLaMA-Factory call is the function itself
        ff = f"{f}.function" if "function" in c else f
        if not isinstance(fn, dict):
            raise DataError(f"expected an object, got {_type(fn)}", source=source, field=ff)
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"expected the function's name, got {name!r}", source=source, field=f"{ff}.name")
        args = fn.get("arguments", fn.get("parameters", {}))
        if args is None:
            args = {}
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise DataError(f"arguments are not valid JSON: {e.msg} (column {e.colno})", source=source,
                                field=f"{ff}.arguments") from None
        if not isinstance(args, dict):
            raise DataError(f"arguments must be a JSON object, got {_type(args)}", source=source, field=f"{ff}.arguments")
        call: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": args}}
        if c.get("id") is not None:
            call = {"id": str(c["id"]), **call}
        out.append(call)
    return tuple(out)


def normalize_tools(tools: Any, *, source: str, field: str = "tools") -> list[dict[str, Any]] | None:
    """Tool definitions as `[{"type": "function", "function": {...}}]` (a bare function definition, a
    legacy `functions` list or a JSON string of either is accepted); None for none."""
    if tools is None:
        return None
    if isinstance(tools, str):
        if not tools.strip():
            return None
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise DataError(f"not valid JSON: {e.msg} (column {e.colno})", source=source, field=field) from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise DataError(f"expected a list of tool definitions, got {_type(tools)}", source=source, field=field)
    out = []
    for j, t in enumerate(tools):
        if not isinstance(t, dict):
            raise DataError(f"expected a tool definition object, got {_type(t)}", source=source, field=f"{field}[{j}]")
        fn = t.get("function", t) if t.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise DataError("expected a function definition with a name", source=source, field=f"{field}[{j}]")
        out.append({"type": "function", "function": fn})
    return out or None


def _type(v: Any) -> str:
    return "null" if v is None else type(v).__name__


@dataclass(frozen=True)
class Message:
    """One turn. `step` is set exactly for trainable assistant turns."""

    role: str
    content: str
    step: int | None = None
    trainable: bool = True
    weight: float | None = None
    #: assistant turns: the tool calls it makes (see the module docstring); `content` then shows them as text
    tool_calls: tuple[dict[str, Any], ...] | None = None
    #: with `tool_calls`: the turn's own text besides the calls (None when it had none)
    raw_content: str | None = None
    #: tool turns: which call this answers and the tool's name, when the source says
    tool_call_id: str | None = None
    name: str | None = None

    @property
    def is_step(self) -> bool:
        return self.step is not None

    @classmethod
    def with_tool_calls(cls, text: str | None, calls: tuple[dict[str, Any], ...], **kw: Any) -> "Message":
        """An assistant turn making `calls` (normalized, see `normalize_tool_calls`), with its own `text`."""
        return cls("assistant", tool_call_content(text, calls), tool_calls=tuple(calls),
                   raw_content=text if text and text.strip() else None, **kw)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            d["content"] = self.raw_content
            d["tool_calls"] = [dict(c) for c in self.tool_calls]
        if self.role == "tool":
            if self.tool_call_id is not None:
                d["tool_call_id"] = self.tool_call_id
            if self.name is not None:
                d["name"] = self.name
        if self.role == "assistant":
            if self.step is not None:
                d["step"] = self.step
            else:
                d["trainable"] = False
            if self.weight is not None:
                d["weight"] = self.weight
        return d


@dataclass
class Trajectory:
    """An expert episode: an id, the env/task it comes from, and its turns."""

    id: str
    env: str
    messages: list[Message]
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    #: tool definitions given to the agent (OpenAI `tools`), rendered into the prompt by the chat template
    tools: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        validate_messages(self.messages, source=self.source or self.id)

    @property
    def steps(self) -> list[Message]:
        return [m for m in self.messages if m.is_step]

    @property
    def n_steps(self) -> int:
        return sum(1 for m in self.messages if m.is_step)

    def step_message_index(self) -> list[int]:
        """Position in `messages` of each step, indexed by step number."""
        return [i for i, m in enumerate(self.messages) if m.is_step]

    def content_hash(self) -> str:
        """Hash of the turns only (not id/source): equal content means a duplicate episode."""
        h = hashlib.sha256()
        for m in self.messages:
            h.update(m.role.encode())
            h.update(b"\x00")
            h.update(m.content.encode())
            h.update(b"\x01")
        if self.tools:
            h.update(json.dumps(self.tools, sort_keys=True).encode())
        return h.hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "env": self.env,
            "source": self.source,
            "messages": [m.to_dict() for m in self.messages],
        }
        if self.tools:
            d["tools"] = self.tools
        if self.meta:
            d["meta"] = self.meta
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str | None = None) -> "Trajectory":
        """Read the canonical form (as written by `to_dict`); errors name `source` and the field."""
        where = source or str(d.get("id", "<record>"))
        if not isinstance(d, dict):
            raise DataError(f"expected a JSON object, got {type(d).__name__}", source=where)
        for key in ("id", "env", "messages"):
            if key not in d:
                raise DataError("missing field", source=where, field=key)
        if not isinstance(d["messages"], list):
            raise DataError("expected a list", source=where, field="messages")
        msgs = []
        for i, m in enumerate(d["messages"]):
            if not isinstance(m, dict):
                raise DataError("expected an object", source=where, field=f"messages[{i}]")
            for key in ("role", "content"):
                if key not in m:
                    raise DataError("missing field", source=where, field=f"messages[{i}].{key}")
            kw = dict(step=m.get("step"), trainable=m.get("trainable", m.get("step") is not None), weight=m.get("weight"))
            if m.get("tool_calls"):
                calls = normalize_tool_calls(m["tool_calls"], source=where, field=f"messages[{i}].tool_calls")
                msgs.append(Message.with_tool_calls(m["content"], calls, **kw))
            else:
                msgs.append(Message(role=m["role"], content=m["content"], tool_call_id=m.get("tool_call_id"),
                                    name=m.get("name"), **kw))
        return cls(
            id=str(d["id"]),
            env=str(d["env"]),
            messages=msgs,
            source=str(d.get("source", "")),
            meta=dict(d.get("meta") or {}),
            tools=normalize_tools(d.get("tools"), source=where),
        )


def validate_messages(messages: list[Message], *, source: str) -> None:
    """Check the invariants every stage relies on; raise a DataError naming the offending field.

    - roles are system/user/assistant/tool, contents are non-empty strings (a tool's result may be empty);
    - only assistant turns make tool calls;
    - steps are exactly the trainable assistant turns, numbered 0..n-1 in order;
    - there is at least one step, and no two assistant turns follow each other (the environment must
      answer every action);
    - weights, when given, are finite non-negative numbers.
    """
    if not messages:
        raise DataError("no messages", source=source, field="messages")
    expected_step = 0
    prev_role = None
    for i, m in enumerate(messages):
        f = f"messages[{i}]"
        if m.role not in ROLES:
            raise DataError(f"unknown role {m.role!r} (expected one of {ROLES})", source=source, field=f"{f}.role")
        if not isinstance(m.content, str):
            raise DataError(f"content must be a string, got {type(m.content).__name__}", source=source, field=f"{f}.content")
        if not m.content.strip() and m.role != "tool":
            raise DataError("empty content", source=source, field=f"{f}.content")
        if m.tool_calls and m.role != "assistant":
            raise DataError(f"only assistant turns make tool calls (role {m.role!r})", source=source, field=f"{f}.tool_calls")
        if m.role == "assistant":
            if prev_role == "assistant":
                raise DataError("two assistant turns in a row", source=source, field=f)
            if m.trainable:
                if m.step != expected_step:
                    raise DataError(f"step index {m.step!r}, expected {expected_step}", source=source, field=f"{f}.step")
                expected_step += 1
            elif m.step is not None:
                raise DataError("a non-trainable turn cannot have a step index", source=source, field=f"{f}.step")
            if m.weight is not None:
                w = m.weight
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not (w >= 0) or w == float("inf"):
                    raise DataError(f"weight must be a finite number >= 0, got {w!r}", source=source, field=f"{f}.weight")
        elif m.step is not None:
            raise DataError(f"only assistant turns can be steps (role {m.role!r})", source=source, field=f"{f}.step")
        prev_role = m.role
    if expected_step == 0:
        raise DataError("no trainable assistant turn (a trajectory needs at least one step)", source=source, field="messages")


def number_steps(
    turns: "list[tuple[str, str, bool, float | None] | Message]", *, source: str
) -> list[Message]:
    """Build messages from (role, content, trainable, weight) tuples (or Messages whose `step` is to be
    set), numbering the trainable assistant turns."""
    out = []
    k = 0
    for t in turns:
        m = t if isinstance(t, Message) else Message(t[0], t[1], trainable=t[2], weight=t[3])
        if m.role == "assistant" and m.trainable:
            out.append(replace(m, step=k, trainable=True))
            k += 1
        elif m.role == "assistant":
            out.append(replace(m, step=None, trainable=False))
        else:
            out.append(replace(m, step=None, trainable=True, weight=None))
    validate_messages(out, source=source)
    return out
