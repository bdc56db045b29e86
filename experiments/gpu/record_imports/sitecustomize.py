"""Loaded by every Python process whose PYTHONPATH starts with this folder (experiments/gpu/run.py
--record-imports DIR puts it there): at exit, writes the top-level names of the modules the process
imported to DIR/<pid>.txt. experiments/gpu/pack.py turns them into the distributions the device lacks."""

import atexit
import os
import sys

_DIR = os.environ.get("ATLAS_GPU_RECORD_IMPORTS")


def _write() -> None:
    names = sorted({m.split(".")[0] for m in list(sys.modules) if m and not m.startswith("_")})
    try:
        os.makedirs(_DIR, exist_ok=True)
        with open(os.path.join(_DIR, f"{os.getpid()}.txt"), "w") as f:
            f.write("# " + " ".join(sys.argv)[:500] + "\n" + "\n".join(names) + "\n")
    except OSError:
        pass


if _DIR:
    atexit.register(_write)
