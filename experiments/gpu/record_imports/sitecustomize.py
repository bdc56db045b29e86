"""Loaded by every Python process whose PYTHONPATH starts with this folder (experiments/gpu/run.py
--record-imports DIR puts it there): at exit, writes the top-level names of the modules the process
imported to DIR/<pid>.txt (with the file each came from). experiments/gpu/pack.py turns them into the distributions the device lacks."""

import atexit
import os
import sys

_DIR = os.environ.get("ATLAS_GPU_RECORD_IMPORTS")


def _write() -> None:
    """One line per imported module: its name and, when it came from a file, a tab and that file (the file
    decides the distribution: a namespace such as `google` is shared by several)."""
    lines = []
    for name, mod in sorted(list(sys.modules.items())):
        f = getattr(mod, "__file__", None)
        lines.append(f"{name}\t{f}" if isinstance(f, str) else name)
    try:
        os.makedirs(_DIR, exist_ok=True)
        with open(os.path.join(_DIR, f"{os.getpid()}.txt"), "w") as out:
            out.write("# " + " ".join(sys.argv)[:500] + "\n" + "\n".join(lines) + "\n")
    except OSError:
        pass


if _DIR:
    atexit.register(_write)
