"""Harness for driving the real CLI, ``python -m gateway ...``, in a subprocess (SPEC §1).

Every gateway runs in a fresh temporary working directory (so no ``./config.yaml`` is found
unless a test writes one) with an environment scrubbed of anything the machine could leak in
(``RELIAPI_*``, ``REDIS_URL``, ``LOG_LEVEL``, provider keys, proxies). Each process is started in
its own session and killed with its whole process group at teardown; every wait has a deadline.
The ``cli`` fixture (tests/conftest.py) hands a test a ``CLI`` and closes it afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
STARTUP_S = 10  # how long a gateway may take to answer /healthz
EXIT_S = 15  # how long a gateway may take to exit after SIGTERM with nothing in flight

_LEAKY_PREFIXES = ("RELIAPI_",)
_LEAKY_NAMES = {
    "REDIS_URL", "LOG_LEVEL", "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "MISTRAL_API_KEY", "OPENAI_BASE_URL",
    "ANTHROPIC_BASE_URL", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "PYTHONPATH", "PYTHONSTARTUP",
}

INVALID_YAML = """\
server: {port: "abc"}
targets: {a: {base_url: "https://x", circuit: {error_threshold: "5"}, bogus: 1}}
"""
INVALID_ERRORS = (
    "server.port: expected int, got str",
    "targets.a.circuit.error_threshold: expected int, got str",
    "targets.a.bogus: unknown key",
)


# ---------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(_LEAKY_PREFIXES) and k.upper() not in _LEAKY_NAMES
    }
    env["PYTHONPATH"] = str(REPO)  # the gateway package from this checkout, whatever the cwd
    env.update(extra or {})
    return env


def refuses(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:port (the connection is refused)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def get_json(port: int, path: str) -> tuple[int, Any]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def assert_no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


class Gateway:
    """One running ``python -m gateway`` process, its output captured to files."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int | None, out: Path, err: Path) -> None:
        self.proc, self.port, self.out_path, self.err_path = proc, port, out, err

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    @property
    def output(self) -> str:
        return f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON lines on stdout (anything else is ignored)."""
        records = []
        for line in self.stdout.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def messages(self) -> list[str]:
        return [str(r.get("message", "")) for r in self.log_records()]

    def wait_healthy(self, port: int | None = None, timeout: float = STARTUP_S) -> None:
        port = port or self.port
        assert port is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"gateway exited with {self.proc.returncode} before answering /healthz\n{self.output}")
            try:
                status, _ = get_json(port, "/healthz")
                if status == 200:
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"gateway not healthy on port {port} within {timeout}s\n{self.output}")
            time.sleep(0.05)

    def wait_exit(self, timeout: float = EXIT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"gateway still running {timeout}s later\n{self.output}")

    async def wait_exit_async(self, timeout: float = EXIT_S) -> int:
        """wait_exit that keeps the test's event loop (and an in-process fake upstream) running."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(f"gateway still running {timeout}s later\n{self.output}")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit()

    def kill(self) -> None:
        """Teardown: SIGKILL the process group this gateway leads (its workers included)."""
        if self.proc.poll() is None:  # not reaped yet, so the group id is still ours
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)


class CLI:
    """Runs the CLI in a fresh working directory with a clean environment."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.started: list[Gateway] = []

    def write(self, name: str, text: object) -> Path:
        """Write ``text`` (YAML, or a ``GatewayConfig``: its YAML) to ``name`` in the working directory."""
        path = self.cwd / name
        path.write_text(str(text))
        return path

    def run(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """A command that is expected to finish by itself (--check, bad flags, bad config)."""
        return subprocess.run(
            [sys.executable, "-m", "gateway", *args], cwd=self.cwd, env=clean_env(env),
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )

    def start(self, *args: str, env: dict[str, str] | None = None, port: int | None = None) -> Gateway:
        """Start a server; ``port`` is where the caller expects it (for wait_healthy)."""
        n = len(self.started)
        out, err = self.cwd / f"gateway{n}.stdout", self.cwd / f"gateway{n}.stderr"
        with out.open("wb") as out_f, err.open("wb") as err_f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", *args], cwd=self.cwd, env=clean_env(env),
                stdin=subprocess.DEVNULL, stdout=out_f, stderr=err_f, start_new_session=True,
            )
        gw = Gateway(proc, port, out, err)
        self.started.append(gw)
        return gw

    def close(self) -> None:
        for gw in self.started:
            gw.kill()
