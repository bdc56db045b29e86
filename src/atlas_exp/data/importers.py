"""Record -> Trajectory converters for the public formats expert trajectories come in.

Every converter takes one decoded record plus `where` (the `<file>:<line>` or `<source>#<n>` it came from)
and returns a canonical `Trajectory`, or raises a `DataError` naming `where` and the record's own field
(`conversations[3].value`), never the canonical one, so the user can find the problem in their file.

Formats (`format=`):

- `agentgym` (alias `sharegpt`): AgentGym/AgentTraj-L and ETO-style ShareGPT,
  `{"item_id"|"id", "env"?, "conversations": [{"from", "value", "loss"?}], ...}`. `from` is
  human/gpt/system (user/assistant accepted as synonyms). `loss: false` marks an assistant turn as not
  trainable (AgentTraj-L's first "OK. I'll follow..." turn); `loss: true`, `null` or absent on an
  assistant turn means trainable. In AgentTraj-L every user turn has `loss: null`, every first assistant
  turn `loss: false` and every later one `loss: true`; ALFWorld's expert file has no `loss` at all, and
  all its assistant turns are expert actions, so "absent means trainable" is the rule that fits both.
  `loss: true` on a user/system turn is an error: nothing but assistant turns can be trained.
- `openai`: OpenAI chat fine-tuning records, `{"messages": [{"role", "content", "weight"?}], "id"?,
  "env"?}`. `weight: 0` marks an assistant turn as not trainable (as in OpenAI's format); any other weight
  is kept as that step's weight. Our own canonical `trajectories.jsonl` reads back through this format too
  (its `trainable: false` is honoured, its `step` numbers are recomputed, its `meta` stays `meta`, and its
  `source` becomes the file and line it is read from now).
- `generic`: a record that is itself a list of `{role, content}` messages, or an object holding such a
  list under `messages_key`. Roles may be system/user/assistant or human/gpt; `weight`/`trainable` are
  honoured as in `openai`.
- `auto`: `conversations` -> agentgym, `messages` -> openai, a list or `messages_key` -> generic.

The id is the record's `item_id` or `id`; records without one get the source's `default_id` (derived
from the file name and line). The env is resolved in this order (see `resolve_env`):
1. the record's `env` field;
2. the source's `env` setting (`default_env`), for data that does not name its env;
3. the record's id, when it has the AgentGym form `<env>_<n>` (LMRL-Gym's `lmrlgym_<env>_<n>` for maze
   and wordle): every AgentTraj-L id follows this form and yields exactly its `env` field;
4. the file name (`fallback_env`, from `env_from_filename`): `maze.jsonl` -> maze,
   `alfworld_train_expert_gt.jsonl` -> alfworld.
If none applies the record is a DataError on field `env` that says to set `env` on the source.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from atlas_exp.data.trajectory import Trajectory, number_steps
from atlas_exp.errors import ConfigError, DataError

FORMATS = ("auto", "agentgym", "sharegpt", "openai", "generic")

#: ShareGPT speaker names (and the chat role names some converters write there) -> canonical role
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
#: OpenAI chat roles we can represent (tool/function turns have no place in an agent trajectory here)
OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
#: generic lists: OpenAI roles plus the ShareGPT speaker names
GENERIC_ROLES = {**OPENAI_ROLES, "human": "user", "gpt": "assistant"}

# `<env>_<n>`, with LMRL-Gym's suite prefix dropped: lmrlgym_maze_13 -> maze, sciworld_10 -> sciworld
_ID_ENV = re.compile(r"^(?:lmrlgym_)?([A-Za-z][A-Za-z0-9]*(?:_[A-Za-z][A-Za-z0-9]*)*)_\d+$")
# file names that say which split or shard a file is, not which env it holds
_GENERIC_STEMS = {"train", "test", "val", "valid", "validation", "dev", "data", "part", "shard", "default", "all"}
# top-level fields a converter consumes; everything else goes to `meta`. A canonical record's `source`
# (where it was read before) is replaced by where it is read now.
_CONSUMED = {"item_id", "id", "env", "conversations", "messages", "source"}


def check_format(fmt: str, *, option: str = "format") -> str:
    """Normalise a `format=` option, or raise a ConfigError naming it."""
    if fmt not in FORMATS:
        raise ConfigError(f"{option}={fmt!r} is not a known record format; choose one of {', '.join(FORMATS)}")
    return "agentgym" if fmt == "sharegpt" else fmt


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


def detect_format(record: Any, *, where: str, messages_key: str = "messages") -> str:
    """Which converter a record needs (see the module docstring); a DataError when none fits.

    Typed tables (parquet, `datasets`) give every row every column, so a column only counts when it is
    not null in this row.
    """
    if isinstance(record, list):
        return "generic"
    if isinstance(record, dict):
        if record.get("conversations") is not None:
            return "agentgym"
        if record.get("messages") is not None:
            return "openai"
        if record.get(messages_key) is not None:
            return "generic"
        generic = f" or `{messages_key}` (a list of role/content messages)" if messages_key != "messages" else ""
        raise DataError(
            "cannot tell the record's format: expected `conversations` (AgentGym/ShareGPT) or `messages` "
            f"(OpenAI chat or role/content messages){generic}; found fields {sorted(record)[:10]}",
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
    messages_key: str = "messages",
) -> Trajectory:
    """Convert one record with the named (or detected) format; see the module docstring for the rules."""
    fmt = check_format(format)
    if fmt == "auto":
        fmt = detect_format(record, where=where, messages_key=messages_key)
    kw = dict(where=where, default_id=default_id, default_env=default_env, fallback_env=fallback_env)
    if fmt == "agentgym":
        return from_agentgym(record, **kw)
    if fmt == "openai":
        return from_openai(record, **kw)
    return from_generic(record, messages_key=messages_key, **kw)


def from_agentgym(
    record: Any,
    *,
    where: str,
    default_id: str | None = None,
    default_env: str | None = None,
    fallback_env: str | None = None,
) -> Trajectory:
    """AgentGym ShareGPT: `conversations` of `{from, value, loss}`; `loss: false` = not trainable."""
    _expect_object(record, where)
    convs = _expect_list(record, "conversations", where)
    turns = []
    for i, t in enumerate(convs):
        f = f"conversations[{i}]"
        if not isinstance(t, dict):
            raise DataError(f"expected an object, got {_type(t)}", source=where, field=f)
        role = _role(t, "from", SHAREGPT_ROLES, where, f)
        content = _content(t, "value", where, f)
        loss = t.get("loss")
        if loss is not None and not isinstance(loss, bool):
            raise DataError(f"expected true, false or null, got {loss!r}", source=where, field=f"{f}.loss")
        if loss is True and role != "assistant":
            raise DataError(f"loss=true on a {t['from']!r} turn: only assistant turns can be trained",
                            source=where, field=f"{f}.loss")
        turns.append((role, content, role == "assistant" and loss is not False, None))
    return _build(turns, record, where=where, list_field="conversations", default_id=default_id,
                  default_env=default_env, fallback_env=fallback_env)


def from_openai(
    record: Any,
    *,
    where: str,
    default_id: str | None = None,
    default_env: str | None = None,
    fallback_env: str | None = None,
) -> Trajectory:
    """OpenAI chat: `messages` of `{role, content, weight?}`; `weight: 0` = not trainable."""
    _expect_object(record, where)
    msgs = _expect_list(record, "messages", where)
    turns = _chat_turns(msgs, OPENAI_ROLES, where, "messages")
    return _build(turns, record, where=where, list_field="messages", default_id=default_id,
                  default_env=default_env, fallback_env=fallback_env)


def from_generic(
    record: Any,
    *,
    where: str,
    messages_key: str = "messages",
    default_id: str | None = None,
    default_env: str | None = None,
    fallback_env: str | None = None,
) -> Trajectory:
    """A bare list of `{role, content}` messages, or an object holding one under `messages_key`."""
    if isinstance(record, list):
        turns = _chat_turns(record, GENERIC_ROLES, where, "")
        return _build(turns, {}, where=where, list_field="", default_id=default_id,
                      default_env=default_env, fallback_env=fallback_env)
    _expect_object(record, where)
    msgs = _expect_list(record, messages_key, where)
    turns = _chat_turns(msgs, GENERIC_ROLES, where, messages_key)
    return _build(turns, record, where=where, list_field=messages_key, default_id=default_id,
                  default_env=default_env, fallback_env=fallback_env, consumed={messages_key})


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


# --- shared pieces -----------------------------------------------------------------------------------


def _chat_turns(msgs: list, roles: dict[str, str], where: str, list_field: str) -> list[tuple]:
    """(role, content, trainable, weight) for role/content messages with optional weight/trainable."""
    turns = []
    for i, m in enumerate(msgs):
        f = f"{list_field}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"expected an object, got {_type(m)}", source=where, field=f)
        role = _role(m, "role", roles, where, f)
        content = _content(m, "content", where, f)
        trainable = role == "assistant"
        weight = None
        flag = m.get("trainable")
        if flag is not None:
            if not isinstance(flag, bool):
                raise DataError(f"expected true or false, got {flag!r}", source=where, field=f"{f}.trainable")
            if flag and role != "assistant":
                raise DataError("only assistant turns can be trainable", source=where, field=f"{f}.trainable")
            trainable = trainable and flag
        w = m.get("weight")
        if w is not None:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise DataError(f"weight must be a finite number >= 0, got {w!r}", source=where, field=f"{f}.weight")
            if role != "assistant":
                raise DataError(f"weight is only allowed on assistant turns (role {m['role']!r})",
                                source=where, field=f"{f}.weight")
            if w == 0:
                trainable = False
            elif trainable:
                weight = float(w)
        turns.append((role, content, trainable, weight))
    return turns


def _build(
    turns: list[tuple],
    record: dict[str, Any],
    *,
    where: str,
    list_field: str,
    default_id: str | None,
    default_env: str | None,
    fallback_env: str | None,
    consumed: set[str] = frozenset(),
) -> Trajectory:
    """Check the turn order in the record's own field names, then build the canonical trajectory."""
    if not turns:
        raise DataError("no messages", source=where, field=list_field or None)
    for i in range(1, len(turns)):
        if turns[i][0] == "assistant" and turns[i - 1][0] == "assistant":
            raise DataError("two assistant turns in a row (the environment must answer every action)",
                            source=where, field=f"{list_field}[{i}]")
    if not any(role == "assistant" and trainable for role, _, trainable, _ in turns):
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
    return Trajectory(id=traj_id, env=env, messages=number_steps(turns, source=where), source=where, meta=meta)


def _record_id(record: dict[str, Any], where: str) -> str | None:
    for key in ("item_id", "id"):
        v = record.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (str, int)) or (isinstance(v, str) and not v.strip()):
            raise DataError(f"expected a non-empty string or an integer, got {v!r}", source=where, field=key)
        return str(v)
    return None


def _role(turn: dict, key: str, roles: dict[str, str], where: str, f: str) -> str:
    if turn.get(key) is None:
        raise DataError("missing role", source=where, field=f"{f}.{key}")
    name = turn[key]
    if not isinstance(name, str):
        raise DataError(f"expected a string, got {_type(name)}", source=where, field=f"{f}.{key}")
    if name not in roles:
        raise DataError(f"unknown role {name!r} (expected one of {', '.join(roles)})", source=where, field=f"{f}.{key}")
    return roles[name]


def _content(turn: dict, key: str, where: str, f: str) -> str:
    if turn.get(key) is None:
        raise DataError("missing content", source=where, field=f"{f}.{key}")
    text = turn[key]
    if not isinstance(text, str):
        raise DataError(f"expected a string, got {_type(text)}", source=where, field=f"{f}.{key}")
    if not text.strip():
        raise DataError("empty content", source=where, field=f"{f}.{key}")
    return text


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
