"""Store URLs (gateway/store/url.py): one reading for commands and pub/sub, every topology, and bad
input refused with its reason — by ``open_store``, by ``--check`` and at startup — never ignored."""

from __future__ import annotations

import ssl
from typing import Any

import pytest

from gateway.store import StoreURLError, check_store_url, open_store
from gateway.store.redis import RedisStore
from gateway.store.url import parse_store_url

# url → topology, nodes, unix path, db, username, password, TLS (verify, check hostname) or None, service
STORE_URLS: list[tuple[str, tuple[Any, ...]]] = [
    ("redis://cache.internal:6380/2", ("single", [("cache.internal", 6380)], None, 2, None, None, None, None)),
    ("redis://:pw@/3", ("single", [("localhost", 6379)], None, 3, None, "pw", None, None)),
    ("redis://alice:p%40ss%3Aw0rd@h:1/0", ("single", [("h", 1)], None, 0, "alice", "p@ss:w0rd", None, None)),
    ("redis://:only%2Fpass@h", ("single", [("h", 6379)], None, 0, None, "only/pass", None, None)),
    ("redis://h?username=bob&password=s%26cret", ("single", [("h", 6379)], None, 0, "bob", "s&cret", None, None)),
    ("redis://[::1]:6390/4", ("single", [("::1", 6390)], None, 4, None, None, None, None)),
    ("rediss://[::1]/1", ("single", [("::1", 6379)], None, 1, None, None, (True, True), None)),
    ("rediss://r.example:6380?ssl_cert_reqs=none", ("single", [("r.example", 6380)], None, 0, None, None,
                                                    (False, False), None)),
    ("rediss://r?ssl_check_hostname=false", ("single", [("r", 6379)], None, 0, None, None, (True, False), None)),
    ("unix:///run/redis/redis.sock?db=1", ("single", [], "/run/redis/redis.sock", 1, None, None, None, None)),
    ("unix://carol:pw@/run/my%20redis.sock?db=5", ("single", [], "/run/my redis.sock", 5, "carol", "pw", None, None)),
    ("redis+sentinel://s1:26379,s2/mymaster/2", ("sentinel", [("s1", 26379), ("s2", 26379)], None, 2, None, None,
                                                 None, "mymaster")),
    ("rediss+sentinel://app:pw@s1/main?sentinel_password=x", ("sentinel", [("s1", 26379)], None, 0, "app", "pw",
                                                              (True, True), "main")),
    ("redis+cluster://n1:7000,n2:7001,[::1]:7002", ("cluster", [("n1", 7000), ("n2", 7001), ("::1", 7002)], None, 0,
                                                   None, None, None, None)),
    ("rediss+cluster://u:p@n1:7000/0", ("cluster", [("n1", 7000)], None, 0, "u", "p", (True, True), None)),
]


@pytest.mark.parametrize(("url", "expected"), STORE_URLS, ids=[u for u, _ in STORE_URLS])
async def test_every_topology_is_read_once_for_commands_and_pub_sub(url: str, expected: tuple[Any, ...]) -> None:
    parsed = parse_store_url(url)
    tls = None if parsed.tls is None else (parsed.tls.verify, parsed.tls.check_hostname)
    assert (parsed.topology, list(parsed.nodes), parsed.path, parsed.db, parsed.username, parsed.password, tls,
            parsed.service) == expected
    store = RedisStore(url, key_prefix="url-test")  # connects nothing
    try:
        if parsed.topology == "single":  # commands and the pub/sub connection: one endpoint, one context
            assert store._router.client.endpoint == await store._router.pubsub_endpoint()
            context = store._router.client.endpoint.ssl
            assert (context is None) == (tls is None)
            if context is not None:
                assert (context.verify_mode == ssl.CERT_REQUIRED, context.check_hostname) == tls
    finally:
        await store.close()


BAD_URLS = [
    ("http://localhost:6379", "unsupported store URL scheme http://"),
    ("redis://h:6379/0?socket_timeout=5", "option socket_timeout is not an option the gateway reads"),
    ("redis://h?db=1&db=2", "option db is given twice"),
    ("redis://h/not-a-db", "the database must be a number, got 'not-a-db'"),
    ("redis://h?ssl_ca_certs=/ca.pem", "option ssl_ca_certs is for TLS: use rediss://"),
    ("redis://h?sentinel_password=x", "option sentinel_password is for redis\\+sentinel://"),
    ("rediss://h?ssl_cert_reqs=optional", "ssl_cert_reqs: expected required or none"),
    ("rediss://h?ssl_keyfile=/k.pem", "ssl_keyfile needs ssl_certfile"),
    ("rediss://h?ssl_ca_certs=/nonexistent/ca.pem", "TLS: the CA file '/nonexistent/ca.pem' cannot be used"),
    ("rediss://h?ssl_certfile=/nonexistent/c.pem&ssl_keyfile=/k.pem",
     "TLS: the client certificate '/nonexistent/c.pem' with the key '/k.pem' cannot be used"),
    ("redis://h1,h2:6380", "several hosts are for redis\\+sentinel:// or redis\\+cluster://"),
    ("redis://h:99999", "the port must be a number 1-65535"),
    ("redis+sentinel://s1:26379", "needs the primary's name"),
    ("redis+cluster://n1:7000/3", "a Redis Cluster has database 0 only, not 3"),
    ("unix://host/run/r.sock", "unix:// takes a socket path, not a host"),
    ("memory://somewhere", "memory:// takes no host"),
    ("redis://h/2?db=3", "the database is given twice, as /2 and as \\?db="),
    ("redis+sentinel://s1:26379/mymaster/2?db=3", "the database is given twice"),
    ("redis://u:from-userinfo@h?password=from-query", "the password is given twice"),
    ("redis://u:pw@h?username=bob", "the username is given twice"),
]


@pytest.mark.parametrize(("url", "reason"), BAD_URLS, ids=[u for u, _ in BAD_URLS])
def test_a_url_the_gateway_cannot_use_is_refused_with_the_reason(url: str, reason: str) -> None:
    with pytest.raises(StoreURLError, match=reason):
        check_store_url(url)


def test_a_refusal_never_shows_the_password() -> None:
    for url in ["redis://:hunter22@h:6379/x", "redis://u:hunter22@h?bogus=1", "redis://h?password=hunter22&x=1"]:
        with pytest.raises(StoreURLError) as info:
            open_store(url)
        assert "hunter22" not in str(info.value)


@pytest.mark.parametrize("url", [
    "redis://app:FullSecret9Kq/@127.0.0.1:23100/0", "redis://:Q?FullSecret9Kq@127.0.0.1:23100/0",
    "redis://127.0.0.1:23100/0?password=Ab&Secret9Kq", "redis+sentinel://h:1,h2:2/m/0?sentinel_password=Ab&Secret9Kq",
    "redis+cluster://app:Full#Secret9Kq@h:1,h2:2", "redis://app:Xy/Secret9Kq-q@h:1/0?bogus=1",
])
def test_a_password_whose_slash_question_mark_or_ampersand_broke_the_url_is_never_quoted(url: str) -> None:
    """Generated passwords hold ``/ ? & #``; not percent-encoded, they cut the URL elsewhere, and the part of the
    password after the cut was quoted as a host, a port or an option's name."""
    with pytest.raises(StoreURLError) as info:
        check_store_url(url)
    assert "Secret9Kq" not in str(info.value) and "Full" not in str(info.value), info.value
    assert "percent-encode" in str(info.value) or "option bogus" in str(info.value)


def test_check_reports_a_bad_store_url_and_its_reason(cli) -> None:
    """``--check`` (and the server, which checks the same way): exit 2 and the reason; also for a URL from
    --redis-url / REDIS_URL, which no config file names."""
    result = cli.run("--check", "--redis-url", "redis://:hunter22@127.0.0.1:6379/0?retry_on_timeout=yes")
    assert result.returncode == 2
    assert "option retry_on_timeout is not an option the gateway reads" in result.stderr
    assert "hunter22" not in result.stderr + result.stdout
