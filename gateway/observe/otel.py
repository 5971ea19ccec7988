"""Span export over OTLP/HTTP with the OpenTelemetry SDK (``pip install reliapi[otel]``).

``open_export`` decides once, at start, whether spans go anywhere: ``tracing.export: auto`` (the
default) exports when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set,
``otlp`` always, ``off`` never; ``OTEL_SDK_DISABLED=true`` or an ``OTEL_TRACES_EXPORTER`` without ``otlp``
turn it off too. Without the packages it is off (and says so once). Off, nothing here is imported
and a request pays nothing for it.

On, each sampled request is handed over when it ends (``SpanExport.finish``, called by the edge after
the last byte of a stream): its trace (``gateway.observe.trace``), its access-log fields and the span
events its policies emitted while it ran (``on_event``, subscribed to the event bus). A background
thread turns them into the SDK's spans — one server span for the request, one client span per upstream
attempt (``gateway.observe.spans``) — and exports them in batches with the SDK's OTLP exporter, which
reads the standard ``OTEL_EXPORTER_OTLP_*`` variables (endpoint, headers, timeout, compression) and
``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES``. The queue is bounded (``OTEL_BSP_MAX_QUEUE_SIZE``,
2048 requests): an exporter that cannot keep up, or an endpoint that does not answer, loses spans —
counted in ``reliapi_trace_spans_dropped_total`` — and never slows or fails a request.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.observe.events import UpstreamAnswered
from gateway.observe.trace import CURRENT

if TYPE_CHECKING:
    from gateway.config.tracing import TracingConfig
    from gateway.observe.events import Event
    from gateway.observe.trace import Trace

log = logging.getLogger("reliapi")

def wanted(config: TracingConfig, env: Mapping[str, str]) -> bool:
    """Whether the config and the ``OTEL_*`` variables ask for span export."""
    if config.export == "off" or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER")
    if exporters is not None and "otlp" not in {e.strip() for e in exporters.split(",")}:
        return False
    return config.export == "otlp" or bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                                           or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def open_export(config: TracingConfig, env: Mapping[str, str] = os.environ) -> SpanExport | None:
    """The span export the config and environment ask for, started; None when there is none."""
    if not wanted(config, env):
        return None
    try:
        from gateway.observe.otel_sdk import Converter
    except ImportError as e:
        log.warning("span export asked for, but OpenTelemetry is not installed (pip install 'reliapi[otel]'): %s", e)
        return None
    export = SpanExport(Converter(env), env)
    export.start()
    return export


def _int_env(env: Mapping[str, str], name: str, default: int) -> int:
    try:
        value = int(env.get(name, "") or default)
    except ValueError:
        return default
    return value if value > 0 else default


class SpanExport:
    """Finished requests queued for a background thread that converts and exports them in batches.

    ``converter`` turns one request into the SDK's spans and exports batches (``otel_sdk.Converter``; a
    test may pass its own). ``dropped`` counts spans lost: to a full queue, or to an export that failed."""

    def __init__(self, converter: Any, env: Mapping[str, str] = os.environ) -> None:
        self.converter = converter
        self.max_queue = _int_env(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048)
        self.batch = min(_int_env(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512), self.max_queue)
        self.delay_s = _int_env(env, "OTEL_BSP_SCHEDULE_DELAY", 1000) / 1000
        self.queue: collections.deque[tuple[Any, ...]] = collections.deque()
        self.dropped: dict[str, int] = {"queue_full": 0, "export_failed": 0}
        self.exported = 0
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="reliapi-span-export", daemon=True)
        self._thread.start()

    def finish(self, trace: Trace, fields: dict[str, Any], cache: str | None, method: str) -> None:
        """A recorded request ended (on the event loop: only a queue append); ``method``: the one it came with (an
        envelope's access line names the method it sent upstream)."""
        if len(self.queue) >= self.max_queue:
            self.dropped["queue_full"] += 1 + len(trace.spans)
            return
        self.queue.append((trace, fields, cache, time.time_ns(), method))
        if len(self.queue) >= self.batch:
            self._wake.set()

    def on_event(self, event: Event) -> None:
        """An event a policy emitted: a span event on the request it happened in (if recorded)."""
        trace = CURRENT.get()
        if trace is None or not trace.recording or type(event) is UpstreamAnswered:  # an attempt is a span of its own
            return
        fields = msgspec.to_builtins(event)
        name = fields.pop("event")
        trace.event(name, {f"reliapi.{k}": v for k, v in fields.items() if v is not None})

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self.delay_s)
            self._wake.clear()
            self._drain()

    def _drain(self) -> None:
        while self.queue:
            items = []
            while self.queue and len(items) < self.batch:
                items.append(self.queue.popleft())
            spans = []
            for item in items:
                try:
                    spans.extend(self.converter.spans(*item))
                except Exception:  # a bug converting one request must not stop the exporter
                    log.exception("could not make spans of a request")
            if not spans:
                continue
            try:
                ok = self.converter.export(spans)
            except Exception:
                log.exception("span export failed")
                ok = False
            if ok:
                self.exported += len(spans)
            else:
                self.dropped["export_failed"] += len(spans)

    def close(self, timeout_s: float = 2.0) -> None:
        """Export what is queued, within ``timeout_s`` (an endpoint that does not answer is not waited for)."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._thread is None or not self._thread.is_alive():
            self._drain_quickly(timeout_s)
        self.converter.shutdown()

    def _drain_quickly(self, timeout_s: float) -> None:
        done = threading.Thread(target=self._drain, daemon=True)
        done.start()
        done.join(timeout_s)
