"""The canonical trajectory: what every importer produces and every later stage reads.

A trajectory alternates observations (user/system turns) and steps (assistant turns). Only trainable
assistant turns are *steps*: they carry a 0-based `step` index in order. Assistant turns that the source
marks as not trainable (AgentTraj-L's `"loss": false` "OK. I'll follow..." turn) stay in the input but
have no index and are never supervised.

On disk (`trajectories.jsonl`) one trajectory is one JSON object per line:
    {"id", "env", "source", "messages": [{"role", "content", "step"?, "trainable"?, "weight"?}], "meta"?}
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from atlas_exp.errors import DataError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    """One turn. `step` is set exactly for trainable assistant turns."""

    role: str
    content: str
    step: int | None = None
    trainable: bool = True
    weight: float | None = None

    @property
    def is_step(self) -> bool:
        return self.step is not None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"role": self.role, "content": self.content}
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
        return h.hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "env": self.env,
            "source": self.source,
            "messages": [m.to_dict() for m in self.messages],
        }
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
            msgs.append(
                Message(
                    role=m["role"],
                    content=m["content"],
                    step=m.get("step"),
                    trainable=m.get("trainable", m.get("step") is not None),
                    weight=m.get("weight"),
                )
            )
        return cls(
            id=str(d["id"]),
            env=str(d["env"]),
            messages=msgs,
            source=str(d.get("source", "")),
            meta=dict(d.get("meta") or {}),
        )


def validate_messages(messages: list[Message], *, source: str) -> None:
    """Check the invariants every stage relies on; raise a DataError naming the offending field.

    - roles are system/user/assistant, contents are non-empty strings;
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
        if not m.content.strip():
            raise DataError("empty content", source=source, field=f"{f}.content")
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
    turns: list[tuple[str, str, bool, float | None]], *, source: str
) -> list[Message]:
    """Build messages from (role, content, trainable, weight) tuples, numbering the trainable assistant turns."""
    out = []
    k = 0
    for role, content, trainable, weight in turns:
        if role == "assistant" and trainable:
            out.append(Message(role, content, step=k, trainable=True, weight=weight))
            k += 1
        elif role == "assistant":
            out.append(Message(role, content, step=None, trainable=False, weight=weight))
        else:
            out.append(Message(role, content))
    validate_messages(out, source=source)
    return out
