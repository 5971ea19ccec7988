"""The fixed shape every provider adapter has."""

from __future__ import annotations


class Provider:
    name: str = "http"
    # How a configured key is attached when the auth block does not name a header.
    key_header: str = "Authorization"
    key_prefix: str = "Bearer "
    # Marks the response of a streamed request.
    stream_content_type: str = "text/event-stream"
