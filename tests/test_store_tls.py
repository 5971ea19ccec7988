"""The store over TLS and with ACL users: a redis-server of the test's own with ``--tls-port`` and a CA
made in the test (openssl CLI), verification on; a wrong CA, a wrong password, a cluster URL on a
single node — each one clear error (``--check``, startup, ``/readyz``), never the password.

Sentinel and Cluster over TLS too: a primary, a replica and two sentinels, or three Cluster primaries,
speaking TLS only on every link (``tls-replication``, ``tls-cluster``), with passwords — written as a
``store:`` block, served through two gateways that share their state there."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import aiohttp
import pytest

from gateway.store import StoreMisconfigured
from gateway.store.redis import RedisStore
from gateway.store.resp import RespClient
from tests.support.cli_harness import free_port, get_json
from tests.support.config import NO_AUTH, GatewayConfig
from tests.support.fakes import Fault
from tests.support.stores import PrivateRedis, new_prefix
from tests.support.topologies import (
    ClusterGroup,
    SentinelGroup,
    ServerTLS,
    TLSRedis,
    make_ca,
    make_cert,
    make_server_tls,
)


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


async def test_no_client_certificate_for_a_server_that_requires_one_is_a_clear_error(tls_redis, cli) -> None:
    redis, (ca, _), _ = tls_redis
    store = RedisStore(f"rediss://127.0.0.1:{redis.tls_port}/0?ssl_ca_certs={ca}", key_prefix=new_prefix())
    try:
        with pytest.raises(StoreMisconfigured, match=r"TLS: Redis at 127\.0\.0\.1:\d+: the server refused the connection \(\w+\); check the "
                                                      r"client certificate"):
            await store.get("k")
    finally:
        await store.close()
    checked = cli.run("--check", "--redis-url", f"rediss://127.0.0.1:{redis.tls_port}/0?ssl_ca_certs={ca}")
    assert checked.returncode == 2 and "check the client certificate" in checked.stderr, checked.stderr


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


# ------------------------------------------------------------------ Sentinel and Cluster over TLS, as a block

PASSWORD, SENTINEL_PASSWORD = "data-pass-8431", "sentinel-pass-5520"
SECRETS = {"REDIS_PASSWORD": PASSWORD, "SENTINEL_PASSWORD": SENTINEL_PASSWORD}
ACME, BATCH = {"Authorization": "Bearer acme-key-123456"}, {"Authorization": "Bearer batch-key-123456"}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture(scope="module")
def group_tls(tmp_path_factory: pytest.TempPathFactory) -> ServerTLS:
    return make_server_tls(tmp_path_factory.mktemp("group-tls"))


@pytest.fixture(scope="module", params=["sentinel", "cluster"])
def tls_topology(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, group_tls: ServerTLS):
    """Every server TLS only, clients' certificates required, the data nodes (and the sentinels) with a password."""
    dir = tmp_path_factory.mktemp(request.param)
    group = (SentinelGroup(dir, tls=group_tls, sentinels=2, password=PASSWORD, sentinel_password=SENTINEL_PASSWORD)
             if request.param == "sentinel" else ClusterGroup(dir, tls=group_tls, password=PASSWORD))
    try:
        yield request.param, group.start()
    finally:
        group.stop()


def block_config(fake_url: str, topology, tls: ServerTLS, *, ca: Path) -> GatewayConfig:
    """The store as a block (passwords from the environment); tenant ``acme`` limited to 3 a minute."""
    name, group = topology
    where = ({"sentinel": {"hosts": group.hosts, "master": group.SERVICE, "db": 0, "password": "${SENTINEL_PASSWORD}"}}
             if name == "sentinel" else {"cluster": {"nodes": group.nodes}})
    cfg = GatewayConfig(fake_url, default_target="up").store(
        **where, password="${REDIS_PASSWORD}", key_prefix=new_prefix(),
        tls={"ca_file": str(ca), "cert_file": str(tls.client_cert), "key_file": str(tls.client_key)})
    cfg.tenant("acme", api_key="acme-key-123456", rate_limit={"rpm": 3})
    cfg.tenant("batch", api_key="batch-key-123456")
    return cfg.up(auth=NO_AUTH, idempotency={"wait_s": 10})


async def shown(http: aiohttp.ClientSession, port: int) -> str:
    """Everything a gateway shows about itself: probes, metrics, the status page and its data."""
    texts = []
    for path in ("/readyz", "/metrics", "/status.json", "/"):
        async with http.get(f"http://127.0.0.1:{port}{path}") as resp:
            texts.append(await resp.text())
    return "\n".join(texts)


async def test_two_gateways_share_their_state_on_tls_sentinels_or_cluster_written_as_a_block(
        tls_topology, group_tls, cli, fake, gateway, gateway_log) -> None:
    name, _ = tls_topology
    cfg = block_config(fake.url, tls_topology, group_tls, ca=group_tls.ca)
    cli.write("gateway.yaml", cfg)
    port = free_port()
    one = cli.start("--config", "gateway.yaml", "--port", str(port), env=SECRETS, port=port)  # a real process
    await asyncio.to_thread(one.wait_healthy)
    two, two_logs = await gateway(cfg, env=SECRETS)  # and one in this process, from the same file

    async with aiohttp.ClientSession() as http:
        async def call(i: int, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
            if i % 2 == 0:
                async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT, headers=headers) as r:
                    return r.status, dict(r.headers), await r.read()
            async with two.post("/v1/chat/completions", json=CHAT, headers=headers) as r:
                return r.status, dict(r.headers), await r.read()

        async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
            assert resp.status == 200, await resp.text()
        limited = [await call(i, ACME) for i in range(4)]  # 3 a minute, counted in the store by both gateways
        assert [status for status, _, _ in limited] == [200, 200, 200, 429]
        assert [h["X-RateLimit-Remaining"] for _, h, _ in limited] == ["2", "1", "0", "0"]

        fake.plan(Fault(delay_ms=300))  # duplicates on both gateways wait for one run (a flight, over pub/sub)
        key = {**BATCH, "Idempotency-Key": f"order-{name}"}
        runs = await asyncio.gather(*(call(i, key) for i in range(4)))
        assert [status for status, _, _ in runs] == [200] * 4 and len({body for _, _, body in runs}) == 1
        assert len(fake.requests) == 3 + 1
        assert (await call(1, key))[1].get("Idempotent-Replayed") == "true"

        seen = await shown(http, port)
    assert f"rediss+{name}://:***@127.0.0.1:" in one.output  # the startup line names the store, masked
    for secret in SECRETS.values():
        assert secret not in one.output + seen + str(two_logs) + "".join(gateway_log.text)


async def test_a_wrong_ca_or_no_client_certificate_for_tls_sentinels_or_cluster_is_a_clear_error(
        tls_topology, group_tls, cli, fake, tmp_path: Path) -> None:
    """At ``--check`` (exit 2, not "not reachable now"), and at startup: logged once, ``/readyz``'s reason."""
    no_cert = block_config(fake.url, tls_topology, group_tls, ca=group_tls.ca).store(tls={"ca_file": str(group_tls.ca)})
    cli.write("no-cert.yaml", no_cert)
    refused = cli.run("--check", "--config", "no-cert.yaml", env=SECRETS)
    assert refused.returncode == 2, refused.stderr
    assert re.search(r"store: .*TLS: (sentinel|Redis) at 127\.0\.0\.1:\d+: the server refused the connection \(\w+\); "
                     r"check the client certificate "
                     r"\(ssl_certfile, tls.cert_file in a store block\)", refused.stderr), refused.stderr
    other_ca, _ = make_ca(tmp_path, "not-the-servers-ca")
    cli.write("gateway.yaml", block_config(fake.url, tls_topology, group_tls, ca=other_ca))
    checked = cli.run("--check", "--config", "gateway.yaml", env=SECRETS)
    assert checked.returncode == 2, checked.stderr
    assert re.search(r"store: .*TLS: .*: the server's certificate was not accepted \(.*\); check ssl_ca_certs "
                     r"\(tls.ca_file in a store block\)", checked.stderr), checked.stderr
    port = free_port()
    gw = cli.start("--config", "gateway.yaml", "--port", str(port), env=SECRETS, port=port)
    await asyncio.to_thread(gw.wait_healthy)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
            status, body = resp.status, await resp.json()
        seen = await shown(http, port)
    assert status == 503 and "certificate was not accepted" in body["reason"], body
    assert any("refuses the gateway" in m and "certificate was not accepted" in m for m in gw.messages()), gw.output
    for secret in SECRETS.values():
        assert secret not in refused.stderr + checked.stdout + checked.stderr + gw.output + seen


async def test_a_reset_before_any_answer_is_diagnosed_by_listening_for_the_servers_alert(tls_redis) -> None:
    """TLS 1.3 refuses a missing client certificate only after the handshake; a command already sent can turn
    that alert into a bare reset. The diagnosis connects once more and listens: the alert then arrives whole."""
    import ssl

    from gateway.store import failures

    redis, (ca, _), tmp_path = tls_redis
    no_cert = ssl.create_default_context(cafile=str(ca))
    refused = await failures.closed_early("127.0.0.1", redis.tls_port, no_cert, who="Redis at here")
    assert refused is not None and "Redis at here: the server refused the connection" in str(refused)
    assert "check the client certificate" in str(refused)
    client = make_cert(tmp_path, "client-ok", (ca, tmp_path / "test-ca.key"), san="DNS:client")
    with_cert = ssl.create_default_context(cafile=str(ca))
    with_cert.load_cert_chain(str(client[0]), str(client[1]))
    assert await failures.closed_early("127.0.0.1", redis.tls_port, with_cert, who="Redis at here") is None
