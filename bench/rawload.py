"""A lean HTTP/1.1 load generator on raw asyncio sockets (uvloop), for what the aiohttp client in
loadgen.py is too heavy or too imprecise for. Each sub-command prints ONE JSON object on stdout:

  openloop  fixed-rate (open-loop) non-streaming POSTs: request i of a slice is due at
            t0 + i/rate and is sent then, whatever is still outstanding (a free keep-alive
            connection of the target's pool, or a new one if none is free). Latency counts from the
            *scheduled* time, so a late answer or a late send is never hidden (no coordinated omission).
            Slices rotate over the --url targets (A B C, C B A, ...) so that drift hits them all.
  rps       closed loop: --concurrency keep-alive connections, each sending the next request as soon
            as the last answer is in (cheap: for measuring a proxy's capacity, e.g. --workers 2).
  ttfb      streaming time to first body byte, closed loop at --concurrency, in batches that rotate
            over the --url targets like loadgen.py ttfb.

Why not aiohttp: its client costs ~150-250 us of CPU per request in Python, and asyncio/uvloop timers
have 1 ms granularity. Here one request is a bytes write plus a Content-Length (or chunked-end) scan of
the answer (~20-40 us), and the open-loop schedule ticks on a Linux timerfd (ns resolution, CLOCK_MONOTONIC
like time.perf_counter), and openloop and ttfb run at SCHED_FIFO priority 1 when allowed (--priority), so
the process is on a CPU the moment a tick or an answer comes. How late every send was (send lag) and how
much CPU this process used are in the output: the generator is not the bottleneck if its CPU is well
under one core and the send lag p99 is small next to the latencies measured.

Only for the bench's fake upstream and proxies: answers must carry Content-Length or be chunked.
Every loop is bounded by a count and a deadline.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import resource
import sys
import time
from urllib.parse import urlsplit

import uvloop

BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
STREAM_BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"stream":true}'
pc = time.perf_counter  # CLOCK_MONOTONIC on Linux, the timerfd's clock


def pct(sorted_vals: list[float], p: float) -> float | None:
    """Nearest-rank percentile, as loadgen.pct."""
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, int(round(p / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]


def summary(vals_s: list[float]) -> dict:
    """Percentiles in ms of a list of seconds."""
    s = sorted(vals_s)
    ms = 1000.0
    return {"n": len(s), "p50_ms": _m(pct(s, 50), ms), "p90_ms": _m(pct(s, 90), ms),
            "p99_ms": _m(pct(s, 99), ms), "p999_ms": _m(pct(s, 99.9), ms),
            "max_ms": _m(s[-1] if s else None, ms), "mean_ms": _m(sum(s) / len(s) if s else None, ms)}


def _m(v, k):
    return None if v is None else v * k


def raise_priority(how: str) -> str:
    """Run at a higher scheduling priority if allowed: the generator needs a few % of a core, but it
    needs it *on time* — a send or a receive timestamp taken late because a proxy, the upstream or
    anything else had the CPU would count against every target's latency. "rt": SCHED_FIFO priority
    1 (the scheduler runs it as soon as it wakes; the kernel's RT throttling caps any runaway at 95 %
    of a CPU), else nice -10; "nice": nice -10; "none". Returns what it got."""
    if how == "rt":
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
            return "SCHED_FIFO 1"
        except (OSError, AttributeError):
            how = "nice"
    if how == "nice":
        try:
            os.setpriority(os.PRIO_PROCESS, 0, -10)
            return "nice -10"
        except OSError:
            pass
    return "normal"


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def request_bytes(url: str, body: bytes, extra: dict | None = None) -> tuple[str, int, bytes]:
    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    hdrs = {"Host": f"{host}:{port}", "Content-Type": "application/json",
            "Authorization": "Bearer sk-bench", "Content-Length": str(len(body)), **(extra or {})}
    head = f"POST {u.path or '/'} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
    return host, port, head.encode() + body


# ------------------------------------------------------------------ timerfd (ns-precise ticks)
class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class Ticker:
    """A periodic CLOCK_MONOTONIC timerfd read by the event loop: on_tick() runs at start, start +
    period, ... (as soon as the process gets a CPU). Falls back to loop.call_at (1 ms granular) if
    timerfd is not available."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_tick):
        self.loop, self.on_tick, self.fd = loop, on_tick, -1
        try:
            self.libc = ctypes.CDLL("libc.so.6", use_errno=True)
            self.fd = self.libc.timerfd_create(1, os.O_NONBLOCK | os.O_CLOEXEC)  # CLOCK_MONOTONIC
        except (OSError, AttributeError):
            self.fd = -1
        self.kind = "timerfd" if self.fd >= 0 else "call_at"
        self._h = None

    @staticmethod
    def _ts(t: float) -> _Timespec:
        sec = int(t)
        return _Timespec(sec, int(round((t - sec) * 1e9)))

    def start(self, t0: float, period: float) -> None:
        if self.fd >= 0:
            spec = _Itimerspec(self._ts(period), self._ts(t0))
            if self.libc.timerfd_settime(self.fd, 1, ctypes.byref(spec), None) != 0:  # TFD_TIMER_ABSTIME
                raise OSError(ctypes.get_errno(), "timerfd_settime")
            self.loop.add_reader(self.fd, self._read)
        else:
            self._period = period
            self._next = t0
            self._h = self.loop.call_at(self.loop.time() + (t0 - pc()), self._fallback)

    def _read(self) -> None:
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            return
        self.on_tick()

    def _fallback(self) -> None:
        self.on_tick()
        self._next += self._period
        self._h = self.loop.call_at(self.loop.time() + max(0.0, self._next - pc()), self._fallback)

    def stop(self) -> None:
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            self.libc.timerfd_settime(self.fd, 0, ctypes.byref(_Itimerspec()), None)
        elif self._h:
            self._h.cancel()

    def close(self) -> None:
        self.stop()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ------------------------------------------------------------------ one connection
class Conn(asyncio.Protocol):
    """One keep-alive connection: one request at a time; on_done(conn, ok, err) when the answer is
    complete (Content-Length or the chunked terminator), on_first(conn) at the first body byte."""

    __slots__ = ("tr", "buf", "body_at", "need", "chunked", "status", "t_sched", "t_send", "t_first",
                 "on_done", "on_first", "busy", "closed", "pool")

    def __init__(self, pool):
        self.pool, self.tr, self.buf, self.busy, self.closed = pool, None, b"", False, False
        self.on_done = self.on_first = None
        self.t_sched = self.t_send = self.t_first = 0.0

    def connection_made(self, tr) -> None:
        self.tr = tr

    def send(self, req: bytes, t_sched: float) -> None:
        self.busy = True
        self.buf, self.body_at, self.need, self.chunked, self.status = b"", -1, -1, False, 0
        self.t_sched, self.t_first = t_sched, 0.0
        self.t_send = pc()
        self.tr.write(req)

    def data_received(self, data: bytes) -> None:
        now = pc()
        buf = self.buf + data if self.buf else data
        if self.body_at < 0:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                self.buf = buf
                return
            head = buf[:i].lower()
            self.body_at = i + 4
            try:
                self.status = int(head[9:12])
            except ValueError:
                self.status = 0
            j = head.find(b"\ncontent-length:")
            if j >= 0:
                k = head.find(b"\r", j)
                self.need = self.body_at + int(head[j + 16:k if k > 0 else None])
            else:
                self.chunked = b"\ntransfer-encoding: chunked" in head
                if not self.chunked:
                    self._finish(now, "no_length")
                    return
        if not self.t_first and len(buf) > self.body_at:
            self.t_first = now
            if self.on_first:
                self.on_first(self)
        if self.chunked:
            if buf.endswith(b"\r\n0\r\n\r\n") or (len(buf) == self.body_at + 5 and buf.endswith(b"0\r\n\r\n")):
                self.buf = buf
                self._finish(now, None)
            else:
                # keep only what the terminator check and the [DONE] check need
                self.buf = buf if len(buf) < 4096 else buf[:self.body_at] + buf[-256:]
            return
        if len(buf) >= self.need:
            self.buf = buf
            self._finish(now, None)
        else:
            self.buf = buf

    def _finish(self, now: float, err: str | None) -> None:
        self.busy = False
        if err is None and self.status != 200:
            err = f"status_{self.status}"
        cb, self.on_done = self.on_done, None
        if cb:
            cb(self, now, err)

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.busy:
            self.busy = False
            cb, self.on_done = self.on_done, None
            if cb:
                cb(self, pc(), "connection_lost")
        if self.pool is not None:
            self.pool.lost(self)


class Pool:
    """Keep-alive connections to one target; idle ones are reused last-in first-out."""

    def __init__(self, loop, host: str, port: int):
        self.loop, self.host, self.port = loop, host, port
        self.idle: list[Conn] = []
        self.all: set[Conn] = set()
        self.opened = 0
        self.opening = 0

    async def open(self) -> Conn:
        self.opening += 1
        try:
            _, c = await self.loop.create_connection(lambda: Conn(self), self.host, self.port)
        finally:
            self.opening -= 1
        self.opened += 1
        self.all.add(c)
        return c

    async def prefill(self, n: int) -> None:
        for c in await asyncio.gather(*(self.open() for _ in range(n))):
            self.idle.append(c)

    def lost(self, c: Conn) -> None:
        self.all.discard(c)
        if c in self.idle:
            self.idle.remove(c)

    def close(self) -> None:
        for c in list(self.all):
            if c.tr:
                c.tr.close()


# ------------------------------------------------------------------ openloop
async def run_openloop(a) -> dict:
    loop = asyncio.get_running_loop()
    targets = []
    for u in a.url:
        host, port, req = request_bytes(u, BODY)
        targets.append({"url": u, "req": req, "pool": Pool(loop, host, port), "lat": [], "svc": [], "lag": [],
                        "errors": {}, "sent": 0, "slices": []})
    for t in targets:
        await t["pool"].prefill(a.pool)
    period = 1.0 / a.rate
    state = {"t": None, "i": 0, "n": 0, "t0": 0.0, "outstanding": 0, "record": True, "done": None}

    def on_done(c: Conn, now: float, err: str | None) -> None:
        t = state_t[c.pool]
        state["outstanding"] -= 1
        if state["record_of"].get(c) is not False:
            if err:
                t["errors"][err] = t["errors"].get(err, 0) + 1
            else:
                t["lat"].append(now - c.t_sched)
                t["svc"].append(now - c.t_send)
                t["lag"].append(c.t_send - c.t_sched)
        state["record_of"].pop(c, None)
        if not c.closed and err is None:
            c.pool.idle.append(c)
        elif not c.closed:
            c.tr.close()
        if state["outstanding"] <= 0 and state["i"] >= state["n"] and state["done"] and not state["done"].done():
            state["done"].set_result(None)

    state_t = {t["pool"]: t for t in targets}
    state["record_of"] = {}

    def fire(t: dict, t_sched: float) -> None:
        pool: Pool = t["pool"]
        t["sent"] += 1
        state["outstanding"] += 1
        if pool.idle:
            c = pool.idle.pop()
            c.on_done = on_done
            state["record_of"][c] = state["record"]
            c.send(t["req"], t_sched)
            return
        record = state["record"]

        async def fresh() -> None:  # no free connection: open one; its set-up counts in the latency
            try:
                c = await pool.open()
            except OSError as e:
                state["outstanding"] -= 1
                if record:
                    k = type(e).__name__
                    t["errors"][k] = t["errors"].get(k, 0) + 1
                if state["outstanding"] <= 0 and state["i"] >= state["n"] and not state["done"].done():
                    state["done"].set_result(None)
                return
            c.on_done = on_done
            state["record_of"][c] = record
            c.send(t["req"], t_sched)

        loop.create_task(fresh())

    def tick() -> None:
        now = pc()
        t, i, n, t0 = state["t"], state["i"], state["n"], state["t0"]
        while i < n:  # every request due by now, each on its own connection
            ts = t0 + i * period
            if ts > now:
                break
            fire(t, ts)
            i += 1
        state["i"] = i
        if i >= n:
            ticker.stop()
            if state["outstanding"] <= 0 and not state["done"].done():
                state["done"].set_result(None)

    ticker = Ticker(loop, tick)

    async def one_slice(t: dict, seconds: float, record: bool) -> dict:
        n = max(1, int(round(seconds * a.rate)))
        lat0, err0 = len(t["lat"]), sum(t["errors"].values())
        state.update(t=t, i=0, n=n, record=record, done=loop.create_future())
        state["t0"] = pc() + 0.005
        c0 = cpu_s()
        ticker.start(state["t0"], period)
        try:
            await asyncio.wait_for(state["done"], seconds + a.timeout)
        except TimeoutError:
            ticker.stop()
            # what is still outstanding after the timeout: counted as timeouts, connections dropped
            stuck = [c for c in list(t["pool"].all) if c.busy]
            for c in stuck:
                c.on_done = None
                c.tr.close()
            state["outstanding"] = 0
            if record:
                t["errors"]["timeout"] = t["errors"].get("timeout", 0) + len(stuck) + (n - state["i"])
        wall = pc() - state["t0"]
        lat = sorted(t["lat"][lat0:])
        return {"n": n, "ok": len(lat), "errors": sum(t["errors"].values()) - err0,
                "p50_ms": _m(pct(lat, 50), 1000), "p99_ms": _m(pct(lat, 99), 1000),
                "loadgen_cpu_pct_of_core": round(100 * (cpu_s() - c0) / max(wall, 1e-6), 1)}

    t_start, cpu_start = pc(), cpu_s()
    for t in targets:  # warm-up: not recorded
        await one_slice(t, a.warmup_s, False)
    order = list(range(len(targets)))
    cpu_meas, wall_meas = 0.0, 0.0
    for r in range(a.rounds):
        for k in (order if r % 2 == 0 else order[::-1]):
            c0, w0 = cpu_s(), pc()
            s = await one_slice(targets[k], a.slice_s, True)
            cpu_meas += cpu_s() - c0
            wall_meas += pc() - w0
            s["round"] = r + 1
            targets[k]["slices"].append(s)
            await asyncio.sleep(a.pause_s)
    ticker.close()
    out = {}
    for t in targets:
        out[t["url"]] = {"sent": t["sent"], "ok": len(t["lat"]), "errors": t["errors"],
                         "connections_opened": t["pool"].opened, "latency": summary(t["lat"]),
                         "service": summary(t["svc"]), "send_lag": summary(t["lag"]),
                         "slices": t["slices"]}
        t["pool"].close()
    return {"mode": "openloop", "rate": a.rate, "ticker": ticker.kind, "priority": a.priority_got,
            "elapsed_s": pc() - t_start,
            "loadgen_cpu_s": cpu_s() - cpu_start,
            "loadgen_cpu_pct_of_core": round(100 * cpu_meas / max(wall_meas, 1e-6), 1), "targets": out}


# ------------------------------------------------------------------ rps (closed loop)
async def run_rps(a) -> dict:
    loop = asyncio.get_running_loop()
    host, port, req = request_bytes(a.url[0], BODY)
    pool = Pool(loop, host, port)
    await pool.prefill(a.concurrency)
    lat: list[float] = []
    errors: dict[str, int] = {}
    t_start = pc()
    deadline = t_start + a.duration
    c0 = cpu_s()
    done = loop.create_future()
    active = [a.concurrency]

    def on_done(c: Conn, now: float, err: str | None) -> None:
        if err:
            errors[err] = errors.get(err, 0) + 1
        else:
            lat.append(now - c.t_send)
        if now < deadline and not c.closed and err is None and len(lat) < a.max_requests:
            c.on_done = on_done
            c.send(req, now)
            return
        if err and not c.closed:
            c.tr.close()
        active[0] -= 1
        if active[0] == 0 and not done.done():
            done.set_result(None)

    for c in list(pool.idle):
        c.on_done = on_done
        c.send(req, pc())
    try:
        await asyncio.wait_for(done, a.duration + 30)
    except TimeoutError:
        errors["timeout"] = errors.get("timeout", 0) + active[0]
    elapsed = pc() - t_start
    cpu = cpu_s() - c0
    pool.close()
    return {"mode": "rps", "requests_ok": len(lat), "errors": errors, "elapsed_s": elapsed,
            "rps": len(lat) / elapsed if elapsed > 0 else 0.0,
            "loadgen_cpu_pct_of_core": round(100 * cpu / max(elapsed, 1e-6), 1), **summary(lat)}


# ------------------------------------------------------------------ ttfb (streams)
async def run_ttfb(a) -> dict:
    loop = asyncio.get_running_loop()
    extra = {"X-Bench-Chunks": str(a.chunks), "X-Bench-Interval-Ms": str(a.interval_ms)}
    targets = []
    for u in a.url:
        host, port, req = request_bytes(u, STREAM_BODY, extra)
        targets.append({"url": u, "req": req, "pool": Pool(loop, host, port), "ttfb": [], "errors": {}})
    for t in targets:
        await t["pool"].prefill(a.concurrency)
    deadline = pc() + a.timeout * 4

    async def one(t: dict, record: bool) -> None:
        pool: Pool = t["pool"]
        c = pool.idle.pop() if pool.idle else await pool.open()
        fut = loop.create_future()

        def on_done(conn: Conn, now: float, err: str | None) -> None:
            if not fut.done():
                fut.set_result(err)

        c.on_done = on_done
        c.send(t["req"], pc())
        try:
            err = await asyncio.wait_for(fut, a.timeout)
        except TimeoutError:
            err = "timeout"
            c.on_done = None
            c.tr.close()
        if err is None and b"[DONE]" not in c.buf[-256:]:
            err = "no_done"
        if err is None and not c.closed:
            pool.idle.append(c)
        elif not c.closed:
            c.tr.close()
        if not record:
            return
        if err:
            t["errors"][err] = t["errors"].get(err, 0) + 1
        else:
            t["ttfb"].append(c.t_first - c.t_send)

    async def batch(t: dict, n: int, record: bool) -> None:
        remaining = [n]

        async def worker(k: int) -> None:
            # stagger the workers' first streams over ~one stream's life, so a batch does not
            # open with a burst of --concurrency requests in the same microsecond
            await asyncio.sleep(k * a.stagger_ms / 1000.0)
            while remaining[0] > 0 and pc() < deadline:
                remaining[0] -= 1
                await one(t, record)

        await asyncio.gather(*(worker(k) for k in range(min(a.concurrency, n))))

    t_start, c0 = pc(), cpu_s()
    for t in targets:
        await batch(t, a.concurrency * 2, False)
    nb = -(-a.count // a.batch)
    for b in range(nb):
        n = min(a.batch, a.count - b * a.batch)
        for t in (targets if b % 2 == 0 else targets[::-1]):
            await batch(t, n, True)
    elapsed = pc() - t_start
    for t in targets:
        t["pool"].close()
    return {"mode": "ttfb", "elapsed_s": elapsed, "priority": a.priority_got,
            "loadgen_cpu_pct_of_core": round(100 * (cpu_s() - c0) / max(elapsed, 1e-6), 1),
            "targets": {t["url"]: {"ok": len(t["ttfb"]), "errors": t["errors"],
                                   "ttfb_ms": [round(x * 1000, 4) for x in t["ttfb"]] if a.raw else None,
                                   **summary(t["ttfb"])} for t in targets}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    o = sub.add_parser("openloop")
    o.add_argument("--url", required=True, action="append", help="repeat: slices rotate over the targets")
    o.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    o.add_argument("--slice-s", type=float, default=2.0, help="seconds per slice (one target)")
    o.add_argument("--rounds", type=int, default=5, help="slices per target")
    o.add_argument("--warmup-s", type=float, default=0.5, help="unrecorded slice per target first")
    o.add_argument("--pause-s", type=float, default=0.05, help="pause between slices")
    o.add_argument("--pool", type=int, default=16, help="keep-alive connections opened per target up front")
    o.add_argument("--timeout", type=float, default=10.0, help="grace after a slice's last send")
    r = sub.add_parser("rps")
    r.add_argument("--url", required=True, action="append")
    r.add_argument("--concurrency", type=int, default=64)
    r.add_argument("--duration", type=float, default=5.0)
    r.add_argument("--max-requests", type=int, default=10_000_000)
    t = sub.add_parser("ttfb")
    t.add_argument("--url", required=True, action="append")
    t.add_argument("--concurrency", type=int, default=32)
    t.add_argument("--count", type=int, default=1000, help="recorded streams per target")
    t.add_argument("--batch", type=int, default=128, help="streams per target before switching")
    t.add_argument("--chunks", type=int, default=3)
    t.add_argument("--interval-ms", type=int, default=10)
    t.add_argument("--stagger-ms", type=float, default=1.0)
    t.add_argument("--timeout", type=float, default=30.0)
    t.add_argument("--raw", action="store_true")
    for sp in (o, r, t):
        sp.add_argument("--priority", choices=("rt", "nice", "none"), default="none" if sp is r else "rt",
                        help="rt: SCHED_FIFO 1 if allowed (root), else nice -10; nice: nice -10; none")
    a = ap.parse_args()
    a.priority_got = raise_priority(a.priority)
    if a.mode == "openloop":
        a.rate = max(1.0, min(a.rate, 100_000.0))
        a.rounds = max(1, min(a.rounds, 100))
        a.slice_s = max(0.1, min(a.slice_s, 60.0))
    fn = {"openloop": run_openloop, "rps": run_rps, "ttfb": run_ttfb}[a.mode]
    res = uvloop.run(fn(a))
    sys.stdout.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
