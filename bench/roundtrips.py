#!/usr/bin/env python3
"""Store round trips per request of the stateful pipeline, counted by Redis itself (``MONITOR``).

Starts the fake upstream and one gateway with the stateful bench's config (tenant with a rate limit,
idempotency, cache — ``bench/stateful.py``) on Redis, under a fresh key prefix, then sends one request
at a time and counts the commands Redis received from the gateway for each (a script counts once: the
commands it runs inside are not round trips):

  - MISS: a new body with a new ``Idempotency-Key`` (every policy misses and writes);
  - HIT: the same body again without a key (answered from the cache);
  - REPLAY: the first request again with its key (answered by idempotency).

  python bench/roundtrips.py          # ~5 s; needs Redis at REDIS_URL (default redis://127.0.0.1:6379/0)

The leader's writes land just after its client got the answer, so each request waits for the store to
go quiet before the next one is sent.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from measure import CHAT_PATH  # noqa: E402
from procs import HOST, PY, RESULTS, Child, cleanup, free_port, http, wait_ready  # noqa: E402
from stateful import REDIS_URL, TENANT_KEY, drop_prefix, gateway_config  # noqa: E402


class Monitor:
    """``MONITOR`` on its own connection: the top-level commands that name the prefix, as they arrive."""

    def __init__(self, url: str, prefix: str) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), timeout=5)
        self.sock.sendall(b"MONITOR\r\n")
        self.prefix = prefix.encode()
        self.lines: list[str] = []
        self.last_at = time.monotonic()
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            *whole, buf = buf.split(b"\r\n")
            for line in whole:
                # +1700000000.123456 [0 127.0.0.1:5555] "EVALSHA" "…" — "[0 lua]" are a script's own commands
                if self.prefix in line and b" lua]" not in line:
                    with self.lock:
                        self.lines.append(line.decode(errors="replace"))
                        self.last_at = time.monotonic()

    def take(self, quiet_s: float = 0.3) -> list[str]:
        """The commands since the last take, once none came for ``quiet_s`` (and at least that long)."""
        time.sleep(quiet_s)
        while time.monotonic() - self.last_at < quiet_s:
            time.sleep(0.05)
        with self.lock:
            out, self.lines = self.lines, []
        return out


def what(line: str, prefix: str) -> str:
    """``EVALSHA(idem+cache)``: the command and the kinds of key it names (the first segment after the prefix)."""
    words = [w.strip('"') for w in line.split("] ", 1)[-1].split('" "')]
    kinds = sorted({w[len(prefix) + 1:].split(":", 1)[0] for w in words[1:] if w.startswith(prefix + ":")},
                   key=lambda k: ("idem", "cache", "rl").index(k) if k in ("idem", "cache", "rl") else 9)
    return f"{words[0]}({'+'.join(kinds)})"


BACKGROUND = ":usage:"  # usage rows are written in batches, in the background: not a request's round trip


def main() -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    prefix = "bench:" + uuid.uuid4().hex[:12]
    out: dict = {}
    try:
        up_port = free_port()
        upstream = Child("upstream", [PY, str(BENCH_DIR / "fake_upstream.py"), "--host", HOST, "--port", str(up_port)],
                         RESULTS / "roundtrips-upstream.log")
        wait_ready(upstream, up_port, 15)
        cfg = RESULTS / "roundtrips.yaml"
        cfg.write_text(gateway_config(f"http://{HOST}:{up_port}", REDIS_URL, prefix))
        port = free_port()
        gw = Child("gateway", [PY, "-m", "gateway", "--config", str(cfg), "--host", HOST, "--port", str(port)],
                   RESULTS / "roundtrips-gateway.log")
        wait_ready(gw, port, 30)
        url = f"http://{HOST}:{port}{CHAT_PATH}"
        monitor = Monitor(REDIS_URL, prefix)
        headers = {"Authorization": f"Bearer {TENANT_KEY}", "Content-Type": "application/json"}

        def body(n: int) -> bytes:
            return json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"rt {n}"}]}).encode()

        http("POST", url, body(0), {**headers, "Idempotency-Key": uuid.uuid4().hex})  # warm-up: scripts loaded
        monitor.take()
        cases = [("MISS", body(1), {"Idempotency-Key": "k1"}), ("HIT", body(1), {}),
                 ("REPLAY", body(1), {"Idempotency-Key": "k1"}), ("MISS", body(2), {"Idempotency-Key": "k2"}),
                 ("HIT", body(2), {})]
        for name, data, extra in cases:
            status, got, _ = http("POST", url, data, {**headers, **extra})
            taken = monitor.take()
            lines = [line for line in taken if BACKGROUND not in line]
            cmds = Counter(what(line, prefix) for line in lines)
            print(f"{name:<7} HTTP {status} X-Cache {got.get('x-cache', '-'):<6} round trips {len(lines)}: "
                  + ", ".join(f"{c}×{n}" if n > 1 else c for c, n in cmds.items())
                  + (f"   (+{len(taken) - len(lines)} usage batch, background)" if len(taken) > len(lines) else ""))
            out.setdefault(name, []).append({"round_trips": len(lines), "commands": dict(cmds), "status": status})
            if os.environ.get("ROUNDTRIPS_VERBOSE"):
                for line in lines:
                    print("   ", line[:200])
        (RESULTS / "roundtrips.json").write_text(json.dumps(out, indent=2) + "\n")
        return 0
    finally:
        cleanup()
        drop_prefix(prefix)


if __name__ == "__main__":
    sys.exit(main())
