"""The import graph keeps its layers (pyproject.toml's [tool.importlinter]): `lint-imports` finds no import
that runs back up (lazy imports inside functions count), and the contract has no exception to ignore."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_imports_point_down():
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = [str(exe)] if exe.exists() else [shutil.which("lint-imports") or "lint-imports"]
    p = subprocess.run([*cmd, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert "1 kept, 0 broken" in p.stdout


def test_the_contract_ignores_no_import():
    import tomllib

    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert [c.get("ignore_imports", []) for c in contracts] == [[]]
