"""Lists of messages -> Trajectory: AgentGym's ShareGPT `conversations`, OpenAI's `messages` (tool calls
included), and any other list of turns under the field map (`ChatFields`: which keys hold the turns, each
turn's role, text, loss and weight, and the role names of the file).

One turn reads the same way in every list format; only the defaults of the field map differ."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

from atlas_exp.data.importers.options import ChatFields
from atlas_exp.data.importers.records import build_trajectory, expect_list, expect_object, turn_content, type_name
from atlas_exp.data.trajectory import Message, Trajectory, normalize_tool_calls, normalize_tools
from atlas_exp.errors import DataError


def from_agentgym(record: Any, *, where: str, fields: ChatFields | None = None, **defaults: Any) -> Trajectory:
    """AgentGym ShareGPT: `conversations` of `{from, value, loss}`; `loss: false` = not trainable."""
    fields = _keys_or(fields, messages_key="conversations", role_key="from", content_key="value")
    return _from_chat(record, where=where, fields=fields, **defaults)


def from_openai(record: Any, *, where: str, fields: ChatFields | None = None, **defaults: Any) -> Trajectory:
    """OpenAI chat: `messages` of `{role, content, weight?, tool_calls?}`; `weight: 0` = not trainable."""
    fields = _keys_or(fields, messages_key="messages", role_key="role", content_key="content")
    return _from_chat(record, where=where, fields=fields, **defaults)


def _keys_or(fields: ChatFields | None, *, messages_key: str, role_key: str, content_key: str) -> ChatFields:
    """The field map with a format's own keys wherever the options name none."""
    given = fields or ChatFields()
    return replace(given, messages_key=given.messages_key or messages_key, role_key=given.role_key or role_key,
                   content_key=given.content_key or content_key)


def from_generic(record: Any, *, where: str, fields: ChatFields | None = None,
                 messages_key: str | None = None, **defaults: Any) -> Trajectory:
    """A bare list of messages, or an object holding one under `messages_key` (default: `conversations` or
    `messages`); each turn's keys as `fields` says, or detected per turn."""
    return _from_chat(record, where=where, fields=fields or ChatFields(messages_key=messages_key), **defaults)


def _from_chat(record: Any, *, where: str, fields: ChatFields, default_id: str | None = None,
               default_env: str | None = None, fallback_env: str | None = None) -> Trajectory:
    """`defaults` of the converters above: the record's id, env and file-name env when it names none."""
    if isinstance(record, list):
        raw_turns, list_field, top_level = record, "", {}
    else:
        expect_object(record, where)
        key = fields.messages_key
        if key is None:
            key = next((k for k in ("conversations", "messages") if record.get(k) is not None), "messages")
        raw_turns, list_field, top_level = expect_list(record, key, where), key, record
    sharegpt = list_field == "conversations"
    turns = [_chat_turn(raw, fields, where, f"{list_field}[{i}]", sharegpt) for i, raw in enumerate(raw_turns)]
    tools = None
    for key in ("tools", "functions"):
        if top_level.get(key) is not None:
            tools = normalize_tools(top_level[key], source=where, field=key)
            break
    consumed = {list_field} if list_field else set()
    return build_trajectory(turns, top_level, where=where, list_field=list_field, default_id=default_id,
                            default_env=default_env, fallback_env=fallback_env, consumed=consumed, tools=tools)


def _turn_keys(turn: dict, fields: ChatFields, sharegpt: bool) -> tuple[str, str]:
    """(role key, content key) of one turn: the configured ones, else `role`/`content` or `from`/`value`,
    whichever the turn has (`sharegpt`: the family to assume when it has neither, e.g. under `conversations`)."""
    if "role" in turn or "content" in turn:
        sharegpt = False
    elif "from" in turn or "value" in turn:
        sharegpt = True
    role, content = ("from", "value") if sharegpt else ("role", "content")
    return fields.role_key or role, fields.content_key or content


def _chat_turn(turn: Any, fields: ChatFields, where: str, field_path: str, sharegpt: bool = False) -> Message:
    """One turn of a list of messages as a Message (step numbers are set later); `field_path` is where the
    turn is in the record (`conversations[3]`), for errors."""
    if not isinstance(turn, dict):
        raise DataError(f"expected an object, got {type_name(turn)}", source=where, field=field_path)
    role_key, content_key = _turn_keys(turn, fields, sharegpt)
    if turn.get(role_key) is None:
        hint = "" if fields.role_key else f"; the turn has keys {sorted(turn)[:8]}: set data.role_key to the key of each turn's role"
        raise DataError(f"missing role{hint}", source=where, field=f"{field_path}.{role_key}")
    name = turn[role_key]
    if not isinstance(name, str):
        raise DataError(f"expected a string, got {type_name(name)}", source=where, field=f"{field_path}.{role_key}")
    role = fields.roles.get(name) or fields.roles.get(name.lower())
    if role is None:
        raise DataError(f"unknown role {name!r} (known: {', '.join(sorted(fields.roles))}); map it with "
                        f"data.roles, e.g. data.roles={{user: [{name}]}}", source=where, field=f"{field_path}.{role_key}")
    calls = None
    text: str | None = None
    if role == "tool_call":  # the content is the call, as JSON
        raw = turn.get(content_key)
        try:
            parsed = json.loads(raw) if isinstance(raw, str) else raw
        except json.JSONDecodeError as e:
            raise DataError(f"a {name!r} turn must hold a JSON tool call: {e.msg} (column {e.colno})",
                            source=where, field=f"{field_path}.{content_key}") from None
        calls = normalize_tool_calls(parsed, source=where, field=f"{field_path}.{content_key}")
        role = "assistant"
    elif turn.get("tool_calls") or turn.get("function_call"):
        calls_key = "tool_calls" if turn.get("tool_calls") else "function_call"
        if role != "assistant":
            raise DataError(f"only assistant turns make tool calls (role {name!r})", source=where,
                            field=f"{field_path}.{calls_key}")
        calls = normalize_tool_calls(turn[calls_key], source=where, field=f"{field_path}.{calls_key}")
        if turn.get(content_key) is not None:  # the text besides the calls; OpenAI allows null
            text = turn_content(turn, content_key, where, field_path, allow_empty=True)
    trainable, weight = _turn_flags(turn, role, name, fields, where, field_path)
    if calls is not None:
        return Message.with_tool_calls(text, calls, trainable=trainable, weight=weight)
    content = turn_content(turn, content_key, where, field_path, allow_empty=role == "tool")
    if role == "tool":
        call_id = turn.get("tool_call_id")
        tool_name = turn.get("name") if isinstance(turn.get("name"), str) else None
        return Message("tool", content, tool_call_id=str(call_id) if call_id is not None else None, name=tool_name)
    return Message(role, content, trainable=trainable, weight=weight)


def _turn_flags(turn: dict, role: str, name: str, fields: ChatFields, where: str,
                field_path: str) -> tuple[bool, float | None]:
    """(trainable, weight) from the turn's loss (true/false/null), weight (>= 0) and trainable marks."""
    trainable = role == "assistant"
    for key in dict.fromkeys((fields.loss_key, "trainable")):
        flag = turn.get(key)
        if flag is None:
            continue
        if not isinstance(flag, bool):
            raise DataError(f"expected true, false or null, got {flag!r}", source=where, field=f"{field_path}.{key}")
        if flag and role != "assistant":
            raise DataError(f"{key}=true on a {name!r} turn: only assistant turns can be trained",
                            source=where, field=f"{field_path}.{key}")
        trainable = trainable and flag
    weight = None
    given = turn.get(fields.weight_key)
    if given is not None:
        weight_field = f"{field_path}.{fields.weight_key}"
        if isinstance(given, bool) or not isinstance(given, (int, float)) or not math.isfinite(given) or given < 0:
            raise DataError(f"weight must be a finite number >= 0, got {given!r}", source=where, field=weight_field)
        if role != "assistant":
            raise DataError(f"weight is only allowed on assistant turns (role {name!r})", source=where,
                            field=weight_field)
        if given == 0:
            trainable = False
        elif trainable:
            weight = float(given)
    return trainable, weight
