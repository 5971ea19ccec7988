"""Building upstream URLs from client paths without letting the client choose the host (SPEC §8).

Never ``urljoin`` on client input: ``urljoin(base, "//evil/x")`` swaps the host and
``../`` walks out of the base path. Instead every client segment must be a plain
segment, and the result is checked to stay under the target's origin and base path.

"Plain" also means plain to upstreams that normalise harder than RFC 3986: Tomcat/Spring
drop ``;`` parameters (``..;`` is ``..``), some servers decode twice (``%252e`` is ``.``),
read overlong UTF-8 (``%c0%ae``) or NFKC-fold Unicode (``%ef%bc%8e``, U+FF0E, is ``.``).
The query and header values the client sends are checked here too: only what HTTP can
carry as it is goes upstream.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from urllib.parse import unquote_to_bytes

from multidict import CIMultiDictProxy

from gateway.errors import InvalidRequest
from providers.endpoints import Endpoint, endpoint

# A plain segment: RFC 3986 pchar minus '@', with percent-escapes checked separately.
_SEGMENT = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:%-]+")
# Encoded '.', '/', '\' and control characters would let a normalising upstream re-split the path.
_BAD_ESCAPE = re.compile(r"%(2[eEfF]|5[cC]|[01][0-9a-fA-F]|7[fF])")
_ESCAPE = re.compile(r"%[0-9a-fA-F]{2}")
_DOUBLE_ESCAPE = re.compile(r"%25[0-9a-fA-F]{2}")  # '%252e' is '%2e' to a server that decodes twice
_DOT_SEGMENTS = (".", "..")
# Look-alikes that NFKC does not fold to '/' or '\\' but some servers and browsers treat as one: refused
# wherever they are (no text needs them).
_SLASH_LIKES = frozenset("\u2215\u2044\u29f8\u2216\u29f5\u29f9")
# What some upstreams read as '.' or '\\' though NFKC keeps them: the ideographic full stop (U+FF61 and
# U+FE12 fold to it), and the yen and won signs ('\\' in Japanese and Korean code pages, which Windows
# maps to). They are ordinary text ('こんにちは。', '¥100'), so they are refused only where they make a
# dot segment ('。。', '..¥admin').
_AS_READ = {"\u3002": ".", "\u00a5": "\\", "\u20a9": "\\"}
_SEPARATORS = re.compile(r"[/\\]")


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
        if seg in _DOT_SEGMENTS:
            raise InvalidRequest("invalid path: '.' and '..' segments are not allowed", param="path")
        if not _SEGMENT.fullmatch(seg):
            raise InvalidRequest("invalid path: segment contains a character that is not allowed", param="path")
        text = _decoded(seg) if "%" in seg else seg
        if ";" in text and text.partition(";")[0] in _DOT_SEGMENTS:
            raise InvalidRequest("invalid path: ';' parameters on a '.' or '..' segment are not allowed "
                                 "(an upstream that drops them sees '..')", param="path")
        if "." in text and _disguised_dots(text):
            raise InvalidRequest("invalid path: a segment that is dots once an upstream drops what follows or "
                                 "surrounds them (';', '#', '?', ':', spaces, invisible characters)", param="path")
        if i == 0 and ":" in seg:
            raise InvalidRequest("invalid path: the first segment may not contain ':'", param="path")
    if len(_known_good) < 4096:  # LLM traffic reuses a handful of paths; the check runs once each
        _known_good.add(rel)
    return rel


_known_good: set[str] = set()


_AFTER_DOTS = re.compile(r"[;#?:]")


def _disguised_dots(text: str) -> bool:
    """'...', '.. ', '..#x', '..::$DATA', '.\u200b.': dots (and nothing else) to a server that cuts a segment at
    ';', '#', '?' or ':' (an NTFS stream), drops trailing dots and spaces (Windows), or ignores invisible
    characters. A plain '.'-containing name ('v1.2', '.well-known') is not one."""
    core = _AFTER_DOTS.split(text, 1)[0]
    if not text.isascii():
        core = "".join(ch for ch in core if unicodedata.category(ch) not in ("Cf", "Zs"))
    return bool(core) and not core.strip(". ")


def _decoded(seg: str) -> str:
    """A segment with percent-escapes checked and decoded; InvalidRequest names the trick."""
    if _BAD_ESCAPE.search(seg):
        raise InvalidRequest("invalid path: encoded '.', '/', '\\' or control characters", param="path")
    if len(_ESCAPE.findall(seg)) != seg.count("%"):
        raise InvalidRequest("invalid path: malformed percent-escape", param="path")
    if _DOUBLE_ESCAPE.search(seg):
        raise InvalidRequest("invalid path: double-encoded percent-escape ('%25' followed by two hex digits)",
                             param="path")
    try:
        text = unquote_to_bytes(seg).decode("utf-8")  # strict: overlong forms such as %c0%ae fail here
    except UnicodeDecodeError:
        raise InvalidRequest("invalid path: percent-escapes must encode UTF-8", param="path") from None
    if _ESCAPE.search(text):  # '%25%32%65' is '%2e' once decoded, '.' to a server that decodes twice
        raise InvalidRequest("invalid path: double-encoded percent-escape (an escape that decodes to another)",
                             param="path")
    if not text.isascii():
        _check_unicode(text)
    return text


def _check_unicode(text: str) -> None:
    """Refuse what a folding upstream reads as '/', '\\', '%' or a dot segment; accept other text."""
    read = []  # the segment as an upstream that folds it reads it
    odd = None  # the first character read as something else
    for ch in text:
        if ch.isascii():
            read.append(ch)
            continue
        if unicodedata.category(ch) == "Cc":  # C1 controls (%c2%85 …), like %00-%1f
            raise InvalidRequest("invalid path: encoded '.', '/', '\\' or control characters", param="path")
        folded = unicodedata.normalize("NFKC", ch)
        if ch in _SLASH_LIKES or folded in ("/", "\\"):
            raise InvalidRequest(f"invalid path: a Unicode look-alike of '.', '/' or '\\' (U+{ord(ch):04X})",
                                 param="path")
        if "%" in folded:  # U+FF05: folded, then decoded, '％２ｅ' is '.'
            raise InvalidRequest(f"invalid path: a Unicode look-alike of '%' (U+{ord(ch):04X})", param="path")
        folded = _AS_READ.get(folded, folded)
        if odd is None and folded != ch:
            odd = ch
        read.append(folded)
    if odd is None or ("." in text and _disguised_dots(text)):  # (the latter named by validate_path)
        return
    for piece in _SEPARATORS.split("".join(read)):
        if "." in piece and (piece in _DOT_SEGMENTS or _disguised_dots(piece)):
            raise InvalidRequest(f"invalid path: a Unicode look-alike of '.', '/' or '\\' (U+{ord(odd):04X}) makes "
                                 "a '.' or '..' segment for an upstream that folds it", param="path")


# What HTTP cannot carry in a request target as it is: controls, space, DEL, '#' (a fragment
# never goes upstream); non-ASCII is tested with isascii().
_QUERY_BAD = re.compile(r"[\x00-\x20\x7f#]")


def validate_query(query: str) -> str:
    """Check a client's raw query string (after '?'); it is relayed unchanged, so it must already
    be percent-encoded."""
    if query and (not query.isascii() or _QUERY_BAD.search(query)):
        raise InvalidRequest("invalid query: spaces, '#', control and non-ASCII characters must be percent-encoded",
                             param="query")
    return query


# A header value HTTP carries as it is: printable ASCII, HTAB, and non-ASCII text that is valid UTF-8
# (RFC 9110 §5.5's obs-text: relayed as the same bytes). Refused: controls (C0, DEL, C1) and bytes that
# are not UTF-8 (aiohttp reads them as lone surrogates, which no upstream would get as sent).
_BAD_VALUE = re.compile("[^\t\x20-\x7e\u00a0-\ud7ff\ue000-\U0010ffff]")


def validate_header_values(headers: Mapping[str, str] | CIMultiDictProxy[str], *, parsed: bool = False) -> None:
    """Raise InvalidRequest naming the first header whose value cannot be relayed as it came. ``parsed``:
    headers aiohttp's parser took, which holds no C0 control already."""
    joined = "".join(headers.values())
    if joined.isascii() and (parsed or joined.isprintable()):  # the usual case: C-speed scans, 0x20-0x7E only
        return
    if not _BAD_VALUE.search(joined):
        return
    for name, value in headers.items():
        if _BAD_VALUE.search(value):
            raise InvalidRequest(f"headers.{name[:64]}: a header value may hold printable text and tabs, as UTF-8; "
                                 "control characters and bytes that are not UTF-8 are not allowed",
                                 param=f"headers.{name[:64]}")


class UpstreamBase:
    """A target's base URL split once at startup; ``url(rel, query)`` joins a validated path."""

    __slots__ = ("origin", "base_path", "_prefix", "_v1_prefix", "_endpoints")

    def __init__(self, base_url: str) -> None:
        m = re.fullmatch(r"(https?://[^/]+)(/.*)?", base_url.rstrip("/"))
        if m is None:
            raise ValueError(f"not an absolute http(s) URL: {base_url!r}")
        self.origin = m.group(1)
        self.base_path = m.group(2) or ""
        self._prefix = self.origin + self.base_path + "/"
        # /v1/{path}: a base that already ends in /v1 takes the rest; otherwise /v1 is kept.
        self._v1_prefix = self._prefix if self.base_path.endswith("/v1") else self._prefix + "v1/"
        self._endpoints: dict[tuple[str, bool], Endpoint] = {}

    def endpoint(self, rel: str, *, v1: bool) -> Endpoint:
        """The endpoint of the path the upstream sees for ``rel`` (made once per path)."""
        found = self._endpoints.get((rel, v1))
        if found is None:
            found = endpoint((self._v1_prefix if v1 else self._prefix)[len(self.origin):] + rel)
            if len(self._endpoints) < 4096:  # paths come from clients: bounded
                self._endpoints[(rel, v1)] = found
        return found

    def url(self, rel: str, query: str, *, v1: bool) -> str:
        url = (self._v1_prefix if v1 else self._prefix) + rel
        if not url.startswith(self._prefix):  # defence in depth: validate_path already ran
            raise InvalidRequest("invalid path", param="path")
        return url + "?" + query if query else url
