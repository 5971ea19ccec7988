"""W3C trace context (https://www.w3.org/TR/trace-context/): every request is part of a trace.

The edge (``gateway.edge.serve``) starts a ``Trace`` for each request: it continues the caller's
``traceparent`` / ``tracestate`` when they are well formed, else starts a new trace (sampled at
``tracing.sample_ratio``; a caller's sampled flag wins). The request is one span of it (the
gateway's ``span_id``); each upstream attempt is a child span with an id of its own, sent upstream
as that attempt's ``traceparent`` (``gateway.flow.send``). The trace id is in every log line made
while the request runs (``CURRENT``, read by ``gateway.observe.logs``), in its access line, and in
the answer's ``traceresponse`` / ``X-ReliAPI-Trace-Id`` headers for the client to quote.

All of this is pure Python and cheap (ids are slices of a block of OS randomness; a header present
is checked with one regex match). Recording spans for export is ``gateway.observe.otel``'s, and only when a trace is
``recording``: otherwise an attempt costs its id and its header, nothing else. A malformed header is
ignored (a new trace), never an error; a ``tracestate`` is only read beside a valid ``traceparent``.
"""

from __future__ import annotations

import os
import re
import time
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, NamedTuple

from multidict import istr

if TYPE_CHECKING:
    from collections.abc import Mapping

TRACEPARENT = istr("traceparent")
TRACESTATE = istr("tracestate")
TRACERESPONSE = istr("traceresponse")  # W3C Trace Context Level 2 (draft): the server's span, to the client
X_RELIAPI_TRACE_ID = istr("X-ReliAPI-Trace-Id")

# The request being answered, for whatever logs or records something while it runs.
CURRENT: ContextVar[Trace | None] = ContextVar("reliapi_trace", default=None)

# version-traceid-parentid-flags, lowercase hex only; a future version may append "-…" fields.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.S)
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16

# tracestate list members (§3.3.1): key = simple key or tenant@system; value printable, no "," "=", no
# trailing space. At most 32 of them; 512 characters are kept, more are cut as §3.3.1.5 says.
_MEMBER = re.compile(
    r"([a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
    r"=([\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e])")
MAX_MEMBERS = 32
MAX_STATE = 512
_MAX_HEADER = 8192  # longer than anything valid could be: not even split

_SAMPLED, _UNSAMPLED = "-01", "-00"

# Ids are slices of one block of random hex, drawn from the OS a few KiB at a time: a request's ids cost
# one slice, not random draws and formatted numbers (which cost more than everything else here together).
_POOL_HEX = 8192
_pool = ""
_at = _POOL_HEX


def _new_process() -> None:  # forked workers must not repeat each other's ids
    global _at
    _at = _POOL_HEX


os.register_at_fork(after_in_child=_new_process)


def random_hex(n: int) -> str:
    """``n`` random lowercase hex digits (n ≤ 64)."""
    global _pool, _at
    at = _at + n
    if at > _POOL_HEX:
        _pool, at = os.urandom(_POOL_HEX // 2).hex(), n
    _at = at
    return _pool[at - n:at]


def new_span_id() -> str:
    span_id = random_hex(16)
    return span_id if span_id != "0000000000000000" else new_span_id()  # all zeros is not an id


def parse_traceparent(value: str) -> tuple[str, str, int] | None:
    """(trace id, parent span id, flags) of a valid ``traceparent``, else None."""
    m = _TRACEPARENT.fullmatch(value)
    if m is None:
        return None
    version, trace_id, parent, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest is not None) or trace_id == _ZERO_TRACE or parent == _ZERO_SPAN:
        return None
    return trace_id, parent, int(flags, 16)


def clean_tracestate(values: list[str]) -> str:
    """The ``tracestate`` to pass on, from the header's values (repeated headers are one list): ""
    when any member is malformed, a key repeats or there are more than 32 members. Over 512
    characters, members longer than 128 go first, then the rightmost (the oldest), until it fits."""
    text = ",".join(values)
    if len(text) > _MAX_HEADER:
        return ""
    members: list[str] = []
    keys: set[str] = set()
    for raw in text.split(","):
        member = raw.strip(" \t")
        if not member:
            continue  # empty list members are allowed, and dropped
        m = _MEMBER.fullmatch(member)
        if m is None or m.group(1) in keys:
            return ""
        keys.add(m.group(1))
        members.append(member)
    if len(members) > MAX_MEMBERS:
        return ""
    out = ",".join(members)
    if len(out) > MAX_STATE:
        members = [m for m in members if len(m) <= 128]
        while members and len(",".join(members)) > MAX_STATE:
            members.pop()
        out = ",".join(members)
    return out


class Span:
    """A recorded upstream attempt (only when the trace is ``recording``): what ``gateway.observe.otel``
    exports as a client span. Never holds a prompt, an answer or a key."""

    __slots__ = ("span_id", "name", "start_ns", "end_ns", "attrs", "error")

    def __init__(self, span_id: str, name: str, attrs: dict[str, Any]) -> None:
        self.span_id = span_id
        self.name = name
        self.start_ns = time.time_ns()
        self.end_ns = 0
        self.attrs = attrs
        self.error: str | None = None  # the error class, when the attempt failed

    def end(self) -> None:
        if not self.end_ns:
            self.end_ns = time.time_ns()


class Recording:
    """What a recorded request collects for its spans (``gateway.observe.otel``)."""

    __slots__ = ("start_ns", "spans", "events")

    def __init__(self) -> None:
        self.start_ns = time.time_ns()
        self.spans: list[Span] = []  # the upstream attempts, in order
        self.events: list[tuple[str, int, dict[str, Any]]] = []  # (name, time ns, attributes) on the request's span


class Trace(NamedTuple):
    """One request's place in its trace: ``span_id`` is the gateway's span for the request, child of the
    caller's ``parent_id`` (None: the trace starts here); ``flags`` the traceparent's, with its dash;
    ``spare`` a span id drawn with the others, for the first upstream attempt. ``recording``: its spans
    are exported, and ``rec`` collects them. (A tuple: built without a Python call, on every request.)"""

    trace_id: str
    span_id: str
    parent_id: str | None
    flags: str
    state: str
    recording: bool
    spare: str
    rec: Recording | None

    @property
    def spans(self) -> list[Span]:
        return self.rec.spans  # type: ignore[union-attr]

    @property
    def events(self) -> list[tuple[str, int, dict[str, Any]]]:
        return self.rec.events  # type: ignore[union-attr]

    @property
    def start_ns(self) -> int:
        return self.rec.start_ns  # type: ignore[union-attr]

    def traceresponse(self) -> str:
        """The ``traceresponse`` header: the request's own span."""
        return f"00-{self.trace_id}-{self.span_id}{self.flags}"

    def event(self, name: str, attrs: dict[str, Any]) -> None:
        if self.rec is not None:
            self.rec.events.append((name, time.time_ns(), attrs))


def _trace(trace_id: str, span_id: str, parent_id: str | None, flags: str, state: str, recording: bool,
           spare: str = "") -> Trace:
    return Trace(trace_id, span_id, parent_id, flags, state, recording, spare or new_span_id(),
                 Recording() if recording else None)


_new_trace = tuple.__new__  # Trace(...) without NamedTuple's Python-level __new__


class Tracing:
    """A runtime's way of starting traces (``tracing:``); ``recording``: spans are exported
    (``gateway.observe.otel`` is configured). ``Tracing.start`` runs once per request."""

    __slots__ = ("sample_bound", "trace_id_header", "traceresponse", "recording")

    def __init__(self, sample_ratio: float = 1.0, *, response_header: str = "X-ReliAPI-Trace-Id",
                 recording: bool = False) -> None:
        # a new trace is sampled when its id's low 64 bits are below this (OpenTelemetry's TraceIdRatioBased)
        self.sample_bound = int(sample_ratio * (1 << 64)) if sample_ratio < 1 else None
        self.trace_id_header = response_header in ("X-ReliAPI-Trace-Id", "both")
        self.traceresponse = response_header in ("traceresponse", "both")
        self.recording = recording

    def name(self, trace: Trace, headers: Any) -> None:
        """Name the trace on an answer (``tracing.response_header``)."""
        if self.trace_id_header:
            headers[X_RELIAPI_TRACE_ID] = trace.trace_id
        if self.traceresponse:
            headers[TRACERESPONSE] = trace.traceresponse()

    def start(self, headers: Mapping[str, str]) -> Trace:
        value = headers.get(TRACEPARENT)
        if value is not None:
            found = self._continued(headers, value)
            if found is not None:
                return found
        global _pool, _at  # random_hex(64), inline: this runs for every request
        at = _at + 64
        if at > _POOL_HEX:
            _pool, at = os.urandom(_POOL_HEX // 2).hex(), 64
        _at = at
        ids = _pool[at - 64:at]
        trace_id, span_id, spare = ids[:32], ids[32:48], ids[48:]
        if "0000000000000000" in ids:  # one in 2^60: an all-zero id is no id
            trace_id, span_id, spare = random_hex(32), new_span_id(), new_span_id()
        bound = self.sample_bound
        if bound is None:  # every trace sampled (the default)
            if self.recording:
                return _trace(trace_id, span_id, None, _SAMPLED, "", True, spare)
            return _new_trace(Trace, (trace_id, span_id, None, _SAMPLED, "", False, spare, None))
        sampled = int(trace_id[16:], 16) < bound
        return _trace(trace_id, span_id, None, _SAMPLED if sampled else _UNSAMPLED, "", self.recording and sampled, spare)

    def _continued(self, headers: Any, value: str) -> Trace | None:
        found = parse_traceparent(value) if len(value) < 256 else None
        if found is None or len(headers.getall(TRACEPARENT)) != 1:
            return None
        trace_id, parent, flags = found
        state = headers.getall(TRACESTATE, None)
        sampled = bool(flags & 1)
        return _trace(trace_id, new_span_id(), parent, _SAMPLED if sampled else _UNSAMPLED,
                      clean_tracestate(state) if state else "", self.recording and sampled)


NO_TRACE = Trace(None, None, None, "", "", False, "", None)  # type: ignore[arg-type]  # a request outside the proxy
