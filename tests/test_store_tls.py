"""The store over TLS and with ACL users: a redis-server of the test's own with ``--tls-port`` and a CA
made in the test (openssl CLI), verification on; a wrong CA, a wrong password, a cluster URL on a
single node — each one clear error (``--check``, startup, ``/readyz``), never the password."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from gateway.store import StoreMisconfigured
from gateway.store.redis import RedisStore
from gateway.store.resp import RespClient
from tests.support.cli_harness import free_port, get_json
from tests.support.stores import PrivateRedis, new_prefix
from tests.support.topologies import TLSRedis, make_ca, make_cert


@pytest.fixture
def tls_redis(tmp_path: Path):
    ca = make_ca(tmp_path, "test-ca")
    redis = TLSRedis(tmp_path, ca, client_certs=True)
    redis.args = (*redis.args, "--port", "0")  # TLS only: the plain port is closed
    redis.start()
    yield redis, ca, tmp_path
    redis.stop()


def rediss(redis: TLSRedis, tmp_path: Path, ca: Path, **extra: str) -> str:
    client = make_cert(tmp_path, f"client-{len(extra)}", (ca, tmp_path / "test-ca.key"), san="DNS:client")
    options = {"ssl_ca_certs": str(ca), "ssl_certfile": str(client[0]), "ssl_keyfile": str(client[1]), **extra}
    return f"rediss://127.0.0.1:{redis.tls_port}/0?" + "&".join(f"{k}={v}" for k, v in options.items())


async def test_the_store_works_over_tls_with_verification_on(tls_redis) -> None:
    redis, (ca, _), tmp_path = tls_redis
    store = RedisStore(rediss(redis, tmp_path, ca), key_prefix=new_prefix())
    try:
        await store.ping()
        await store.set("k", b"over tls")
        assert await store.get("k") == b"over tls"
        async with store.subscribe("ch") as sub:  # pub/sub: the same TLS connection setup
            await store.publish("ch", b"hello")
            assert await sub.get(2) == b"hello"
        assert (await store.take("rl", rate_per_s=1, burst=0)).allowed
    finally:
        await store.close()


async def test_a_wrong_ca_is_refused_with_a_clear_error(tls_redis, tmp_path: Path, cli) -> None:
    redis, (ca, _), _ = tls_redis
    other_ca, _ = make_ca(tmp_path, "someone-else")
    url = f"rediss://127.0.0.1:{redis.tls_port}/0?ssl_ca_certs={other_ca}"
    store = RedisStore(url, key_prefix=new_prefix())
    try:
        with pytest.raises(StoreMisconfigured, match="certificate was not accepted .*check ssl_ca_certs"):
            await store.ping()
    finally:
        await store.close()
    checked = cli.run("--check", "--redis-url", url)
    assert checked.returncode == 2 and "certificate was not accepted" in checked.stderr, checked.stderr
    port = free_port()
    gw = cli.start("--port", str(port), "--redis-url", url, port=port)
    gw.wait_healthy()
    status, body = get_json(port, "/readyz")
    assert status == 503 and "certificate was not accepted" in body["reason"], body
    assert any("certificate was not accepted" in m for m in gw.messages()), gw.output  # said at startup


async def test_a_wrong_password_is_one_clear_error_not_a_connection_per_command(cli) -> None:
    redis = PrivateRedis("--user", "app", "on", ">right-pass-123", "~*", "&*", "+@all",
                         "--user", "default", "off")
    redis.start()
    admin = RespClient(f"redis://app:right-pass-123@127.0.0.1:{redis.port}/0", connect_timeout_s=1, timeout_s=2)
    url = f"redis://app:wrong-pass-456@127.0.0.1:{redis.port}/0"
    store = RedisStore(url, key_prefix=new_prefix())
    try:
        before = _connections_received(await admin.execute("INFO", "stats"))
        errors = set()
        for _ in range(50):
            with pytest.raises(StoreMisconfigured) as info:
                await store.get("k")
            errors.add(str(info.value))
        after = _connections_received(await admin.execute("INFO", "stats"))
        assert after - before == 1, "one connection tried, its refusal remembered for the next commands"
        assert len(errors) == 1 and "WRONGPASS" in errors.pop()
        checked = cli.run("--check", "--redis-url", url)
        assert checked.returncode == 2 and "WRONGPASS" in checked.stderr
        assert "wrong-pass-456" not in checked.stderr + checked.stdout
        good = RedisStore(f"redis://app:right-pass-123@127.0.0.1:{redis.port}/0", key_prefix=new_prefix())
        await good.set("k", b"v")  # the ACL user itself works
        assert await good.get("k") == b"v"
        await good.close()
    finally:
        await store.close()
        await admin.close()
        redis.stop()


def _connections_received(info: bytes) -> int:
    return int(re.search(rb"total_connections_received:(\d+)", info).group(1))


async def test_a_cluster_url_on_a_single_node_is_a_check_error(cli) -> None:
    redis = PrivateRedis()
    redis.start()
    try:
        url = f"redis+cluster://127.0.0.1:{redis.port}"
        started = time.monotonic()
        checked = cli.run("--check", "--redis-url", url)
        assert checked.returncode == 2, checked.stderr
        assert "is not a Redis Cluster node (cluster support disabled): use redis://" in checked.stderr
        assert time.monotonic() - started < 20
    finally:
        redis.stop()
