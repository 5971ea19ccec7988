"""Python load generator for the ReliAPI benchmark (aiohttp client + uvloop).

Sub-commands, each prints ONE JSON object on stdout:
  rps      closed-loop non-streaming load at fixed concurrency for a duration
           (fallback when wrk is not installed; run.py may start 2 of these)
  ttfb     streaming time-to-first-body-byte at low concurrency
  streams  open N concurrent SSE streams at once, verify each got its first
           chunk and its [DONE], report how many were open simultaneously

Every loop is bounded by a request count and/or a deadline.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import aiohttp
import uvloop

BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
STREAM_BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"stream":true}'
HEADERS = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}


def pct(sorted_vals: list[float], p: float) -> float | None:
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, int(round(p / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]


def summarize_ms(vals: list[float]) -> dict:
    s = sorted(vals)
    return {
        "n": len(s),
        "p50_ms": pct(s, 50),
        "p90_ms": pct(s, 90),
        "p99_ms": pct(s, 99),
        "max_ms": s[-1] if s else None,
        "mean_ms": (sum(s) / len(s)) if s else None,
    }


def session(limit: int, timeout: aiohttp.ClientTimeout | None = None) -> aiohttp.ClientSession:
    conn = aiohttp.TCPConnector(limit=limit, limit_per_host=0, force_close=False)
    return aiohttp.ClientSession(connector=conn, auto_decompress=False,
                                 timeout=timeout or aiohttp.ClientTimeout(total=60))


# --------------------------------------------------------------------------- rps
async def run_rps(a) -> dict:
    lat_us: list[int] = []
    errors: dict[str, int] = {}
    status_err = 0
    n_ok = 0
    max_requests = a.max_requests
    headers = dict(HEADERS)
    if a.tenant_key:
        headers["Authorization"] = f"Bearer {a.tenant_key}"
    seq = iter(range(10**12))
    tag = f"{time.time_ns():x}"

    def request() -> tuple[bytes, dict]:
        """Every request the same (cacheable), or each one new: its own idempotency key and
        body, so every policy misses and writes (the stateful pipeline's worst case)."""
        if not a.unique:
            return BODY, headers
        n = next(seq)
        body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi %s-%d"}]}' % (tag.encode(), n)
        return body, {**headers, "Idempotency-Key": f"{tag}-{n}"}

    async with session(a.concurrency) as s:
        t_start = time.perf_counter()
        deadline = t_start + a.duration

        async def worker() -> None:
            nonlocal status_err, n_ok
            pc = time.perf_counter
            while True:
                t0 = pc()
                if t0 >= deadline or len(lat_us) + status_err >= max_requests:
                    return
                body, hdrs = request()
                try:
                    async with s.post(a.url, data=body, headers=hdrs) as r:
                        await r.read()
                        ok = r.status == 200
                except Exception as e:  # noqa: BLE001 - counted and reported
                    k = type(e).__name__
                    errors[k] = errors.get(k, 0) + 1
                    if sum(errors.values()) > 10_000:
                        return
                    await asyncio.sleep(0.01)
                    continue
                if ok:
                    n_ok += 1
                    lat_us.append(int((pc() - t0) * 1e6))
                else:
                    status_err += 1

        await asyncio.wait_for(
            asyncio.gather(*(worker() for _ in range(a.concurrency))), a.duration + 30)
        elapsed = time.perf_counter() - t_start
    return {
        "mode": "rps",
        "requests_ok": n_ok,
        "status_errors": status_err,
        "errors": errors,
        "elapsed_s": elapsed,
        "rps": n_ok / elapsed if elapsed > 0 else 0.0,
        "lat_us": lat_us if a.raw else None,
        **summarize_ms([x / 1000.0 for x in lat_us]),
    }


# -------------------------------------------------------------------------- ttfb
def stream_headers(a) -> dict:
    h = dict(HEADERS)
    h["X-Bench-Chunks"] = str(a.chunks)
    h["X-Bench-Interval-Ms"] = str(a.interval_ms)
    return h


async def one_stream(s: aiohttp.ClientSession, url: str, a, hdrs: dict, on_first=None,
                     samples: list[str] | None = None) -> tuple[float | None, str | None]:
    """Returns (ttfb_ms, error). Reads the whole stream and requires [DONE]. The first few
    exceptions' messages go to samples, if given."""
    t0 = time.perf_counter()
    ttfb = None
    try:
        async with s.post(url, data=STREAM_BODY, headers=hdrs) as r:
            if r.status != 200:
                await r.read()
                return None, f"status_{r.status}"
            first = await r.content.readany()
            ttfb = (time.perf_counter() - t0) * 1000.0
            if not first:
                return ttfb, "empty_body"
            if on_first:
                on_first()
            tail = first[-64:]
            nbytes = len(first)
            while nbytes < 50_000_000:  # bounded
                chunk = await r.content.readany()
                if not chunk:
                    break
                nbytes += len(chunk)
                tail = (tail + chunk)[-64:]
            if b"[DONE]" not in tail:
                return ttfb, "no_done"
            return ttfb, None
    except Exception as e:  # noqa: BLE001 - counted and reported
        if samples is not None and len(samples) < 5:
            samples.append(repr(e)[:300])
        return ttfb, type(e).__name__


async def run_ttfb(a) -> dict:
    """Streams in batches of --batch, alternating the --url targets in ABBA order; each
    batch runs at --concurrency against one target, so all targets see the same host noise."""
    urls: list[str] = a.url
    hdrs = stream_headers(a)
    ttfbs: dict[str, list[float]] = {u: [] for u in urls}
    errors: dict[str, dict[str, int]] = {u: {} for u in urls}
    timeout = aiohttp.ClientTimeout(total=a.timeout)
    t_start = time.perf_counter()
    deadline = t_start + a.timeout * 4
    async with session(a.concurrency * len(urls), timeout) as s:

        async def batch(url: str, n: int, record: bool) -> None:
            remaining = n

            async def worker() -> None:
                nonlocal remaining
                while remaining > 0 and time.perf_counter() < deadline:
                    remaining -= 1
                    t, err = await one_stream(s, url, a, hdrs)
                    if not record:
                        continue
                    if err:
                        errors[url][err] = errors[url].get(err, 0) + 1
                    elif t is not None:
                        ttfbs[url].append(t)

            await asyncio.gather(*(worker() for _ in range(min(a.concurrency, n))))

        async def all_batches() -> None:
            for u in urls:  # warm-up: open the keep-alive connections, not recorded
                await batch(u, a.concurrency * 2, False)
            nb = -(-a.count // a.batch)
            for b in range(nb):
                n = min(a.batch, a.count - b * a.batch)
                for u in (urls if b % 2 == 0 else urls[::-1]):
                    await batch(u, n, True)

        await asyncio.wait_for(all_batches(), a.timeout * 4 + 10)
    elapsed = time.perf_counter() - t_start
    return {"mode": "ttfb", "elapsed_s": elapsed, "targets": {
        u: {"ok": len(ttfbs[u]), "errors": errors[u], "ttfb_ms": ttfbs[u] if a.raw else None,
            **summarize_ms(ttfbs[u])} for u in urls}}


# ----------------------------------------------------------------------- streams
async def run_streams(a) -> dict:
    """Open --count streams, at most --max-pending of them waiting for their first chunk at a time
    (so the proxy's accept queue never overflows however slow it is to set streams up), no faster
    than --ramp-s allows. With --hold the upstream keeps every stream going until it is released
    (POST /_bench/release, done by the harness once all are open), so all N are open together
    however long the opening took."""
    hdrs = stream_headers(a)
    if a.hold:
        hdrs["X-Bench-Hold"] = "1"
    ttfbs: list[float] = []
    errors: dict[str, int] = {}
    samples: list[str] = []  # the first few error messages, for the log
    state = {"open": 0, "max_open": 0, "got_first": 0, "all_open_at": None, "first_end_at": None}
    timeout = aiohttp.ClientTimeout(total=a.timeout, sock_connect=30)
    pending = asyncio.Semaphore(max(1, a.max_pending))
    t_start = time.perf_counter()

    def on_first() -> None:
        state["open"] += 1
        state["got_first"] += 1
        state["max_open"] = max(state["max_open"], state["open"])
        if state["got_first"] == a.count:
            state["all_open_at"] = time.perf_counter() - t_start
            if a.signal_file:
                with open(a.signal_file, "w") as f:
                    f.write("all_open\n")

    async with session(0, timeout) as s:

        async def one(i: int) -> None:
            # ramp: spread connection opening over ramp_s to avoid a SYN burst
            await asyncio.sleep(a.ramp_s * i / max(1, a.count))
            await pending.acquire()
            released = False

            def first() -> None:
                nonlocal released
                released = True
                pending.release()
                on_first()

            try:
                t, err = await one_stream(s, a.url, a, hdrs, first, samples)
            finally:
                if not released:
                    pending.release()
            if t is not None and released:
                state["open"] -= 1
                if state["first_end_at"] is None:
                    state["first_end_at"] = time.perf_counter() - t_start
                ttfbs.append(t)
            if err:
                errors[err] = errors.get(err, 0) + 1

        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(a.count))),
                               a.timeout + a.ramp_s + 10)
    elapsed = time.perf_counter() - t_start
    failed = sum(errors.values())
    return {"mode": "streams", "count": a.count, "got_first_chunk": state["got_first"],
            "completed_ok": a.count - failed, "failed": failed, "errors": errors, "error_samples": samples,
            "max_open_concurrently": state["max_open"], "all_open_at_s": state["all_open_at"],
            "first_stream_ended_at_s": state["first_end_at"],
            "elapsed_s": elapsed, **summarize_ms(ttfbs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("rps")
    r.add_argument("--url", required=True)
    r.add_argument("--concurrency", type=int, default=64)
    r.add_argument("--duration", type=float, default=10)
    r.add_argument("--max-requests", type=int, default=5_000_000)
    r.add_argument("--raw", action="store_true", help="include raw latencies (us)")
    r.add_argument("--tenant-key", default=None, help="send this tenant key as the bearer token")
    r.add_argument("--unique", action="store_true", help="a new idempotency key and body per request")
    t = sub.add_parser("ttfb")
    t.add_argument("--url", required=True, action="append", help="repeat to interleave targets")
    t.add_argument("--concurrency", type=int, default=8)
    t.add_argument("--count", type=int, default=200, help="recorded streams per target")
    t.add_argument("--batch", type=int, default=16, help="streams per target before switching")
    t.add_argument("--chunks", type=int, default=3)
    t.add_argument("--interval-ms", type=int, default=10)
    t.add_argument("--timeout", type=float, default=30)
    t.add_argument("--raw", action="store_true")
    st = sub.add_parser("streams")
    st.add_argument("--url", required=True)
    st.add_argument("--count", type=int, default=1000)
    st.add_argument("--chunks", type=int, default=12)
    st.add_argument("--interval-ms", type=int, default=1000)
    st.add_argument("--ramp-s", type=float, default=1.0)
    st.add_argument("--timeout", type=float, default=60)
    st.add_argument("--signal-file", default=None, help="written when all streams are open")
    st.add_argument("--hold", action="store_true", help="ask the upstream to hold every stream until released")
    st.add_argument("--max-pending", type=int, default=256,
                    help="streams waiting for their first chunk at most (bounds the SYN/accept backlog)")
    a = ap.parse_args()
    fn = {"rps": run_rps, "ttfb": run_ttfb, "streams": run_streams}[a.mode]
    res = uvloop.run(fn(a))
    sys.stdout.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
