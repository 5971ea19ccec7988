"""The real CLI, driven the way a user drives it: ``python -m gateway ...`` in a subprocess (SPEC §1).

Every gateway runs in a fresh temporary working directory (so no ``./config.yaml`` is found
unless a test writes one) with an environment scrubbed of anything the machine could leak in
(``RELIAPI_*``, ``REDIS_URL``, ``LOG_LEVEL``, provider keys, proxies). Each process is started in
its own session and killed with its whole process group at teardown; every wait has a deadline.
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fakes import FakeUpstream

REPO = Path(__file__).resolve().parents[1]
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

    def write(self, name: str, text: str) -> Path:
        path = self.cwd / name
        path.write_text(text)
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


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[CLI]:
    runner = CLI(tmp_path)
    try:
        yield runner
    finally:
        runner.close()


def child_pids(pid: int) -> set[int]:
    children: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children.update(int(c) for c in (task / "children").read_text().split())
        except OSError:
            pass
    return children


def listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on ``port`` (IPv4 and IPv6), from /proc/net/tcp*."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A = LISTEN
                inodes.add(fields[9])
    return inodes


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").glob("*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


# ---------------------------------------------------------------- --check


def test_check_valid_file_lists_targets(cli: CLI) -> None:
    cli.write("good.yaml", """\
targets:
  billing: {base_url: "https://billing.example.com/api"}
  llm: {base_url: "https://api.openai.com/v1", provider: openai}
""")
    result = cli.run("--check", "--config", "good.yaml")
    assert result.returncode == 0, result.stderr
    assert "good.yaml" in result.stdout
    assert "billing" in result.stdout and "llm" in result.stdout
    assert_no_traceback(result.stderr)


def test_check_built_in_default_when_no_config_anywhere(cli: CLI) -> None:
    result = cli.run("--check")
    assert result.returncode == 0, result.stderr
    assert "built-in default" in result.stdout
    for target in ("openai", "anthropic", "mistral"):
        assert target in result.stdout


def test_check_invalid_file_lists_every_error_with_its_path(cli: CLI) -> None:
    cli.write("bad.yaml", INVALID_YAML)
    result = cli.run("--check", "--config", "bad.yaml")
    assert result.returncode == 2, result.stdout + result.stderr
    for error in INVALID_ERRORS:
        assert error in result.stderr
    assert "bad.yaml" in result.stderr
    assert result.stdout == ""
    assert_no_traceback(result.stderr)


def test_check_unreadable_and_malformed_files_exit_2(cli: CLI) -> None:
    missing = cli.run("--check", "--config", "nope.yaml")
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr
    assert_no_traceback(missing.stderr)
    cli.write("broken.yaml", "targets: [unclosed\n")
    broken = cli.run("--check", "--config", "broken.yaml")
    assert broken.returncode == 2 and "invalid YAML" in broken.stderr
    assert_no_traceback(broken.stderr)


def test_server_refuses_to_start_on_invalid_config(cli: CLI) -> None:
    cli.write("bad.yaml", INVALID_YAML)
    check = cli.run("--check", "--config", "bad.yaml")
    port = free_port()
    result = cli.run("--config", "bad.yaml", "--port", str(port))
    assert result.returncode == 2, result.stdout + result.stderr
    for error in INVALID_ERRORS:
        assert error in result.stderr
    assert result.stderr == check.stderr  # the same messages as --check
    assert_no_traceback(result.stderr)
    assert refuses(port)


def test_config_sources_precedence_flag_env_discovered(cli: CLI) -> None:
    """--config beats RELIAPI_CONFIG, which beats ./config.yaml."""
    cli.write("config.yaml", "targets: {from_cwd: {base_url: 'https://cwd.example.com'}}\n")
    cli.write("env.yaml", "targets: {from_env: {base_url: 'https://env.example.com'}}\n")
    cli.write("flag.yaml", "targets: {from_flag: {base_url: 'https://flag.example.com'}}\n")
    assert "from_cwd" in cli.run("--check").stdout
    assert "from_env" in cli.run("--check", env={"RELIAPI_CONFIG": "env.yaml"}).stdout
    assert "from_flag" in cli.run("--check", "--config", "flag.yaml", env={"RELIAPI_CONFIG": "env.yaml"}).stdout


# ---------------------------------------------------------------- serving


def test_starts_on_built_in_default_without_any_config(cli: CLI) -> None:
    port = free_port()
    gw = cli.start("--port", str(port), port=port)
    gw.wait_healthy()
    assert get_json(port, "/healthz")[0] == 200
    status, body = get_json(port, "/readyz")
    assert status == 200, body
    assert body["store"] == "memory"
    assert sorted(body["targets"]) == ["anthropic", "mistral", "openai"]
    startup = [m for m in gw.messages() if "listening on" in m]
    assert len(startup) == 1, gw.output
    assert f"127.0.0.1:{port}" in startup[0]
    for target in ("openai", "anthropic", "mistral"):
        assert target in startup[0]
    assert gw.terminate() == 0, gw.output
    assert_no_traceback(gw.stderr)


def test_port_precedence_flag_beats_env_beats_file(cli: CLI) -> None:
    p_file, p_env, p_flag = free_port(), free_port(), free_port()
    cli.write("ports.yaml", f"server: {{port: {p_file}}}\n")

    from_env = cli.start("--config", "ports.yaml", env={"RELIAPI_PORT": str(p_env)}, port=p_env)
    from_env.wait_healthy()
    assert refuses(p_file)
    assert from_env.terminate() == 0, from_env.output

    from_flag = cli.start("--config", "ports.yaml", "--port", str(p_flag), env={"RELIAPI_PORT": str(p_env)},
                          port=p_flag)
    from_flag.wait_healthy()
    assert refuses(p_env) and refuses(p_file)
    assert from_flag.terminate() == 0, from_flag.output


def test_discovers_config_yaml_in_working_directory(cli: CLI) -> None:
    port = free_port()
    cli.write("config.yaml", f"""\
server: {{port: {port}}}
targets: {{only_one: {{base_url: "https://x.example.com"}}}}
""")
    gw = cli.start(port=port)
    gw.wait_healthy()
    status, body = get_json(port, "/readyz")
    assert status == 200 and body["targets"] == ["only_one"]
    assert any("config.yaml" in m for m in gw.messages() if "listening on" in m), gw.output
    assert gw.terminate() == 0, gw.output


def start_behind_fake(cli: CLI, fake: FakeUpstream, grace_s: float) -> Gateway:
    """A gateway whose default target ``up`` is the in-process fake upstream."""
    port = free_port()
    cli.write("up.yaml", f"""\
server: {{port: {port}, default_target: up, shutdown_grace_s: {grace_s}}}
targets:
  up: {{base_url: "{fake.url}/v1", provider: openai}}
""")
    return cli.start("--config", "up.yaml", port=port)


async def stream_and_sigterm(gw: Gateway, chunks: int, interval_ms: int) -> tuple[list[bytes], bool]:
    """Open a slow stream, SIGTERM the gateway after its first chunk and read until the stream ends.

    Returns the non-empty lines received and whether new connections were refused while the
    gateway was still running (i.e. it stopped accepting before it finished draining).
    """
    port = gw.port

    async def refused_soon() -> bool:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
            except ConnectionRefusedError:
                return gw.proc.poll() is None
            else:
                writer.close()
            await asyncio.sleep(0.02)
        pytest.fail(f"new connections still accepted 5s after SIGTERM\n{gw.output}")

    lines: list[bytes] = []
    refused: asyncio.Task[bool] | None = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
            headers={"X-Fake-Chunks": str(chunks), "X-Fake-Interval-Ms": str(interval_ms)},
        ) as resp:
            assert resp.status == 200, await resp.text()
            try:
                async for line in resp.content:
                    if line.strip():
                        lines.append(line.strip())
                    if refused is None and b"tok0" in line:
                        gw.proc.send_signal(signal.SIGTERM)
                        refused = asyncio.create_task(refused_soon())
            except aiohttp.ClientPayloadError:
                pass  # a stream cut by the gateway at the end of its grace period
    assert refused is not None, lines
    return lines, await refused


async def test_sigterm_drains_in_flight_stream_then_exits_0(cli: CLI, fake: FakeUpstream) -> None:
    gw = start_behind_fake(cli, fake, grace_s=10)
    await asyncio.to_thread(gw.wait_healthy)

    lines, refused_while_draining = await stream_and_sigterm(gw, chunks=10, interval_ms=200)

    assert refused_while_draining, "the gateway exited before it stopped accepting connections"
    payload = b"\n".join(lines)
    for i in range(10):
        assert f"tok{i} ".encode() in payload, payload
    assert lines[-1] == b"data: [DONE]", payload
    assert fake.streams_finished == 1
    assert await gw.wait_exit_async(timeout=10 + 5) == 0, gw.output
    assert any("shutting down" in m for m in gw.messages()), gw.output
    assert_no_traceback(gw.stderr)


@pytest.mark.parametrize("grace_s", [0, 0.5])
async def test_sigterm_cuts_streams_outliving_the_grace_period(cli: CLI, fake: FakeUpstream, grace_s: float) -> None:
    """A stream far longer than shutdown_grace_s (0 = no grace) is cut; the gateway still exits 0."""
    gw = start_behind_fake(cli, fake, grace_s=grace_s)
    await asyncio.to_thread(gw.wait_healthy)

    lines, _ = await stream_and_sigterm(gw, chunks=100, interval_ms=200)  # 20 s if left to finish

    assert b"data: [DONE]" not in lines
    assert fake.streams_finished == 0
    assert await gw.wait_exit_async(timeout=10) == 0, gw.output
    assert_no_traceback(gw.stderr)


def test_workers_share_one_port_and_stop_on_sigterm(cli: CLI) -> None:
    port = free_port()
    gw = cli.start("--workers", "2", "--port", str(port), port=port)
    gw.wait_healthy()

    def both_listening() -> bool:
        listeners = listening_inodes(port)
        kids = child_pids(gw.pid)
        return len(kids) == 2 and all(socket_inodes(k) & listeners for k in kids)

    wait_for(both_listening, STARTUP_S, f"two workers listening on port {port}\n{gw.output}")
    workers = child_pids(gw.pid)
    assert not socket_inodes(gw.pid) & listening_inodes(port)  # the parent only supervises
    assert get_json(port, "/healthz")[0] == 200
    assert "memory store" in gw.output and "per process" in gw.output

    # a worker that dies is replaced
    dead = min(workers)
    os.kill(dead, signal.SIGKILL)
    wait_for(lambda: dead not in child_pids(gw.pid) and both_listening(), STARTUP_S,
             f"a replacement worker\n{gw.output}")
    workers = child_pids(gw.pid)
    gw.wait_healthy()

    assert gw.terminate() == 0, gw.output
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert refuses(port)
    assert_no_traceback(gw.stderr)


# ---------------------------------------------------------------- bad flags and environment


def test_bad_log_level_flag_exits_2(cli: CLI) -> None:
    result = cli.run("--log-level", "nope")
    assert result.returncode == 2
    assert "--log-level" in result.stderr and "nope" in result.stderr
    assert_no_traceback(result.stderr)


def test_bad_log_level_env_exits_2(cli: CLI) -> None:
    result = cli.run("--port", str(free_port()), env={"LOG_LEVEL": "nope"})
    assert result.returncode == 2
    assert "LOG_LEVEL" in result.stderr and "nope" in result.stderr
    assert_no_traceback(result.stderr)


def test_non_numeric_port_env_exits_2(cli: CLI) -> None:
    result = cli.run(env={"RELIAPI_PORT": "abc"})
    assert result.returncode == 2
    assert "RELIAPI_PORT" in result.stderr and "abc" in result.stderr
    assert_no_traceback(result.stderr)


def test_non_numeric_port_flag_exits_2(cli: CLI) -> None:
    result = cli.run("--port", "abc")
    assert result.returncode == 2
    assert "--port" in result.stderr
    assert_no_traceback(result.stderr)


@pytest.mark.parametrize(("args", "env", "name"), [
    (("--port", "70000"), {}, "--port"),
    ((), {"RELIAPI_PORT": "-5"}, "RELIAPI_PORT"),
    (("--check",), {"RELIAPI_PORT": "65536"}, "RELIAPI_PORT"),
])
def test_out_of_range_port_exits_2(cli: CLI, args: tuple[str, ...], env: dict[str, str], name: str) -> None:
    result = cli.run(*args, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{name}: expected a port number 0-65535" in result.stderr
    assert "listening on" not in result.stdout
    assert_no_traceback(result.stderr)


def test_port_in_use_exits_1_with_clear_message(cli: CLI) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        result = cli.run("--port", str(port))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stdout
    assert_no_traceback(result.stderr)


async def test_sighup_reloads_config_and_rejects_a_bad_one(cli: CLI, fake: FakeUpstream) -> None:
    gw = start_behind_fake(cli, fake, grace_s=1)
    await asyncio.to_thread(gw.wait_healthy)
    port = gw.port
    assert get_json(port, "/readyz")[1]["targets"] == ["up"]

    # a valid new config: a second target appears without a restart
    cli.write("up.yaml", f"""\
server: {{port: {port}, default_target: up, shutdown_grace_s: 1}}
targets:
  up: {{base_url: "{fake.url}/v1", provider: openai}}
  two: {{base_url: "{fake.url}/api"}}
""")
    gw.proc.send_signal(signal.SIGHUP)
    await asyncio.to_thread(wait_for, lambda: get_json(port, "/readyz")[1]["targets"] == ["two", "up"], 10,
                            "the reloaded targets")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/t/two/ping") as resp:
            assert resp.status == 200 and (await resp.json())["path_qs"] == "/api/ping"

    # a broken config is rejected, logged with its errors, and the running one keeps serving
    cli.write("up.yaml", INVALID_YAML)
    gw.proc.send_signal(signal.SIGHUP)
    await asyncio.to_thread(wait_for, lambda: any("reload rejected" in m for m in gw.messages()), 10,
                            "the rejection log line")
    assert any("targets.a.circuit.error_threshold: expected int, got str" in m for m in gw.messages()), gw.output
    assert get_json(port, "/readyz")[1]["targets"] == ["two", "up"]
    assert gw.proc.poll() is None
    assert await asyncio.to_thread(gw.terminate) == 0, gw.output
    assert_no_traceback(gw.stderr)
