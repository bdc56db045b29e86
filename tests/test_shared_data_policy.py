"""The real-data policy of conftest.py: without `../shared/data` the tests that need it skip, saying what is
missing, and the others run; under CI=true the same session fails instead.

Each case runs pytest in a child process on a small generated test folder whose conftest.py is a copy of
ours, with ATLAS_SHARED_DATA pointing at a folder of our choosing (empty, or with the expected parts).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED_DATA_MISSING, SHARED_DATA_PARTS

CONFTEST = Path(__file__).with_name("conftest.py")

USES_FIXTURES = '''
def test_shared_data(shared_data):
    assert (shared_data / "agenttraj_l").is_dir()

def test_agenttraj_dir(agenttraj_dir):
    assert agenttraj_dir.is_dir()

def test_needs_nothing():
    assert True
'''

#: a module that reads real data at import time: collection must not crash without it
READS_AT_IMPORT = '''
from conftest import require_shared_data

FILES = sorted(p.name for p in (require_shared_data() / "agenttraj_l").iterdir())

def test_files():
    assert isinstance(FILES, list)
'''

#: a test that skips for the shared-data reason by itself, not through the fixture
SKIPS_BY_ITSELF = '''
import pytest
from conftest import SHARED_DATA_MISSING

def test_skips():
    pytest.skip(f"{SHARED_DATA_MISSING}: some/file not found")
'''


def run_pytest(tmp_path: Path, data: Path, ci: bool, **modules: str) -> subprocess.CompletedProcess:
    root = tmp_path / "suite"
    root.mkdir()
    shutil.copy(CONFTEST, root / "conftest.py")
    (root / "pytest.ini").write_text("[pytest]\n")
    for name, text in modules.items():
        (root / f"{name}.py").write_text(text)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS", "PYTEST_PLUGINS")}
    env["ATLAS_SHARED_DATA"] = str(data)
    env["ATLAS_EXP_TEST_CACHE"] = str(tmp_path / "cache")
    if ci:
        env["CI"] = "true"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", "-c", str(root / "pytest.ini"), str(root)],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )


@pytest.fixture
def empty(tmp_path) -> Path:
    d = tmp_path / "no_data"
    d.mkdir()
    return d


@pytest.fixture
def present(tmp_path) -> Path:
    d = tmp_path / "data"
    for part in SHARED_DATA_PARTS:
        (d / part).mkdir(parents=True)
    (d / "agenttraj_l" / "textcraft.jsonl").write_text("")
    return d


def test_without_data_the_tests_that_need_it_skip_saying_what_is_missing(tmp_path, empty):
    r = run_pytest(tmp_path, empty, ci=False, test_fixtures=USES_FIXTURES, test_at_import=READS_AT_IMPORT)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "1 passed, 3 skipped" in out, out
    assert out.count(SHARED_DATA_MISSING) >= 2, out  # the fixture's skips and the module's
    assert str(empty / "agenttraj_l") in out and str(empty / "alfworld") in out, out
    assert "set ATLAS_SHARED_DATA" in out, out


def test_under_ci_missing_data_fails_the_tests_that_need_it(tmp_path, empty):
    r = run_pytest(tmp_path, empty, ci=True, test_fixtures=USES_FIXTURES)
    out = r.stdout + r.stderr
    assert r.returncode == pytest.ExitCode.TESTS_FAILED, out
    assert "1 passed, 2 errors" in out and "skipped" not in out, out
    assert f"CI=true but {SHARED_DATA_MISSING}" in out and str(empty / "agenttraj_l") in out, out


def test_under_ci_missing_data_read_at_import_is_a_collection_error(tmp_path, empty):
    r = run_pytest(tmp_path, empty, ci=True, test_fixtures=USES_FIXTURES, test_at_import=READS_AT_IMPORT)
    out = r.stdout + r.stderr
    assert r.returncode == pytest.ExitCode.INTERRUPTED, out
    assert "skipped" not in out, out
    assert f"CI=true but {SHARED_DATA_MISSING}" in out and str(empty / "agenttraj_l") in out, out


def test_under_ci_any_skip_for_missing_data_fails_the_session(tmp_path, present):
    """Data present, every fixture test passes, but one test skips for the shared-data reason on its own."""
    r = run_pytest(tmp_path, present, ci=True, test_fixtures=USES_FIXTURES, test_self_skip=SKIPS_BY_ITSELF)
    out = r.stdout + r.stderr
    assert r.returncode == pytest.ExitCode.TESTS_FAILED, out
    assert "3 passed, 1 skipped" in out, out
    assert "real data required in CI" in out and "test_self_skip.py::test_skips" in out, out


def test_under_ci_with_data_present_the_session_passes(tmp_path, present):
    r = run_pytest(tmp_path, present, ci=True, test_fixtures=USES_FIXTURES, test_at_import=READS_AT_IMPORT)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "4 passed" in out and "real data required in CI" not in out, out


def test_other_skips_do_not_fail_ci(tmp_path, present):
    other = "import pytest\n\ndef test_gpu():\n    pytest.skip('no GPU here')\n"
    r = run_pytest(tmp_path, present, ci=True, test_other=other)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "1 skipped" in out, out
