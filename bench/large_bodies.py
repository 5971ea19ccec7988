#!/usr/bin/env python3
"""Does a large body stall everyone else? A probe's /healthz latency while four 10 MB bodies arrive.

The gateway is one process on one event loop: whatever it does with a request body without
yielding — parse it, canonicalise it for a cache key, rewrite a field — every other request
waits for. This bench starts the fake upstream and two gateways:

  default   the built-in pipeline (retry, circuit; no policy reads the body but the router)
  full      a budgeted tenant, per-request caps, a response cache and an Idempotency-Key on
            every request: every policy that reads a body does

and, for each, sends four 10 MB JSON chat bodies at once — three shapes: half a million keys
nested in ``metadata``, half a million keys at the top level, one 10 MB message — while a
probe asks ``GET /healthz`` every 5 ms on its own connection. It reports the probe's p50, p99
and worst latency during the bodies, against the same probe with no bodies in flight.

    python bench/large_bodies.py            # ~30 s

Target (issue #12 point 7): no body holds the event loop more than 50 ms at a stretch — with
four in flight, a probe should never wait much past that.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import aiohttp  # noqa: E402
import msgspec  # noqa: E402
from loadgen import pct  # noqa: E402
from procs import HOST, PY, RESULTS, Child, cleanup, free_port, log, wait_ready  # noqa: E402

TENANT_KEY = "bench-tenant-key-0001"
BODIES = 4


def config(up_url: str, full: bool) -> str:
    text = ("server: {default_target: up, max_body_mb: 12}\n"
            "targets:\n"
            "  up:\n"
            f"    base_url: {up_url}/v1\n"
            "    provider: openai\n"
            "    auth: {type: none}\n")
    if full:
        text += ("    cache: {ttl_s: 600, max_entry_mb: 1}\n"
                 "    llm: {max_tokens: 1000, soft_cost_cap_usd: 5, hard_cost_cap_usd: 10}\n"
                 "tenants:\n"
                 "  - name: bench\n"
                 f"    api_key: {TENANT_KEY}\n"
                 "    budget: {daily_usd: 100000}\n")
    return text


def bodies() -> dict[str, bytes]:
    keys = {f"k{i}": "v" * 8 for i in range(500_000)}
    message = {"role": "user", "content": "hi"}
    return {
        "nested-keys": msgspec.json.encode({"model": "gpt-4o-mini", "messages": [message], "metadata": keys}),
        "top-level-keys": msgspec.json.encode({"model": "gpt-4o-mini", "messages": [message], **keys}),
        "long-text": msgspec.json.encode({"model": "gpt-4o-mini", "messages": [
            {"role": "user", "content": "lorem ipsum " * 870_000}]}),
    }


async def probe(session: aiohttp.ClientSession, url: str, stop: asyncio.Event, out: list[float]) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        async with session.get(url) as resp:
            await resp.read()
        out.append((time.perf_counter() - started) * 1000)
        await asyncio.sleep(0.005)


async def send(session: aiohttp.ClientSession, url: str, body: bytes, full: bool) -> int:
    headers = {"Content-Type": "application/json"}
    if full:
        headers |= {"Authorization": f"Bearer {TENANT_KEY}", "Idempotency-Key": uuid.uuid4().hex}
    async with session.post(url, data=body, headers=headers) as resp:
        await resp.read()
        return resp.status


async def measure(port: int, body: bytes | None, full: bool, seconds: float) -> dict:
    base = f"http://{HOST}:{port}"
    latencies: list[float] = []
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as probe_session, aiohttp.ClientSession() as senders:
        task = asyncio.ensure_future(probe(probe_session, base + "/healthz", stop, latencies))
        await asyncio.sleep(0.3)  # the probe's connection is up and warm
        latencies.clear()
        started = time.perf_counter()
        statuses: list[int] = []
        if body is None:
            await asyncio.sleep(seconds)
        else:
            # each body made unique (the cache and idempotency must do their work, not hit)
            sends = [send(senders, base + "/v1/chat/completions",
                          body.replace(b'"hi"', json.dumps(uuid.uuid4().hex).encode(), 1), full)
                     for _ in range(BODIES)]
            statuses = await asyncio.gather(*sends)
        elapsed = time.perf_counter() - started
        stop.set()
        await task
    latencies.sort()
    return {"probes": len(latencies), "p50_ms": round(pct(latencies, 50), 2), "p99_ms": round(pct(latencies, 99), 2),
            "max_ms": round(max(latencies), 2), "seconds": round(elapsed, 2), "statuses": statuses}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    res: dict = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "bodies_at_once": BODIES, "runs": {}}
    try:
        up_port = free_port()
        up_url = f"http://{HOST}:{up_port}"
        upstream = Child("upstream", [PY, str(BENCH_DIR / "fake_upstream.py"), "--host", HOST, "--port", str(up_port)],
                         RESULTS / "large-upstream.log")
        wait_ready(upstream, up_port, 15)
        shapes = bodies()
        for name, full in (("default", False), ("full", True)):
            cfg = RESULTS / f"large-{name}.yaml"
            cfg.write_text(config(up_url, full))
            port = free_port()
            child = Child(name, [PY, "-m", "gateway", "--config", str(cfg), "--host", HOST, "--port", str(port),
                                 "--log-level", "warning"], RESULTS / f"large-{name}.log")
            wait_ready(child, port, 30)
            runs = res["runs"][name] = {"idle": asyncio.run(measure(port, None, full, 2.0))}
            for shape, body in shapes.items():
                asyncio.run(measure(port, body, full, 0))  # warm-up (first use of each code path)
                runs[shape] = asyncio.run(measure(port, body, full, 0))
                log(f"{name:8s} {shape:15s} {runs[shape]}")
            child.stop()
    finally:
        cleanup()
    (RESULTS / "large_bodies.json").write_text(json.dumps(res, indent=2))
    print(f"\n/healthz latency (ms) while {BODIES} 10 MB bodies arrive at once")
    print(f"{'pipeline':10s} {'bodies':16s} {'p50':>7s} {'p99':>7s} {'max':>7s}  statuses")
    for name, runs in res["runs"].items():
        for shape, r in runs.items():
            print(f"{name:10s} {shape:16s} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f} {r['max_ms']:7.2f}  {r['statuses']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
