#!/usr/bin/env python3
"""ReliAPI gateway benchmark: gateway vs. a bare aiohttp pass-through proxy.

One command starts a fake upstream, the gateway and a bare proxy (all on
127.0.0.1), then measures for each proxy under identical conditions:
  (a) non-streaming requests/s and latency p50/p99 at fixed concurrency
  (b) streaming time-to-first-body-byte p50/p99 at c=8, and what each proxy adds to the
      upstream's own TTFB at c=1 (p50) and c=32 (p99)
  (d) open loop: latency p50/p99 at a fixed 1000 req/s, from the scheduled send time, and
      what each proxy adds to the upstream's own p99
  (e) the gateway with --workers 2 against 1 worker (requests/s, and where the CPU went)
  (c) peak RSS of the proxy process while N (default 1000) streams are open
and prints a bare-vs-gateway table with pass/fail against the targets.
Results: bench/results/latest.json (+ process logs in bench/results/).

  python bench/run.py                 # full run, ~3.5 min
  python bench/run.py --quick         # ~1 min smoke run
  python bench/run.py --scale         # only (c), at 10,000 streams (~1.5-2 min)
  python bench/run.py --gateway-cmd bare   # test the harness: "gateway" slot = 2nd bare proxy

run.py parses the options and drives a run; phases.py starts the processes and runs the
phases; procs.py manages processes and reads /proc; measure.py takes one measurement at a time;
report.py turns the results into the table, the checks and latest.json. loadgen.py (aiohttp) and
rawload.py (raw sockets, open loop) are the load generators besides wrk.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def _ensure_deps() -> None:
    """The children need aiohttp + uvloop; re-exec with the repo venv if this python lacks them."""
    try:
        import aiohttp  # noqa: F401
        import uvloop  # noqa: F401
    except ImportError:
        venv_py = BENCH_DIR.parent / ".venv" / "bin" / "python"
        if venv_py.exists() and not os.environ.get("RELIAPI_BENCH_REEXEC"):
            os.environ["RELIAPI_BENCH_REEXEC"] = "1"
            os.execv(str(venv_py), [str(venv_py), str(Path(__file__).resolve()), *sys.argv[1:]])
        sys.exit("bench: aiohttp/uvloop not importable (and no .venv/bin/python found)")


_ensure_deps()
sys.path.insert(0, str(BENCH_DIR))  # the sibling modules below, whatever the cwd

import argparse  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import aiohttp  # noqa: E402
import report  # noqa: E402
from phases import Run  # noqa: E402
from procs import REPO, RESULTS, cleanup, loadavg, log, raise_nofile  # noqa: E402

# the phases in the order a run takes them (--phases picks a subset)
PHASES = ("rps", "ttfb", "tails", "openloop", "workers", "rss")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="ReliAPI benchmark: gateway vs. bare aiohttp proxy",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--duration", type=float, default=10,
                    help="measured throughput seconds per proxy per round")
    ap.add_argument("--concurrency", type=int, default=64, help="connections for the rps test")
    ap.add_argument("--streams", type=int, default=None, help="concurrent streams for the RSS test "
                    "(default 1000, --scale 10000)")
    ap.add_argument("--quick", action="store_true", help="~1 min smoke run (short runs, 1 round)")
    ap.add_argument("--scale", action="store_true",
                    help="only the RSS phase, at 10,000 open streams (a chunk every 5 s, held 15 s)")
    ap.add_argument("--phases", default=None,
                    help=f"comma-separated subset of {','.join(PHASES)} (default all; --scale: rss)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="throughput rounds per proxy (default 3, quick 1)")
    ap.add_argument("--warmup", type=float, default=None, help="warm-up seconds per proxy (default 2, quick 1)")
    ap.add_argument("--ttfb-streams", type=int, default=None,
                    help="streams per proxy for the TTFB test (default 400, quick 100)")
    ap.add_argument("--ttfb-concurrency", type=int, default=8)
    ap.add_argument("--ttfb-batch", type=int, default=16,
                    help="TTFB streams per proxy before switching to the other proxy")
    ap.add_argument("--ttfb-tail-concurrency", type=int, default=32, help="concurrency of the TTFB p99 test")
    ap.add_argument("--ttfb-tail-streams", type=int, default=None,
                    help="streams per proxy (and direct) for the TTFB p99 test (default 1600, quick 320)")
    ap.add_argument("--ttfb-c1-streams", type=int, default=None,
                    help="streams per proxy (and direct) for the TTFB p50 test at c=1 (default 300, quick 100)")
    ap.add_argument("--openloop-rate", type=float, default=1000.0, help="open-loop requests per second")
    ap.add_argument("--openloop-slice", type=float, default=None, help="seconds per open-loop slice (default 2)")
    ap.add_argument("--openloop-rounds", type=int, default=None,
                    help="open-loop slices per proxy and direct (default 5, quick 2)")
    ap.add_argument("--workers", type=int, default=2,
                    help="the workers phase compares the gateway with --workers N against 1 worker")
    ap.add_argument("--workers-slice", type=float, default=2.0, help="seconds per workers-phase slice")
    ap.add_argument("--workers-rounds", type=int, default=None,
                    help="ABBA quads in the workers phase (default 3, quick 1)")
    ap.add_argument("--slice", type=float, default=2.0,
                    help="throughput runs are split into alternating slices of ~this many seconds")
    ap.add_argument("--hold-s", type=int, default=None,
                    help="seconds all N streams stay open together before they are released "
                         "(default 10, quick 3, scale 15)")
    ap.add_argument("--ramp-s", type=float, default=None,
                    help="spread opening of the N streams over at least this (default 1, scale 10)")
    ap.add_argument("--stream-interval-ms", type=int, default=None,
                    help="chunk interval of the N open streams (default 1000, scale 5000)")
    ap.add_argument("--max-pending", type=int, default=256,
                    help="N streams test: at most this many waiting for their first chunk at a time")
    ap.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto",
                    help="rps load generator: wrk if on PATH (auto), else the Python one")
    ap.add_argument("--loadgen-procs", type=int, default=1, help="processes for the Python load generator")
    ap.add_argument("--wrk-threads", type=int, default=1)
    ap.add_argument("--gateway-cmd", default=None,
                    help="override the gateway command (template; placeholders {python} {config} "
                         "{host} {port} {upstream_port} {upstream_url} {repo} {bench} {log_level}); the value "
                         "'bare' runs a second bare proxy in the gateway slot to test the harness")
    # info by default: the per-request access log is part of the gateway's real cost
    ap.add_argument("--gateway-log-level", default="info",
                    help="--log-level passed to the gateway ({log_level}); the gateway writes its "
                         "per-request JSON access log only at info/debug")
    ap.add_argument("--startup-timeout", type=float, default=30.0)
    ap.add_argument("--strict", action="store_true", help="exit 1 if any target check fails")
    return _resolve_sizes(ap.parse_args())


def _resolve_sizes(a: argparse.Namespace) -> argparse.Namespace:
    """Fill the --quick/--scale-dependent defaults, then clamp: every loop is bounded in count and time."""
    q = a.quick
    sc = a.scale
    if a.phases is None:
        a.phases = "rss" if sc else ",".join(PHASES)
    a.phases = [x.strip() for x in a.phases.split(",") if x.strip()]
    if bad := [x for x in a.phases if x not in PHASES]:
        raise SystemExit(f"--phases: unknown {bad}; choose from {','.join(PHASES)}")
    if a.streams is None:
        a.streams = 10000 if sc else 1000
    big = a.streams > 2000
    if a.ramp_s is None:
        a.ramp_s = 10.0 if big else 1.0
    if a.stream_interval_ms is None:
        a.stream_interval_ms = 5000 if big else 1000
    if a.ttfb_tail_streams is None:
        a.ttfb_tail_streams = 320 if q else 1600
    if a.ttfb_c1_streams is None:
        a.ttfb_c1_streams = 100 if q else 300
    if a.openloop_slice is None:
        a.openloop_slice = 1.0 if q else 2.0
    if a.openloop_rounds is None:
        a.openloop_rounds = 2 if q else 5
    if a.workers_rounds is None:
        a.workers_rounds = 1 if q else 3
    if a.rounds is None:
        a.rounds = 1 if q else 3
    if a.warmup is None:
        a.warmup = 1.0 if q else 2.0
    if a.ttfb_streams is None:
        a.ttfb_streams = 100 if q else 400
    if a.hold_s is None:
        a.hold_s = 3 if q else 15 if big else 10
    if q and a.duration == 10:
        a.duration = 3
    a.duration = max(1.0, min(a.duration, 300.0))
    a.concurrency = max(1, min(a.concurrency, 4096))
    a.streams = max(1, min(a.streams, 20000))
    a.ramp_s = max(0.0, min(a.ramp_s, 120.0))
    a.stream_interval_ms = max(50, min(a.stream_interval_ms, 30000))
    a.max_pending = max(1, min(a.max_pending, 4096))
    a.ttfb_tail_concurrency = max(1, min(a.ttfb_tail_concurrency, 1024))
    a.ttfb_tail_streams = max(10, min(a.ttfb_tail_streams, 50000))
    a.ttfb_c1_streams = max(10, min(a.ttfb_c1_streams, 20000))
    a.openloop_rate = max(1.0, min(a.openloop_rate, 20000.0))
    a.openloop_slice = max(0.2, min(a.openloop_slice, 30.0))
    a.openloop_rounds = max(1, min(a.openloop_rounds, 50))
    a.workers = max(2, min(a.workers, 16))
    a.workers_slice = max(1.0, min(a.workers_slice, 30.0))
    a.workers_rounds = max(1, min(a.workers_rounds, 20))
    a.rounds = max(1, min(a.rounds, 10))
    a.hold_s = max(2, min(a.hold_s, 120))
    a.ttfb_streams = max(10, min(a.ttfb_streams, 20000))
    a.slice = max(1.0, min(a.slice, a.duration))
    a.ttfb_batch = max(1, min(a.ttfb_batch, a.ttfb_streams))
    return a


def _estimate_s(a: argparse.Namespace) -> float:
    n_sl = a.rounds * max(1, round(a.duration / a.slice))
    est = {"rps": 2 * (a.warmup + 0.3) + 2 * a.rounds * a.duration + 2 * n_sl * 0.15,
           "ttfb": 2 + 2 * a.ttfb_streams / max(1, a.ttfb_concurrency) * 0.04,
           "tails": 2 + 3 * (a.ttfb_c1_streams * 0.008 + a.ttfb_tail_streams / a.ttfb_tail_concurrency * 0.04),
           "openloop": 2 + 3 * (0.6 + a.openloop_rounds * (a.openloop_slice + 0.1)),
           "workers": 4 + 2 * (a.warmup + 0.3) + 4 * a.workers_rounds * (a.workers_slice + 0.3),
           "rss": 2 * (a.hold_s + a.ramp_s + a.streams / 400 + 2 * a.stream_interval_ms / 1000 + 3)}
    return 4 + sum(v for k, v in est.items() if k in a.phases)


def _environment(loadgen: str, nofile: str) -> dict:
    env = {"loadgen": loadgen, "python": platform.python_version(), "cpus": os.cpu_count(),
           "platform": platform.platform(), "loadavg_start": loadavg(), "nofile": nofile,
           "PYTHONUNBUFFERED": os.environ.get("PYTHONUNBUFFERED"), "aiohttp": aiohttp.__version__}
    try:  # best effort: nice to have in the JSON, not worth failing the run for
        if loadgen == "wrk":
            v = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=5)
            env["wrk"] = (v.stdout + v.stderr).strip().splitlines()[0]
        env["git_rev"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                        capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    return env


def _on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt  # handled like Ctrl-C: the finally block stops every child


def main() -> int:
    a = parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _on_sigterm)
    loadgen = a.loadgen
    if loadgen == "auto":
        loadgen = "wrk" if shutil.which("wrk") else "python"
    if loadgen == "wrk" and not shutil.which("wrk"):
        log("wrk not on PATH (try: apt-get install -y wrk); use --loadgen python")
        return 2
    nofile = raise_nofile(2 * a.streams + 200)  # per stream: the proxy's client and upstream sockets
    log(f"load generator: {loadgen}; {nofile}; cores={os.cpu_count()}; loadavg={loadavg()}; "
        f"estimated time ~{_estimate_s(a):.0f}s")
    res: dict = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": dict(vars(a)),
                 "environment": _environment(loadgen, nofile), "targets": {},
                 "runs": {"rps": [], "ttfb": [], "streams": []}, "cpu": {}, "errors": []}
    run = Run(a, loadgen, res)
    t_begin = time.monotonic()
    tmpdir = Path(tempfile.mkdtemp(prefix="reliapi-bench-cfg-"))
    try:
        run.start(tmpdir)
        steps = {"rps": run.throughput, "ttfb": run.stream_ttfb, "tails": run.ttfb_tails,
                 "openloop": run.open_loop, "workers": run.workers_scaling, "rss": run.rss_streams}
        for ph in PHASES:
            if ph in a.phases:
                steps[ph]()
        if "gateway" in run.names:  # the size of its access log, as a hint at the logging cost
            try:
                res["targets"]["gateway"]["log_bytes"] = (RESULTS / "gateway.log").stat().st_size
            except OSError:
                pass
        res["checks"] = report.checks(res, run.names, run.labels)
        report.print_summary(res, run.names, run.labels)
        if a.strict and run.exit_code == 0 and any(c["pass"] is False for c in res["checks"]):
            run.exit_code = 1
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        res["errors"].append("interrupted")
        run.exit_code = 130
    except Exception as e:  # noqa: BLE001
        log(f"bench failed: {e}")
        res["errors"].append(f"fatal: {e}")
        run.exit_code = 2
    finally:
        cleanup()
        shutil.rmtree(tmpdir, ignore_errors=True)
        res["elapsed_s"] = round(time.monotonic() - t_begin, 1)
        report.write_json(res)
    log(f"done in {res['elapsed_s']}s; results: {RESULTS / 'latest.json'}; logs: {RESULTS}/*.log")
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
