"""The measurements against one proxy: requests/s (wrk, loadgen.py or rawload.py), stream time to
first byte (loadgen.py at c=8, rawload.py at c=1 and c=32), open-loop latency at a fixed rate
(rawload.py), and RSS while N streams are open. Also the fake upstream's control API and the smoke test."""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from loadgen import BODY, HEADERS, STREAM_BODY, pct
from procs import BENCH_DIR, HOST, PY, http, kill_tool, mem_kb, reset_hwm, run_tools, spawn_tool

CHAT_PATH = "/v1/chat/completions"
WRK_ERRORS = ("err_connect", "err_read", "err_write", "err_status", "err_timeout")


def upstream_ctl(up_port: int, **cfg) -> None:
    """Set the fake upstream's default stream shape, so it holds even if a proxy drops the
    X-Bench-* headers; reset_stats=True zeroes its stream counters."""
    st, _, _ = http("POST", f"http://{HOST}:{up_port}/_bench/config",
                    json.dumps(cfg).encode(), {"Content-Type": "application/json"})
    if st != 200:
        raise RuntimeError(f"upstream config failed: HTTP {st}")


def upstream_release(up_port: int) -> None:
    """End every held stream (at its next chunk)."""
    http("POST", f"http://{HOST}:{up_port}/_bench/release", b"")


def upstream_stats(up_port: int) -> dict:
    return json.loads(http("GET", f"http://{HOST}:{up_port}/_bench/stats")[2])


def smoke(url: str) -> None:
    """One non-streaming and one streaming request must work before anything is measured."""
    st, _, body = http("POST", url, BODY, HEADERS)
    if st != 200:
        raise RuntimeError(f"non-streaming request -> HTTP {st}: {body[:300]!r}")
    if "choices" not in json.loads(body):
        raise RuntimeError(f"non-streaming request -> unexpected body {body[:300]!r}")
    hdr = dict(HEADERS, **{"X-Bench-Chunks": "2", "X-Bench-Interval-Ms": "5"})
    st, h, body = http("POST", url, STREAM_BODY, hdr)
    if st != 200 or not h.get("content-type", "").startswith("text/event-stream"):
        raise RuntimeError(f"streaming request -> HTTP {st} {h.get('content-type')}: {body[:300]!r}")
    if b"data: [DONE]" not in body:
        raise RuntimeError(f"streaming request: no [DONE] in {body[-300:]!r}")


def _last_json(out: str) -> dict:
    """loadgen.py prints its result as one JSON object on the last line."""
    return json.loads(out.strip().splitlines()[-1])


class Bench:
    """Runs one measurement at a time against a proxy url and returns its numbers."""

    def __init__(self, a: argparse.Namespace, loadgen: str, up_port: int):
        self.a, self.loadgen, self.up_port = a, loadgen, up_port
        self.lg = [PY, str(BENCH_DIR / "loadgen.py")]
        self.raw = [PY, str(BENCH_DIR / "rawload.py")]

    # -------------------------------------------------------------- (a) throughput
    def rps(self, url: str, duration: float) -> dict:
        if self.loadgen == "wrk":
            return self._rps_wrk(url, duration)
        return self._rps_python(url, duration)

    def _rps_wrk(self, url: str, duration: float) -> dict:
        a = self.a
        cmd = ["wrk", "-t", str(a.wrk_threads), "-c", str(a.concurrency), "-d", f"{duration:g}s",
               "--latency", "--timeout", "10s", "-s", str(BENCH_DIR / "wrk_post.lua"), url]
        out = run_tools([cmd], duration + 60)[0]
        line = next((ln for ln in out.splitlines() if ln.startswith("BENCHJSON ")), None)
        if line is None:
            raise RuntimeError(f"wrk output not understood:\n{out[-1500:]}")
        w = json.loads(line[len("BENCHJSON "):])
        secs = w["duration_us"] / 1e6
        ok = w["requests"] - w["err_status"]
        return {"rps": ok / secs, "p50_ms": w["p50_us"] / 1000, "p90_ms": w["p90_us"] / 1000,
                "p99_ms": w["p99_us"] / 1000, "max_ms": w["max_us"] / 1000,
                "requests_ok": ok, "errors": {k: w[k] for k in WRK_ERRORS if w[k]},
                "elapsed_s": secs}

    def _rps_python(self, url: str, duration: float) -> dict:
        """--loadgen-procs loadgen.py processes share the connections; latencies are pooled."""
        a = self.a
        n = max(1, a.loadgen_procs)
        per = [a.concurrency // n + (1 if i < a.concurrency % n else 0) for i in range(n)]
        cmds = [self.lg + ["rps", "--url", url, "--concurrency", str(c), "--duration", f"{duration}",
                           "--raw"] for c in per if c > 0]
        outs = [_last_json(o) for o in run_tools(cmds, duration + 60)]
        lat_ms = sorted(x / 1000.0 for o in outs for x in o["lat_us"])
        errs: dict[str, int] = {}
        for o in outs:
            for k, v in o["errors"].items():
                errs[k] = errs.get(k, 0) + v
            if o["status_errors"]:
                errs["status"] = errs.get("status", 0) + o["status_errors"]
        secs = max(o["elapsed_s"] for o in outs)
        ok = sum(o["requests_ok"] for o in outs)
        return {"rps": ok / secs, "p50_ms": pct(lat_ms, 50), "p90_ms": pct(lat_ms, 90),
                "p99_ms": pct(lat_ms, 99), "max_ms": lat_ms[-1] if lat_ms else None,
                "requests_ok": ok, "errors": errs, "elapsed_s": secs}

    # -------------------------------------------------------------- (b) stream TTFB
    def ttfb(self, urls: list[str]) -> dict:
        """One loadgen process, so all urls see the same moments: batches of --ttfb-batch
        short streams (3 chunks, 10 ms apart) alternate between the urls."""
        a = self.a
        cmd = self.lg + ["ttfb", "--concurrency", str(a.ttfb_concurrency), "--count",
                         str(a.ttfb_streams), "--batch", str(a.ttfb_batch), "--chunks", "3",
                         "--interval-ms", "10", "--timeout", "30", "--raw"]
        for u in urls:
            cmd += ["--url", u]
        return _last_json(run_tools([cmd], 240)[0])

    def ttfb_raw(self, urls: list[str], concurrency: int, count: int, batch: int, chunks: int,
                 interval_ms: int) -> dict:
        """rawload.py ttfb: closed loop at `concurrency`, the workers' first streams staggered by
        1 ms, batches rotating over the urls (the upstream direct among them: the reference)."""
        cmd = self.raw + ["ttfb", "--concurrency", str(concurrency), "--count", str(count), "--batch",
                          str(batch), "--chunks", str(chunks), "--interval-ms", str(interval_ms),
                          "--stagger-ms", "1", "--timeout", "30"]
        for u in urls:
            cmd += ["--url", u]
        return _last_json(run_tools([cmd], 300)[0])

    # -------------------------------------------------------------- (d) open loop @ fixed rate
    def openloop(self, urls: list[str]) -> dict:
        """rawload.py openloop: --openloop-rate requests/s scheduled on time, slices rotating over
        the urls; latency from the scheduled send time."""
        a = self.a
        cmd = self.raw + ["openloop", "--rate", str(a.openloop_rate), "--slice-s", str(a.openloop_slice),
                          "--rounds", str(a.openloop_rounds), "--warmup-s", "0.5", "--pool", "16"]
        for u in urls:
            cmd += ["--url", u]
        budget = len(urls) * (a.openloop_rounds * (a.openloop_slice + 1) + 12) + 60
        return _last_json(run_tools([cmd], budget)[0])

    # -------------------------------------------------------------- (e) closed loop, lean client
    def rps_raw(self, url: str, duration: float, concurrency: int) -> dict:
        cmd = self.raw + ["rps", "--url", url, "--concurrency", str(concurrency), "--duration", str(duration)]
        return _last_json(run_tools([cmd], duration + 60)[0])

    # -------------------------------------------------------------- (c) RSS @ N streams
    def streams(self, url: str, pid: int, n: int) -> dict:
        """Open n streams (at most --max-pending awaiting their first chunk at a time, spread over at
        least --ramp-s), hold all n open together for --hold-s s (the upstream sends a chunk every
        --stream-interval-ms), then release them; sample pid's RSS all along."""
        a = self.a
        interval = a.stream_interval_ms
        upstream_ctl(self.up_port, interval_ms=interval, hold=True, close=True, reset_stats=True)
        time.sleep(0.5)
        before = mem_kb(pid)
        hwm_reset = reset_hwm(pid)
        sig_dir = Path(tempfile.mkdtemp(prefix="reliapi-bench-"))
        sig = sig_dir / "all_open"  # loadgen.py creates it once every stream got its first chunk
        open_budget = a.ramp_s + 30 + n / 50  # opening slower than 50 streams/s: give up, release
        timeout = open_budget + a.hold_s + 2 * interval / 1000 + 60
        cmd = self.lg + ["streams", "--url", url, "--count", str(n), "--chunks", "1", "--interval-ms",
                         str(interval), "--ramp-s", str(a.ramp_s), "--timeout", f"{timeout:.0f}",
                         "--signal-file", str(sig), "--hold", "--max-pending", str(a.max_pending)]
        try:
            out, rss = _sample_rss(spawn_tool(cmd), pid, sig, a.hold_s, open_budget,
                                   lambda: upstream_release(self.up_port), timeout + a.ramp_s + 20,
                                   lambda: upstream_stats(self.up_port)["streams_started"])
        finally:
            shutil.rmtree(sig_dir, ignore_errors=True)
            try:
                upstream_release(self.up_port)
                upstream_ctl(self.up_port, hold=False, close=False)
            except Exception:  # noqa: BLE001 - the next phase will say if the upstream is gone
                pass
        res = _last_json(out)
        after = mem_kb(pid)
        up = upstream_stats(self.up_port)
        res.update({
            "rss_before_kb": before["rss_kb"],
            "rss_at_all_open_kb": rss["all_open"],
            "rss_max_sampled_kb": rss["max"],
            "vm_hwm_kb": after["hwm_kb"],
            "vm_hwm_reset": hwm_reset,
            "rss_after_kb": after["rss_kb"],
            # VmHWM catches peaks between samples, if the kernel let us reset it
            "peak_rss_kb": max(rss["max"], after["hwm_kb"]),
            "rss_samples": rss["samples"],
            "held_all_open_s": rss["held_s"],
            "released_early": rss["released_early"],
            "nprocs": after["nprocs"],
            "upstream": {k: up[k] for k in ("streams_started", "streams_completed",
                                            "streams_aborted", "max_open_streams")},
        })
        return res


def _sample_rss(p: subprocess.Popen, pid: int, sig: Path, hold_s: float, open_budget: float,
                release, budget: float, started, stall_s: float = 20.0) -> tuple[str, dict]:
    """Sample pid's RSS every 100 ms until tool p exits (at most budget s). When sig appears (all
    streams open) note the RSS, and hold_s later call release(); if sig has not appeared after
    open_budget s, or started() (streams the upstream saw) has not moved for stall_s, release anyway
    (the check will fail). Returns p's stdout and the samples' summary."""
    max_rss, all_open, samples = 0, None, 0
    t0 = time.monotonic()
    deadline = t0 + budget
    t_open = t_release = None
    last_started, t_moved = -1, t0
    try:
        while p.poll() is None and time.monotonic() < deadline:
            rss = mem_kb(pid)["rss_kb"]
            max_rss = max(max_rss, rss)
            samples += 1
            now = time.monotonic()
            if all_open is None and sig.exists():
                all_open, t_open = rss, now
            if t_open is None and t_release is None and samples % 10 == 0:  # once a second
                try:
                    n = started()
                except Exception:  # noqa: BLE001 - a busy upstream: try again next second
                    n = last_started
                if n != last_started:
                    last_started, t_moved = n, now
            if t_release is None and ((t_open is not None and now - t_open >= hold_s)
                                      or (t_open is None and (now - t0 >= open_budget or now - t_moved >= stall_s))):
                release()
                t_release = now
            time.sleep(0.1)
        out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        kill_tool(p)
    if p.returncode != 0:
        raise RuntimeError(f"streams loadgen exited {p.returncode}: {err.decode()[-800:]}")
    held = None if t_open is None or t_release is None else round(t_release - t_open, 1)
    return out.decode(), {"max": max_rss, "all_open": all_open, "samples": samples, "held_s": held,
                          "released_early": t_open is None}
