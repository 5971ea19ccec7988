#!/usr/bin/env python3
"""Does a large body stall everyone else? A probe's /healthz latency while four 10 MB bodies arrive.

The gateway is one process on one event loop: whatever it does with a request body without
yielding — parse it, canonicalise it for a cache key, rewrite a field — every other request
waits for. This bench starts the fake upstream, the bare aiohttp pass-through and two gateways:

  bare      bench/bare_proxy.py: the floor (receiving and sending 40 MB costs something too)
  default   the built-in pipeline (retry, circuit; no policy reads the body but the router)
  full      a budgeted tenant, per-request caps, a response cache and an Idempotency-Key on
            every request: every policy that reads a body does

and, for each, sends four 10 MB JSON chat bodies at once — three shapes: half a million keys
nested in ``metadata``, half a million keys at the top level, one 10 MB message — while a
probe (a process of its own) asks ``GET /healthz`` every 5 ms on its own connection for 3 s.
It reports the probe's p50, p99 and worst latency, against the same probe with no bodies in
flight. On two cores the gateway shares the machine with the harness sending 40 MB, the fake
upstream receiving it and the probe: the worst probe includes their scheduling too.

    python bench/large_bodies.py            # ~30 s

Target (issue #12 point 7): no body holds the event loop more than 50 ms at a stretch. That is
measured from inside the gateway (``stretch_gateway.py``: the longest step asyncio's debug loop
reports while the bodies are handled); the probe shows what another client sees.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
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


async def probe(url: str, seconds: float) -> list[float]:
    """The probe, run in a process of its own (``--probe``): the harness's own sending must not delay it."""
    latencies: list[float] = []
    async with aiohttp.ClientSession() as session:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            async with session.get(url) as resp:
                await resp.read()
            latencies.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.005)
    return latencies


async def send(session: aiohttp.ClientSession, url: str, body: bytes, full: bool) -> int:
    headers = {"Content-Type": "application/json"}
    if full:
        headers |= {"Authorization": f"Bearer {TENANT_KEY}", "Idempotency-Key": uuid.uuid4().hex}
    async with session.post(url, data=body, headers=headers) as resp:
        await resp.read()
        return resp.status


async def measure(port: int, body: bytes | None, full: bool, seconds: float) -> dict:
    base = f"http://{HOST}:{port}"
    # each body made unique beforehand (the cache and idempotency must do their work, not hit)
    bodies = [body.replace(b'"hi"', json.dumps(uuid.uuid4().hex).encode(), 1) for _ in range(BODIES)] if body else []
    window = 3.0 if body else seconds
    prober = await asyncio.create_subprocess_exec(
        PY, __file__, "--probe", base + "/healthz", "--seconds", str(window), stdout=asyncio.subprocess.PIPE)
    await asyncio.sleep(0.5)  # the probe is up and has its connection
    statuses: list[int] = []
    started = time.perf_counter()
    if bodies:
        async with aiohttp.ClientSession() as senders:
            statuses = await asyncio.gather(*(send(senders, base + "/v1/chat/completions", b, full) for b in bodies))
    elapsed = time.perf_counter() - started
    out, _ = await prober.communicate()
    latencies = sorted(json.loads(out))
    return {"probes": len(latencies), "p50_ms": round(pct(latencies, 50), 2), "p99_ms": round(pct(latencies, 99), 2),
            "max_ms": round(latencies[-1], 2), "seconds": round(elapsed, 2), "statuses": statuses}


def stretches(up_url: str, shapes: dict[str, bytes]) -> dict[str, float]:
    """The full pipeline on asyncio's debug loop (``bench/stretch_gateway.py``): the longest step, in ms,
    that held the loop while each shape's four bodies were handled."""
    cfg = RESULTS / "large-full.yaml"
    port = free_port()
    log_path = RESULTS / "large-stretches.log"
    os.environ["PYTHONASYNCIODEBUG"] = "1"
    try:
        child = Child("stretches", [PY, str(BENCH_DIR / "stretch_gateway.py"), "--config", str(cfg), "--host", HOST,
                                    "--port", str(port), "--log-level", "warning"], log_path)
    finally:
        del os.environ["PYTHONASYNCIODEBUG"]
    out: dict[str, float] = {}
    try:
        wait_ready(child, port, 30)
        for shape, body in shapes.items():
            asyncio.run(measure(port, body, True, 0))  # warm-up
            start = log_path.stat().st_size
            asyncio.run(measure(port, body, True, 0))
            text = log_path.read_bytes()[start:].decode(errors="replace")
            took = [float(m) * 1000 for m in re.findall(r"took (\d+\.\d+) seconds", text)]
            out[shape] = round(max(took, default=0.0), 1)
    finally:
        child.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probe", help=argparse.SUPPRESS)  # internal: run as the probe process
    ap.add_argument("--seconds", type=float, default=3.0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.probe:
        print(json.dumps(asyncio.run(probe(a.probe, a.seconds))))
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    res: dict = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "bodies_at_once": BODIES, "runs": {}}
    try:
        up_port = free_port()
        up_url = f"http://{HOST}:{up_port}"
        upstream = Child("upstream", [PY, str(BENCH_DIR / "fake_upstream.py"), "--host", HOST, "--port", str(up_port)],
                         RESULTS / "large-upstream.log")
        wait_ready(upstream, up_port, 15)
        shapes = bodies()
        for name, full in (("bare", False), ("default", False), ("full", True)):
            port = free_port()
            if name == "bare":  # the floor: a bare aiohttp pass-through on the same machine, in the same run
                child = Child(name, [PY, str(BENCH_DIR / "bare_proxy.py"), "--host", HOST, "--port", str(port),
                                     "--upstream", up_url], RESULTS / "large-bare.log")
            else:
                cfg = RESULTS / f"large-{name}.yaml"
                cfg.write_text(config(up_url, full))
                child = Child(name, [PY, "-m", "gateway", "--config", str(cfg), "--host", HOST, "--port", str(port),
                                     "--log-level", "warning"], RESULTS / f"large-{name}.log")
            wait_ready(child, port, 30)
            runs = res["runs"][name] = {"idle": asyncio.run(measure(port, None, full, 3.0))}
            for shape, body in shapes.items():
                asyncio.run(measure(port, body, full, 0))  # warm-up (first use of each code path)
                runs[shape] = asyncio.run(measure(port, body, full, 0))
                log(f"{name:8s} {shape:15s} {runs[shape]}")
            child.stop()
        res["stretches_ms"] = stretches(up_url, shapes)
        log(f"longest stretches: {res['stretches_ms']}")
    finally:
        cleanup()
    (RESULTS / "large_bodies.json").write_text(json.dumps(res, indent=2))
    print(f"\nlongest step holding the event loop (full pipeline, asyncio debug loop; steps under "
          f"20 ms are not reported): {res['stretches_ms']}")
    print(f"\n/healthz latency (ms) while {BODIES} 10 MB bodies arrive at once")
    print(f"{'pipeline':10s} {'bodies':16s} {'p50':>7s} {'p99':>7s} {'max':>7s}  statuses")
    for name, runs in res["runs"].items():
        for shape, r in runs.items():
            print(f"{name:10s} {shape:16s} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f} {r['max_ms']:7.2f}  {r['statuses']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
