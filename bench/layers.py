#!/usr/bin/env python3
"""CPU instructions per request, layer by layer: what each stateful policy adds (callgrind, deterministic).

``bench/instructions.py`` counts a plain request against the bare proxy; this counts the same request
through pipelines that add one policy at a time, each request a miss with a new body (and a new
idempotency key where the layer has one) — the worst case of ``make bench-stateful``:

  plain       default pipeline, no store work
  tenant      + a tenant key (authentication, tenant access)
  rl          + the tenant's rate limit (one GCRA take on the memory store)
  idem        + an idempotency key (claim, lead, answer stored)
  cache       rate limit + the cache on the target (claim, lead, answer stored), no idempotency key
  full        rate limit + idempotency + cache: the stateful pipeline on the memory store
  full-redis  the same on Redis (REDIS_URL, default redis://127.0.0.1:6379/0)
  hit         a cache HIT (the same request again), memory store

    python bench/layers.py                 # every layer, ~6 min
    python bench/layers.py rl full         # some

Each layer runs twice under callgrind (N1 and N2 sequential requests, a pause before each, as in
``bench/instructions.py``); the difference over N2 - N1 is one request's cost. Needs valgrind.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from instructions import PY, connect, free_port, run_counted  # noqa: E402
from stateful import drop_prefix  # noqa: E402

LAYERS = ("plain", "tenant", "rl", "idem", "cache", "full", "full-redis", "hit")
TENANT_KEY = b"bench-tenant-key-0001"
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
N1, N2, GAP_S = 60, 260, 0.02
PREFIX = "layers:" + uuid.uuid4().hex[:8]  # this run's keys (on Redis: dropped at the end)


def config(layer: str, up_port: int, port: int, prefix: str) -> str:
    text = (f"server: {{default_target: up, port: {port}}}\ntargets:\n  up:\n"
            f"    base_url: http://127.0.0.1:{up_port}/v1\n    provider: openai\n    auth: {{type: none}}\n")
    if layer in ("cache", "full", "full-redis", "hit"):
        text += "    cache: {ttl_s: 600}\n"
    if layer == "plain":
        return text
    store = REDIS_URL if layer == "full-redis" else "memory://"
    text += f"store: {{url: \"{store}\", key_prefix: \"{prefix}\"}}\n"
    text += f"tenants:\n  - name: bench\n    api_key: {TENANT_KEY.decode()}\n"
    if layer != "tenant":
        text += "    rate_limit: {rpm: 100000000, burst: 1000000}\n"
    return text


def send(port: int, n: int, layer: str) -> None:
    sock = connect(port)
    with sock:
        for _ in range(n):
            time.sleep(GAP_S)
            unique = b"same" if layer == "hit" else uuid.uuid4().hex.encode()
            body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi %s"}]}' % unique
            head = b"Authorization: Bearer " + (b"sk-bench" if layer == "plain" else TENANT_KEY) + b"\r\n"
            if layer in ("idem", "full", "full-redis"):
                head += b"Idempotency-Key: k-" + unique + b"\r\n"
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         + head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = sock.recv(65536)
                if not data:
                    raise SystemExit("the gateway closed the connection")
                buf += data
            status, _, rest = buf.partition(b"\r\n\r\n")
            if not status.startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"{layer}: {status.decode(errors='replace')}")
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", status).group(1))
            while len(rest) < length:
                rest += sock.recv(65536)


def count(layer: str, up_port: int, n: int, tmp: Path) -> int:
    port = free_port()
    cfg = tmp / f"{layer}.yaml"
    cfg.write_text(config(layer, up_port, port, PREFIX))
    return run_counted([PY, "-m", "gateway", "--config", str(cfg), "--log-level", "info"], tmp / f"{layer}.{n}.out",
                       lambda: send(port, n, layer))


def main() -> int:
    layers = sys.argv[1:] or list(LAYERS)
    unknown = [x for x in layers if x not in LAYERS]
    if unknown:
        print(f"unknown layer(s) {unknown}; choose from {', '.join(LAYERS)}", file=sys.stderr)
        return 2
    if shutil.which("valgrind") is None:
        print("valgrind not found (apt-get install valgrind)", file=sys.stderr)
        return 2
    up_port = free_port()
    upstream = subprocess.Popen([PY, str(BENCH / "fake_upstream.py"), "--port", str(up_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = Path(tempfile.mkdtemp(prefix="reliapi-layers-"))
    try:
        connect(up_port, timeout=15).close()
        for layer in layers:
            first, second = count(layer, up_port, N1, tmp), count(layer, up_port, N2, tmp)
            print(f"{layer:10s} {(second - first) / (N2 - N1) / 1000:8.1f} k instructions / request", flush=True)
    finally:
        upstream.terminate()
        upstream.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
        if "full-redis" in layers:
            drop_prefix(PREFIX)
    return 0


if __name__ == "__main__":
    sys.exit(main())
