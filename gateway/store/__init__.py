"""Shared state for the policies; the backend is chosen by the store URL.

``memory://`` keeps everything in this process; ``redis://``, ``rediss://`` and
``unix://`` put it in Redis so that any number of gateway instances act as one.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from gateway.store.base import Store, StoreError, Subscription, Take, TakeResult
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore

__all__ = ["Store", "StoreError", "Subscription", "Take", "TakeResult", "open_store"]

_REDIS_SCHEMES = ("redis", "rediss", "unix")


def open_store(url: str, *, key_prefix: str = "reliapi") -> Store:
    """Build the store for ``url`` without connecting; call ``ping()`` to check it.

    ``key_prefix`` namespaces every key and channel on Redis (``reliapi:<key>``) so
    several deployments or test runs can share one database. A memory store is
    private to its process and needs no namespace.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        return MemoryStore()
    if scheme in _REDIS_SCHEMES:
        return RedisStore(url, key_prefix=key_prefix)
    raise ValueError(
        f"unsupported store URL scheme {scheme + '://' if scheme else '(none)'}: "
        "expected memory://, redis://, rediss:// or unix://"
    )
