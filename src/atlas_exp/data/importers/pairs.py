"""Single-step records -> Trajectory (`format=pairs`): an input/output pair (Alpaca's instruction + input,
prompt/completion, question/answer) as [system], user, assistant: one step. The options: `PairOptions`."""

from __future__ import annotations

from typing import Any

from atlas_exp.data.importers.options import PairOptions
from atlas_exp.data.importers.records import build_trajectory, expect_object, text_value
from atlas_exp.data.trajectory import Message, Trajectory
from atlas_exp.errors import DataError

# pairs: the fields `auto` looks for, in order
_PAIR_INPUTS = ("instruction", "prompt", "input", "question", "query")
_PAIR_OUTPUTS = ("output", "completion", "response", "answer")


def looks_like_pair(record: dict) -> bool:
    """An object with one of the input fields and one of the output fields `format=pairs` looks for."""
    return any(record.get(k) is not None for k in _PAIR_INPUTS) and any(record.get(k) is not None for k in _PAIR_OUTPUTS)


def from_pairs(record: Any, *, where: str, options: PairOptions | None = None, default_id: str | None = None,
               default_env: str | None = None, fallback_env: str | None = None) -> Trajectory:
    """A single-step record: [system], user (the input), assistant (the output, the one step)."""
    opts = options or PairOptions()
    expect_object(record, where)
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
    for i, key in enumerate(in_keys):  # the first one must be there and hold text; later ones may be empty
        if record.get(key) is not None:
            text = text_value(record[key], where, key, allow_empty=i > 0)
            if text.strip():
                inputs.append(text)
    out_key = opts.output_key or next((k for k in _PAIR_OUTPUTS if record.get(k) is not None), None)
    if out_key is None:
        raise DataError(f"no output field: expected one of {', '.join(_PAIR_OUTPUTS)}; found fields {sorted(record)[:10]}. "
                        "Set data.pairs.output_key", source=where)
    if record.get(out_key) is None:
        raise DataError("missing field (data.pairs.output_key)", source=where, field=out_key)
    output = text_value(record[out_key], where, out_key, allow_empty=False)
    sys_key = opts.system_key or ("system" if isinstance(record.get("system"), str) else None)
    messages = []
    if sys_key and record.get(sys_key) is not None and str(record[sys_key]).strip():
        messages.append(Message("system", text_value(record[sys_key], where, sys_key, allow_empty=False)))
    messages += [Message("user", "\n\n".join(inputs)), Message("assistant", output)]
    consumed = set(in_keys) | {out_key} | ({sys_key} if sys_key else set())
    return build_trajectory(messages, record, where=where, list_field="", default_id=default_id,
                            default_env=default_env, fallback_env=fallback_env, consumed=consumed)
