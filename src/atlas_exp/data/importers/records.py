"""What every converter shares: the env and id rules, reading a field's text, and building the canonical
`Trajectory` once a format has turned its record into turns (`build_trajectory`, which checks the turn
order in the record's own field names).

The format modules (`chat`, `transcript`, `pairs`) sit on top of this one; it knows no format."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from atlas_exp.data.trajectory import Message, Trajectory, number_steps
from atlas_exp.errors import DataError

# `<env>_<n>`, with LMRL-Gym's suite prefix dropped: lmrlgym_maze_13 -> maze, sciworld_10 -> sciworld
_ID_ENV = re.compile(r"^(?:lmrlgym_)?([A-Za-z][A-Za-z0-9]*(?:_[A-Za-z][A-Za-z0-9]*)*)_\d+$")
# file names that say which split or shard a file is, not which env it holds
_GENERIC_STEMS = {"train", "test", "val", "valid", "validation", "dev", "data", "part", "shard", "default", "all"}
# top-level fields a converter consumes; everything else goes to `meta`. A canonical record's `source`
# (where it was read before) is replaced by where it is read now.
_CONSUMED = {"item_id", "id", "env", "conversations", "messages", "source", "tools", "functions"}


# --- env and id rules ----------------------------------------------------------------------------------


def env_from_id(item_id: str) -> str | None:
    """The env an AgentGym-style id names (`babyai_12` -> babyai, `lmrlgym_wordle_3` -> wordle), or None."""
    match = _ID_ENV.match(item_id)
    return match.group(1) if match else None


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


# --- the trajectory a converter builds ---------------------------------------------------------------


def build_trajectory(
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
    for key, value in record.items():
        if key in _CONSUMED or key in consumed or value is None:
            continue
        if key == "meta" and isinstance(value, dict):  # our canonical form: its meta stays meta
            meta.update({meta_key: jsonable(meta_value) for meta_key, meta_value in value.items()})
        else:
            meta[key] = jsonable(value)
    # the checks above cover every rule in `validate_messages`, which `number_steps` reruns as a backstop
    return Trajectory(id=traj_id, env=env, messages=number_steps(turns, source=where), source=where, meta=meta,
                      tools=tools)


def _record_id(record: dict[str, Any], where: str) -> str | None:
    """The record's own id (`item_id`, else `id`) as a string, or None when it has none."""
    for key in ("item_id", "id"):
        value = record.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)) or (isinstance(value, str) and not value.strip()):
            raise DataError(f"expected a non-empty string or an integer, got {value!r}", source=where, field=key)
        return str(value)
    return None


def turn_content(turn: dict, key: str, where: str, field_path: str, *, allow_empty: bool = False) -> str:
    """The text under `key` of one turn (`field_path`: the turn's place in the record, for errors)."""
    if turn.get(key) is None:
        hint = "" if key in turn else f"; the turn has keys {sorted(turn)[:8]}: set data.content_key to the key of its text"
        raise DataError(f"missing content{hint}", source=where, field=f"{field_path}.{key}")
    return text_value(turn[key], where, f"{field_path}.{key}", allow_empty=allow_empty)


def text_value(value: Any, where: str, field_path: str, *, allow_empty: bool) -> str:
    """A string, or a list of text parts (`{"type": "text", "text": ...}` or strings) joined with newlines."""
    if isinstance(value, list):
        texts = []
        for index, part in enumerate(value):
            if isinstance(part, str):
                texts.append(part)
                continue
            if not isinstance(part, dict):
                raise DataError(f"expected a content part object, got {type_name(part)}", source=where, field=f"{field_path}[{index}]")
            kind = part.get("type", "text")
            if kind != "text" or not isinstance(part.get("text"), str):
                raise DataError(f"content part of type {kind!r} is not text: only text can be trained on "
                                "(drop the part, or the record with data.on_error=skip)",
                                source=where, field=f"{field_path}[{index}].type" if kind != "text" else f"{field_path}[{index}].text")
            texts.append(part["text"])
        value = "\n".join(texts)
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type_name(value)}", source=where, field=field_path)
    if not allow_empty and not value.strip():
        raise DataError("empty content", source=where, field=field_path)
    return value


def expect_object(record: Any, where: str) -> None:
    """A DataError unless the record is a JSON object."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type_name(record)}", source=where)


def expect_list(record: dict, key: str, where: str) -> list:
    """The list of turns under `key`, or a DataError naming the field."""
    value = record.get(key)
    if value is None:
        raise DataError("missing field", source=where, field=key)
    if not isinstance(value, list):
        raise DataError(f"expected a list of messages, got {type_name(value)}", source=where, field=key)
    return value


def type_name(value: Any) -> str:
    """A value's type as JSON would call a missing one (`null`), for error messages."""
    return "null" if value is None else type(value).__name__


def jsonable(value: Any) -> Any:
    """Meta values from typed tables can be dates or numpy scalars; keep them writable as JSON."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return json.loads(json.dumps(value, default=str))
