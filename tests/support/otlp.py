"""A real OTLP/HTTP trace receiver on loopback for the span export tests: ``POST /v1/traces`` with a protobuf
``ExportTraceServiceRequest``, decoded with ``opentelemetry-proto`` into plain ``Received`` spans."""

from __future__ import annotations

import asyncio
import gzip
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclass
class Received:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: str  # "server" | "client" | …
    attrs: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    error: bool
    start_ns: int
    end_ns: int
    resource: dict[str, Any]
    trace_state: str


@dataclass
class Receiver:
    spans: list[Received] = field(default_factory=list)
    posts: int = 0
    delay_s: float = 0.0  # before answering each export (a slow collector)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/traces", self.traces)
        return app

    async def traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.posts += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        export = ExportTraceServiceRequest.FromString(body)
        for rs in export.resource_spans:
            resource = _attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(Received(
                        s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                        ProtoSpan.SpanKind.Name(s.kind).removeprefix("SPAN_KIND_").lower(), _attrs(s.attributes),
                        [(e.name, _attrs(e.attributes)) for e in s.events], s.status.code == 2,
                        s.start_time_unix_nano, s.end_time_unix_nano, resource, s.trace_state,
                    ))
        self.arrived.set()
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    async def wait_for(self, count: int, timeout_s: float = 10.0) -> list[Received]:
        """At least ``count`` spans have arrived (fails after ``timeout_s``)."""
        async with asyncio.timeout(timeout_s):
            while len(self.spans) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.spans

    def of_trace(self, trace_id: str) -> tuple[Received, list[Received]]:
        """The trace's server span and its client spans, in the order they started."""
        mine = [s for s in self.spans if s.trace_id == trace_id]
        servers = [s for s in mine if s.kind == "server"]
        assert len(servers) == 1, mine
        return servers[0], sorted((s for s in mine if s.kind == "client"), key=lambda s: s.start_ns)
