"""Record -> Trajectory converters for the public formats expert trajectories come in.

Every converter raises a `DataError` naming where the record came from and its own field. Each format,
the field map and how the env is resolved: docs/data_formats.md#record-formats."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from atlas_exp.data.trajectory import Message, Trajectory, normalize_tool_calls, normalize_tools, number_steps
from atlas_exp.errors import ConfigError, DataError

FORMATS = ("auto", "agentgym", "sharegpt", "openai", "generic", "transcript", "pairs")
#: canonical roles a role map may name; `tool_call` is an assistant turn whose content is a JSON call
#: (LLaMA-Factory's `function_call` turns)
MAPPED_ROLES = ("system", "user", "assistant", "tool", "tool_call")

#: role names found in public data -> canonical role (ShareGPT's human/gpt, OpenAI's roles and legacy
#: function role, LLaMA-Factory's observation/function_call); names are also tried lower-cased
DEFAULT_ROLES: dict[str, str] = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant",
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
    "function_call": "tool_call",
}

# `<env>_<n>`, with LMRL-Gym's suite prefix dropped: lmrlgym_maze_13 -> maze, sciworld_10 -> sciworld
_ID_ENV = re.compile(r"^(?:lmrlgym_)?([A-Za-z][A-Za-z0-9]*(?:_[A-Za-z][A-Za-z0-9]*)*)_\d+$")
# file names that say which split or shard a file is, not which env it holds
_GENERIC_STEMS = {"train", "test", "val", "valid", "validation", "dev", "data", "part", "shard", "default", "all"}
# top-level fields a converter consumes; everything else goes to `meta`. A canonical record's `source`
# (where it was read before) is replaced by where it is read now.
_CONSUMED = {"item_id", "id", "env", "conversations", "messages", "source", "tools", "functions"}
# pairs: the fields `auto` looks for, in order
_PAIR_INPUTS = ("instruction", "prompt", "input", "question", "query")
_PAIR_OUTPUTS = ("output", "completion", "response", "answer")
# transcript: the text fields `auto` looks for, in order
_TRANSCRIPT_TEXTS = ("transcript", "trajectory", "text")


def check_format(fmt: str, *, option: str = "format") -> str:
    """Normalise a `format=` option, or raise a ConfigError naming it."""
    if fmt not in FORMATS:
        raise ConfigError(f"{option}={fmt!r} is not a known record format; choose one of {', '.join(FORMATS)}")
    return "agentgym" if fmt == "sharegpt" else fmt


# --- options -------------------------------------------------------------------------------------------


def _opt_str(option: str, v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{option}={v!r}: expected a field name or null")
    return v


def _plain(v: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)) or (hasattr(v, "__iter__") and not isinstance(v, (str, bytes))):
        return [_plain(x) for x in v]
    return v


@dataclass(frozen=True)
class ChatFields:
    """Where a list-of-messages record keeps its turns and each turn's parts (None: the format's default)."""

    messages_key: str | None = None
    role_key: str | None = None
    content_key: str | None = None
    loss_key: str = "loss"
    weight_key: str = "weight"
    #: file role name -> canonical role (DEFAULT_ROLES with the `roles` option applied)
    roles: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_ROLES))

    @classmethod
    def build(cls, messages_key: str | None = None, role_key: str | None = None, content_key: str | None = None,
              loss_key: str | None = None, weight_key: str | None = None, roles: Any = None) -> "ChatFields":
        """From the source options; `roles` is {canonical role: name or [names]} (axolotl's `roles` layout)."""
        role_map = dict(DEFAULT_ROLES)
        for canon, names in (_plain(roles) or {}).items():
            if canon not in MAPPED_ROLES:
                raise ConfigError(f"roles: {canon!r} is not a role; map file role names to one of {', '.join(MAPPED_ROLES)} "
                                  f"(e.g. roles={{user: [human], assistant: [gpt]}})")
            for name in [names] if isinstance(names, str) else list(names or []):
                if not isinstance(name, str) or not name:
                    raise ConfigError(f"roles.{canon}: expected role names, got {name!r}")
                role_map[name] = canon
        return cls(
            messages_key=_opt_str("messages_key", messages_key),
            role_key=_opt_str("role_key", role_key),
            content_key=_opt_str("content_key", content_key),
            loss_key=_opt_str("loss_key", loss_key) or "loss",
            weight_key=_opt_str("weight_key", weight_key) or "weight",
            roles=role_map,
        )


@dataclass(frozen=True)
class TranscriptOptions:
    """How to cut a text transcript into turns (`format=transcript`).

    Marker mode (default): a line starting with one of `agent_markers` (`Thought`, `Action`), optionally
    numbered (`Thought 3:`), starts agent text; one starting with an `observation_markers` entry
    (`Observation 3:`) starts an observation. Consecutive agent parts make one assistant turn, kept
    verbatim (markers included: the model learns the format it will write). Line mode (`action_prefix`,
    e.g. `"> "`): lines starting with the prefix are the agent's actions (the prefix dropped unless
    `strip_prefix=false`), every other line is an observation. The text before the first agent turn is
    the task (the first user turn), after the `prompt_key` field's text when given.

    `start_marker`: the trajectory starts at the LAST occurrence of this text; what comes before is a
    few-shot prefix, dropped (or, with `keep_prefix`, kept at the start of the first user turn).
    `text_key`: the field holding the transcript (default: the first of transcript/trajectory/text).
    """

    text_key: str | None = None
    prompt_key: str | None = None
    agent_markers: tuple[str, ...] = ("Thought", "Action")
    observation_markers: tuple[str, ...] = ("Observation",)
    action_prefix: str | None = None
    strip_prefix: bool = True
    start_marker: str | None = None
    keep_prefix: bool = False

    @classmethod
    def build(cls, options: Any = None) -> "TranscriptOptions":
        d = _plain(options) or {}
        if not isinstance(d, dict):
            raise ConfigError(f"transcript: expected a mapping of options, got {d!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"transcript: unknown option(s) {unknown}; known: {sorted(known)}")
        d = {k: v for k, v in d.items() if v is not None}
        for key in ("agent_markers", "observation_markers"):
            if key in d:
                v = d[key]
                d[key] = (v,) if isinstance(v, str) else tuple(v)
                if not d[key] or not all(isinstance(m, str) and m.strip() for m in d[key]):
                    raise ConfigError(f"transcript.{key}={v!r}: expected a non-empty list of marker words")
        for key in ("text_key", "prompt_key", "action_prefix", "start_marker"):
            if key in d and (not isinstance(d[key], str) or not d[key]):
                raise ConfigError(f"transcript.{key}={d[key]!r}: expected a non-empty string or null")
        opts = cls(**d)
        overlap = set(opts.agent_markers) & set(opts.observation_markers)
        if overlap:
            raise ConfigError(f"transcript: {sorted(overlap)} is both an agent and an observation marker")
        return opts


@dataclass(frozen=True)
class PairOptions:
    """Single-step records (`format=pairs`): the user turn is `input_key` (several fields are joined with a
    blank line), the step is `output_key`, an optional system turn `system_key`. Unset: the input is
    `instruction` (+ `input`, Alpaca), else the first of prompt/input/question/query; the output the
    first of output/completion/response/answer; the system `system` when present."""

    input_key: tuple[str, ...] | None = None
    output_key: str | None = None
    system_key: str | None = None

    @classmethod
    def build(cls, options: Any = None) -> "PairOptions":
        d = _plain(options) or {}
        if not isinstance(d, dict):
            raise ConfigError(f"pairs: expected a mapping of options, got {d!r}")
        unknown = sorted(set(d) - {"input_key", "output_key", "system_key"})
        if unknown:
            raise ConfigError(f"pairs: unknown option(s) {unknown}; known: input_key, output_key, system_key")
        inp = d.get("input_key")
        if inp is not None:
            inp = (inp,) if isinstance(inp, str) else tuple(inp)
            if not inp or not all(isinstance(k, str) and k for k in inp):
                raise ConfigError(f"pairs.input_key={d.get('input_key')!r}: expected a field name or a list of them")
        return cls(input_key=inp, output_key=_opt_str("pairs.output_key", d.get("output_key")),
                   system_key=_opt_str("pairs.system_key", d.get("system_key")))


@dataclass(frozen=True)
class ImportOptions:
    """Everything a converter needs besides the record: the format and its field options."""

    format: str = "auto"
    chat: ChatFields = field(default_factory=ChatFields)
    transcript: TranscriptOptions = field(default_factory=TranscriptOptions)
    pairs: PairOptions = field(default_factory=PairOptions)

    def fingerprint_parts(self) -> dict[str, Any]:
        return {"format": self.format, "chat": {**self.chat.__dict__, "roles": dict(self.chat.roles)},
                "transcript": self.transcript.__dict__, "pairs": self.pairs.__dict__}


# --- env and id rules ----------------------------------------------------------------------------------


def env_from_id(item_id: str) -> str | None:
    """The env an AgentGym-style id names (`babyai_12` -> babyai, `lmrlgym_wordle_3` -> wordle), or None."""
    m = _ID_ENV.match(item_id)
    return m.group(1) if m else None


def env_from_filename(path: str | Path) -> str | None:
    """The env a file name suggests: its leading word (`webshop.jsonl`, `alfworld_train_expert_gt.jsonl`).

    Names that only say which split/shard a file is (`train-00000-of-00001.parquet`, `data.jsonl`) give
    None, so a wrong env is never invented from them.
    """
    stem = Path(path).name.split(".", 1)[0]
    word = re.split(r"[_\-.\s]", stem, maxsplit=1)[0].lower()
    if not word or not word[0].isalpha() or word in _GENERIC_STEMS:
        return None
    return word


def looks_like_pair(record: dict) -> bool:
    """An object with one of the input fields and one of the output fields `format=pairs` looks for."""
    return any(record.get(k) is not None for k in _PAIR_INPUTS) and any(record.get(k) is not None for k in _PAIR_OUTPUTS)


def detect_format(record: Any, *, where: str, messages_key: str | None = None) -> str:
    """Which converter a record needs (see the module docstring); a DataError when none fits.

    Typed tables (parquet, `datasets`) give every row every column, so a column only counts when it is
    not null in this row.
    """
    if isinstance(record, list):
        return "generic"
    if isinstance(record, dict):
        for key in (messages_key, "conversations", "messages"):
            if key and record.get(key) is not None:
                return "generic"
        if looks_like_pair(record):
            return "pairs"
        looked = f"`{messages_key}`, " if messages_key else ""
        raise DataError(
            f"cannot tell the record's format: expected {looked}`conversations` or `messages` (a list of turns), "
            f"or input/output fields; found fields {sorted(record)[:10]}. Set data.messages_key to the field "
            "holding the turns, or data.format=transcript|pairs",
            source=where,
        )
    raise DataError(f"expected a JSON object or a list of messages, got {_type(record)}", source=where)


def convert_record(
    record: Any,
    *,
    where: str,
    format: str = "auto",
    default_id: str | None = None,
    default_env: str | None = None,
    fallback_env: str | None = None,
    messages_key: str | None = None,
    options: ImportOptions | None = None,
) -> Trajectory:
    """Convert one record with the named (or detected) format; see the module docstring for the rules."""
    if options is None:
        options = ImportOptions(format=check_format(format), chat=ChatFields(messages_key=messages_key))
    fmt = options.format
    chat = options.chat
    if fmt == "auto":
        fmt = detect_format(record, where=where, messages_key=chat.messages_key)
    kw = dict(where=where, default_id=default_id, default_env=default_env, fallback_env=fallback_env)
    if fmt == "agentgym":
        return from_agentgym(record, fields=chat, **kw)
    if fmt == "openai":
        return from_openai(record, fields=chat, **kw)
    if fmt == "transcript":
        return from_transcript(record, options=options.transcript, **kw)
    if fmt == "pairs":
        return from_pairs(record, options=options.pairs, **kw)
    return from_generic(record, fields=chat, **kw)


def from_agentgym(record: Any, *, where: str, fields: ChatFields | None = None, **kw: Any) -> Trajectory:
    """AgentGym ShareGPT: `conversations` of `{from, value, loss}`; `loss: false` = not trainable."""
    f = fields or ChatFields()
    f = ChatFields(messages_key=f.messages_key or "conversations", role_key=f.role_key or "from",
                   content_key=f.content_key or "value", loss_key=f.loss_key, weight_key=f.weight_key, roles=f.roles)
    return _from_chat(record, where=where, fields=f, **kw)


def from_openai(record: Any, *, where: str, fields: ChatFields | None = None, **kw: Any) -> Trajectory:
    """OpenAI chat: `messages` of `{role, content, weight?, tool_calls?}`; `weight: 0` = not trainable."""
    f = fields or ChatFields()
    f = ChatFields(messages_key=f.messages_key or "messages", role_key=f.role_key or "role",
                   content_key=f.content_key or "content", loss_key=f.loss_key, weight_key=f.weight_key, roles=f.roles)
    return _from_chat(record, where=where, fields=f, **kw)


def from_generic(record: Any, *, where: str, fields: ChatFields | None = None,
                 messages_key: str | None = None, **kw: Any) -> Trajectory:
    """A bare list of messages, or an object holding one under `messages_key` (default: `conversations` or
    `messages`); each turn's keys as `fields` says, or detected per turn."""
    f = fields or ChatFields(messages_key=messages_key)
    return _from_chat(record, where=where, fields=f, **kw)


def _from_chat(record: Any, *, where: str, fields: ChatFields, default_id: str | None = None,
               default_env: str | None = None, fallback_env: str | None = None) -> Trajectory:
    if isinstance(record, list):
        msgs, list_field, rec = record, "", {}
    else:
        _expect_object(record, where)
        key = fields.messages_key
        if key is None:
            key = next((k for k in ("conversations", "messages") if record.get(k) is not None), "messages")
        msgs, list_field, rec = _expect_list(record, key, where), key, record
    sharegpt = list_field == "conversations"
    turns = [_chat_turn(m, fields, where, f"{list_field}[{i}]", sharegpt) for i, m in enumerate(msgs)]
    tools = None
    for key in ("tools", "functions"):
        if rec.get(key) is not None:
            tools = normalize_tools(rec[key], source=where, field=key)
            break
    consumed = {list_field} if list_field else set()
    return _build(turns, rec, where=where, list_field=list_field, default_id=default_id, default_env=default_env,
                  fallback_env=fallback_env, consumed=consumed, tools=tools)


def _turn_keys(turn: dict, fields: ChatFields, sharegpt: bool) -> tuple[str, str]:
    """(role key, content key) of one turn: the configured ones, else `role`/`content` or `from`/`value`,
    whichever the turn has (`sharegpt`: the family to assume when it has neither, e.g. under `conversations`)."""
    if "role" in turn or "content" in turn:
        sharegpt = False
    elif "from" in turn or "value" in turn:
        sharegpt = True
    role, content = ("from", "value") if sharegpt else ("role", "content")
    return fields.role_key or role, fields.content_key or content


def _chat_turn(m: Any, fields: ChatFields, where: str, f: str, sharegpt: bool = False) -> Message:
    """One turn of a list of messages as a Message (step numbers are set later)."""
    if not isinstance(m, dict):
        raise DataError(f"expected an object, got {_type(m)}", source=where, field=f)
    role_key, content_key = _turn_keys(m, fields, sharegpt)
    if m.get(role_key) is None:
        hint = "" if fields.role_key else f"; the turn has keys {sorted(m)[:8]}: set data.role_key to the key of each turn's role"
        raise DataError(f"missing role{hint}", source=where, field=f"{f}.{role_key}")
    name = m[role_key]
    if not isinstance(name, str):
        raise DataError(f"expected a string, got {_type(name)}", source=where, field=f"{f}.{role_key}")
    role = fields.roles.get(name) or fields.roles.get(name.lower())
    if role is None:
        raise DataError(f"unknown role {name!r} (known: {', '.join(sorted(fields.roles))}); map it with "
                        f"data.roles, e.g. data.roles={{user: [{name}]}}", source=where, field=f"{f}.{role_key}")
    calls = None
    text: str | None = None
    if role == "tool_call":  # the content is the call, as JSON
        raw = m.get(content_key)
        try:
            parsed = json.loads(raw) if isinstance(raw, str) else raw
        except json.JSONDecodeError as e:
            raise DataError(f"a {name!r} turn must hold a JSON tool call: {e.msg} (column {e.colno})",
                            source=where, field=f"{f}.{content_key}") from None
        calls = normalize_tool_calls(parsed, source=where, field=f"{f}.{content_key}")
        role = "assistant"
    elif m.get("tool_calls") or m.get("function_call"):
        ck = "tool_calls" if m.get("tool_calls") else "function_call"
        if role != "assistant":
            raise DataError(f"only assistant turns make tool calls (role {name!r})", source=where, field=f"{f}.{ck}")
        calls = normalize_tool_calls(m[ck], source=where, field=f"{f}.{ck}")
        if m.get(content_key) is not None:  # the text besides the calls; OpenAI allows null
            text = _content(m, content_key, where, f, allow_empty=True)
    trainable, weight = _turn_flags(m, role, name, fields, where, f)
    if calls is not None:
        return Message.with_tool_calls(text, calls, trainable=trainable, weight=weight)
    content = _content(m, content_key, where, f, allow_empty=role == "tool")
    if role == "tool":
        call_id = m.get("tool_call_id")
        tool_name = m.get("name") if isinstance(m.get("name"), str) else None
        return Message("tool", content, tool_call_id=str(call_id) if call_id is not None else None, name=tool_name)
    return Message(role, content, trainable=trainable, weight=weight)


def _turn_flags(m: dict, role: str, name: str, fields: ChatFields, where: str, f: str) -> tuple[bool, float | None]:
    """(trainable, weight) from the turn's loss (true/false/null), weight (>= 0) and trainable marks."""
    trainable = role == "assistant"
    for key in dict.fromkeys((fields.loss_key, "trainable")):
        flag = m.get(key)
        if flag is None:
            continue
        if not isinstance(flag, bool):
            raise DataError(f"expected true, false or null, got {flag!r}", source=where, field=f"{f}.{key}")
        if flag and role != "assistant":
            raise DataError(f"{key}=true on a {name!r} turn: only assistant turns can be trained",
                            source=where, field=f"{f}.{key}")
        trainable = trainable and flag
    weight = None
    w = m.get(fields.weight_key)
    if w is not None:
        wf = f"{f}.{fields.weight_key}"
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise DataError(f"weight must be a finite number >= 0, got {w!r}", source=where, field=wf)
        if role != "assistant":
            raise DataError(f"weight is only allowed on assistant turns (role {name!r})", source=where, field=wf)
        if w == 0:
            trainable = False
        elif trainable:
            weight = float(w)
    return trainable, weight


# --- transcripts and pairs -----------------------------------------------------------------------------


def _marker_regex(opts: TranscriptOptions) -> re.Pattern[str]:
    words = "|".join(re.escape(w) for w in sorted(opts.agent_markers + opts.observation_markers, key=len, reverse=True))
    return re.compile(rf"^[ \t]*(?P<marker>{words})(?:[ \t]*\d+)?[ \t]*:", re.MULTILINE)


def from_transcript(record: Any, *, where: str, options: TranscriptOptions | None = None,
                    default_id: str | None = None, default_env: str | None = None,
                    fallback_env: str | None = None) -> Trajectory:
    """One text transcript -> user (task) / assistant (agent text) / user (observation) turns."""
    opts = options or TranscriptOptions()
    if isinstance(record, str):
        record = {"text": record}
    _expect_object(record, where)
    key = opts.text_key or next((k for k in _TRANSCRIPT_TEXTS if isinstance(record.get(k), str)), None)
    if key is None:
        raise DataError(f"no transcript field: expected one of {', '.join(_TRANSCRIPT_TEXTS)}; found fields "
                        f"{sorted(record)[:10]}. Set data.transcript.text_key", source=where)
    if record.get(key) is None:
        raise DataError("missing field (data.transcript.text_key)", source=where, field=key)
    text = _text_value(record[key], where, key, allow_empty=False)
    prefix = ""
    if opts.start_marker is not None:
        at = text.rfind(opts.start_marker)
        if at < 0:
            raise DataError(f"the start marker {opts.start_marker!r} does not occur (data.transcript.start_marker)",
                            source=where, field=key)
        prefix, text = text[:at], text[at:]
    if opts.action_prefix is not None:
        parts = _split_lines(text, opts)
        how = f"no line starts with the action prefix {opts.action_prefix!r} (data.transcript.action_prefix)"
    else:
        parts = _split_markers(text, opts)
        how = (f"no line starts with an agent marker ({', '.join(opts.agent_markers)}; data.transcript.agent_markers), "
               f"or set data.transcript.action_prefix for `> action` transcripts")
    head, turns = parts
    if not turns:
        raise DataError(f"no agent turn: {how}", source=where, field=key)
    task = []
    if opts.prompt_key is not None:
        if record.get(opts.prompt_key) is None:
            raise DataError("missing field (data.transcript.prompt_key)", source=where, field=opts.prompt_key)
        task.append(_text_value(record[opts.prompt_key], where, opts.prompt_key, allow_empty=False).strip())
    if opts.keep_prefix and prefix.strip():
        task.insert(0, prefix.strip())
    if head.strip():
        task.append(head.strip())
    messages = ([Message("user", "\n\n".join(task))] if task else []) + [
        Message("assistant" if agent else "user", body) for agent, body in turns]
    consumed = {key} | ({opts.prompt_key} if opts.prompt_key else set())
    return _build(messages, record, where=where, list_field=key, default_id=default_id, default_env=default_env,
                  fallback_env=fallback_env, consumed=consumed)


def _merge(parts: list[tuple[bool, str]], sep: str) -> list[tuple[bool, str]]:
    """Consecutive parts of the same kind (agent / observation) as one turn, stripped; empty ones dropped."""
    out: list[tuple[bool, list[str]]] = []
    for agent, text in parts:
        if out and out[-1][0] == agent:
            out[-1][1].append(text)
        else:
            out.append((agent, [text]))
    turns = [(agent, sep.join(texts).strip()) for agent, texts in out]
    return [(agent, body) for agent, body in turns if body]


def _split_markers(text: str, opts: TranscriptOptions) -> tuple[str, list[tuple[bool, str]]]:
    matches = list(_marker_regex(opts).finditer(text))
    if not any(m.group("marker") in opts.agent_markers for m in matches):
        return text, []
    head = text[: matches[0].start()]
    parts = [(m.group("marker") in opts.agent_markers, text[m.start(): nxt.start() if nxt else len(text)].strip("\n"))
             for m, nxt in zip(matches, matches[1:] + [None])]
    return head, _merge(parts, "\n")


def _split_lines(text: str, opts: TranscriptOptions) -> tuple[str, list[tuple[bool, str]]]:
    prefix = opts.action_prefix or ""
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith(prefix)), None)
    if first is None:
        return text, []
    head = "\n".join(lines[:first])
    parts = [(line.startswith(prefix), line[len(prefix):] if line.startswith(prefix) and opts.strip_prefix else line)
             for line in lines[first:]]
    return head, _merge(parts, "\n")


def from_pairs(record: Any, *, where: str, options: PairOptions | None = None, default_id: str | None = None,
               default_env: str | None = None, fallback_env: str | None = None) -> Trajectory:
    """A single-step record: [system], user (the input), assistant (the output, the one step)."""
    opts = options or PairOptions()
    _expect_object(record, where)
    if opts.input_key is not None:
        in_keys = opts.input_key
    elif record.get("instruction") is not None:
        in_keys = ("instruction", "input")
    else:
        in_keys = tuple(k for k in _PAIR_INPUTS if record.get(k) is not None)[:1]
    if not in_keys:
        raise DataError(f"no input field: expected one of {', '.join(_PAIR_INPUTS)}; found fields {sorted(record)[:10]}. "
                        "Set data.pairs.input_key", source=where)
    if record.get(in_keys[0]) is None:
        raise DataError("missing field (data.pairs.input_key)", source=where, field=in_keys[0])
    inputs = []
    for i, k in enumerate(in_keys):  # the first one must be there and hold text; later ones may be empty
        if record.get(k) is not None:
            t = _text_value(record[k], where, k, allow_empty=i > 0)
            if t.strip():
                inputs.append(t)
    out_key = opts.output_key or next((k for k in _PAIR_OUTPUTS if record.get(k) is not None), None)
    if out_key is None:
        raise DataError(f"no output field: expected one of {', '.join(_PAIR_OUTPUTS)}; found fields {sorted(record)[:10]}. "
                        "Set data.pairs.output_key", source=where)
    if record.get(out_key) is None:
        raise DataError("missing field (data.pairs.output_key)", source=where, field=out_key)
    output = _text_value(record[out_key], where, out_key, allow_empty=False)
    sys_key = opts.system_key or ("system" if isinstance(record.get("system"), str) else None)
    messages = []
    if sys_key and record.get(sys_key) is not None and str(record[sys_key]).strip():
        messages.append(Message("system", _text_value(record[sys_key], where, sys_key, allow_empty=False)))
    messages += [Message("user", "\n\n".join(inputs)), Message("assistant", output)]
    consumed = set(in_keys) | {out_key} | ({sys_key} if sys_key else set())
    return _build(messages, record, where=where, list_field="", default_id=default_id, default_env=default_env,
                  fallback_env=fallback_env, consumed=consumed)


# --- shared pieces -------------------------------------------------------------------------------------


def resolve_env(
    record: dict[str, Any],
    *,
    where: str,
    record_id: str | None,
    default_env: str | None = None,
    fallback_env: str | None = None,
) -> str:
    """The env of a record by the documented precedence: field, source setting, id form, file name."""
    env = record.get("env")
    if env is not None:
        if not isinstance(env, str) or not env.strip():
            raise DataError(f"expected a non-empty string, got {env!r}", source=where, field="env")
        return env
    if default_env:
        return default_env
    if record_id is not None:
        from_id = env_from_id(record_id)
        if from_id:
            return from_id
    if fallback_env:
        return fallback_env
    raise DataError(
        "cannot tell the env: the record has no `env` field, its id does not have the form <env>_<n>, and "
        "the file name does not name one; set `env` on the data source",
        source=where,
        field="env",
    )


def _build(
    turns: list[Message],
    record: dict[str, Any],
    *,
    where: str,
    list_field: str,
    default_id: str | None,
    default_env: str | None,
    fallback_env: str | None,
    consumed: set[str] = frozenset(),
    tools: list[dict[str, Any]] | None = None,
) -> Trajectory:
    """Check the turn order in the record's own field names, then build the canonical trajectory."""
    if not turns:
        raise DataError("no messages", source=where, field=list_field or None)
    for i in range(1, len(turns)):
        if turns[i].role == "assistant" and turns[i - 1].role == "assistant":
            raise DataError("two assistant turns in a row (the environment must answer every action)",
                            source=where, field=f"{list_field}[{i}]")
    if not any(m.role == "assistant" and m.trainable for m in turns):
        raise DataError("no trainable assistant turn: a trajectory needs at least one step",
                        source=where, field=list_field or None)
    record_id = _record_id(record, where)
    env = resolve_env(record, where=where, record_id=record_id, default_env=default_env, fallback_env=fallback_env)
    traj_id = record_id if record_id is not None else (default_id or where)
    meta = {}
    for k, v in record.items():
        if k in _CONSUMED or k in consumed or v is None:
            continue
        if k == "meta" and isinstance(v, dict):  # our canonical form: its meta stays meta
            meta.update({mk: _jsonable(mv) for mk, mv in v.items()})
        else:
            meta[k] = _jsonable(v)
    # the checks above cover every rule in `validate_messages`, which `number_steps` reruns as a backstop
    return Trajectory(id=traj_id, env=env, messages=number_steps(turns, source=where), source=where, meta=meta,
                      tools=tools)


def _record_id(record: dict[str, Any], where: str) -> str | None:
    for key in ("item_id", "id"):
        v = record.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (str, int)) or (isinstance(v, str) and not v.strip()):
            raise DataError(f"expected a non-empty string or an integer, got {v!r}", source=where, field=key)
        return str(v)
    return None


def _content(turn: dict, key: str, where: str, f: str, *, allow_empty: bool = False) -> str:
    if turn.get(key) is None:
        hint = "" if key in turn else f"; the turn has keys {sorted(turn)[:8]}: set data.content_key to the key of its text"
        raise DataError(f"missing content{hint}", source=where, field=f"{f}.{key}")
    return _text_value(turn[key], where, f"{f}.{key}", allow_empty=allow_empty)


def _text_value(v: Any, where: str, f: str, *, allow_empty: bool) -> str:
    """A string, or a list of text parts (`{"type": "text", "text": ...}` or strings) joined with newlines."""
    if isinstance(v, list):
        texts = []
        for j, part in enumerate(v):
            if isinstance(part, str):
                texts.append(part)
                continue
            if not isinstance(part, dict):
                raise DataError(f"expected a content part object, got {_type(part)}", source=where, field=f"{f}[{j}]")
            kind = part.get("type", "text")
            if kind != "text" or not isinstance(part.get("text"), str):
                raise DataError(f"content part of type {kind!r} is not text: only text can be trained on "
                                "(drop the part, or the record with data.on_error=skip)",
                                source=where, field=f"{f}[{j}].type" if kind != "text" else f"{f}[{j}].text")
            texts.append(part["text"])
        v = "\n".join(texts)
    if not isinstance(v, str):
        raise DataError(f"expected a string, got {_type(v)}", source=where, field=f)
    if not allow_empty and not v.strip():
        raise DataError("empty content", source=where, field=f)
    return v


def _expect_object(record: Any, where: str) -> None:
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {_type(record)}", source=where)


def _expect_list(record: dict, key: str, where: str) -> list:
    v = record.get(key)
    if v is None:
        raise DataError("missing field", source=where, field=key)
    if not isinstance(v, list):
        raise DataError(f"expected a list of messages, got {_type(v)}", source=where, field=key)
    return v


def _type(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _jsonable(v: Any) -> Any:
    """Meta values from typed tables can be dates or numpy scalars; keep them writable as JSON."""
    try:
        json.dumps(v)
        return v
    except (TypeError, ValueError):
        return json.loads(json.dumps(v, default=str))
