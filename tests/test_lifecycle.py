"""Lifecycle of a running gateway process (SPEC §1): SIGTERM drain and grace period, SIGHUP reload, workers.

Each test starts ``python -m gateway`` through the harness in tests/support/cli_harness.py; streams go
to the in-process fake upstream (tests/support/fakes.py), worker processes are inspected through /proc.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.cli_harness import (
    CLI,
    INVALID_YAML,
    STARTUP_S,
    Gateway,
    assert_no_traceback,
    free_port,
    get_json,
    refuses,
)
from tests.support.config import GatewayConfig
from tests.support.fakes import FakeUpstream, Fault


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


def start_behind_fake(cli: CLI, fake: FakeUpstream, grace_s: float, **target: Any) -> Gateway:
    """A gateway whose default target ``up`` is the in-process fake upstream (``target``: more of its fields)."""
    port = free_port()
    cli.write("up.yaml", GatewayConfig(fake.url, port=port, default_target="up", shutdown_grace_s=grace_s)
              .up(models=None, **target))
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
            except (ConnectionRefusedError, ConnectionResetError):  # reset: queued as the listener closed
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


# ---------------------------------------------------------------- SIGTERM and workers


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
    """A stream far longer than shutdown_grace_s (0 = no grace) is cut — with its in-band error event, never
    silently (it used to end mid-stream, looking to the client like a dropped connection); the gateway exits 0."""
    gw = start_behind_fake(cli, fake, grace_s=grace_s)
    await asyncio.to_thread(gw.wait_healthy)

    lines, _ = await stream_and_sigterm(gw, chunks=100, interval_ms=200)  # 20 s if left to finish

    assert b"data: [DONE]" not in lines
    assert lines[-1].startswith(b'data: {"error"') and b"the gateway is shutting down" in lines[-1], lines[-3:]
    assert fake.streams_finished == 0
    assert await gw.wait_exit_async(timeout=10) == 0, gw.output
    assert_no_traceback(gw.stderr)


async def test_sigterm_answers_what_is_still_unanswered_when_the_grace_runs_out(cli: CLI, fake: FakeUpstream) -> None:
    """Past the grace period a request still waiting for its upstream gets a 503 it can retry elsewhere (it used to
    get a dropped connection); a stream cut then is not continued by stream_recovery (its cut is the gateway's, not
    the upstream's); a SIGHUP during the drain changes nothing (it used to kill the process, exit 129)."""
    gw = start_behind_fake(cli, fake, grace_s=0.5, stream_recovery="continue")
    await asyncio.to_thread(gw.wait_healthy)
    url = f"http://127.0.0.1:{gw.port}/v1/chat/completions"
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async def slow() -> tuple[int, str | None, dict]:
            async with session.post(url, json=chat, headers={"X-Fake-Delay-Ms": "10000"}) as resp:
                assert resp.headers.get("Connection") == "close"  # (draining: the connection is not reused)
                return resp.status, resp.headers.get("Retry-After"), await resp.json()

        async def stream() -> list[bytes]:
            async with session.post(url, json={**chat, "stream": True},
                                    headers={"X-Fake-Chunks": "100", "X-Fake-Interval-Ms": "100"}) as resp:
                return [line.strip() async for line in resp.content if line.strip()]

        waiting, streaming = asyncio.ensure_future(slow()), asyncio.ensure_future(stream())
        while len(fake.requests) < 2:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        gw.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.1)
        gw.proc.send_signal(signal.SIGHUP)
        status, retry_after, body = await waiting
        lines = await streaming
    assert status == 503 and retry_after == "1" and "shutting down" in body["error"]["message"], body
    assert b"the gateway is shutting down" in lines[-1] and b"data: [DONE]" not in lines, lines[-2:]
    assert len(fake.requests) == 2  # nothing asked of the upstream again
    assert await gw.wait_exit_async(timeout=10) == 0, gw.output
    assert_no_traceback(gw.stderr)


async def test_sigterm_lets_a_body_still_arriving_finish_and_be_answered(cli: CLI, fake: FakeUpstream) -> None:
    """A request whose body is still being uploaded is in flight: it is read to its end and answered within the
    grace period (aiohttp's own pre_shutdown closed its connection, which then dropped every byte that came),
    and an idle keep-alive connection is closed at once."""
    gw = start_behind_fake(cli, fake, grace_s=5)
    await asyncio.to_thread(gw.wait_healthy)
    body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"' + b"x" * 200_000 + b'"}]}'
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", gw.port)  # connected, sends nothing
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(head + body[:1000])
    await writer.drain()
    await asyncio.sleep(0.3)
    gw.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.5)  # draining
    assert await asyncio.wait_for(idle_reader.read(), 5) == b""  # the idle connection was closed
    writer.write(body[1000:])
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    idle_writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b"Connection: close" in answer and b"Hello from the fake." in answer
    assert len(fake.requests) == 1 and len(fake.requests[0].body) == len(body)
    assert await gw.wait_exit_async(timeout=10) == 0, gw.output


async def test_sigterm_past_the_grace_leaves_no_flight_locked_in_the_store(cli: CLI, fake: FakeUpstream) -> None:
    """A stream that leads its idempotency key and, nested, its cache entry, cut at shutdown: its client is told the
    gateway stopped (not "abandoned by its client"), and both keys are released before the store closes — a lock
    left behind held the retry the client is told to send for the lock's whole TTL (found by a review)."""
    from gateway.store.redis import RedisStore
    from tests.support.stores import REDIS_URL, drop, new_prefix, redis_store

    prefix = new_prefix()
    await drop(await redis_store(prefix))  # (skips, with the reason, when Redis is not there)
    port = free_port()
    cli.write("up.yaml", GatewayConfig(fake.url, port=port, default_target="up", shutdown_grace_s=0.3)
              .up(models=None, cache={"ttl_s": 60}).store(url=REDIS_URL, key_prefix=prefix))
    gw = cli.start("--config", "up.yaml", port=port)
    await asyncio.to_thread(gw.wait_healthy)
    lines: list[bytes] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "locks"}]},
            headers={"X-Fake-Chunks": "100", "X-Fake-Interval-Ms": "100", "Idempotency-Key": "k-cut-1"},
        ) as resp:
            async for line in resp.content:
                if line.strip():
                    lines.append(line.strip())
                if len(lines) == 2:
                    gw.proc.send_signal(signal.SIGTERM)
    assert b"the gateway is shutting down" in lines[-1], lines[-2:]
    assert await gw.wait_exit_async(timeout=10) == 0, gw.output
    store = RedisStore(REDIS_URL, key_prefix=prefix)
    try:
        keys = [key async for key in store.scan_prefix("")]
        held = [key for key in keys if (key.startswith(("idem:", "cache:")) and ":log:" not in key)]
        assert held == [], held  # neither the idempotency key nor the cache entry is still locked
    finally:
        await drop(store)


async def test_sigterm_ends_a_stream_whose_recovery_is_waiting_for_its_continuation(cli: CLI, fake: FakeUpstream) -> None:
    """The upstream cut the stream; stream_recovery's continuation is still waiting for its answer when the grace
    period runs out: the stream ends with its in-band error (it was dropped without one: being relayed it is not
    answered 503, and its continuation was not yet a stream to end)."""
    gw = start_behind_fake(cli, fake, grace_s=0.3, stream_recovery="continue")
    await asyncio.to_thread(gw.wait_healthy)
    fake.plan(Fault(chunks=5, cut_after=2), Fault(chunks=5, delay_ms=10_000))  # the continuation: answered late

    async def sigterm_once_continuing() -> None:
        while len(fake.requests) < 2:
            await asyncio.sleep(0.02)
        gw.proc.send_signal(signal.SIGTERM)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.post(
            f"http://127.0.0.1:{gw.port}/v1/chat/completions",
            json={"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        ) as resp:
            killer = asyncio.ensure_future(sigterm_once_continuing())
            lines = [line.strip() async for line in resp.content if line.strip()]
            await killer
    assert lines[-1].startswith(b'data: {"error"') and b"data: [DONE]" not in lines, lines[-2:]
    assert b"shutting down" in lines[-1], lines[-1]  # the reason it ended, not the cut the continuation was to mend
    assert len(fake.requests) == 2
    assert await gw.wait_exit_async(timeout=10) == 0, gw.output


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


# ---------------------------------------------------------------- SIGHUP


async def test_sighup_reloads_config_and_rejects_a_bad_one(cli: CLI, fake: FakeUpstream) -> None:
    gw = start_behind_fake(cli, fake, grace_s=1)
    await asyncio.to_thread(gw.wait_healthy)
    port = gw.port
    assert get_json(port, "/readyz")[1]["targets"] == ["up"]

    # a valid new config: a second target appears without a restart (and a new grace period, used at SIGTERM)
    cfg = GatewayConfig(fake.url, port=port, default_target="up", shutdown_grace_s=0.5).up(models=None).rest("two")
    cli.write("up.yaml", cfg)
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
    assert any("draining in-flight requests for up to 0.5s" in m for m in gw.messages()), gw.output  # the reload's
    assert_no_traceback(gw.stderr)
