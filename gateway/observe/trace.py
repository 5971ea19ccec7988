"""W3C trace context (https://www.w3.org/TR/trace-context/): every request is part of a trace.

The edge (``gateway.edge.serve``) starts a ``Trace`` for each request: it continues the caller's
``traceparent`` / ``tracestate`` when they are well formed, else starts a new trace (sampled at
``tracing.sample_ratio``; a caller's sampled flag wins). The request is one span of it (the
gateway's ``span_id``); each upstream attempt is a child span with an id of its own, sent upstream
as that attempt's ``traceparent`` (``gateway.flow.send``). The trace id is in every log line made
while the request runs (``CURRENT``, read by ``gateway.observe.logs``), in its access line, and in
the answer's ``traceresponse`` / ``X-ReliAPI-Trace-Id`` headers for the client to quote.

All of this is pure Python and cheap (ids from one ``getrandbits`` call, one regex match per
header). Recording spans for export is ``gateway.observe.otel``'s, and only when a trace is
``recording``: otherwise an attempt costs its id and its header, nothing else. A malformed header is
ignored (a new trace), never an error; a ``tracestate`` is only read beside a valid ``traceparent``.
"""

from __future__ import annotations

import os
import random
import re
import time
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

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

_NOTHING = ()  # the spans and events of a trace that is not recorded

_rng = random.Random()
os.register_at_fork(after_in_child=_rng.seed)  # forked workers must not repeat each other's ids
_bits = _rng.getrandbits


def new_span_id() -> str:
    while True:
        value = _bits(64)
        if value:
            return f"{value:016x}"


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


class Trace:
    """One request's place in its trace: ``span_id`` is the gateway's span for the request, child of the
    caller's ``parent_id`` (None: the trace starts here). ``recording``: its spans are exported."""

    __slots__ = ("trace_id", "span_id", "parent_id", "sampled", "state", "recording", "start_ns", "spans", "events")

    def __init__(self, trace_id: str, parent_id: str | None, sampled: bool, state: str, recording: bool) -> None:
        self.trace_id = trace_id
        self.span_id = new_span_id()
        self.parent_id = parent_id
        self.sampled = sampled
        self.state = state
        self.recording = recording
        self.start_ns = time.time_ns() if recording else 0
        # recorded only when recording: the attempts, in order; (name, time ns, attributes) on the request's span
        self.spans: list[Span] = [] if recording else _NOTHING  # type: ignore[assignment]
        self.events: list[tuple[str, int, dict[str, Any]]] = [] if recording else _NOTHING  # type: ignore[assignment]

    def traceparent(self, span_id: str) -> str:
        return f"00-{self.trace_id}-{span_id}-{'01' if self.sampled else '00'}"

    def response_headers(self, headers: Any) -> None:
        """``traceresponse`` (the request's own span) and ``X-ReliAPI-Trace-Id`` on an answer."""
        headers[TRACERESPONSE] = self.traceparent(self.span_id)
        headers[X_RELIAPI_TRACE_ID] = self.trace_id

    def event(self, name: str, attrs: dict[str, Any]) -> None:
        if self.recording:
            self.events.append((name, time.time_ns(), attrs))


class Tracing:
    """A runtime's way of starting traces (``tracing:``); ``recording``: spans are exported
    (``gateway.observe.otel`` is configured). ``Tracing.start`` runs once per request."""

    __slots__ = ("sample_bound", "headers", "recording")

    def __init__(self, sample_ratio: float = 1.0, *, response_header: bool = True, recording: bool = False) -> None:
        # a new trace is sampled when its id's low 64 bits are below this (OpenTelemetry's TraceIdRatioBased)
        self.sample_bound = int(sample_ratio * (1 << 64))
        self.headers = response_header
        self.recording = recording

    def start(self, headers: Mapping[str, str]) -> Trace:
        value = headers.get(TRACEPARENT)
        if value is not None and len(value) < 256:
            found = parse_traceparent(value)
            if found is not None and len(headers.getall(TRACEPARENT)) == 1:  # type: ignore[attr-defined]
                trace_id, parent, flags = found
                state = headers.getall(TRACESTATE, None)  # type: ignore[attr-defined]
                sampled = bool(flags & 1)
                return Trace(trace_id, parent, sampled, clean_tracestate(state) if state else "",
                             self.recording and sampled)
        value = _bits(128) or 1
        sampled = (value & 0xFFFFFFFFFFFFFFFF) < self.sample_bound
        return Trace(f"{value:032x}", None, sampled, "", self.recording and sampled)


OFF = Tracing()  # a runtime built without a config's tracing block (tests)
