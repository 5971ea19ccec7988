"""Slow and idle clients are shed (issue #12, point 5): a socket that sends nothing, or a header
byte now and then (slowloris), or a body that stalls, or that stops reading a stream, must not
hold a connection for long; past ``server.max_connections`` a new one gets a 503 it can read.

Everything here uses real sockets against the gateway's own listener (``GatewayRunner``).
``HANG_S`` only bounds a wait that would otherwise hang on a gateway without these limits.
"""

from __future__ import annotations

import asyncio
import errno
import socket

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.client_reqrep import ConnectionKey
from aioresponses import aioresponses
from multidict import CIMultiDict

from gateway.edge import server as listener
from gateway.edge.server import Limits, auto_max_connections
from gateway.keys import RUNTIME
from tests.support.cli_harness import CLI, free_port
from tests.support.config import llm_config
from tests.support.config_helpers import errors_of, load

HANG_S = 5.0
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n"
CHAT = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'


# ---------------------------------------------------------------- raw HTTP over a socket


async def connect(client) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(client.host, client.port)


def parse_head(head: bytes) -> tuple[int, CIMultiDict[str]]:
    lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    return int(lines[0].split()[1]), headers


async def read_response(reader: asyncio.StreamReader) -> tuple[int, CIMultiDict[str], bytes]:
    """One response with a Content-Length (the connection may stay open)."""
    status, headers = parse_head(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HANG_S))
    return status, headers, await reader.readexactly(int(headers["Content-Length"]))


async def closed(reader: asyncio.StreamReader) -> bytes:
    """Everything left until the gateway closes the connection (fails if it never does)."""
    try:
        return await asyncio.wait_for(reader.read(), HANG_S)
    except ConnectionResetError:
        return b""


def assert_request_timeout_envelope(status: int, headers: CIMultiDict[str], body: bytes) -> None:
    assert status == 408
    assert headers["Connection"].lower() == "close" and headers["X-Request-Id"]
    err = msgspec.json.decode(body)
    assert err["success"] is False
    assert err["error"]["code"] == "request_timeout" and err["error"]["type"] == "client_error"
    assert err["meta"]["request_id"] == headers["X-Request-Id"]


# ---------------------------------------------------------------- request heads


async def test_slowloris_head_gets_408_and_is_closed_while_others_are_served(fake, gateway):
    client, _ = await gateway(llm_config(fake.url, header_timeout_s=0.3))
    reader, writer = await connect(client)
    head = b"GET /healthz HTTP/1.1\r\nHost: gw\r\nUser-Agent: slowloris\r\n\r\n"  # ~10 s at this pace
    sent = 0

    async def trickle() -> None:
        nonlocal sent
        for byte in head:
            writer.write(bytes([byte]))
            sent += 1
            await asyncio.sleep(0.2)

    task = asyncio.create_task(trickle())
    try:
        async with client.get("/healthz") as resp:  # a normal client meanwhile
            assert resp.status == 200
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HANG_S)
    finally:
        task.cancel()
    assert 0 < sent < len(head)  # cut off long before the slow client was done
    status, headers = parse_head(answer)
    assert_request_timeout_envelope(status, headers, await reader.readexactly(int(headers["Content-Length"])))
    assert await closed(reader) == b""
    writer.close()


async def test_idle_fresh_connection_is_closed_without_an_answer(fake, gateway):
    client, _ = await gateway(llm_config(fake.url, header_timeout_s=0.3))
    reader, writer = await connect(client)
    assert await closed(reader) == b""  # nothing sent, nothing answered: just closed
    writer.close()


async def test_head_split_across_writes_and_pipelined_requests_are_served(fake, gateway):
    client, _ = await gateway(llm_config(fake.url, header_timeout_s=0.3))
    reader, writer = await connect(client)
    writer.write(HEALTHZ[:10])
    await asyncio.sleep(0.1)
    writer.write(HEALTHZ[10:] + HEALTHZ + HEALTHZ[:5])  # the rest, one whole request and a piece of a third
    await asyncio.sleep(0.1)
    writer.write(HEALTHZ[5:])
    for _ in range(3):
        status, _, body = await read_response(reader)
        assert status == 200 and b'"ok"' in body
    await asyncio.sleep(0.4)  # every complete head stopped the clock: idle now is keep-alive, not a late head
    writer.write(HEALTHZ)
    assert (await read_response(reader))[0] == 200
    writer.close()


# ---------------------------------------------------------------- keep-alive


async def test_kept_alive_connection_serves_the_next_request_then_idles_out(fake, gateway):
    client, _ = await gateway(llm_config(fake.url, header_timeout_s=0.2, keepalive_timeout_s=0.8))
    reader, writer = await connect(client)
    writer.write(HEALTHZ)
    assert (await read_response(reader))[0] == 200
    await asyncio.sleep(0.4)  # idle longer than header_timeout_s: the next head's clock starts at its first byte
    writer.write(HEALTHZ)
    assert (await read_response(reader))[0] == 200
    assert await closed(reader) == b""  # then idle past keepalive_timeout_s
    writer.close()


# ---------------------------------------------------------------- request bodies


async def test_stalled_body_gets_408_in_the_clients_dialect(fake, gateway):
    client, logs = await gateway(llm_config(fake.url, body_timeout_s=0.3))
    reader, writer = await connect(client)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                 b"X-Request-Id: slow-body-1\r\nContent-Length: %d\r\n\r\n" % len(CHAT) + CHAT[:10])
    status, headers, body = await read_response(reader)  # and then nothing more is sent
    assert status == 408
    assert headers["X-Request-Id"] == "slow-body-1" and headers["Connection"].lower() == "close"
    err = msgspec.json.decode(body)["error"]  # the OpenAI shape: this is /v1/chat/completions
    assert err["code"] == "request_timeout" and err["param"] is None and "stalled" in err["message"]
    assert await closed(reader) == b""
    assert fake.requests == []
    assert logs[-1]["error_code"] == "request_timeout" and logs[-1]["status"] == 408
    writer.close()


async def test_a_body_trickled_past_its_deadline_gets_408_whatever_its_gaps(fake, gateway):
    """One byte every 0.1 s never trips body_timeout_s; body_deadline_s ends it all the same (a slot held
    this way would lock every other client out under max_connections)."""
    client, _ = await gateway(llm_config(fake.url, body_timeout_s=0.4, body_deadline_s=0.5))
    reader, writer = await connect(client)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(CHAT))

    async def drip() -> None:
        for byte in CHAT:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.1)

    task = asyncio.create_task(drip())
    try:
        status, headers, body = await asyncio.wait_for(read_response(reader), HANG_S)
    finally:
        task.cancel()
    assert status == 408 and "not complete within 0.5 s" in msgspec.json.decode(body)["error"]["message"]
    assert fake.requests == []
    writer.close()


async def test_body_trickling_with_short_gaps_is_accepted(fake, gateway):
    client, _ = await gateway(llm_config(fake.url, header_timeout_s=0.2, body_timeout_s=0.4))
    reader, writer = await connect(client)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(CHAT))
    for i in range(0, len(CHAT), 12):  # ~0.7 s in all: longer than either timeout, each gap shorter
        await asyncio.sleep(0.1)
        writer.write(CHAT[i:i + 12])
    status, _, body = await read_response(reader)
    assert status == 200, body
    assert [r.body for r in fake.requests] == [CHAT]
    writer.close()


# ---------------------------------------------------------------- the connection cap


async def test_connections_over_the_cap_get_503_and_held_ones_keep_working(fake, gateway):
    client, _ = await gateway(llm_config(fake.url, max_connections=3, header_timeout_s=5))
    held = [await connect(client) for _ in range(3)]  # idle sockets, as an attacker would hold them

    refused = []
    for request in (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nX-Request-Id: over-1\r\nContent-Length: %d\r\n\r\n%s"
        % (len(CHAT), CHAT),
        b"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\n{}",
        HEALTHZ,
    ):
        reader, writer = await connect(client)
        writer.write(request)
        status, headers, body = await read_response(reader)
        assert status == 503 and headers["Retry-After"] == "1" and headers["Connection"].lower() == "close"
        assert headers["X-Request-Id"]
        assert await closed(reader) == b""
        writer.close()
        refused.append((headers["X-Request-Id"], msgspec.json.decode(body)))

    (openai_id, openai), (_, anthropic), (envelope_id, envelope) = refused
    assert openai_id == "over-1"
    assert openai["error"]["code"] == "too_many_connections" and openai["error"]["type"] == "server_error"
    assert anthropic["type"] == "error" and anthropic["error"]["type"] == "overloaded_error"
    assert envelope["error"]["code"] == "too_many_connections" and envelope["error"]["retryable"] is True
    assert envelope["meta"]["request_id"] == envelope_id
    assert fake.requests == []

    for reader, writer in held:  # the open connections were never touched
        writer.write(HEALTHZ)
        assert (await read_response(reader))[0] == 200
        writer.close()


def test_max_connections_defaults_to_half_the_open_file_limit_left_after_the_gateways_own(monkeypatch):
    monkeypatch.setattr(listener.resource, "getrlimit", lambda _: (256, 4096))
    assert auto_max_connections() == 96  # each may need an upstream connection: (256 - 64) / 2
    assert Limits.of(load("server: {}").server) == Limits(header_timeout_s=10, max_connections=96, max_refusing=12)
    assert Limits.of(load("server: {max_connections: 50}").server).max_connections == 50
    monkeypatch.setattr(listener.resource, "getrlimit", lambda _: (8, 4096))
    assert auto_max_connections() == 16


# ---------------------------------------------------------------- streams to slow readers


def big_stream_upstream(gone: asyncio.Event, *, events: int) -> web.Application:
    """An SSE upstream sending ``events`` events of 16 KiB as fast as it may; ``gone``: its reader left."""
    event = b"data: " + b"x" * 16384 + b"\n\n"

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for _ in range(events):
                await resp.write(event)
            await resp.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            gone.set()
            raise
        return resp

    app = web.Application()
    app.router.add_get("/api/stream", stream)
    return app


SSE_GET = b"GET /t/rest/stream HTTP/1.1\r\nHost: gw\r\nAccept: text/event-stream\r\n\r\n"


async def test_stream_to_a_client_that_stops_reading_is_aborted(gateway, aiohttp_server):
    gone = asyncio.Event()
    upstream = await aiohttp_server(big_stream_upstream(gone, events=100_000))  # far more than any buffer
    client, logs = await gateway(llm_config(str(upstream.make_url("")).rstrip("/"), write_timeout_s=0.3))
    reader, writer = await connect(client)
    writer.write(SSE_GET)
    status, _ = parse_head(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HANG_S))
    assert status == 200
    # ... and the client reads nothing more: the gateway gives up on it and lets the upstream go
    await asyncio.wait_for(gone.wait(), HANG_S)
    for _ in range(100):  # the access log line is written as the handler unwinds
        if logs:
            break
        await asyncio.sleep(0.02)
    assert logs[-1]["outcome"] == "client_closed" and logs[-1]["stream"] is True
    await closed(reader)  # what reached the socket's buffers, then the end: the gateway closed it
    writer.close()


async def test_slow_but_steady_reader_gets_the_whole_stream(gateway, aiohttp_server):
    """Longer than every client timeout, and than write_timeout_s: that one bounds a wait for the
    reader, not the answer. (8 MB: more than loopback's socket buffers, so the gateway does wait.)"""
    gone = asyncio.Event()
    upstream = await aiohttp_server(big_stream_upstream(gone, events=480))
    client, logs = await gateway(llm_config(
        str(upstream.make_url("")).rstrip("/"), header_timeout_s=0.2, body_timeout_s=0.2, keepalive_timeout_s=0.2,
        write_timeout_s=0.3))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # a small window: the reader's pace is felt
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (client.host, client.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(SSE_GET)
    received = b""
    while chunk := await asyncio.wait_for(reader.read(65536), HANG_S):
        received += chunk
        if received.endswith(b"0\r\n\r\n"):  # the end of the chunked body
            break
        await asyncio.sleep(0.01)  # reads steadily, but slower than the gateway could send
    assert received.count(b"data: ") == 480 and not gone.is_set()
    assert logs[-1]["outcome"] == "ok"
    writer.close()


# ---------------------------------------------------------------- configuration


def test_new_server_fields_validate_with_their_paths():
    server = load("server: {}").server
    assert (server.header_timeout_s, server.body_timeout_s, server.keepalive_timeout_s, server.max_connections,
            server.write_timeout_s) == (10, 30, 75, None, 60)
    errors = errors_of("server: {header_timeout_s: -1, body_timeout_s: 0, keepalive_timeout_s: -2, "
                       "max_connections: 0, write_timeout_s: fast}")
    assert errors == [
        "server.header_timeout_s: expected float > 0.0, got -1",
        "server.body_timeout_s: expected float > 0.0, got 0",
        "server.keepalive_timeout_s: expected float > 0.0, got -2",
        "server.max_connections: expected int >= 1, got 0",
        "server.write_timeout_s: expected float, got str",
    ]


def test_check_rejects_a_negative_timeout(cli: CLI) -> None:
    cli.write("bad.yaml", "server: {header_timeout_s: -1}\n")
    result = cli.run("--check", "--config", "bad.yaml")
    assert result.returncode == 2
    assert "server.header_timeout_s: expected float > 0.0, got -1" in result.stderr


async def test_cli_listener_closes_idle_connections(cli: CLI) -> None:
    port = free_port()
    cli.write("gw.yaml", f"server: {{port: {port}, header_timeout_s: 0.3}}\n")
    gw = cli.start("--config", "gw.yaml", port=port)
    await asyncio.to_thread(gw.wait_healthy)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await closed(reader) == b""
    writer.close()


# ---------------------------------------------------------------- out of file descriptors


async def test_a_gateway_out_of_descriptors_answers_503_and_no_circuit_counts_it(gateway):
    """EMFILE while connecting upstream is the gateway's own limit (a flood of held sockets), not the
    upstream failing: it must not open a healthy target's circuit — on every instance, with Redis."""
    client, logs = await gateway("""
server: {default_target: up}
targets:
  up:
    base_url: http://upstream.test:9/v1
    provider: openai
    circuit: {error_threshold: 2, cooldown_s: 60}
    retry_matrix: {"net": {attempts: 0}}
""")
    key = ConnectionKey("upstream.test", 9, False, True, None, None, None, None)
    emfile = aiohttp.ClientConnectorError(key, OSError(errno.EMFILE, "Too many open files"))
    with aioresponses(passthrough=[str(client.make_url(""))]) as mocked:
        mocked.post("http://upstream.test:9/v1/chat/completions", exception=emfile, repeat=True)
        for _ in range(4):
            resp = await client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": []})
            assert resp.status == 503 and (await resp.json())["error"]["code"] == "overloaded"
            assert resp.headers["Retry-After"] == "1"
    assert [line["error_code"] for line in logs] == ["overloaded"] * 4  # never circuit_open
    assert client.app[RUNTIME].current.circuits["up"].state == "closed"


async def test_a_body_answered_before_it_was_read_does_not_start_a_head_clock(fake, gateway):
    """A request refused before its body was read (a 401, a 413): the body's last bytes, arriving after the answer,
    complete that body — they are no new request head, and no 408 follows on the kept-alive connection."""
    client, _ = await gateway(f"""
server: {{default_target: up, header_timeout_s: 0.3}}
tenants: [{{name: acme, api_key: tenant-key-acme-0123456789}}]
targets: {{up: {{base_url: "{fake.url}/v1", provider: openai}}}}
""")
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "' + b"x" * 800_000 + b'"}]}'
    reader, writer = await connect(client)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body[:400_000])
    assert (await read_response(reader))[0] == 401  # no key
    writer.write(body[400_000:])  # the rest of that body
    await asyncio.sleep(0.8)  # well past header_timeout_s
    writer.write(HEALTHZ)
    assert (await read_response(reader))[0] == 200  # the next request, not a 408 the client never asked for
    writer.close()
    assert fake.requests == []


async def test_an_http_1_0_client_sees_a_stream_end_when_it_ends(fake, gateway):
    """HTTP/1.0 has no chunked framing: a stream's end is the connection's, even when the client asked to keep it
    alive (it waited for the keep-alive timeout to learn the stream was over)."""
    client, _ = await gateway(llm_config(fake.url))
    body = b'{"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
    reader, writer = await connect(client)
    writer.write(b"POST /v1/chat/completions HTTP/1.0\r\nConnection: keep-alive\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    answer = await closed(reader)  # (fails if the gateway keeps it open)
    assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(b"data: [DONE]\n\n"), answer[-200:]
    writer.close()


@pytest.mark.parametrize(("path", "shape"), [("/healthz", "success"), ("/v1/chat/completions", "openai"),
                                             ("/v1/messages", "anthropic")])
async def test_too_many_request_headers_is_a_431_in_the_dialect_of_its_path(fake, gateway, path, shape):
    """A request the HTTP parser refuses is answered in the dialect its request line asks for (an SDK reads its
    own error shape), not always the gateway's envelope."""
    client, _ = await gateway(llm_config(fake.url))
    reader, writer = await connect(client)
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(200))
    writer.write(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: gw\r\n" + many + b"\r\n")
    status, headers, body = await read_response(reader)
    assert status == 431 and headers["X-Request-Id"]
    answer = msgspec.json.decode(body)
    assert {"success": "success" in answer, "openai": answer.get("error", {}).get("type") == "invalid_request_error",
            "anthropic": answer.get("type") == "error"}[shape], answer
    writer.close()


async def test_expect_100_continue_is_not_answered_for_a_request_that_will_be_refused(fake, gateway):
    """No tenant key, or a body declared over max_body_mb: the final 401 / 413 at once, not "100 Continue" first
    (an invitation to upload what is thrown away); a request that will be read gets its 100 and is served."""
    client, _ = await gateway(f"""
server: {{default_target: up, max_body_mb: 1}}
tenants: [{{name: acme, api_key: tenant-key-acme-0123456789}}]
targets: {{up: {{base_url: "{fake.url}/v1", provider: openai}}}}
""")
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\n")
    for extra, length, status in ((b"", len(CHAT), b"401"),
                                  (b"Authorization: Bearer tenant-key-acme-0123456789\r\n", 5_000_000, b"413")):
        reader, writer = await connect(client)
        writer.write(head + extra + b"Content-Length: %d\r\n\r\n" % length)
        first = await asyncio.wait_for(reader.readuntil(b"\r\n"), HANG_S)
        assert first.startswith(b"HTTP/1.1 " + status), first
        writer.close()
    reader, writer = await connect(client)
    writer.write(head + b"Authorization: Bearer tenant-key-acme-0123456789\r\nContent-Length: %d\r\n\r\n" % len(CHAT))
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HANG_S)).startswith(b"HTTP/1.1 100 Continue")
    writer.write(CHAT)
    assert (await read_response(reader))[0] == 200
    writer.close()
    assert len(fake.requests) == 1
