"""The ``store:`` section: where the state every gateway instance shares lives (``gateway.store``).

One Redis node is a URL (``url: rediss://…``); Sentinel and Cluster may be written as a block instead::

    store:
      sentinel: {hosts: ["10.0.0.1:26379", "10.0.0.2:26379"], master: mymaster, db: 0}
      # or cluster: {nodes: ["10.0.0.1:7000", "10.0.0.2:7000"]}
      username: app                  # the ACL user on the data nodes
      password: ${REDIS_PASSWORD}
      tls: {ca_file: /etc/reliapi/redis-ca.crt}   # TLS to every node and sentinel

The block is only another spelling of the URL: ``resolve`` writes it into ``url``
(``rediss+sentinel://app:…@10.0.0.1:26379,10.0.0.2:26379/mymaster/0?ssl_ca_certs=…``, by
``gateway.store.url.block_url``) and everything after reads ``url`` alone — one parser, one
``StoreURL``, the same checks, and the same masked display of the password in logs, errors,
``/readyz`` and the status page. ``store_errors`` checks the block field by field first, so an error
names the field the user wrote (``store.sentinel.hosts[1]``), then the URL it stands for.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from gateway.store import StoreURLError, check_store_url
from gateway.store.url import TLSOptions, block_url, check_node


class _Base(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class SentinelBlock(_Base):
    hosts: list[str]  # the sentinels, "host:port" (port 26379 when left out), asked in order
    master: Annotated[str, Meta(min_length=1)]  # the name the sentinels know the primary by (sentinel monitor <master>)
    db: Annotated[int, Meta(ge=0)] = 0
    username: str | None = None  # the sentinels' own ACL user, when they have one (not the data nodes')
    password: str | None = None


class ClusterBlock(_Base):
    nodes: list[str]  # a few seed nodes, "host:port" (port 6379 when left out); the rest are found from them


class StoreTLS(_Base):
    """TLS to every node of the block (and every sentinel); ``tls: {}`` is TLS verified by the system's CAs."""

    ca_file: str | None = None  # PEM bundle of the CA that signed the servers' certificates
    cert_file: str | None = None  # a client certificate, for servers with tls-auth-clients yes
    key_file: str | None = None  # its key, when not in cert_file
    verify: bool = True  # false: no verification at all (tests only)
    check_hostname: bool = True  # false: the certificate need not name the address (the CA must still sign it)


class StoreConfig(_Base):
    """Where shared state lives: ``url``, or a ``sentinel`` / ``cluster`` block (written into ``url`` when the
    config is loaded); messages about it name ``where`` the user wrote it."""

    url: str = "memory://"  # or redis://host:6379/0 …, or a block below (REDIS_URL / --redis-url override both)
    sentinel: SentinelBlock | None = None  # instead of url: the primary that Sentinel names
    cluster: ClusterBlock | None = None  # instead of url: a Redis Cluster
    username: str | None = None  # with a block: the ACL user on the data nodes
    password: str | None = None  # with a block; never shown (logs, errors, /readyz, status page)
    tls: StoreTLS | None = None  # with a block: TLS on every connection; no block here = no TLS
    key_prefix: str = "reliapi"
    fail_open: bool = False  # idempotency and budgets keep serving when the store is down
    # rate limits while the store is down: each instance limits on its own (local), or every
    # request passes (allow), or every limited request gets 503 (deny)
    rate_limit_on_error: Literal["local", "allow", "deny"] = "local"
    # memory:// only: the cache's stored answers held in at most this many MB (the oldest go first); None: 256.
    # On Redis, bound memory with Redis's own maxmemory and an eviction policy
    memory_max_mb: float | None = None

    @property
    def where(self) -> str:
        return "store.url" if self.sentinel is None and self.cluster is None else "store"


# a block's own fields, and where the same goes in a URL
_WITH_A_BLOCK = {"username": "redis://user:password@host", "password": "redis://user:password@host",
                 "tls": "rediss://host?ssl_ca_certs=…"}


def resolve(store: StoreConfig) -> StoreConfig:
    """``store`` with ``url`` written from its block, when it has one (nothing is checked here)."""
    if store.sentinel is None and store.cluster is None:
        return store
    tls = None if store.tls is None else TLSOptions(**msgspec.structs.asdict(store.tls))
    common = dict(username=store.username, password=store.password, tls=tls)
    if store.sentinel is not None:
        s = store.sentinel
        url = block_url("sentinel", s.hosts, service=s.master, db=s.db, sentinel_username=s.username,
                        sentinel_password=s.password, **common)
    else:
        url = block_url("cluster", store.cluster.nodes, **common)  # type: ignore[union-attr]
    return msgspec.structs.replace(store, url=url)


MEMORY_MAX_MB = 256.0  # store.memory_max_mb's default


def memory_max_bytes(store: StoreConfig) -> int:
    return int((MEMORY_MAX_MB if store.memory_max_mb is None else store.memory_max_mb) * 1024 * 1024)


def memory_bound_errors(store: StoreConfig) -> list[str]:
    """``memory_max_mb`` set for a store it does nothing for, or not a size (none: fine)."""
    if store.memory_max_mb is None:
        return []
    if not store.url.lower().startswith("memory:") or store.sentinel is not None or store.cluster is not None:
        return ["store.memory_max_mb: bounds the memory:// store only — on Redis, set Redis's own maxmemory "
                "(docs/RUNBOOK.md, sizing)"]
    if not store.memory_max_mb > 0:
        return [f"store.memory_max_mb: expected a size in MB above 0, got {store.memory_max_mb:g}"]
    return []


def store_errors(store: StoreConfig) -> list[str]:
    """Why the gateway cannot use this ``store:`` section (a resolved one), or nothing. A block given
    with ``url`` too is refused before decoding (``gateway.config.compat``), where both are still told apart."""
    bound = memory_bound_errors(store)
    if bound:
        return bound
    if store.sentinel is not None and store.cluster is not None:
        return ["store: give either sentinel or cluster, not both"]
    if store.sentinel is None and store.cluster is None:
        misplaced = [f"store.{name}: goes with a sentinel or cluster block; with store.url it is part of the URL "
                     f"({how})" for name, how in _WITH_A_BLOCK.items() if getattr(store, name) is not None]
        return misplaced or store_url_errors(store.url, store.key_prefix)
    if store.sentinel is not None:
        field, nodes = "sentinel.hosts", store.sentinel.hosts
    else:
        field, nodes = "cluster.nodes", store.cluster.nodes  # type: ignore[union-attr]
    errors = [] if nodes else [f"store.{field}: give at least one, as host:port"]
    for i, item in enumerate(nodes):
        try:
            check_node(item)
        except StoreURLError as e:
            errors.append(f"store.{field}[{i}]: {e}")
    if store.tls is not None:
        errors += [f"store.tls.{name}: the path is empty (leave {name} out for none)"
                   for name in ("ca_file", "cert_file", "key_file") if getattr(store.tls, name) == ""]
        if store.tls.key_file and not store.tls.cert_file:
            errors.append("store.tls.key_file: needs cert_file (the client certificate it belongs to)")
    return errors or store_url_errors(store.url, store.key_prefix, where=store.where)


def store_url_errors(url: str, key_prefix: str, *, where: str = "store.url") -> list[str]:
    """Why the gateway cannot use this store URL (``gateway.store.url``), or nothing."""
    try:
        check_store_url(url)
    except StoreURLError as e:
        return [f"{where}: {e}"]
    if "{" in key_prefix or "}" in key_prefix:
        return [f"store.key_prefix: {key_prefix!r} has a brace — a Redis Cluster would hash every key by it "
                "(one slot for everything)"]
    return []
