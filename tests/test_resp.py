"""The store's own pipelined Redis client (gateway/store/resp.py): framing, order, failures.

Most cases talk to a scripted fake Redis on loopback that answers with exactly the bytes a
test gives it — split anywhere, late, or not at all — and the last ones to the real Redis: the
shared one, or a redis-server of the test's own with a password, users or a unix socket.
"""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from gateway.store import StoreError
from gateway.store.redis import RedisStore
from gateway.store.resp import ReplyError, RespClient, encode, reader
from gateway.store.scripts import Script
from tests.support.stores import REDIS_URL, PrivateRedis, drop, new_prefix, redis_store


class FakeRedis:
    """Reads commands; for each, sends the next scripted answer (bytes, or None: stay silent;
    ``(seconds, bytes)``: that answer, that late)."""

    def __init__(self, answers: list[bytes | tuple[float, bytes] | None]) -> None:
        self.answers = answers
        self.commands: list[bytes] = []
        self.connections = 0
        self.open = 0  # connections the client has not closed yet
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.writers.append(writer)
        try:
            while True:
                header = await reader.readline()
                if not header:
                    return
                n = int(header[1:])
                parts = []
                for _ in range(n):
                    size = int((await reader.readline())[1:])
                    parts.append((await reader.readexactly(size + 2))[:-2])
                self.commands.append(b" ".join(parts))
                answer = self.answers.pop(0) if self.answers else b"+OK\r\n"
                if answer is None:
                    continue
                if isinstance(answer, tuple):
                    await asyncio.sleep(answer[0])
                    answer = answer[1]
                for i in range(len(answer)):  # one byte at a time: every split point is exercised
                    writer.write(answer[i:i + 1])
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self.open -= 1

    async def close(self) -> None:
        for w in self.writers:
            w.close()
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def fake_redis():
    servers: list[FakeRedis] = []

    async def make(answers: list[bytes | tuple[float, bytes] | None]) -> tuple[FakeRedis, RespClient]:
        server = FakeRedis(answers)
        url = await server.start()
        servers.append(server)
        return server, RespClient(url, connect_timeout_s=1, timeout_s=0.5)

    yield make
    for server in servers:
        await server.close()


def test_encode_and_parse_every_reply_type() -> None:
    assert encode(("SET", "k", b"v\r\n", 5, 0.5)) == b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n$1\r\n5\r\n$3\r\n0.5\r\n"
    wire = b"+OK\r\n:42\r\n$3\r\nab\n\r\n$-1\r\n*2\r\n$1\r\nx\r\n*1\r\n:-7\r\n*-1\r\n-ERR nope\r\n"
    read = reader()
    read.feed(wire)
    values = []
    while (value := read.gets()) is not False:
        values.append(value)
    assert values[:6] == [b"OK", 42, b"ab\n", None, [b"x", [-7]], None]
    assert isinstance(values[6], ReplyError) and str(values[6]) == "ERR nope"


async def test_replies_split_byte_by_byte_reach_the_right_callers_in_order(fake_redis) -> None:
    server, client = await fake_redis([b"$5\r\nfirst\r\n", b":2\r\n", b"*2\r\n$1\r\na\r\n$-1\r\n"])
    results = await asyncio.gather(client.execute("GET", "a"), client.execute("INCR", "b"), client.execute("X"))
    assert results == [b"first", 2, [b"a", None]]
    assert server.connections == 1  # pipelined on one connection
    await client.close()


async def test_asking_goes_out_right_before_the_command_it_is_for(fake_redis) -> None:
    """A Cluster slot being migrated: the importing node takes the command only if ASKING came just before it on
    the connection (sent after it, ASKING applied to the next, unrelated command)."""
    server, client = await fake_redis([b"+PONG\r\n", b"+OK\r\n", b"$2\r\nv1\r\n", b"$-1\r\n"])
    await client.execute("PING")
    assert await client.execute_asking("GET", "k1") == b"v1"
    assert await client.execute("GET", "unrelated") is None
    assert server.commands == [b"PING", b"ASKING", b"GET k1", b"GET unrelated"]
    await client.close()


async def test_an_error_reply_raises_for_its_caller_only(fake_redis) -> None:
    _, client = await fake_redis([b"-WRONGTYPE no\r\n", b"+OK\r\n"])
    bad, good = await asyncio.gather(client.execute("GET", "x"), client.execute("SET", "y", "1"), return_exceptions=True)
    assert isinstance(bad, ReplyError) and str(bad) == "WRONGTYPE no" and good == b"OK"
    await client.close()


async def test_a_silent_server_fails_the_command_in_time_and_the_next_one_reconnects(fake_redis) -> None:
    server, client = await fake_redis([None, b"+PONG\r\n"])
    with pytest.raises(ConnectionError, match="did not answer"):
        await client.execute("GET", "x")
    assert await client.execute("PING") == b"PONG"
    assert server.connections == 2  # the stuck connection was dropped, not reused
    await client.close()


async def test_a_command_that_cannot_be_sent_leaves_no_caller_waiting_for_a_reply(fake_redis) -> None:
    # (queued before it was packed, its place in line would hand every later reply to the caller before)
    server, client = await fake_redis([b"+OK\r\n", b"$1\r\nA\r\n", b"$1\r\nB\r\n"])
    assert await client.execute("PING") == b"OK"  # connected
    for bad in ("x\udcff", True):
        with pytest.raises((UnicodeEncodeError, TypeError)):
            await client.execute("GET", bad)
    assert await asyncio.gather(client.execute("GET", "a"), client.execute("GET", "b")) == [b"A", b"B"]
    await client.close()


async def test_each_command_has_its_own_deadline_not_the_oldest_ones(fake_redis) -> None:
    # one watchdog per connection (not a timer per command): when it fires for the first command's deadline
    # (0.5 s) the second, sent 0.3 s later, is not due yet; its answer at ~0.65 s is in time
    server, client = await fake_redis([b"+FAST\r\n", (0.35, b"+SLOW\r\n"), None])
    assert await client.execute("PING") == b"FAST"
    await asyncio.sleep(0.3)
    assert await client.execute("PING") == b"SLOW"
    with pytest.raises(ConnectionError, match="did not answer within 0.5s"):
        await client.execute("GET", "x")  # and one never answered still fails
    assert server.connections == 1
    await client.close()


async def test_a_connection_lost_mid_command_fails_every_command_in_flight(fake_redis) -> None:
    server, client = await fake_redis([None, None])
    pending = [asyncio.ensure_future(client.execute("GET", str(i))) for i in range(2)]
    while len(server.commands) < 2:
        await asyncio.sleep(0.01)
    server.writers[0].transport.abort()
    for fut in pending:
        with pytest.raises(ConnectionError, match="lost"):
            await fut
    await client.close()


async def test_a_connection_lost_while_connecting_is_said_at_once_not_after_the_timeout(monkeypatch) -> None:
    """A server that closes at once (as a TLS 1.3 server does after its alert about our certificate), seen
    only once the connect has finished — here the loop is made late by a slow handshake step."""
    from gateway.store import resp

    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def late(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
        await asyncio.sleep(0.05)  # the close arrives meanwhile
        await handshake(*args, **kwargs)

    handshake = resp.handshake
    monkeypatch.setattr(resp, "handshake", late)
    server = await asyncio.start_server(closing, "127.0.0.1", 0)
    client = RespClient(f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0", connect_timeout_s=1, timeout_s=2)
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="lost.*closed by the server"):
        await client.execute("PING")
    assert time.monotonic() - started < 1, "waited for a reply on a connection already gone"
    await client.close()
    server.close()
    await server.wait_closed()


async def test_nothing_listening_is_a_connection_error_at_once() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    client = RespClient(f"redis://127.0.0.1:{port}/0", connect_timeout_s=1, timeout_s=1)
    with pytest.raises(ConnectionError, match="cannot connect"):
        await client.execute("PING")
    await client.close()


async def test_password_and_database_are_sent_on_connect(fake_redis) -> None:
    server, _ = await fake_redis([b"+OK\r\n", b"+OK\r\n", b"+PONG\r\n"])
    url = f"redis://:s3cret@127.0.0.1:{server.server.sockets[0].getsockname()[1]}/3"
    client = RespClient(url, connect_timeout_s=1, timeout_s=1)
    assert await client.execute("PING") == b"PONG"
    assert server.commands == [b"AUTH s3cret", b"SELECT 3", b"PING"]
    await client.close()


async def test_a_script_redis_does_not_know_yet_is_loaded_then_run_by_sha() -> None:
    store = await redis_store(new_prefix())  # the real Redis (skips, or fails in CI, without it)
    await drop(store)
    client = RespClient(REDIS_URL, connect_timeout_s=1, timeout_s=2)
    script = Script(client, f"-- {new_prefix()}\nreturn {{KEYS[1], ARGV[1]}}")  # never seen: NOSCRIPT first
    assert await client.execute("SCRIPT", "EXISTS", script.sha) == [0]
    assert await script(["k"], [7]) == [b"k", b"7"]
    assert await client.execute("SCRIPT", "EXISTS", script.sha) == [1]  # EVAL cached it
    assert await script(["k"], ["again"]) == [b"k", b"again"]
    await client.close()


async def test_after_a_command_timed_out_others_fail_at_once_and_ping_still_probes():
    """A Redis that stalls must not cost every request the whole timeout (issue #6 review)."""
    from gateway.store import StoreError
    from gateway.store.redis import RedisStore

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 20)  # accepts, reads, never answers
        await asyncio.sleep(30)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = RedisStore(f"redis://127.0.0.1:{port}/0", key_prefix="stall-test")
    try:
        with pytest.raises(StoreError, match="did not answer"):
            await store.get("k")  # waits out the command timeout once
        with pytest.raises(StoreError, match="skipped"):
            await store.get("k")  # then fails at once
        with pytest.raises(StoreError, match="did not answer"):
            await store.ping()  # readiness and resync still find out whether it is back
    finally:
        await store.close()
        server.close()


# ---------------------------------------------------------------- a Redis of the test's own


@pytest.fixture
def own_redis():
    """``own_redis(*flags)``: a started redis-server of this test's own, stopped afterwards."""
    started: list[PrivateRedis] = []

    def start(*flags: str) -> PrivateRedis:
        redis = PrivateRedis(*flags)
        started.append(redis)
        redis.start()
        return redis

    yield start
    for redis in started:
        redis.stop()


async def connected_clients(client: RespClient, *, at_most: int, timeout_s: float = 3.0) -> int:
    """Redis's count of its clients once it is down to ``at_most`` (a close reaches it a moment later)."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = (await client.execute("INFO", "clients")).decode()
        count = int(re.search(r"connected_clients:(\d+)", info).group(1))
        if count <= at_most or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(("credentials", "refusal"), [
    (":wrong-password@", "WRONGPASS"),
    (":right-password@", "DB index is out of range"),  # AUTH passes, SELECT 99 does not
])
async def test_a_refused_auth_or_select_closes_its_connection(own_redis, credentials: str, refusal: str) -> None:
    redis = own_redis("--requirepass", "right-password")
    admin = RespClient(f"redis://:right-password@127.0.0.1:{redis.port}/0", connect_timeout_s=1, timeout_s=2)
    store = RedisStore(f"redis://{credentials}127.0.0.1:{redis.port}/99", key_prefix=new_prefix())
    try:
        assert await connected_clients(admin, at_most=1) == 1
        for _ in range(20):  # each command connects again, and is refused again
            with pytest.raises(StoreError, match=refusal):
                await store.get("k")
        assert await connected_clients(admin, at_most=1) == 1  # none of the 20 connections is still open
    finally:
        await store.close()
        await admin.close()


async def test_a_connect_timing_out_in_auth_closes_its_socket(fake_redis) -> None:
    server, _ = await fake_redis([None] * 3)  # accepts, never answers AUTH
    url = f"redis://:pw@127.0.0.1:{server.server.sockets[0].getsockname()[1]}/0"
    client = RespClient(url, connect_timeout_s=0.2, timeout_s=5)
    for _ in range(3):
        with pytest.raises(ConnectionError, match="did not answer within 0.2s"):  # (it accepted the connection)
            await client.execute("PING")
    deadline = time.monotonic() + 3
    while server.open and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert server.connections == 3 and server.open == 0
    await client.close()


async def databases_of(admin: RespClient, user: str, *, expect: list[int], timeout_s: float = 3.0) -> list[int]:
    """The db of each connection ``user`` holds, sorted (waiting up to ``timeout_s`` for ``expect``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        clients = (await admin.execute("CLIENT", "LIST")).decode().splitlines()
        dbs = sorted(int(re.search(r" db=(\d+)", c).group(1)) for c in clients if f" user={user} " in c)
        if dbs == expect or time.monotonic() > deadline:
            return dbs
        await asyncio.sleep(0.05)


async def test_commands_and_pub_sub_reach_the_same_database_as_the_same_user(own_redis, tmp_path) -> None:
    sock = tmp_path / "r.sock"
    redis = own_redis("--unixsocket", str(sock), "--unixsocketperm", "700",
                      "--user", "alice", "on", ">p@ss:w0rd", "~*", "&*", "+@all")
    admin = RespClient(f"redis://127.0.0.1:{redis.port}/0", connect_timeout_s=1, timeout_s=2)
    alice = "alice:p%40ss%3Aw0rd"
    try:
        for url, db in [(f"redis://{alice}@127.0.0.1:{redis.port}?db=3", 3), (f"unix://{alice}@{sock}?db=1", 1)]:
            prefix = new_prefix()
            store = RedisStore(url, key_prefix=prefix)
            try:
                async with store.subscribe("ch") as sub:  # opens the pub/sub connection
                    await store.set("k", b"v")
                    await store.publish("ch", b"hello")
                    assert await sub.get(timeout_s=2) == b"hello"
                    # alice's connections: commands and pub/sub, both in that db (once the last store's are gone)
                    assert await databases_of(admin, "alice", expect=[db, db]) == [db, db], url
                await admin.execute("SELECT", db)
                assert await admin.execute("EXISTS", f"{prefix}:k") == 1, url
            finally:
                await admin.execute("SELECT", 0)
                await store.close()
    finally:
        await admin.close()
