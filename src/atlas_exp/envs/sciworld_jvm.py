"""One ScienceWorld JVM (`PythonInterface <port>`) and its py4j gateway, started by us, not by the package.

Why not the package's `ScienceWorldEnv`: its launcher sleeps a fixed 5 s, binds a fixed port (25335 + thread
number, so two processes on one machine collide), leaves the JVM running, and asks for the valid-action list
every step. Here the port is a free one, the start waits only until it opens (1-2 s), a failed start says why
(the JVM's last stderr line), and the JVM ends with its owner (`close()`, or a finalizer when it is dropped).
`DETERMINISTIC_JVM_ARGS` fix the object listing order (docs/envs.md#scienceworld, Object order).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from typing import Any

from atlas_exp.errors import ConfigError

#: HotSpot options that make identity hash codes, hence object listing order, the same in every run.
DETERMINISTIC_JVM_ARGS = ("-XX:+UnlockExperimentalVMOptions", "-XX:hashCode=2")

#: Seconds to wait for the JVM to accept connections.
JVM_START_TIMEOUT = 60.0


def default_jar() -> str:
    """The jar shipped in the `scienceworld` package (imports it; its Python wrapper is not used)."""
    try:
        import scienceworld
    except ImportError as e:
        raise ConfigError("ScienceWorld is not installed: pip install 'scienceworld==1.0.2'") from e
    version = getattr(scienceworld, "__version__", "?")
    if version != "1.0.2":
        raise ConfigError(
            f"scienceworld=={version} is installed but the AgentTraj-L data match 1.0.2 "
            "(later versions word observations differently): pip install 'scienceworld==1.0.2', or pass jar="
        )
    return os.path.join(os.path.dirname(scienceworld.__file__), f"scienceworld-{version}.jar")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _stop(proc: subprocess.Popen | None, gateway: Any) -> None:
    """Close the py4j connection and end the JVM (terminate, then kill). Safe to call twice."""
    if gateway is not None:
        with contextlib.suppress(Exception):  # a dead JVM cannot be talked to; it is ended below anyway
            gateway.close()
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


class SciWorldJVM:
    """One ScienceWorld JVM (`PythonInterface <port>`) and the py4j gateway to it."""

    def __init__(self, java: str, jar: str, port: int | None, jvm_args: tuple[str, ...] = ()):
        exe = shutil.which(java)
        if exe is None:
            raise ConfigError(
                f"java runtime {java!r} not found: ScienceWorld runs in a JVM and needs Java 17+ "
                "(e.g. apt-get install openjdk-17-jre-headless), or pass java='/path/to/java'"
            )
        if not os.path.isfile(jar):
            raise ConfigError(f"ScienceWorld jar not found: {jar}")
        from py4j.java_gateway import GatewayParameters, JavaGateway

        if port is not None and not _port_free(port):
            # a JVM would fail to bind it, and we would talk to whatever listens there instead
            raise ConfigError(f"port {port} is in use; pass another port, or port=None for a free one")
        self.port = port if port is not None else _free_port()
        # kept to explain a failed start; closed in close()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(
            [exe, *jvm_args, "-cp", jar, "scienceworld.runtime.pythonapi.PythonInterface", str(self.port)],
            # it reads object_type_ids.tsv from its working directory, which the package keeps beside the jar
            cwd=os.path.dirname(os.path.abspath(jar)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # it prints a line per loaded task; nobody reads it
            stderr=self._stderr,
        )
        self.gateway = None
        self._finalizer = weakref.finalize(self, _stop, self.proc, None)
        deadline = time.monotonic() + JVM_START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                self._stderr.seek(0)
                err = self._stderr.read().decode(errors="replace").strip().splitlines()
                raise ConfigError(
                    f"the ScienceWorld JVM ({exe}) exited with code {self.proc.returncode} on start (it needs "
                    f"Java 17+, and HotSpot for deterministic=True; port {self.port}): {err[-1] if err else 'no message'}"
                )
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    _stop(self.proc, None)
                    raise ConfigError(f"the ScienceWorld JVM did not open port {self.port} in {JVM_START_TIMEOUT:.0f} s")
                time.sleep(0.05)
        self.gateway = JavaGateway(gateway_parameters=GatewayParameters(auto_field=True, port=self.port))
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _stop, self.proc, self.gateway)

    def close(self) -> None:
        self._finalizer()
        self._stderr.close()


__all__ = ["DETERMINISTIC_JVM_ARGS", "JVM_START_TIMEOUT", "SciWorldJVM", "default_jar"]
