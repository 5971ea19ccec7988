#!/usr/bin/env python3
"""CPU instructions per proxied request, gateway vs bare proxy, under valgrind's callgrind.

Requests per second on a shared VM drift by ±20 % between identical runs; instruction
counts do not. Two ways to take them (``--method``):

``dump`` (the default, ~40 s): each proxy runs once under callgrind; the client sends ``--warmup``
requests over one keep-alive connection, has callgrind dump its counters (``vgdb --pid P dump``,
which also zeroes them), sends ``--n`` more and dumps again: the second dump holds exactly those
``--n`` requests, and start-up, warm-up and shutdown are left out without a second run. The bare
proxy and the gateway run side by side (two valgrind processes on two cores; ``--serial`` to
run one after the other).

``restart`` (the method of the committed numbers before it, ~2-4 min): each proxy runs twice,
serving N1 and then N2 requests; (total(N2) - total(N1)) / (N2 - N1) cancels start-up and shutdown.

Either way the proxy must be idle, waiting for the request, when it comes — as behind any real
network. Back to back, whether the proxy was still busy after writing a response when the next
request arrived decided whether it took one more turn of its event loop (≈ 5-10 k instructions), so
the same code measured differently from run to run. ``restart`` pauses ``--gap-ms`` (20) before each
request; ``dump`` pauses ``--gap-ms`` (2) and then waits until every thread of the proxy is asleep
and its CPU time (/proc/PID/task/*/schedstat) has not moved for 2 ms — idle whatever the load on the
machine, which is what lets the two proxies run at once. Hash randomisation is off in the measured
processes (``PYTHONHASHSEED=0``) for the same reason.

    python bench/instructions.py [--n 150] [--warmup 30]
    python bench/instructions.py --repeat 3       # the spread of the method, run to run
    python bench/instructions.py --method restart [--n1 100] [--n2 400] [--gap-ms 20]
    python bench/instructions.py --check bench/instructions_baseline.json   # the regression guard (CI)
    python bench/instructions.py --record bench/instructions_baseline.json  # a new baseline, on purpose

``--check`` fails (exit 1) when the gateway's instructions per plain request, as a ratio to the bare
proxy's measured in the same run, grew more than ``--tolerance`` (3 %) over the committed baseline. The
ratio, not the absolute count, is compared: it carries from one machine and Python build to another,
where the absolute counts do not.

Needs valgrind (Debian package `valgrind`: valgrind and vgdb). 127.0.0.1 only; every wait is bounded.
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
REQUEST = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           b"Authorization: Bearer sk-bench\r\nContent-Length: %d\r\n\r\n" % len(BODY)) + BODY


def _prompt() -> None:
    """The fake upstream runs at SCHED_FIFO priority 1 (else nice -10) where allowed, so that its answer is
    always there before the proxy under callgrind (~50x slower) waits for it. At normal priority, on a busy
    machine, it sometimes was not: the proxy then took one more turn of its event loop (a few k
    instructions) and the count rose with the machine's load (+0.3 % seen)."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (OSError, AttributeError):
        try:
            os.setpriority(os.PRIO_PROCESS, 0, -10)
        except OSError:
            pass


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


def _read_answer(sock: socket.socket, i: int) -> None:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise SystemExit(f"connection closed after {i} requests")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
    while len(rest) < length:
        data = sock.recv(65536)
        if not data:
            raise SystemExit(f"connection closed in answer {i}")
        rest += data


def send_sequential(port: int, n: int, gap_s: float = 0.0) -> None:
    sock = connect(port)
    with sock:
        for i in range(n):
            if gap_s:
                time.sleep(gap_s)
            sock.sendall(REQUEST)
            _read_answer(sock, i)


def _cpu_ns_and_running(pid: int) -> tuple[int, bool]:
    """CPU time (ns) of all of pid's threads, and whether any of them is running or runnable."""
    total, running = 0, False
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                running |= f.read().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError, ValueError):
            pass  # a thread that just ended
    return total, running


def wait_idle(pid: int, quiet_s: float = 0.002, timeout: float = 30.0) -> None:
    """Until every thread of pid sleeps and their CPU time stood still for quiet_s (bounded)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        now, running = _cpu_ns_and_running(pid)
        if not running and now == last:
            return
        last = None if running else now
        time.sleep(quiet_s)
    raise SystemExit(f"pid {pid} not idle after {timeout}s")


# The measured processes get this environment and nothing else: the same in a terminal, under make and in
# CI. Inherited, REDIS_URL (which .ci/run exports for the tests) would put the gateway on Redis, and any other
# variable moves the stack, and with it address-keyed hashing, by a few k instructions per request.
CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp",
             "PYTHONHASHSEED": "0",  # the same dict and set layouts in every run: hash randomisation moves the count
             "PYTHONDONTWRITEBYTECODE": "1"}


def _valgrind(cmd: list[str], out: Path, instr_atstart: bool = True) -> subprocess.Popen:
    opts = [] if instr_atstart else ["--instr-atstart=no"]
    valgrind = shutil.which("valgrind") or "valgrind"
    return subprocess.Popen([valgrind, "--tool=callgrind", f"--callgrind-out-file={out}", *opts, *cmd],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=CLEAN_ENV, cwd=REPO)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _total(path: Path, timeout: float = 60.0) -> int:
    """The instruction total of a callgrind output file, once it is complete (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            match = re.search(r"^(?:summary|totals):\s+(\d+)", path.read_text(), re.M)
        except OSError:
            match = None
        if match:
            return int(match.group(1))
        if time.monotonic() > deadline:
            raise SystemExit(f"no callgrind summary in {path}")
        time.sleep(0.1)


def run_counted(cmd: list[str], out: Path, load: Callable[[], None]) -> int:
    """All instructions of one run of ``cmd`` under callgrind, start-up to shutdown, while ``load`` drives it
    (the ``restart`` method; ``bench/layers.py`` and ``bench/stream_instructions.py`` count this way too)."""
    proc = _valgrind(cmd, out)
    try:
        load()
    finally:
        _stop(proc)
    return _total(out, timeout=5)


def instructions(cmd: list[str], port: int, n: int, out: Path, gap_s: float) -> int:
    """--method restart: all instructions of one run serving n requests, start-up to shutdown."""
    return run_counted(cmd, out, lambda: send_sequential(port, n, gap_s))


class VgdbUnavailable(Exception):
    """vgdb could not reach an idle valgrind process (it needs ptrace for that)."""


def _vgdb(pid: int, *command: str) -> None:
    """A callgrind monitor command to the valgrind process pid, blocked in a syscall: vgdb interrupts
    it with ptrace (where ptrace is not allowed, it would wait for the process to run: it does not)."""
    try:
        subprocess.run(["vgdb", f"--pid={pid}", *command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=30, check=True)
    except (subprocess.TimeoutExpired, subprocess.CalledProcessError) as e:
        raise VgdbUnavailable(f"vgdb {' '.join(command)} to pid {pid}: {e}") from None


def per_request_dump(cmd: list[str], port: int, warmup: int, n: int, out: Path, gap_s: float) -> float:
    """--method dump: one run; counters dumped after `warmup` requests and again after `n` more.
    Start-up runs without instrumentation (3-4x faster under callgrind; nothing of it is counted
    anyway), which is switched on once the proxy listens and is idle."""
    proc = _valgrind(cmd, out, instr_atstart=False)
    try:
        sock = connect(port)
        with sock:
            wait_idle(proc.pid)
            _vgdb(proc.pid, "instrumentation", "on")
            for k, count in enumerate((warmup, n), start=1):
                for i in range(count):
                    time.sleep(gap_s)
                    wait_idle(proc.pid)
                    sock.sendall(REQUEST)
                    _read_answer(sock, i)
                time.sleep(gap_s)
                wait_idle(proc.pid)
                _vgdb(proc.pid, "dump")
                total = _total(Path(f"{out}.{k}"))
        return total / n
    finally:
        _stop(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=("dump", "restart"), default="dump")
    ap.add_argument("--warmup", type=int, default=30, help="dump: requests before the first dump")
    ap.add_argument("--n", type=int, default=150, help="dump: requests measured")
    ap.add_argument("--serial", action="store_true", help="dump: one proxy after the other, not side by side")
    ap.add_argument("--n1", type=int, default=100, help="restart: requests of the first run")
    ap.add_argument("--n2", type=int, default=400, help="restart: requests of the second run")
    ap.add_argument("--gap-ms", type=float, default=None,
                    help="pause before each request (restart: 20, dump: 2, then until the proxy is idle)")
    ap.add_argument("--repeat", type=int, default=1, help="measure this many times and show the spread")
    ap.add_argument("--check", type=Path, help="fail when gateway/bare grew over this baseline file's by > tolerance")
    ap.add_argument("--record", type=Path, help="write the measured ratio to this baseline file")
    ap.add_argument("--tolerance", type=float, default=0.03)
    a = ap.parse_args()
    if a.gap_ms is None:
        a.gap_ms = 2.0 if a.method == "dump" else 20.0
    a.repeat = max(1, min(a.repeat, 10))
    for tool in ("valgrind", "vgdb"):
        if shutil.which(tool) is None:
            print(f"{tool} not found (apt-get install valgrind)", file=sys.stderr)
            return 2
    t_begin = time.monotonic()
    up_port = free_port()
    upstream = subprocess.Popen([PY, str(BENCH / "fake_upstream.py"), "--port", str(up_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_prompt)
    tmp = Path(tempfile.mkdtemp(prefix="reliapi-instr-"))
    runs: list[dict[str, float]] = []
    try:
        connect(up_port, timeout=15).close()
        for r in range(a.repeat):
            try:
                runs.append(_measure(a, up_port, tmp / str(r)))
            except VgdbUnavailable as e:
                print(f"{e}: ptrace not allowed here? Falling back to --method restart (N1 100, N2 400, "
                      f"gap 20 ms: 2-4 min)", flush=True)
                a.method, a.gap_ms = "restart", 20.0
                runs.append(_measure(a, up_port, tmp / f"{r}-restart"))
            res = runs[-1]
            print(f"bare {res['bare'] / 1000:8.1f} k, gateway {res['gateway'] / 1000:8.1f} k instructions / request: "
                  f"gateway/bare {res['gateway'] / res['bare']:.3f}x"
                  + (f"  (run {r + 1} of {a.repeat})" if a.repeat > 1 else ""), flush=True)
    finally:
        upstream.terminate()
        upstream.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = [x["gateway"] / x["bare"] for x in runs]
    ratio = sorted(ratios)[len(ratios) // 2]  # the median run
    how = (f"--method dump, warm-up {a.warmup}, {a.n} requests measured" if a.method == "dump"
           else f"--method restart, N1 {a.n1}, N2 {a.n2}")
    print(f"gateway/bare {ratio:.3f}x  ({how}, gap {a.gap_ms:g} ms; {time.monotonic() - t_begin:.0f} s)")
    if len(runs) > 1:
        for k in ("bare", "gateway"):
            v = [x[k] for x in runs]
            mid = sorted(v)[len(v) // 2]
            print(f"  spread {k:8s} {min(v) / 1000:.1f} - {max(v) / 1000:.1f} k: "
                  f"{100 * (max(v) - mid) / mid:+.2f} % / {100 * (min(v) - mid) / mid:+.2f} % of the median")
        print(f"  spread ratio   {min(ratios):.4f} - {max(ratios):.4f}")
    if a.record is not None:
        med = runs[ratios.index(ratio)]
        a.record.write_text(json.dumps({"gateway_over_bare": round(ratio, 4), "gateway_k": round(med["gateway"] / 1000, 1),
                                        "bare_k": round(med["bare"] / 1000, 1), "method": how}, indent=2) + "\n")
    if a.check is not None:
        base = json.loads(a.check.read_text())["gateway_over_bare"]
        limit = base * (1 + a.tolerance)
        verdict = "OK" if ratio <= limit else "REGRESSION"
        print(f"baseline {base:.3f}x, limit {limit:.3f}x (+{a.tolerance:.0%}): {verdict}")
        if ratio > limit:
            return 1
    return 0


def _measure(a: argparse.Namespace, up_port: int, tmp: Path) -> dict[str, float]:
    """Instructions per request of the bare proxy and of the gateway, one measurement each."""
    tmp.mkdir(parents=True, exist_ok=True)
    jobs = {}
    for name in ("bare", "gateway"):
        port = free_port()
        cfg = tmp / f"gateway-{port}.yaml"
        cfg.write_text(f"server: {{default_target: up, port: {port}}}\ntargets:\n"
                       f"  up: {{base_url: 'http://127.0.0.1:{up_port}/v1', provider: openai, "
                       f"auth: {{type: passthrough}}}}\n")
        cmd = ([PY, str(BENCH / "bare_proxy.py"), "--port", str(port), "--upstream", f"http://127.0.0.1:{up_port}"]
               if name == "bare" else [PY, "-m", "gateway", "--config", str(cfg), "--log-level", "info"])
        jobs[name] = (cmd, port)
    gap = a.gap_ms / 1000
    if a.method == "restart":
        res = {}
        for name, (cmd, port) in jobs.items():
            totals = [instructions(cmd, port, n, tmp / f"{name}.{n}.out", gap) for n in (a.n1, a.n2)]
            res[name] = (totals[1] - totals[0]) / (a.n2 - a.n1)
        return res
    if a.serial:
        return {name: per_request_dump(cmd, port, a.warmup, a.n, tmp / f"{name}.out", gap)
                for name, (cmd, port) in jobs.items()}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futs = {name: pool.submit(per_request_dump, cmd, port, a.warmup, a.n, tmp / f"{name}.out", gap)
                for name, (cmd, port) in jobs.items()}
        return {name: f.result() for name, f in futs.items()}


if __name__ == "__main__":
    sys.exit(main())
