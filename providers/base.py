"""The fixed shape every provider adapter has."""

from __future__ import annotations


class Provider:
    name: str = "http"
    # How a configured key is attached when the auth block does not name a header.
    key_header: str = "Authorization"
    key_prefix: str = "Bearer "
