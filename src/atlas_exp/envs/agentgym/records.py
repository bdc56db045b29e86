"""An env's AgentTraj-L file (`<data_dir>/<env>.jsonl`), read lazily: what the client takes from the data.

The long instruction prompts (WebShop, the tool envs, SciWorld, SQLGym) are not ours to ship, so they are
read from the first record, whose turns every record of the file shares; the TextCraft records give the goal
an item id was played on, which the server's goal for that item must equal (`items.check_textcraft_goal`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from atlas_exp.errors import ConfigError


def read_records(path: Path, *, first_only: bool = False) -> list[dict[str, Any]]:
    """The JSON records of a JSONL file (only the first with `first_only`); a ConfigError naming the line."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"data_dir: {path}:{n} is not a JSON record: {e}") from None
                if first_only:
                    break
    except OSError as e:
        raise ConfigError(f"data_dir: cannot read {path}: {e.strerror or e}") from None
    if not out:
        raise ConfigError(f"data_dir: {path} has no record")
    return out


class AgentTrajFile:
    """`<data_dir>/<file_name>` of env `env`; each lookup says `why` it needs the file, for the error when
    `data_dir` is None. The first record and the records by item id are each read once."""

    def __init__(self, env: str, data_dir: Path | None, file_name: str):
        self.env = env
        self.data_dir = data_dir
        self.file_name = file_name
        self._first: dict[str, Any] | None = None
        self._by_id: dict[str, dict[str, Any]] | None = None

    def path(self, why: str) -> Path:
        if self.data_dir is None:
            raise ConfigError(
                f"{self.env}: {why} comes from AgentTraj-L's {self.file_name}; pass "
                f"data_dir=<folder with {self.file_name}>"
                + (" or instruction=..." if why == "the instruction" else "")
            )
        return self.data_dir / self.file_name

    def turn(self, k: int, why: str) -> str:
        """Turn `k` of the first record (0: the instruction; 2: the first observation, Maze's preamble)."""
        if self._first is None:
            self._first = read_records(self.path(why), first_only=True)[0]
        try:
            return str(self._first["conversations"][k]["value"])
        except (KeyError, IndexError, TypeError):
            raise ConfigError(
                f"data_dir: the first record of {self.data_dir / self.file_name} has no conversations[{k}].value"
            ) from None

    def record(self, item_id: str, why: str) -> dict[str, Any]:
        """The record of `item_id`; a ConfigError when the file has none."""
        if self._by_id is None:
            self._by_id = {str(r.get("item_id")): r for r in read_records(self.path(why))}
        rec = self._by_id.get(item_id)
        if rec is None:
            raise ConfigError(
                f"{self.env}: no record {item_id!r} in {self.data_dir / self.file_name}; give the bare "
                f"index to play the server's own item"
            )
        return rec


__all__ = ["AgentTrajFile", "read_records"]
