"""The options a converter reads besides the record: the format name, where a list of messages keeps its
turns and their parts (`ChatFields`), and the `transcript` and `pairs` formats' settings.

Built once per source from its config (`RecordSource.__init__`), so a wrong option is a ConfigError naming
it before any record is read; the converters only look the options up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from atlas_exp.config import plain
from atlas_exp.errors import ConfigError

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


def check_format(fmt: str, *, option: str = "format") -> str:
    """Normalise a `format=` option, or raise a ConfigError naming it."""
    if fmt not in FORMATS:
        raise ConfigError(f"{option}={fmt!r} is not a known record format; choose one of {', '.join(FORMATS)}")
    return "agentgym" if fmt == "sharegpt" else fmt


def _optional_key(option: str, value: Any) -> str | None:
    """A field-name option: a non-empty string, or None (unset)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{option}={value!r}: expected a field name or null")
    return value



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
        for canon, names in (plain(roles) or {}).items():
            if canon not in MAPPED_ROLES:
                raise ConfigError(f"roles: {canon!r} is not a role; map file role names to one of {', '.join(MAPPED_ROLES)} "
                                  f"(e.g. roles={{user: [human], assistant: [gpt]}})")
            for name in [names] if isinstance(names, str) else list(names or []):
                if not isinstance(name, str) or not name:
                    raise ConfigError(f"roles.{canon}: expected role names, got {name!r}")
                role_map[name] = canon
        return cls(
            messages_key=_optional_key("messages_key", messages_key),
            role_key=_optional_key("role_key", role_key),
            content_key=_optional_key("content_key", content_key),
            loss_key=_optional_key("loss_key", loss_key) or "loss",
            weight_key=_optional_key("weight_key", weight_key) or "weight",
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
        given = plain(options) or {}
        if not isinstance(given, dict):
            raise ConfigError(f"transcript: expected a mapping of options, got {given!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ConfigError(f"transcript: unknown option(s) {unknown}; known: {sorted(known)}")
        given = {key: value for key, value in given.items() if value is not None}
        for key in ("agent_markers", "observation_markers"):
            if key in given:
                value = given[key]
                given[key] = (value,) if isinstance(value, str) else tuple(value)
                if not given[key] or not all(isinstance(marker, str) and marker.strip() for marker in given[key]):
                    raise ConfigError(f"transcript.{key}={value!r}: expected a non-empty list of marker words")
        for key in ("text_key", "prompt_key", "action_prefix", "start_marker"):
            if key in given and (not isinstance(given[key], str) or not given[key]):
                raise ConfigError(f"transcript.{key}={given[key]!r}: expected a non-empty string or null")
        opts = cls(**given)
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
        given = plain(options) or {}
        if not isinstance(given, dict):
            raise ConfigError(f"pairs: expected a mapping of options, got {given!r}")
        unknown = sorted(set(given) - {"input_key", "output_key", "system_key"})
        if unknown:
            raise ConfigError(f"pairs: unknown option(s) {unknown}; known: input_key, output_key, system_key")
        input_keys = given.get("input_key")
        if input_keys is not None:
            input_keys = (input_keys,) if isinstance(input_keys, str) else tuple(input_keys)
            if not input_keys or not all(isinstance(k, str) and k for k in input_keys):
                raise ConfigError(f"pairs.input_key={given.get('input_key')!r}: expected a field name or a list of them")
        return cls(input_key=input_keys, output_key=_optional_key("pairs.output_key", given.get("output_key")),
                   system_key=_optional_key("pairs.system_key", given.get("system_key")))


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

