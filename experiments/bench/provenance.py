"""Where a benchmark ran: the machine (CPU, cores, memory, GPUs, load) and the versions (packages, commit).

What every result JSON of experiments/bench records under `machine` and `versions`, so that a figure can be
read against the machine that produced it (experiments/bench/common.py has the rest of the shared helpers).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import REPO


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_logical": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "hostname_hash": hashlib.sha256(platform.node().encode()).hexdigest()[:8],
    }
    try:
        info["cpu_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["cpu_usable"] = os.cpu_count()
    try:
        import psutil

        info["cpu_physical"] = psutil.cpu_count(logical=False)
        info["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["ram_available_gb"] = round(psutil.virtual_memory().available / 2**30, 1)
    except ImportError:
        pass
    try:
        info["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    gpus: list[dict[str, Any]] = []
    if "torch" in sys.modules:  # only report what torch sees when torch is in (importing it costs seconds)
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                gpus.append({"name": p.name, "memory_gb": round(p.total_memory / 2**30, 1)})
        info["torch_threads"] = torch.get_num_threads()
    else:  # a parent that leaves the GPU work to child processes: ask the driver
        gpus = _nvidia_smi_gpus()
    info["gpus"] = gpus
    info["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS")
    return info


def _nvidia_smi_gpus() -> list[dict[str, Any]]:
    """The NVIDIA GPUs `nvidia-smi` lists (none where it is missing or fails)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.stdout.splitlines() if out.returncode == 0 else []:
        name, _, mib = line.rpartition(",")
        if name.strip():
            gpus.append({"name": name.strip(), "memory_gb": round(float(mib) / 1024, 1) if mib.strip().isdigit() else None})
    return gpus


_PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "llama_cpp_python", "openai", "psutil")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def versions() -> dict[str, Any]:
    v: dict[str, Any] = {}
    for pkg in _PACKAGES:
        try:
            v[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            v[pkg] = None
    v["atlas_exp_commit"] = _git("rev-parse", "HEAD")
    # the benchmarks' own result files are left out: `make bench` rewrites them as it goes
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)experiments/results")
    v["atlas_exp_tracked_changes"] = None if status is None else bool(status)
    return v
