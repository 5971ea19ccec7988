"""OpenTelemetry spans over OTLP/HTTP (issue #18 points 2, 3 and 5), against a real receiver on loopback
(``tests.support.otlp``, decoded with opentelemetry-proto): one server span per request, child of the
caller's span, one client span per upstream attempt, child of the request's, with the GenAI attributes and
the policies' events; a stream's span ends with the stream; an unreachable or slow endpoint never slows or
fails a request, and what it loses is counted."""

from __future__ import annotations

import asyncio
import re
import socket
import sys
import time

import openai
import pytest

from gateway.config.tracing import TracingConfig
from gateway.keys import RUNTIME
from gateway.observe import otel
from tests.support.config import NO_RETRY, GatewayConfig
from tests.support.fakes import Fault
from tests.support.otlp import Receiver

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
CALLER = f"00-{TRACE}-{CALLER_SPAN}-01"
V1 = "/v1/chat/completions"
PROMPT = "the secret prompt words"
ANSWER = "Hello from the fake."


def chat(**extra) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}], **extra}


def config(url: str, **up) -> GatewayConfig:
    cfg = GatewayConfig(url, default_target="up")
    cfg.up(**{"retry_matrix": {"5xx": {"attempts": 2, "base_s": 0}, "429": {"attempts": 0}, "net": {"attempts": 0},
                               "timeout": {"attempts": 0}}, "fallback_targets": ["backup"], **up})
    cfg.up("backup", models=None, retry_matrix=NO_RETRY)
    return cfg.section("tracing", {"response_header": "both"})


@pytest.fixture
async def receiver(aiohttp_server):
    rx = Receiver()
    server = await aiohttp_server(rx.app())
    rx.url = str(server.make_url("")).rstrip("/")  # type: ignore[attr-defined]
    return rx


def otel_env(endpoint: str, **extra: str) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "20", **extra}


def upstream_span_ids(fake) -> list[str]:
    return [seen.headers["traceparent"].split("-")[2] for seen in fake.requests]


def no_content(spans) -> None:
    """Prompts and answers are never recorded."""
    text = repr([(s.name, s.attrs, s.events) for s in spans])
    assert PROMPT not in text and ANSWER not in text and "tok1" not in text


async def test_the_service_name_and_resource_come_from_the_standard_variables(fake, gateway, receiver):
    env = otel_env(receiver.url, OTEL_SERVICE_NAME="reliapi-staging",
                   OTEL_RESOURCE_ATTRIBUTES="service.version=2026.12,deployment.environment=stag%20ing")
    client, _ = await gateway(config(fake.url), env=env)
    await (await client.post(V1, json=chat(), headers={"traceparent": CALLER})).read()
    await receiver.wait_for(2)
    server, _ = receiver.of_trace(TRACE)
    resource = server.resource
    assert (resource["service.name"], resource["service.version"], resource["deployment.environment"]) == (
        "reliapi-staging", "2026.12", "stag ing")


async def test_an_envelopes_server_span_names_the_request_as_it_came_not_the_method_it_sent(fake, gateway, receiver):
    cfg = config(fake.url).rest("api")
    client, logs = await gateway(cfg, env=otel_env(receiver.url))
    resp = await client.post("/proxy/http", json={"target": "api", "method": "DELETE", "path": "/things/1"},
                             headers={"traceparent": CALLER})
    assert resp.status == 200 and fake.requests[-1].method == "DELETE"
    await receiver.wait_for(2)
    server, _ = receiver.of_trace(TRACE)
    assert server.name == "POST /proxy/http" and server.attrs["http.request.method"] == "POST"
    assert logs[-1]["method"] == "DELETE"  # (the access line says what was sent upstream)


async def test_retries_and_a_fallback_are_child_spans_of_the_callers_trace(fake, gateway, receiver):
    client, logs = await gateway(config(fake.url), env=otel_env(receiver.url))
    fake.plan(Fault(status=500), Fault(status=500), Fault(status=500), Fault())  # 3 tries of up, then backup
    resp = await client.post(V1, json=chat(), headers={"traceparent": CALLER, "tracestate": "rojo=1"})
    assert resp.status == 200
    await resp.read()
    await receiver.wait_for(5)
    server, attempts = receiver.of_trace(TRACE)

    # the caller's trace continued: the request's span is a child of the caller's
    assert server.parent_id == CALLER_SPAN and server.trace_state == "rojo=1"
    assert server.span_id == logs[-1]["span_id"] and logs[-1]["trace_id"] == TRACE  # the log names the span
    assert resp.headers["traceresponse"] == f"00-{TRACE}-{server.span_id}-01"
    assert server.name == "POST /v1/{path}" and server.kind == "server" and not server.error
    assert server.resource["service.name"] == "reliapi"
    a = server.attrs
    assert (a["http.route"], a["http.response.status_code"], a["reliapi.target"], a["reliapi.primary_target"],
            a["reliapi.fallback_target"], a["reliapi.attempts"]) == ("/v1/{path}", 200, "backup", "up", "backup", 4)
    names = [name for name, _ in server.events]
    assert names.count("retry_scheduled") == 2 and names.count("fallback_used") == 1
    fallback = dict(server.events)["fallback_used"]
    assert fallback["reliapi.target"] == "up" and fallback["reliapi.to_target"] == "backup"

    # one client span per attempt, each a child of the request's span, each the span the upstream was told of
    assert [s.parent_id for s in attempts] == [server.span_id] * 4
    assert [s.span_id for s in attempts] == upstream_span_ids(fake)
    assert [s.attrs["reliapi.target"] for s in attempts] == ["up", "up", "up", "backup"]
    assert [s.attrs["reliapi.attempt"] for s in attempts] == [1, 2, 3, 4]
    assert [s.attrs["http.response.status_code"] for s in attempts] == [500, 500, 500, 200]
    assert [s.error for s in attempts] == [True, True, True, False]
    assert [s.attrs.get("error.type") for s in attempts] == ["server_error"] * 3 + [None]
    for s in attempts:
        assert s.name == "chat gpt-4o-mini" and s.kind == "client"
        assert (s.attrs["gen_ai.operation.name"], s.attrs["gen_ai.provider.name"],
                s.attrs["gen_ai.request.model"]) == ("chat", "openai", "gpt-4o-mini")
        assert s.attrs["server.address"] == "127.0.0.1"
        assert server.start_ns <= s.start_ns <= s.end_ns <= server.end_ns
    last = attempts[-1].attrs
    assert (last["gen_ai.response.model"], last["gen_ai.usage.input_tokens"], last["gen_ai.usage.output_tokens"],
            last["gen_ai.response.finish_reasons"]) == ("gpt-4o-mini", 5, 4, ["stop"])
    no_content(receiver.spans)


async def test_a_new_trace_is_a_root_span_and_the_log_names_it(fake, gateway, receiver, gateway_log):
    client, logs = await gateway(config(fake.url), env=otel_env(receiver.url))
    fake.plan(Fault(status=500), Fault(status=500), Fault(status=500), Fault())
    resp = await client.post(V1, json=chat())
    await resp.read()
    trace_id = resp.headers["X-ReliAPI-Trace-Id"]
    await receiver.wait_for(5)
    server, attempts = receiver.of_trace(trace_id)
    assert server.parent_id == "" and len(attempts) == 4
    assert logs[-1]["trace_id"] == trace_id and logs[-1]["span_id"] == server.span_id
    lines = [ev for ev in gateway_log.lines if ev.get("event") == "fallback_used"]
    assert lines and {(ev["trace_id"], ev["span_id"]) for ev in lines} == {(trace_id, server.span_id)}


async def test_the_openai_sdk_call_has_genai_attributes(fake, gateway, receiver):
    client, _ = await gateway(config(fake.url), env=otel_env(receiver.url))
    async with openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="sk-client", max_retries=0,
                                  default_headers={"traceparent": CALLER}) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}], max_tokens=50)
        completion = raw.parse()
    assert completion.choices[0].message.content == ANSWER
    assert raw.headers["x-reliapi-trace-id"] == TRACE
    await receiver.wait_for(2)
    server, [attempt] = receiver.of_trace(TRACE)
    assert attempt.attrs["gen_ai.request.max_tokens"] == 50
    assert attempt.attrs["gen_ai.usage.input_tokens"] == 5 and attempt.attrs["gen_ai.response.finish_reasons"] == ["stop"]
    assert server.attrs["gen_ai.usage.output_tokens"] == 4 and server.attrs["reliapi.cache_hit"] is False
    no_content(receiver.spans)


async def test_a_streams_span_ends_when_the_stream_ends(fake, gateway, receiver):
    client, logs = await gateway(config(fake.url), env=otel_env(receiver.url))
    fake.plan(Fault(chunks=4, interval_ms=150))  # about 0.9 s from the first chunk to the last
    started = time.time_ns()
    resp = await client.post(V1, json=chat(stream=True), headers={"traceparent": CALLER})
    first = time.time_ns()
    body = await resp.read()
    ended = time.time_ns()
    assert body.endswith(b"data: [DONE]\n\n")
    await receiver.wait_for(2)
    server, [attempt] = receiver.of_trace(TRACE)
    assert server.end_ns - server.start_ns >= 0.6e9 and server.end_ns >= first + 0.5e9  # not when headers went
    assert started <= server.start_ns and server.end_ns <= ended
    assert attempt.end_ns >= first + 0.5e9  # the attempt lasts as long as its stream
    assert server.attrs["reliapi.stream_end"] == "complete" and server.attrs["reliapi.stream"] is True
    a = attempt.attrs
    assert 0 < a["gen_ai.response.time_to_first_chunk"] < 0.5
    assert (a["gen_ai.response.finish_reasons"], a["gen_ai.usage.output_tokens"], a["gen_ai.response.model"]) == (
        ["stop"], 4, "gpt-4o-mini")
    no_content(receiver.spans)


async def test_a_cut_stream_and_an_abandoned_one_say_so(fake, gateway, receiver):
    client, logs = await gateway(config(fake.url), env=otel_env(receiver.url))
    fake.plan(Fault(chunks=6, cut_after=3))
    resp = await client.post(V1, json=chat(stream=True), headers={"traceparent": CALLER})
    assert b'"error"' in await resp.read()  # the in-band error event
    await receiver.wait_for(2)
    server, [attempt] = receiver.of_trace(TRACE)
    assert server.attrs["reliapi.stream_end"] == "cut" and server.error
    assert attempt.error and attempt.attrs["error.type"]

    fake.plan(Fault(chunks=50, interval_ms=100))
    other = f"00-{'1' * 32}-{CALLER_SPAN}-01"
    resp = await client.post(V1, json=chat(stream=True), headers={"traceparent": other})
    await resp.content.readany()
    resp.close()  # the client leaves mid-stream
    await receiver.wait_for(4)
    server, [attempt] = receiver.of_trace("1" * 32)
    assert server.attrs["reliapi.stream_end"] == "abandoned" and logs[-1]["outcome"] == "client_closed"
    assert attempt.attrs["error.type"] == "cancelled"


async def test_a_recovered_stream_says_so_and_shows_both_attempts(upstreams, gateway, receiver):
    up = await upstreams()
    cfg = config(up.url, stream_recovery="continue", stream_idle_timeout_ms=300)
    client, logs = await gateway(cfg, env=otel_env(receiver.url))
    up.plan(Fault(chunks=20, cut_after=8), Fault(chunks=20))  # cut, then continued on the same target
    resp = await client.post(V1, json=chat(stream=True), headers={"traceparent": CALLER})
    assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    await receiver.wait_for(3)
    server, attempts = receiver.of_trace(TRACE)
    assert server.attrs["reliapi.stream_end"] == "recovered" and server.attrs["reliapi.recovered_on"] == "up"
    assert "stream_recovered" in [name for name, _ in server.events]
    assert len(attempts) == 2 and [s.span_id for s in attempts] == upstream_span_ids(up)
    assert attempts[0].error and not attempts[1].error


async def test_a_cache_hit_is_a_span_without_an_attempt(fake, gateway, receiver):
    cfg = config(fake.url, cache={"ttl_s": 60})
    client, _ = await gateway(cfg, env=otel_env(receiver.url))
    for trace in ("a" * 32, "b" * 32):
        await (await client.post(V1, json=chat(), headers={"traceparent": f"00-{trace}-{CALLER_SPAN}-01"})).read()
        await asyncio.sleep(0.05)
    await receiver.wait_for(3)
    miss, [_] = receiver.of_trace("a" * 32)
    hit, none = receiver.of_trace("b" * 32)
    assert (miss.attrs["reliapi.cache"], hit.attrs["reliapi.cache"], hit.attrs["reliapi.cache_hit"]) == ("miss", "hit", True)
    assert none == [] and len(fake.requests) == 1
    assert [name for name, _ in hit.events] == ["cache_hit"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _metric(client, name: str) -> float:
    text = await (await client.get("/metrics")).text()
    found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


async def _timed_requests(client, n: int) -> list[float]:
    took = []
    for _ in range(n):
        started = time.monotonic()
        resp = await client.post(V1, json=chat())
        assert resp.status == 200
        await resp.read()
        took.append(time.monotonic() - started)
    return took


async def test_an_unreachable_endpoint_never_slows_or_fails_a_request(fake, gateway):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    client, _ = await gateway(config(fake.url), env=otel_env(endpoint, OTEL_EXPORTER_OTLP_TIMEOUT="1"))
    took = await _timed_requests(client, 30)
    assert max(took) < 1.0, took  # never the exporter's 1 s timeout, nor its retries
    failed = 'reliapi_trace_spans_dropped_total{reason="export_failed"}'
    async with asyncio.timeout(15):
        while await _metric(client, failed) < 30:  # every span of every request, counted as lost
            await asyncio.sleep(0.1)
    assert await _metric(client, "reliapi_trace_spans_exported_total") == 0


async def test_a_slow_endpoint_fills_the_bounded_queue_and_drops_are_counted(fake, gateway, receiver):
    receiver.delay_s = 3.0  # longer than the exporter waits (1 s): every export fails, slowly
    env = otel_env(receiver.url, OTEL_EXPORTER_OTLP_TIMEOUT="1", OTEL_BSP_MAX_QUEUE_SIZE="4",
                   OTEL_BSP_MAX_EXPORT_BATCH_SIZE="2")
    client, _ = await gateway(config(fake.url), env=env)
    took = await _timed_requests(client, 40)
    assert max(took) < 1.0, took
    full = await _metric(client, 'reliapi_trace_spans_dropped_total{reason="queue_full"}')
    assert full >= 40 - 4 - 2 * 2 * 2  # the queue holds 4 requests; the thread holds a batch or two of them
    assert client.app[RUNTIME].current.spans.max_queue == 4


def test_export_is_asked_for_by_the_environment_or_the_config():
    on = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert otel.wanted(TracingConfig(), on)
    assert otel.wanted(TracingConfig(), {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"})
    assert not otel.wanted(TracingConfig(), {})  # no endpoint: nothing exported, nothing recorded
    assert otel.wanted(TracingConfig(export="otlp"), {})
    assert not otel.wanted(TracingConfig(export="off"), on)
    assert not otel.wanted(TracingConfig(), {**on, "OTEL_SDK_DISABLED": "true"})
    assert not otel.wanted(TracingConfig(), {**on, "OTEL_TRACES_EXPORTER": "none"})
    assert otel.wanted(TracingConfig(), {**on, "OTEL_TRACES_EXPORTER": "console,otlp"})


async def test_without_the_packages_the_gateway_still_traces(fake, gateway, monkeypatch, gateway_log):
    monkeypatch.setitem(sys.modules, "gateway.observe.otel_sdk", None)  # as if reliapi[otel] were not installed
    client, logs = await gateway(config(fake.url), env=otel_env("http://127.0.0.1:9"))
    assert client.app[RUNTIME].current.spans is None
    assert any("not installed" in line["message"] for line in gateway_log.lines)
    resp = await client.post(V1, json=chat(), headers={"traceparent": CALLER})
    assert resp.status == 200 and resp.headers["X-ReliAPI-Trace-Id"] == TRACE == logs[-1]["trace_id"]
