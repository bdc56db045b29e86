"""API keys in the environment never reach a file: a whole run (data, select, train, eval) with
`logger=wandb` (offline) and W&B, OpenAI and Hugging Face keys set, then every file it could have written
is searched for them: the run dir (its W&B offline run included), the caches, and a private HOME and
TMPDIR (where W&B, Hugging Face and others keep settings and caches of their own)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import REPO, TEST_CACHE

pytestmark = pytest.mark.slow


def files_containing(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for f in root.rglob("*"):
        if f.is_symlink() or not f.is_file():
            continue
        try:
            with f.open("rb") as fh:
                tail = b""
                while chunk := fh.read(1 << 20):
                    block = tail + chunk
                    if any(n in block for n in needles):
                        hits.append(str(f))
                        break
                    tail = block[-64:]
        except OSError:
            continue
    return hits


def test_api_keys_are_written_nowhere(tmp_path, agenttraj_dir):
    lines = (agenttraj_dir / "textcraft.jsonl").read_text().splitlines()
    data = tmp_path / "textcraft.jsonl"
    data.write_text("\n".join(sorted(lines, key=len)[:3]) + "\n")
    secret = uuid.uuid4().hex  # 32 hex characters found nowhere else
    keys = {"WANDB_API_KEY": secret + "deadbeef", "OPENAI_API_KEY": f"sk-{secret}o", "HF_TOKEN": f"hf_{secret}h"}
    home, tmp, cache, rd = tmp_path / "home", tmp_path / "tmp", tmp_path / "cache", tmp_path / "run"
    for d in (home, tmp, cache):
        d.mkdir()
    # the converted model from the shared test cache (converting it again would cost a minute)
    gguf = TEST_CACHE / "gguf"
    assert gguf.is_dir(), "run a test that loads SmolLM2 first (conftest's smollm2_dir)"
    (cache / "gguf").symlink_to(gguf)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "XDG_"))}
    env.update(keys, HOME=str(home), TMPDIR=str(tmp), WANDB_MODE="offline", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "atlas_exp", f"run_dir={rd}", f"cache_dir={cache}", "logger=wandb",
           "data=local", f"data.path={data}", "selector=random", "ratio=0.5",
           "train.max_steps=2", "train.max_length=768", "train.per_device_train_batch_size=1", "train.gradient_accumulation_steps=1",
           "train.logging_steps=1",
           "eval=smoke", "~eval.tasks.babyai", "~eval.tasks.sciworld", "eval.tasks.textcraft.episodes.count=1",
           "eval.tasks.textcraft.max_turns=2", "eval.max_new_tokens=16"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-6000:]
    offline = list((rd / "logs" / "wandb").glob("offline-run-*"))
    assert len(offline) == 2, offline  # the training run and the eval run were logged
    assert (rd / "eval" / "results.json").exists()

    needles = [secret.encode()]
    assert files_containing(rd, needles) == []
    assert files_containing(home, needles) == []
    assert files_containing(tmp, needles) == []
    assert files_containing(cache, needles) == []  # the symlinked model folder is not followed, and holds no run data
    assert secret not in p.stdout + p.stderr
