"""The ``store:`` section (gateway/config/store.py): Sentinel and Cluster written as a block mean exactly
the store URL they stand for — the same parsed ``StoreURL`` — and a block the gateway cannot use is a
``--check`` error naming the field and the reason, never the password."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from gateway.store import open_store
from gateway.store.url import StoreURL, parse_store_url
from tests.support.config_helpers import errors_of, load
from tests.support.stores import PrivateRedis
from tests.support.topologies import make_ca, make_cert

PASSWORD = "hunter2-p@ss:w/rd%&?#"  # every character a URL would read as something else
SENTINEL_PASSWORD = "s3nt!nel pw"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    dir = tmp_path_factory.mktemp("pki")
    ca = make_ca(dir, "ca")
    cert, key = make_cert(dir, "client", ca, san="DNS:client")
    return {"CA": str(ca[0]), "CERT": str(cert), "KEY": str(key)}


def store_yaml(store: dict) -> str:
    return yaml.safe_dump({"store": store})


def reading(parsed: StoreURL) -> dict:
    """What a parsed store URL connects with — everything but how it is shown."""
    fields = dataclasses.asdict(dataclasses.replace(parsed, display=""))
    fields["secrets"] = set(parsed.secrets)
    return fields


# block (with {CA}, {CERT}, {KEY} for the test's files) → the URL it stands for
BLOCKS = [
    ({"sentinel": {"hosts": ["10.0.0.1:26379", "[::1]:26380", "s3"], "master": "my master", "db": 2,
                   "username": "watcher", "password": SENTINEL_PASSWORD},
      "username": "app", "password": PASSWORD, "tls": {"ca_file": "{CA}", "check_hostname": False}},
     "rediss+sentinel://app:hunter2-p%40ss%3Aw%2Frd%25%26%3F%23@10.0.0.1:26379,[::1]:26380,s3/my%20master/2"
     "?ssl_ca_certs={CA}&ssl_check_hostname=false&sentinel_username=watcher&sentinel_password=s3nt%21nel%20pw"),
    ({"sentinel": {"hosts": ["s1"], "master": "mymaster"}}, "redis+sentinel://s1/mymaster"),
    ({"sentinel": {"hosts": ["s1:26379"], "master": "mymaster"}, "tls": {}}, "rediss+sentinel://s1:26379/mymaster/0"),
    ({"cluster": {"nodes": ["n1:7000", "n2"]}}, "redis+cluster://n1:7000,n2:6379"),
    ({"cluster": {"nodes": ["n1:7000"]}, "username": "u", "password": PASSWORD,
      "tls": {"cert_file": "{CERT}", "key_file": "{KEY}", "verify": False}},
     "rediss+cluster://u:hunter2-p%40ss%3Aw%2Frd%25%26%3F%23@n1:7000?ssl_certfile={CERT}&ssl_keyfile={KEY}"
     "&ssl_cert_reqs=none"),
]


@pytest.mark.parametrize(("block", "url"), BLOCKS, ids=[u.partition("?")[0] for _, u in BLOCKS])
def test_a_block_reads_exactly_as_the_url_it_stands_for(block: dict, url: str, pki: dict[str, str]) -> None:
    text = store_yaml(block)
    for name, path in pki.items():
        text, url = text.replace("{" + name + "}", path), url.replace("{" + name + "}", path)
    config = load(text)
    assert reading(parse_store_url(config.store.url)) == reading(parse_store_url(url))
    store = open_store(config.store.url, key_prefix="block-test")  # connects nothing
    shown = store.url_for_display
    assert shown.startswith(url.partition("://")[0] + "://") and "hunter2" not in shown
    assert SENTINEL_PASSWORD not in shown and "s3nt" not in shown


def test_the_block_stands_for_the_url_everywhere_after_loading() -> None:
    """The runtime, ``--check``, ``/readyz`` and the status page read ``store.url`` alone: it is the block's URL."""
    config = load(store_yaml({"cluster": {"nodes": ["n1:7000"]}, "password": "${REDIS_PASSWORD}"}),
                  env={"REDIS_PASSWORD": "from-the-env-123"})
    assert parse_store_url(config.store.url).password == "from-the-env-123"
    assert config.store.where == "store" and load("store: {url: memory://}").store.where == "store.url"


BAD_BLOCKS = [
    ({"url": "redis://h:6379/0", "sentinel": {"hosts": ["s1"], "master": "m"}},
     "store.url: give either url or a sentinel block, not both"),
    ({"url": "memory://", "cluster": {"nodes": ["n1"]}}, "store.url: give either url or a cluster block, not both"),
    ({"sentinel": {"hosts": ["s1"], "master": "m"}, "cluster": {"nodes": ["n1"]}},
     "store: give either sentinel or cluster, not both"),
    ({"sentinel": {"hosts": ["s1"]}}, "store.sentinel.master: required"),
    ({"sentinel": {"hosts": ["s1"], "master": ""}}, "store.sentinel.master: expected str of length >= 1"),
    ({"sentinel": {"hosts": ["s1"], "master": "m", "service": "m"}},
     "store.sentinel.service: unknown key (allowed: db, hosts, master, password, username)"),
    ({"sentinel": {"hosts": ["s1"], "master": "m", "db": -1}}, "store.sentinel.db: expected int >= 0"),
    ({"sentinel": {"hosts": [], "master": "m"}}, "store.sentinel.hosts: give at least one, as host:port"),
    ({"sentinel": {"hosts": "s1:26379", "master": "m"}}, "store.sentinel.hosts: expected a list, got str"),
    ({"sentinel": {"hosts": ["s1", "s2/0"], "master": "m"}}, "store.sentinel.hosts[1]: 's2/0' is not host:port"),
    ({"cluster": {"nodes": ["n1:70000"]}}, "store.cluster.nodes[0]: 'n1:70000': the port must be a number 1-65535"),
    ({"cluster": {"nodes": ["a@b:1"]}}, "store.cluster.nodes[0]: 'a@b:1' is not host:port"),
    ({"cluster": {"nodes": ["n1"], "db": 1}}, "store.cluster.db: unknown key (allowed: nodes)"),
    ({"cluster": {"nodes": ["n1"]}, "tls": {"ca": "/ca.pem"}},
     "store.tls.ca: unknown key (allowed: ca_file, cert_file, check_hostname, key_file, verify)"),
    ({"cluster": {"nodes": ["n1"]}, "tls": {"key_file": "/k.pem"}},
     "store.tls.key_file: needs cert_file (the client certificate it belongs to)"),
    ({"cluster": {"nodes": ["n1"]}, "tls": {"ca_file": "/nonexistent/ca.pem"}},
     "store: TLS: the CA file '/nonexistent/ca.pem' cannot be used"),
    ({"url": "redis://h", "password": PASSWORD},
     "store.password: goes with a sentinel or cluster block; with store.url it is part of the URL "
     "(redis://user:password@host)"),
    ({"tls": {"ca_file": "/ca.pem"}}, "store.tls: goes with a sentinel or cluster block"),
    ({"cluster": {"nodes": ["n1"]}, "key_prefix": "{tenant}"}, "store.key_prefix: '{tenant}' has a brace"),
]


@pytest.mark.parametrize(("block", "error"), BAD_BLOCKS, ids=[f"{e.partition(':')[0]} {e[-24:]}" for _, e in BAD_BLOCKS])
def test_a_block_the_gateway_cannot_use_is_an_error_naming_the_field(block: dict, error: str) -> None:
    errors = errors_of(store_yaml(block if "url" in block else {"password": PASSWORD, **block}))
    assert any(e.startswith(error) for e in errors), errors
    assert "hunter2" not in "\n".join(errors)


async def test_check_names_the_block_and_the_refusal_never_the_password(cli) -> None:
    redis = PrivateRedis("--requirepass", "the-right-one-123")
    redis.start()
    try:
        cli.write("gw.yaml", store_yaml({"cluster": {"nodes": [f"127.0.0.1:{redis.port}"]}, "password": PASSWORD}))
        checked = cli.run("--check", "--config", "gw.yaml")
        assert checked.returncode == 2, checked.stderr
        assert "store: redis ping failed: no Cluster node answered CLUSTER SLOTS" in checked.stderr
        assert "WRONGPASS" in checked.stderr and "hunter2" not in checked.stdout + checked.stderr
        # --redis-url / REDIS_URL replace the file's block, as they replace its url
        overridden = cli.run("--check", "--config", "gw.yaml", env={"REDIS_URL": redis.url.replace(
            "redis://", "redis://:the-right-one-123@")})
        assert overridden.returncode == 0 and "warning" not in overridden.stderr, overridden.stderr
    finally:
        redis.stop()


def test_the_examples_show_the_block_beside_the_url() -> None:
    text = (Path(__file__).resolve().parents[1] / "examples" / "config.yaml").read_text()
    shown = ("  # sentinel:", "  #            username:", "  # username:", "  # password:")
    block = "\n".join(line.replace("  # ", "  ", 1) for line in text.splitlines() if line.startswith(shown))
    config = load(f"store:\n{block}\n", env={"SENTINEL_PASSWORD": "sp-123456", "REDIS_PASSWORD": "rp-123456"})
    assert config.store.url.startswith("redis+sentinel://app:rp-123456@10.0.0.1:26379,10.0.0.2:26379/mymaster/0")
