#!/usr/bin/env python3
"""The stateful pipeline's cost: tenants + rate limit + idempotency + cache, on memory and on Redis.

One run starts the fake upstream, the bare aiohttp pass-through and three gateways — the
default pipeline, the stateful pipeline on the memory store, and the same on Redis — and
measures, in alternating slices so machine noise hits all alike:

  (a) requests/s at fixed concurrency. The stateful gateways get the worst case: every
      request carries a tenant key and a NEW idempotency key and body, so the rate limit
      takes, idempotency claims and stores, and the cache misses, claims and stores —
      four store round trips per request on Redis (``bench/roundtrips.py`` counts them);
  (b) latency at concurrency 1: the bare pass-through's round trip to the upstream vs a
      cache HIT on each store (the same request again; no upstream call).

  python bench/stateful.py            # ~1.5 min
  python bench/stateful.py --quick    # ~25 s

Results: bench/results/stateful.json. Needs Redis at REDIS_URL (default redis://127.0.0.1:6379/0);
without it the Redis gateway is left out and said so.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
import uuid
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from loadgen import pct  # noqa: E402
from measure import CHAT_PATH, _last_json, smoke  # noqa: E402
from procs import HOST, PY, RESULTS, Child, cleanup, free_port, log, run_tools, wait_ready  # noqa: E402

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
TENANT_KEY = "bench-tenant-key-0001"


def gateway_config(up_url: str, store_url: str | None, prefix: str) -> str:
    base = ("server: {default_target: up}\n"
            "targets:\n"
            "  up:\n"
            f"    base_url: {up_url}/v1\n"
            "    provider: openai\n"
            "    auth: {type: none}\n")
    if store_url is None:
        return base
    return (base +
            "    cache: {ttl_s: 600}\n"
            f"store: {{url: \"{store_url}\", key_prefix: \"{prefix}\"}}\n"
            "tenants:\n"
            "  - name: bench\n"
            f"    api_key: {TENANT_KEY}\n"
            "    rate_limit: {rpm: 100000000, burst: 1000000}\n")


def rps(url: str, seconds: float, concurrency: int, *, tenant: bool, unique: bool, raw: bool = False) -> dict:
    cmd = [PY, str(BENCH_DIR / "loadgen.py"), "rps", "--url", url, "--concurrency", str(concurrency),
           "--duration", str(seconds)]
    if tenant:
        cmd += ["--tenant-key", TENANT_KEY]
    if unique:
        cmd += ["--unique"]
    if raw:
        cmd += ["--raw"]
    return _last_json(run_tools([cmd], seconds + 60)[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--concurrency", type=int, default=32)
    a = ap.parse_args()
    rounds, slice_s, probes, probe_s = (1, 2.0, 1, 1.0) if a.quick else (3, 4.0, 3, 2.0)
    RESULTS.mkdir(parents=True, exist_ok=True)
    prefix = "bench:" + uuid.uuid4().hex[:12]
    res: dict = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "concurrency": a.concurrency,
                 "rounds": rounds, "slice_s": slice_s, "rps": {}, "latency_c1_ms": {}, "notes": []}
    try:
        up_port = free_port()
        up_url = f"http://{HOST}:{up_port}"
        upstream = Child("upstream", [PY, str(BENCH_DIR / "fake_upstream.py"), "--host", HOST, "--port", str(up_port)],
                         RESULTS / "stateful-upstream.log")
        wait_ready(upstream, up_port, 15)
        ports: dict[str, int] = {}
        bare_port = free_port()
        bare = Child("bare", shlex.split(f"{PY} {BENCH_DIR}/bare_proxy.py --host {HOST} --port {bare_port} "
                                         f"--upstream {up_url}"), RESULTS / "stateful-bare.log")
        wait_ready(bare, bare_port, 15)
        ports["bare"] = bare_port
        redis_ok = _redis_answers()
        variants = {"gateway": None, "stateful-memory": "memory://"}
        if redis_ok:
            variants["stateful-redis"] = REDIS_URL
        else:
            res["notes"].append(f"Redis not reachable at {REDIS_URL}: stateful-redis left out")
            log(res["notes"][-1])
        for name, store in variants.items():
            cfg = RESULTS / f"stateful-{name}.yaml"
            cfg.write_text(gateway_config(up_url, store, prefix))
            port = free_port()
            child = Child(name, [PY, "-m", "gateway", "--config", str(cfg), "--host", HOST, "--port", str(port),
                                 "--log-level", "info"], RESULTS / f"stateful-{name}.log")
            wait_ready(child, port, 30)
            ports[name] = port
        urls = {n: f"http://{HOST}:{p}{CHAT_PATH}" for n, p in ports.items()}
        smoke(urls["bare"])
        smoke(urls["gateway"])
        log(f"warm-up; then {rounds} rounds of {slice_s:g}s slices per proxy at c={a.concurrency}")
        for n, url in urls.items():
            rps(url, 1.0, a.concurrency, tenant=n.startswith("stateful"), unique=n.startswith("stateful"))
        names = list(urls)
        runs: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds * 2):
            order = names if r % 2 == 0 else names[::-1]
            line = []
            for n in order:
                stateful = n.startswith("stateful")
                m = rps(urls[n], slice_s, a.concurrency, tenant=stateful, unique=stateful)
                if m["status_errors"] or m["errors"]:
                    res["notes"].append(f"{n}: status errors {m['status_errors']}, errors {m['errors']}")
                runs[n].append(m["rps"])
                line.append(f"{n} {m['rps']:6.0f}/s")
            log(f"slice {r + 1}/{rounds * 2}: " + " | ".join(line))
        for n in names:
            total = sum(runs[n]) / len(runs[n])
            res["rps"][n] = {"rps": round(total, 1), "slices": [round(x, 1) for x in runs[n]]}
        for n in names:  # each quad is two rounds, in ABBA order: Σ proxy / Σ bare over it, median over the quads
            quads = [(runs[n][q] + runs[n][q + 1]) / (runs["bare"][q] + runs["bare"][q + 1])
                     for q in range(0, len(runs[n]) - 1, 2)]
            res["rps"][n]["ratio_quads"] = [round(x, 3) for x in quads]
            res["rps"][n]["ratio_vs_bare"] = round(statistics.median(quads), 3)

        # (b) cache HIT vs the bare round trip: one request at a time on a keep-alive connection,
        # the same request over and over (after the first, every stateful answer is a HIT)
        lat: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(probes):
            for n in names:
                m = rps(urls[n], probe_s, 1, tenant=n.startswith("stateful"), unique=False, raw=True)
                lat[n] += [x / 1000.0 for x in m["lat_us"]]
        for n in names:
            s = sorted(lat[n])
            res["latency_c1_ms"][n] = {"p50": round(pct(s, 50), 3), "p90": round(pct(s, 90), 3),
                                       "p99": round(pct(s, 99), 3)}
        _report(res, names)
        return 0
    finally:
        cleanup()
        drop_prefix(prefix)
        (RESULTS / "stateful.json").write_text(json.dumps(res, indent=2) + "\n")


def _report(res: dict, names: list[str]) -> None:
    what = {"bare": "bare aiohttp pass-through", "gateway": "gateway, default pipeline",
            "stateful-memory": "tenant+rate limit+idempotency+cache, memory (all misses)",
            "stateful-redis": "tenant+rate limit+idempotency+cache, Redis (all misses)"}
    print()
    print(f"{'proxy':<17} {'rps':>8} {'× bare':>7}   {'c=1 p50 ms':>10} {'p99 ms':>8}   what (c=1 column: cache HIT for stateful)")
    for n in names:
        r, lt = res["rps"][n], res["latency_c1_ms"][n]
        print(f"{n:<17} {r['rps']:8.0f} {r['ratio_vs_bare']:7.2f}   {lt['p50']:10.3f} {lt['p99']:8.3f}   {what[n]}")
    checks = []
    if "stateful-redis" in res["rps"]:
        ratio = res["rps"]["stateful-redis"]["ratio_vs_bare"]
        quads = " ".join(f"{x:.2f}" for x in res["rps"]["stateful-redis"]["ratio_quads"])
        checks.append(("stateful pipeline on Redis >= 0.6x bare throughput (median of ABBA quads)", ratio >= 0.6,
                       f"{ratio:.2f}x (quads {quads})"))
    bare_p50 = res["latency_c1_ms"]["bare"]["p50"]
    for n in ("stateful-memory", "stateful-redis"):
        if n in res["latency_c1_ms"]:
            hit = res["latency_c1_ms"][n]["p50"]
            checks.append((f"cache HIT ({n.split('-')[1]}) faster than the bare round trip", hit < bare_p50,
                           f"{hit:.3f} vs {bare_p50:.3f} ms"))
    res["checks"] = [{"check": c, "pass": ok, "value": v} for c, ok, v in checks]
    print()
    for c, ok, v in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {c}: {v}")
    for note in res["notes"]:
        print(f"  note: {note}")


def _redis_answers() -> bool:
    import socket
    from urllib.parse import urlsplit
    parts = urlsplit(REDIS_URL)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def drop_prefix(prefix: str) -> None:
    """Delete the run's keys (redis-cli, when Redis was used)."""
    if not _redis_answers():
        return
    import subprocess
    from urllib.parse import urlsplit
    parts = urlsplit(REDIS_URL)
    cmd = ["redis-cli", "-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379), "--scan",
           "--pattern", f"{prefix}:*"]
    try:
        keys = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.split()
        for i in range(0, len(keys), 500):
            subprocess.run(cmd[:5] + ["UNLINK", *keys[i:i + 500]], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pass


if __name__ == "__main__":
    sys.exit(main())
