"""The OpenTelemetry SDK side of span export (``gateway.observe.otel``): imported only when spans are
exported, so the gateway runs without the ``otel`` extra installed.

``Converter.spans`` turns one finished request into the SDK's ``ReadableSpan``s with the ids the gateway
already used (logged, sent upstream, answered to the client): the request's server span, child of the
caller's span when it sent a ``traceparent``, and each upstream attempt's client span, child of the
request's. ``Converter.export`` sends a batch with the SDK's OTLP/HTTP exporter, configured by the
standard ``OTEL_EXPORTER_OTLP_*`` variables. Runs on the export thread, never on the event loop.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from gateway import __version__

if TYPE_CHECKING:
    from gateway.observe.trace import Trace

# The surface (access log "route") → the server span's http.route.
_ROUTES = {"v1": "/v1/{path}", "t": "/t/{target}/{path}", "proxy": "/proxy/http", "proxy_llm": "/proxy/llm",
           "generate": "/v1/generate"}
# How a request that got an answer ended, for its span (the access line's outcome → reliapi.stream_end).
_STREAM_ENDS = {"ok": "complete", "upstream_error": "complete", "stream_error": "cut", "client_closed": "abandoned",
                "cancelled": "abandoned"}
# Access-log fields the server span carries as they are.
_SERVER_FIELDS = (("request_id", "reliapi.request_id"), ("tenant", "reliapi.tenant"), ("target", "reliapi.target"),
                  ("primary_target", "reliapi.primary_target"), ("fallback_target", "reliapi.fallback_target"),
                  ("recovered_on", "reliapi.recovered_on"), ("attempts", "reliapi.attempts"),
                  ("outcome", "reliapi.outcome"), ("cache_hit", "reliapi.cache_hit"),
                  ("idempotent_hit", "reliapi.idempotent_hit"), ("stream", "reliapi.stream"),
                  ("cost_usd", "reliapi.cost_usd"), ("ttft_ms", "reliapi.ttft_ms"),
                  ("model", "gen_ai.request.model"), ("prompt_tokens", "gen_ai.usage.input_tokens"),
                  ("completion_tokens", "gen_ai.usage.output_tokens"), ("upstream_status", "reliapi.upstream_status"))
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_OK, _UNSET = Status(StatusCode.OK), Status(StatusCode.UNSET)


def _resource_attributes(env: Mapping[str, str]) -> dict[str, str]:
    """The resource's attributes: ``OTEL_RESOURCE_ATTRIBUTES`` (``k=v,…``, percent-encoded values), then
    ``OTEL_SERVICE_NAME``, over the gateway's own ``service.name`` / ``service.version`` (attributes handed to
    ``Resource.create`` win over what it reads from the environment itself, so the environment is read here)."""
    attrs: dict[str, str] = {"service.name": "reliapi", "service.version": __version__}
    for item in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            attrs[key.strip()] = urllib.parse.unquote(value.strip())
    if env.get("OTEL_SERVICE_NAME"):
        attrs["service.name"] = env["OTEL_SERVICE_NAME"]
    return attrs


class Converter:
    def __init__(self, env: Mapping[str, str] = os.environ, exporter: Any = None) -> None:
        self.resource = Resource.create(_resource_attributes(env))
        self.scope = InstrumentationScope("reliapi", __version__)
        self.exporter = exporter or OTLPSpanExporter(endpoint=_endpoint(env), timeout=_timeout(env))

    def spans(self, trace: Trace, fields: dict[str, Any], cache: str | None, end_ns: int,
              method: str | None = None) -> list[ReadableSpan]:
        trace_id = int(trace.trace_id, 16)
        state = _state(trace.state)
        server = SpanContext(trace_id, int(trace.span_id, 16), False, _SAMPLED, state)
        caller = SpanContext(trace_id, int(trace.parent_id, 16), True, _SAMPLED, state) if trace.parent_id else None
        route = _ROUTES.get(fields.get("route") or "")
        method = method or fields.get("method") or "HTTP"  # the server's: the request as it came
        attrs: dict[str, Any] = {"http.request.method": method, "http.response.status_code": fields["status"]}
        if route is not None:
            attrs["http.route"] = route
        for field, name in _SERVER_FIELDS:
            value = fields.get(field)
            if value is not None:
                attrs[name] = value
        if cache is not None:
            attrs["reliapi.cache"] = cache.lower()
        if fields.get("stream"):
            attrs["reliapi.stream_end"] = ("recovered" if fields.get("recovered_on")
                                           else _STREAM_ENDS.get(fields.get("outcome") or "", "error"))
        code = fields.get("error_code")
        failed = code is not None or fields["status"] >= 500 or fields.get("outcome") == "stream_error"
        if failed:
            attrs["error.type"] = code or str(fields["status"])
        spans = [ReadableSpan(
            f"{method} {route}" if route else method, context=server, parent=caller, resource=self.resource,
            attributes=attrs, events=[Event(name, a, ts) for name, ts, a in trace.events], kind=SpanKind.SERVER,
            status=Status(StatusCode.ERROR, attrs["error.type"]) if failed else _UNSET,
            start_time=trace.start_ns, end_time=end_ns, instrumentation_scope=self.scope,
        )]
        for span in trace.spans:
            error = span.error
            if not span.end_ns:  # never answered: the request ended (the client left) while it waited
                error = span.attrs["error.type"] = "cancelled"
            spans.append(ReadableSpan(
                span.name, context=SpanContext(trace_id, int(span.span_id, 16), False, _SAMPLED, state), parent=server,
                resource=self.resource, attributes=span.attrs, kind=SpanKind.CLIENT,
                status=Status(StatusCode.ERROR, error) if error else _UNSET,
                start_time=span.start_ns, end_time=span.end_ns or end_ns, instrumentation_scope=self.scope,
            ))
        return spans

    def export(self, spans: Sequence[ReadableSpan]) -> bool:
        return self.exporter.export(spans) is SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.exporter.shutdown()


def _endpoint(env: Mapping[str, str]) -> str | None:
    """The traces endpoint the (given) environment names, as the SDK reads it; None: the SDK's default."""
    url = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if url:
        return url
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return base.rstrip("/") + "/v1/traces" if base else None


def _timeout(env: Mapping[str, str]) -> float | None:
    text = env.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") or env.get("OTEL_EXPORTER_OTLP_TIMEOUT")
    try:
        return float(text) if text else None  # seconds, as the Python SDK reads it
    except ValueError:
        return None


def _state(text: str) -> TraceState:
    if not text:
        return TraceState()
    return TraceState.from_header([text])
