"""The ``tracing:`` block (``gateway.observe.trace``, ``gateway.observe.otel``).

A caller's ``traceparent`` is always continued and every request has a trace id, whatever this says;
the block says how the traces the gateway starts itself are sampled, whether answers name their trace,
and whether spans are exported. ``export`` is read at start: a reload keeps the running exporter.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct


class TracingConfig(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    sample_ratio: Annotated[float, Meta(ge=0, le=1)] = 1.0  # of the traces the gateway starts; a caller's flag wins
    # the trace named on every proxied answer: X-ReliAPI-Trace-Id: <trace id>; traceresponse (W3C Trace Context
    # Level 2 draft): 00-<trace id>-<the gateway's span id>-<flags>; both; none
    response_header: Literal["X-ReliAPI-Trace-Id", "traceresponse", "both", "none"] = "X-ReliAPI-Trace-Id"
    # auto: spans go out over OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is
    # set and reliapi[otel] is installed; otlp: whenever it is installed (default endpoint localhost:4318); off: never
    export: Literal["auto", "otlp", "off"] = "auto"
