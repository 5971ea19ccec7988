#!/usr/bin/env python3
"""CPU instructions per SSE stream, gateway vs bare proxy, under callgrind (deterministic).

Each proxy serves N1 and then N2 sequential streams (``"stream": true``; the fake upstream sends its first chunk,
``--chunks`` more, then ``data: [DONE]``); (total(N2) - total(N1)) / (N2 - N1) is one stream's cost. Run with two
``--chunks`` values to split it into a fixed part and a per-chunk part.

    python bench/stream_instructions.py                 # --chunks 5, ~2 min
    python bench/stream_instructions.py --chunks 25

With no gap between upstream chunks, how many arrive in one read depends on timing: expect ±20 k per stream
between runs on a busy machine (``--interval-ms 5`` spaces them, steadier).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from instructions import PY, connect, free_port, run_counted  # noqa: E402

BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"stream":true}'


def send(port: int, n: int, chunks: int, interval_ms: int) -> None:
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Authorization: Bearer sk-bench\r\nX-Bench-Chunks: %d\r\nX-Bench-Interval-Ms: %d\r\n"
               b"Content-Length: %d\r\n\r\n" % (chunks, interval_ms, len(BODY))) + BODY
    sock = connect(port)
    with sock:
        for i in range(n):
            time.sleep(0.02)
            sock.sendall(request)
            buf = b""
            while not buf.endswith(b"0\r\n\r\n"):  # the chunked body's end
                data = sock.recv(65536)
                if not data:
                    raise SystemExit("the proxy closed the connection")
                buf += data
            if i == 0 and b"[DONE]" not in buf:
                raise SystemExit(buf[:500].decode(errors="replace"))


def count(name: str, up_port: int, n: int, tmp: Path, a: argparse.Namespace) -> int:
    port = free_port()
    cfg = tmp / "gateway.yaml"
    cfg.write_text(f"server: {{default_target: up, port: {port}}}\ntargets:\n"
                   f"  up: {{base_url: 'http://127.0.0.1:{up_port}/v1', provider: openai, auth: {{type: passthrough}}}}\n")
    cmd = ([PY, str(BENCH / "bare_proxy.py"), "--port", str(port), "--upstream", f"http://127.0.0.1:{up_port}"]
           if name == "bare" else [PY, "-m", "gateway", "--config", str(cfg), "--log-level", "info"])
    return run_counted(cmd, tmp / f"{name}.{n}.out", lambda: send(port, n, a.chunks, a.interval_ms))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=5, help="chunks after the first one")
    ap.add_argument("--interval-ms", type=int, default=0, help="the upstream's pause before each of them")
    ap.add_argument("--n1", type=int, default=40)
    ap.add_argument("--n2", type=int, default=160)
    a = ap.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind not found (apt-get install valgrind)", file=sys.stderr)
        return 2
    up_port = free_port()
    upstream = subprocess.Popen([PY, str(BENCH / "fake_upstream.py"), "--port", str(up_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = Path(tempfile.mkdtemp(prefix="reliapi-streams-"))
    try:
        connect(up_port, timeout=15).close()
        for name in ("bare", "gateway"):
            first, second = count(name, up_port, a.n1, tmp, a), count(name, up_port, a.n2, tmp, a)
            print(f"{name:8s} {(second - first) / (a.n2 - a.n1) / 1000:8.1f} k instructions / stream "
                  f"(1 + {a.chunks} chunks)", flush=True)
    finally:
        upstream.terminate()
        upstream.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
