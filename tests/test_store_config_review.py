"""The black-box review of the store configuration (URL forms and the ``store:`` block): each finding, against
real redis-server processes of the test's own (loopback ports, stopped by PID) and the real CLI.

Host names the resolver cannot encode are config errors (not a traceback at --check, startup or reload); a
password never shows, and is never "masked" into free text either; a cluster block on a sentinel and a master
no sentinel knows are --check errors; a TLS/plain mismatch is said as such; every message names the node."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from gateway.store import StoreError, StoreMisconfigured, open_store, probe_store
from gateway.store.redis import RedisStore
from gateway.store.resp import Endpoint, RespClient
from gateway.store.url import address, block_url, parse_store_url
from tests.support.cli_harness import CLI, assert_no_traceback, free_port, get_json
from tests.support.config_helpers import errors_of
from tests.support.stores import PrivateRedis, new_prefix
from tests.support.topologies import Proc, TLSRedis, cluster_port, make_ca, make_cert

HEAD = "server: {host: 127.0.0.1, port: %d}\ntargets: {echo: {base_url: 'http://127.0.0.1:9/'}}\nstore:\n"


def config(block: str, port: int = 18731) -> str:
    return HEAD % port + "".join(f"  {line}\n" for line in block.strip().splitlines())


def dead_port() -> int:
    return free_port()  # nothing listens there


# ------------------------------------------------------------------- 1. host names the resolver cannot encode

BAD_HOSTS = ["a..b:7000", "...", "a" * 64 + ".example:7000", "-a.example", "[not-v6]:1"]


@pytest.mark.parametrize("node", BAD_HOSTS)
def test_a_host_name_the_resolver_cannot_encode_is_an_error_naming_the_field(node: str) -> None:
    errors = errors_of(config(f"cluster: {{nodes: ['{node}']}}"))
    assert any(e.startswith("store.cluster.nodes[0]: ") and repr(node) in e for e in errors), errors
    errors = errors_of(config(f"sentinel: {{hosts: ['127.0.0.1:26379', '{node}'], master: m}}"))
    assert any(e.startswith("store.sentinel.hosts[1]: ") for e in errors), errors


def test_the_url_form_is_checked_by_the_same_parser() -> None:
    assert errors_of(config("url: 'redis://a..b:1/0'")) == ["store.url: 'a..b:1' is not a valid host name"]
    for good in ("redis://10.0.0.1:1/0", "redis://[::1]:1/0", "redis://cache_1.internal.:1/0", "redis://h/0"):
        parse_store_url(good)
    assert errors_of(config("cluster: {nodes: ['a..b:7000']}")) == [
        "store.cluster.nodes[0]: 'a..b:7000' is not a valid host name"]


def test_check_refuses_such_a_host_from_the_command_line_too(cli: CLI) -> None:
    cli.write("gw.yaml", config("url: memory://"))
    checked = cli.run("--check", "--config", "gw.yaml", "--redis-url", "redis://a..b:1/0")
    assert checked.returncode == 2, checked.stderr
    assert "--redis-url: 'a..b:1' is not a valid host name" in checked.stderr
    assert_no_traceback(checked.stderr)
    checked = cli.run("--check", "--config", "gw.yaml", env={"REDIS_URL": "redis://.../0"})
    assert checked.returncode == 2 and "REDIS_URL: '...' is not a valid host name" in checked.stderr, checked.stderr


async def test_a_host_the_resolver_cannot_encode_is_a_store_error_at_connect_never_a_crash() -> None:
    """Defence in depth: whatever gets past the parser (a sentinel may name any host) is a ConnectionError."""
    client = RespClient(Endpoint(host="a..b", port=1), connect_timeout_s=1, timeout_s=1)
    try:
        with pytest.raises(ConnectionError, match=r"cannot connect to Redis at a\.\.b:1: the host name cannot"):
            await client.execute("PING")
    finally:
        await client.close()


async def test_a_reload_onto_such_a_host_is_rejected_with_the_field_not_a_500(cli: CLI) -> None:
    port = free_port()
    cli.write("gw.yaml", config("url: memory://", port))
    gw = cli.start("--config", "gw.yaml", port=port)
    await asyncio.to_thread(gw.wait_healthy)
    cli.write("gw.yaml", config("cluster: {nodes: ['a..b:7000']}", port))
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{port}/admin/reload") as resp:
            body = await resp.json()
    assert resp.status < 500, body
    assert "store.cluster.nodes[0]: 'a..b:7000' is not a valid host name" in str(body)
    gw.proc.send_signal(signal.SIGHUP)
    await asyncio.sleep(1)
    assert gw.terminate() == 0
    assert "Task exception was never retrieved" not in gw.output and "Unclosed client session" not in gw.output
    assert_no_traceback(gw.stderr)


# --------------------------------------------------- 2. a password never shows, and is never masked into free text

@pytest.mark.parametrize("password", ["Connect", "1", "redis", "refused", "ion"])
@pytest.mark.parametrize("form", ["url", "block"])
async def test_a_password_that_is_also_ordinary_text_leaves_every_message_intact(cli: CLI, password: str,
                                                                                 form: str) -> None:
    redis_port, port = dead_port(), free_port()
    if form == "url":
        block, shown = f"url: 'redis://:{password}@127.0.0.1:{redis_port}/0'", f"redis://:***@127.0.0.1:{redis_port}/0"
        why = f"redis ping failed: cannot connect to Redis at 127.0.0.1:{redis_port}: Connection refused"
    else:
        block = f"cluster: {{nodes: ['127.0.0.1:{redis_port}']}}\npassword: '{password}'"
        shown = f"redis+cluster://:***@127.0.0.1:{redis_port}"
        why = (f"redis ping failed: no Cluster node answered CLUSTER SLOTS: cannot connect to Redis at "
               f"127.0.0.1:{redis_port}: Connection refused")
    cli.write("gw.yaml", config(block, port))
    checked = cli.run("--check", "--config", "gw.yaml")
    where = "store.url" if form == "url" else "store"
    assert checked.returncode == 0, checked.stderr
    assert f"warning: {where}: not reachable now, not checked further: {why}\n" in checked.stderr, checked.stderr
    gw = cli.start("--config", "gw.yaml", port=port)
    await asyncio.to_thread(gw.wait_healthy)
    status, ready = await asyncio.to_thread(get_json, port, "/readyz")
    assert status == 503 and ready["reason"] == f"store unavailable ({shown}): {why}", ready
    status, page = await asyncio.to_thread(get_json, port, "/status.json")
    assert page["store"] == {"backend": "redis", "url": shown, "healthy": False, "error": why}, page["store"]
    assert gw.terminate() == 0
    assert f"store {shown} is not answering: {why}" in gw.messages(), gw.messages()
    # the texts are exactly as above: nothing masked into them, no password, no Python class name
    assert "***ion" not in gw.output and "Error:" not in gw.output and "Error:" not in checked.stderr


def test_a_secret_a_server_quotes_back_is_cut_off_and_never_substituted_in_free_text() -> None:
    store = open_store("redis://:Connect@127.0.0.1:1/0")
    echoed = ConnectionError("ERR unknown command 'AUTH', with args beginning with: 'Connect'")
    assert str(store._error("ping", echoed)) == "redis ping failed: ERR unknown command 'AUTH'"
    text = str(store._error("ping", ConnectionError("cannot connect to Redis at 127.0.0.1:1: Connection refused")))
    assert text == "redis ping failed: cannot connect to Redis at 127.0.0.1:1: Connection refused"
    long = open_store("redis://:long-enough-pw@127.0.0.1:1/0")  # exact quoted forms of a long one: masked
    assert "long-enough-pw" not in str(long._error("ping", ConnectionError("odd 'long-enough-pw' and :long-enough-pw@")))


# ------------------------------------------------------------------ 3, 4 and the node names: Sentinel and Cluster

@pytest.fixture
def sentinel(tmp_path: Path):
    """A data node (password data-pass-123) and one sentinel (password sentinel-pw-123) watching it as mymaster."""
    data = PrivateRedis("--requirepass", "data-pass-123")
    data.start()
    procs: list[Proc] = []
    try:
        procs.append(Proc(tmp_path, free_port(), [f"sentinel monitor mymaster 127.0.0.1 {data.port} 1",
                                                  "sentinel auth-pass mymaster data-pass-123",
                                                  "requirepass sentinel-pw-123"],
                          sentinel=True, password="sentinel-pw-123"))
        yield data, procs[0].port
    finally:
        for proc in procs:
            proc.kill()
        data.stop()


def sentinel_block(*ports: int, master: str = "mymaster", password: str = "data-pass-123",
                   sentinel_password: str = "sentinel-pw-123") -> str:
    hosts = ", ".join(f"'127.0.0.1:{p}'" for p in ports)
    return f"sentinel: {{hosts: [{hosts}], master: {master}, password: '{sentinel_password}'}}\npassword: '{password}'"


def test_a_cluster_block_on_a_sentinel_is_a_check_error(cli: CLI, sentinel) -> None:
    _, port = sentinel
    cli.write("gw.yaml", config(f"cluster: {{nodes: ['127.0.0.1:{port}']}}\npassword: sentinel-pw-123"))
    checked = cli.run("--check", "--config", "gw.yaml")
    assert checked.returncode == 2, checked.stderr
    assert (f"store: redis ping failed: 127.0.0.1:{port} is not a Redis Cluster node (ERR unknown command "
            "'CLUSTER')") in checked.stderr, checked.stderr


def test_a_master_no_sentinel_knows_is_a_check_error_unless_none_answered(cli: CLI, sentinel) -> None:
    _, port = sentinel
    dead = dead_port()
    cli.write("gw.yaml", config(sentinel_block(dead, port, master="nosuch")))
    checked = cli.run("--check", "--config", "gw.yaml")
    assert checked.returncode == 2, checked.stderr
    assert f"no sentinel knows a primary named 'nosuch' (asked: 127.0.0.1:{port})" in checked.stderr, checked.stderr
    cli.write("gw.yaml", config(sentinel_block(dead, master="nosuch")))
    checked = cli.run("--check", "--config", "gw.yaml")
    assert checked.returncode == 0, checked.stderr
    assert (f"warning: store: not reachable now, not checked further: redis ping failed: no sentinel named the "
            f"primary 'nosuch': cannot connect to sentinel at 127.0.0.1:{dead}: Connection refused\n") in checked.stderr
    assert checked.stderr.count("cannot connect") == 1 and "Error" not in checked.stderr


async def test_a_refusal_behind_a_sentinel_says_which_node_refused(sentinel) -> None:
    data, port = sentinel
    wrong_data = block_url("sentinel", [f"127.0.0.1:{port}"], service="mymaster", password="wrong-pass-123",
                           sentinel_password="sentinel-pw-123")
    with pytest.raises(StoreMisconfigured, match=rf"the primary at 127\.0\.0\.1:{data.port} \(named by the "
                                                 r"sentinels\) refused the connection: WRONGPASS"):
        await probe_store(wrong_data)
    wrong_sentinel = block_url("sentinel", [f"127.0.0.1:{port}"], service="mymaster", password="data-pass-123",
                               sentinel_password="wrong-pass-123")
    with pytest.raises(StoreMisconfigured, match=rf"sentinel at 127\.0\.0\.1:{port} refused the connection: "
                                                 "WRONGPASS"):
        await probe_store(wrong_sentinel)


# ------------------------------------------------------------------------------------ 5. an empty block

@pytest.mark.parametrize("block", ["cluster", "sentinel"])
def test_an_empty_block_is_an_error_not_the_memory_store(block: str) -> None:
    assert errors_of(HEAD % 18731 + f"  {block}:\n") == [f"store.{block}: expected a mapping, got null"]


# ------------------------------------------------------------------ 6. REDIS_URL / --redis-url replace a block

async def test_redis_url_replacing_a_block_is_said_at_check_and_at_startup(cli: CLI) -> None:
    redis_port, port = dead_port(), free_port()
    cli.write("gw.yaml", config("cluster: {nodes: ['n1:7000']}\npassword: file-secret-123", port))
    for args, env, given in (((), {"REDIS_URL": f"redis://:env-secret-123@127.0.0.1:{redis_port}/0"}, "REDIS_URL"),
                             (("--redis-url", f"redis://127.0.0.1:{redis_port}/0"), None, "--redis-url")):
        checked = cli.run("--check", "--config", "gw.yaml", *args, env=env)
        assert checked.returncode == 0, checked.stderr
        assert f"environment: {given} replaces store.cluster (with its username, password and tls)" in checked.stderr
        assert "secret-123" not in checked.stderr
    gw = cli.start("--config", "gw.yaml", env={"REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}, port=port)
    await asyncio.to_thread(gw.wait_healthy)
    assert gw.terminate() == 0
    assert any(m.startswith("environment: REDIS_URL replaces store.cluster") for m in gw.messages()), gw.messages()


# ------------------------------------------------------------------------------- 7. TLS on one side only

@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[Path, Path]]:
    dir = tmp_path_factory.mktemp("review-pki")
    return dir, make_ca(dir, "ca")


def test_tls_against_a_plain_server_and_plain_against_a_tls_one_are_check_errors(cli: CLI, pki) -> None:
    dir, ca = pki
    plain, tls = PrivateRedis(), TLSRedis(dir, ca)
    plain.start()
    tls.start()
    try:
        cli.write("gw.yaml", config(f"cluster: {{nodes: ['127.0.0.1:{plain.port}']}}\ntls: {{ca_file: '{ca[0]}'}}"))
        checked = cli.run("--check", "--config", "gw.yaml")
        assert checked.returncode == 2, checked.stderr
        assert f"Redis at 127.0.0.1:{plain.port} answers without TLS: it does not speak TLS on this port" \
            in checked.stderr, checked.stderr
        for block in (f"cluster: {{nodes: ['127.0.0.1:{tls.tls_port}']}}", f"url: redis://127.0.0.1:{tls.tls_port}/0"):
            cli.write("gw.yaml", config(block))
            checked = cli.run("--check", "--config", "gw.yaml")
            assert checked.returncode == 2, checked.stderr
            assert f"Redis at 127.0.0.1:{tls.tls_port} speaks TLS on this port: use rediss://" in checked.stderr
            assert "reset by peer" not in checked.stderr
    finally:
        plain.stop()
        tls.stop()


def test_a_tls_port_that_never_answers_stays_not_reachable_with_a_hint(cli: CLI, pki) -> None:
    _, ca = pki
    with socket.socket() as silent:  # accepts (the backlog) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        cli.write("gw.yaml", config(f"url: 'rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca[0]}'"))
        checked = cli.run("--check", "--config", "gw.yaml")
    assert checked.returncode == 0, checked.stderr
    assert (f"not reachable now, not checked further: redis ping failed: Redis at 127.0.0.1:{port} did not accept a "
            "connection within 1s (does the server speak TLS on this port?)") in checked.stderr, checked.stderr


# ------------------------------------------------------------------------------- 8. lone surrogates

@pytest.mark.parametrize(("field", "yaml_block"), [
    ("store.password", 'cluster: {nodes: [n1]}\npassword: "\\ud800secret-xyz"'),
    ("store.username", 'cluster: {nodes: [n1]}\nusername: "\\udfffsecret-xyz"'),
    ("store.sentinel.master", 'sentinel: {hosts: [s1], master: "\\ud800secret-xyz"}'),
    ("store.sentinel.password", 'sentinel: {hosts: [s1], master: m, password: "secret-xyz\\ud800"}'),
    ("store.url", 'url: "redis://:\\ud800secret-xyz@h/0"'),
])
def test_a_lone_surrogate_is_an_error_naming_the_field_without_the_value(field: str, yaml_block: str) -> None:
    errors = errors_of(config(yaml_block))
    assert errors == [f"{field}: holds a character that is not valid text (a lone surrogate such as \\ud800; the "
                      "value is not shown)"], errors


async def test_a_reload_onto_a_lone_surrogate_is_rejected_not_a_500(cli: CLI) -> None:
    port = free_port()
    cli.write("gw.yaml", config("url: memory://", port))
    gw = cli.start("--config", "gw.yaml", port=port)
    await asyncio.to_thread(gw.wait_healthy)
    cli.write("gw.yaml", config('cluster: {nodes: [n1]}\npassword: "\\ud800x-secret"', port))
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{port}/admin/reload") as resp:
            body = await resp.json()
    assert resp.status < 500 and "store.password: holds a character that is not valid text" in str(body), body
    assert gw.terminate() == 0
    assert "x-secret" not in gw.output
    assert_no_traceback(gw.stderr)


# ------------------------------------------------------------------------------- the smaller findings

async def test_an_ipv6_node_prints_in_brackets() -> None:
    assert address("::1", 7000) == "[::1]:7000" and address("10.0.0.1", 1) == "10.0.0.1:1"
    port = dead_port()
    store = open_store(f"redis://[::1]:{port}/0")
    try:
        with pytest.raises(StoreError, match=rf"cannot connect to Redis at \[::1\]:{port}: "):
            await store.ping()
    finally:
        await store.close()


def test_a_client_certificate_without_its_key_says_give_key_file(pki) -> None:
    dir, ca = pki
    cert, _ = make_cert(dir, "client-no-key", ca, san="DNS:client")
    errors = errors_of(config(f"cluster: {{nodes: [n1]}}\ntls: {{cert_file: '{cert}'}}"))
    assert any(f"the client certificate '{cert}' holds no private key: give its key file (tls.key_file" in e
               for e in errors), errors


@pytest.mark.parametrize("name", ["ca_file", "cert_file", "key_file"])
def test_an_empty_tls_path_is_an_error_not_the_system_cas(name: str) -> None:
    tls = {"ca_file": "''", "cert_file": "''", "key_file": "''"}[name]
    errors = errors_of(config(f"cluster: {{nodes: [n1]}}\ntls: {{{name}: {tls}}}"))
    assert f"store.tls.{name}: the path is empty (leave {name} out for none)" in errors, errors


def test_the_display_url_shows_tls_paths_readable_and_secrets_masked() -> None:
    from gateway.store.url import TLSOptions

    url = block_url("cluster", ["n1:7000"], password="p w/secret", tls=TLSOptions(ca_file="/etc/my certs/ca+1.pem"),
                    sentinel_password=None)
    shown = parse_store_url(url).display
    assert shown == "rediss+cluster://:***@n1:7000?ssl_ca_certs=/etc/my certs/ca+1.pem", shown


async def test_a_reload_that_changes_the_store_says_so(cli: CLI) -> None:
    port, redis_port = free_port(), dead_port()
    cli.write("gw.yaml", config("url: memory://", port))
    gw = cli.start("--config", "gw.yaml", port=port)
    await asyncio.to_thread(gw.wait_healthy)
    cli.write("gw.yaml", config(f"url: 'redis://:pw-123456@127.0.0.1:{redis_port}/0'", port))
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{port}/admin/reload") as resp:
            assert resp.status == 200, await resp.text()
    deadline = time.monotonic() + 5
    while not any("config reloaded" in m for m in gw.messages()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert gw.terminate() == 0
    reloaded = [m for m in gw.messages() if m.startswith("config reloaded")]
    assert reloaded and reloaded[0].endswith(f"; store now redis://:***@127.0.0.1:{redis_port}/0)"), reloaded


async def test_a_redis_url_at_a_replica_a_cluster_node_or_a_sentinel_is_refused_naming_what_it_is(tmp_path, sentinel):
    """Each would take some commands and refuse others: ready, then requests failing one by one (a review found
    --check passing and /readyz ready). Said at --check, at start and on /readyz, with what to write instead."""
    primary = PrivateRedis()
    primary.start()
    replica = PrivateRedis("--replicaof", "127.0.0.1", str(primary.port))
    node = PrivateRedis("--cluster-enabled", "yes", "--cluster-config-file", str(tmp_path / "nodes.conf"))
    node.port = cluster_port()  # (its cluster bus, port + 10000, must be free and a port too)
    node.url = f"redis://127.0.0.1:{node.port}/0"
    replica.start()
    node.start()
    _, sentinel_port = sentinel
    try:
        assert await probe_store(primary.url) is None  # a standalone primary: fine
        cases = [(replica.url, "is a read-only replica"), (node.url, "is a Redis Cluster node: write redis+cluster://"),
                 (f"redis://:sentinel-pw-123@127.0.0.1:{sentinel_port}/0", "is a Sentinel, not a Redis server")]
        for url, said in cases:
            with pytest.raises(StoreMisconfigured, match=re.escape(said)):
                await probe_store(url)
    finally:
        for server in (node, replica, primary):
            server.stop()



async def test_a_replica_or_cluster_node_an_acl_user_cannot_ask_role_of_is_refused_at_its_first_refusal(tmp_path):
    """The RUNBOOK's ACL user may lack ROLE: the node cannot be told at connect, so its first READONLY or MOVED
    says what it is — once, as a refusal /readyz shows — rather than every command failing on its own."""
    acl = ["--user", "default", "off", "--user", "app", "on", ">app-pw-123456", "~*", "&*", "+@all", "-role", "-info"]
    primary = PrivateRedis(*acl)
    primary.start()
    replica = PrivateRedis("--replicaof", "127.0.0.1", str(primary.port), "--masteruser", "app",
                           "--masterauth", "app-pw-123456", *acl)
    node = PrivateRedis("--cluster-enabled", "yes", "--cluster-config-file", str(tmp_path / "nodes.conf"), *acl)
    node.port = cluster_port()
    replica.start()
    node.start()
    try:
        node_cli = ["redis-cli", "-p", str(node.port), "--user", "app", "--pass", "app-pw-123456", "--no-auth-warning"]
        subprocess.run([*node_cli, "CLUSTER", "ADDSLOTSRANGE", "0", "0"], check=True, capture_output=True)
        for server, said in ((replica, "is a read-only replica"), (node, "is a Redis Cluster node")):
            store = RedisStore(f"redis://app:app-pw-123456@127.0.0.1:{server.port}/0", key_prefix=new_prefix())
            try:
                assert await probe_store(f"redis://app:app-pw-123456@127.0.0.1:{server.port}/0") is None
                with pytest.raises(StoreMisconfigured, match=re.escape(said)):
                    await store.set("k", b"v")  # (the key "k" is in no slot this node serves)
                with pytest.raises(StoreMisconfigured, match=re.escape(said)):
                    await store.ping()  # what /readyz asks: the same refusal, not "ready"
            finally:
                await store.close()
    finally:
        for server in (node, replica, primary):
            server.stop()

def test_check_asks_every_sentinel_not_only_the_first_that_answers(cli: CLI, sentinel) -> None:
    """A second sentinel that is no sentinel (or refuses the password) is found at --check, not at a failover."""
    _, port = sentinel
    plain = PrivateRedis()
    plain.start()
    try:
        cli.write("gw.yaml", config(sentinel_block(port, plain.port)))
        checked = cli.run("--check", "--config", "gw.yaml")
        assert checked.returncode == 2, checked.stderr
        assert f"127.0.0.1:{plain.port}" in checked.stderr, checked.stderr
        assert_no_traceback(checked.stderr)
        cli.write("gw.yaml", config(sentinel_block(port)))
        assert cli.run("--check", "--config", "gw.yaml").returncode == 0
    finally:
        plain.stop()
