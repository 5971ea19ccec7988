#!/usr/bin/env python3
"""CPU instructions per proxied request, gateway vs bare proxy, under valgrind's callgrind.

Requests per second on a shared VM drift by ±20 % between identical runs; instruction
counts do not. Each proxy runs twice under callgrind, serving N1 and then N2 sequential
non-streaming requests over one keep-alive connection; (total(N2) - total(N1)) / (N2 - N1)
cancels start-up and shutdown and leaves the cost of one request. Takes 2-4 minutes.

The client waits ``--gap-ms`` between a response and the next request, so that the proxy is
always idle, waiting for it, when it comes — as behind any real network. Without the gap the
count depended on a race: a proxy that was still busy after writing a response found the next
request already there and skipped one turn of its event loop (≈ 5-10 k instructions), so the
same code measured differently from run to run and any change of timing moved the count. Hash
randomisation is off in the measured processes (``PYTHONHASHSEED=0``) for the same reason.

    python bench/instructions.py [--n1 100] [--n2 400] [--gap-ms 20]
    python bench/instructions.py --check bench/instructions_baseline.json   # the regression guard (CI)
    python bench/instructions.py --record bench/instructions_baseline.json  # a new baseline, on purpose

``--check`` fails (exit 1) when the gateway's instructions per plain request, as a ratio to the bare
proxy's measured in the same run, grew more than ``--tolerance`` (3 %) over the committed baseline. The
ratio, not the absolute count, is compared: it carries from one machine and Python build to another,
where the absolute counts do not.

Needs valgrind (Debian package `valgrind`). 127.0.0.1 only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
REQUEST = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           b"Authorization: Bearer sk-bench\r\nContent-Length: %d\r\n\r\n" % len(BODY)) + BODY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect(port: int, timeout: float = 120) -> socket.socket:
    deadline = time.monotonic() + timeout  # valgrind makes start-up slow
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=60)
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"nothing listening on {port} after {timeout}s") from None
            time.sleep(0.2)


def send_sequential(port: int, n: int, gap_s: float = 0.0) -> None:
    sock = connect(port)
    with sock:
        for i in range(n):
            if gap_s:
                time.sleep(gap_s)
            sock.sendall(REQUEST)
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = sock.recv(65536)
                if not data:
                    raise SystemExit(f"connection closed after {i} requests")
                buf += data
            head, _, rest = buf.partition(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
            while len(rest) < length:
                rest += sock.recv(65536)


def instructions(cmd: list[str], port: int, n: int, out: Path, gap_s: float) -> int:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["PYTHONHASHSEED"] = "0"  # the same dict and set layouts in every run: hash randomisation moves the count
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *cmd],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    try:
        send_sequential(port, n, gap_s)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    match = re.search(r"^summary:\s+(\d+)", out.read_text(), re.M)
    if match is None:
        raise SystemExit(f"no callgrind summary in {out}")
    return int(match.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n1", type=int, default=100)
    ap.add_argument("--n2", type=int, default=400)
    ap.add_argument("--gap-ms", type=float, default=20.0, help="pause before each request (0: back to back)")
    ap.add_argument("--check", type=Path, help="fail when gateway/bare grew over this baseline file's by > tolerance")
    ap.add_argument("--record", type=Path, help="write the measured ratio to this baseline file")
    ap.add_argument("--tolerance", type=float, default=0.03)
    a = ap.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind not found (apt-get install valgrind)", file=sys.stderr)
        return 2
    up_port = free_port()
    upstream = subprocess.Popen([PY, str(BENCH / "fake_upstream.py"), "--port", str(up_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = Path(tempfile.mkdtemp(prefix="reliapi-instr-"))
    try:
        connect(up_port, timeout=15).close()
        cfg = tmp / "gateway.yaml"
        results = {}
        for name in ("bare", "gateway"):
            port = free_port()
            cfg.write_text(f"server: {{default_target: up, port: {port}}}\ntargets:\n"
                           f"  up: {{base_url: 'http://127.0.0.1:{up_port}/v1', provider: openai, "
                           f"auth: {{type: passthrough}}}}\n")
            cmd = ([PY, str(BENCH / "bare_proxy.py"), "--port", str(port), "--upstream", f"http://127.0.0.1:{up_port}"]
                   if name == "bare" else [PY, "-m", "gateway", "--config", str(cfg), "--log-level", "info"])
            totals = [instructions(cmd, port, n, tmp / f"{name}.{n}.out", a.gap_ms / 1000) for n in (a.n1, a.n2)]
            results[name] = (totals[1] - totals[0]) / (a.n2 - a.n1)
            print(f"{name:8s} {results[name] / 1000:8.1f} k instructions / request", flush=True)
        ratio = results["gateway"] / results["bare"]
        print(f"gateway/bare {ratio:.3f}x")
        if a.record is not None:
            a.record.write_text(json.dumps({"gateway_over_bare": round(ratio, 4), "gateway_k": round(results["gateway"] / 1000, 1),
                                            "bare_k": round(results["bare"] / 1000, 1)}, indent=2) + "\n")
        if a.check is not None:
            base = json.loads(a.check.read_text())["gateway_over_bare"]
            limit = base * (1 + a.tolerance)
            verdict = "OK" if ratio <= limit else "REGRESSION"
            print(f"baseline {base:.3f}x, limit {limit:.3f}x (+{a.tolerance:.0%}): {verdict}")
            if ratio > limit:
                return 1
    finally:
        upstream.terminate()
        upstream.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
