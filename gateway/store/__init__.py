"""Shared state for the policies; the backend is chosen by the store URL.

``memory://`` keeps everything in this process; ``redis://``, ``rediss://``, ``unix://``,
``redis+sentinel://`` and ``redis+cluster://`` put it in Redis so that any number of gateway
instances act as one (``gateway.store.url`` reads them all).
"""

from __future__ import annotations

from gateway.store.base import Claim, Store, StoreError, StoreMisconfigured, Subscription, Take, TakeResult, Write
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore
from gateway.store.url import StoreURLError, parse_store_url

__all__ = ["Claim", "Store", "StoreError", "Subscription", "Take", "TakeResult", "Write", "open_store", "check_store_url", "probe_store",
           "StoreURLError", "StoreMisconfigured"]



def check_store_url(url: str) -> None:
    """Raise ``StoreURLError`` with the reason when the gateway cannot use ``url``: its syntax, its
    options, and the TLS files it names (read now, so a missing CA is a config error, not a 503 later)."""
    if url.partition("://")[0].lower() == "memory":
        if url.lower() not in ("memory://", "memory:///"):
            raise StoreURLError("memory:// takes no host, path or options")
        return
    tls = parse_store_url(url).tls
    if tls is not None:
        tls.context  # noqa: B018 - reads the CA and client certificate files: StoreURLError naming the one that fails


async def probe_store(url: str, *, key_prefix: str = "reliapi") -> str | None:
    """Connect and ping, for ``--check``: None when the store answers, else why not. A ``StoreMisconfigured``
    (wrong password, untrusted certificate, a cluster URL on a single node …) raises."""
    store = open_store(url, key_prefix=key_prefix)
    try:
        await store.ping()
    except StoreMisconfigured:
        raise
    except StoreError as e:
        return str(e)
    finally:
        await store.close()
    parsed = parse_store_url(url)
    if parsed.topology in ("sentinel", "cluster"):  # every seed, not only the first that answered
        from gateway.store.topology import refusals_of_every_seed

        problems = await refusals_of_every_seed(parsed)
        if problems:
            raise StoreMisconfigured("; ".join(problems))
    return None


def open_store(url: str, *, key_prefix: str = "reliapi", memory_max_bytes: int | None = None) -> Store:
    """Build the store for ``url`` without connecting; call ``ping()`` to check it.

    ``key_prefix`` namespaces every key and channel on Redis (``reliapi:<key>``) so
    several deployments or test runs can share one database. A memory store is
    private to its process and needs no namespace.
    """
    if url.partition("://")[0].lower() == "memory":
        return MemoryStore(max_cache_bytes=memory_max_bytes)
    return RedisStore(url, key_prefix=key_prefix)  # StoreURLError (a ValueError) when it cannot be used
