"""Building upstream URLs from client paths without letting the client choose the host (SPEC §8).

Never ``urljoin`` on client input: ``urljoin(base, "//evil/x")`` swaps the host and
``../`` walks out of the base path. Instead every client segment must be a plain
segment, and the result is checked to stay under the target's origin and base path.
"""

from __future__ import annotations

import re

from gateway.errors import InvalidRequest

# A plain segment: RFC 3986 pchar minus '@', with percent-escapes checked separately.
_SEGMENT = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:%-]+")
# Encoded '.', '/', '\' and control characters would let a normalising upstream re-split the path.
_BAD_ESCAPE = re.compile(r"%(2[eEfF]|5[cC]|[01][0-9a-fA-F]|7[fF])")
_ESCAPE = re.compile(r"%[0-9a-fA-F]{2}")


def validate_path(rel: str) -> str:
    """Check a client's raw (still percent-encoded) path below the surface prefix.

    Returns it unchanged when every segment is plain; raises InvalidRequest otherwise.
    An empty path and a single trailing slash are allowed.
    """
    if not rel or rel in _known_good:
        return rel
    body = rel[:-1] if rel.endswith("/") else rel
    if not body:
        raise InvalidRequest("invalid path: empty segment", param="path")
    for i, seg in enumerate(body.split("/")):
        if not seg:
            raise InvalidRequest("invalid path: empty segment ('//')", param="path")
        if seg in (".", ".."):
            raise InvalidRequest("invalid path: '.' and '..' segments are not allowed", param="path")
        if not _SEGMENT.fullmatch(seg):
            raise InvalidRequest("invalid path: segment contains a character that is not allowed", param="path")
        if "%" in seg:
            if _BAD_ESCAPE.search(seg):
                raise InvalidRequest("invalid path: encoded '.', '/', '\\' or control characters", param="path")
            if len(_ESCAPE.findall(seg)) != seg.count("%"):
                raise InvalidRequest("invalid path: malformed percent-escape", param="path")
        if i == 0 and ":" in seg:
            raise InvalidRequest("invalid path: the first segment may not contain ':'", param="path")
    if len(_known_good) < 4096:  # LLM traffic reuses a handful of paths; the check runs once each
        _known_good.add(rel)
    return rel


_known_good: set[str] = set()


class UpstreamBase:
    """A target's base URL split once at startup; ``url(rel, query)`` joins a validated path."""

    __slots__ = ("origin", "base_path", "_prefix", "_v1_prefix")

    def __init__(self, base_url: str) -> None:
        m = re.fullmatch(r"(https?://[^/]+)(/.*)?", base_url.rstrip("/"))
        if m is None:
            raise ValueError(f"not an absolute http(s) URL: {base_url!r}")
        self.origin = m.group(1)
        self.base_path = m.group(2) or ""
        self._prefix = self.origin + self.base_path + "/"
        # /v1/{path}: a base that already ends in /v1 takes the rest; otherwise /v1 is kept.
        self._v1_prefix = self._prefix if self.base_path.endswith("/v1") else self._prefix + "v1/"

    def url(self, rel: str, query: str, *, v1: bool) -> str:
        url = (self._v1_prefix if v1 else self._prefix) + rel
        if not url.startswith(self._prefix):  # defence in depth: validate_path already ran
            raise InvalidRequest("invalid path", param="path")
        return url + "?" + query if query else url
