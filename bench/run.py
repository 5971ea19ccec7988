#!/usr/bin/env python3
"""ReliAPI gateway benchmark: gateway vs. a bare aiohttp pass-through proxy.

One command starts a fake upstream, the gateway and a bare proxy (all on
127.0.0.1), then measures for each proxy under identical conditions:
  (a) non-streaming requests/s and latency p50/p99 at fixed concurrency
  (b) streaming time-to-first-body-byte p50/p99 at low concurrency
  (c) peak RSS of the proxy process while N (default 1000) streams are open
and prints a bare-vs-gateway table with pass/fail against the targets.
Results: bench/results/latest.json (+ process logs in bench/results/).

  python bench/run.py                 # full run, ~2.5 min
  python bench/run.py --quick         # ~20-30 s smoke run
  python bench/run.py --gateway-cmd bare   # test the harness: "gateway" slot = 2nd bare proxy

run.py parses the options and drives a run; phases.py starts the processes and runs the three
phases; procs.py manages processes and reads /proc; measure.py takes one measurement at a time;
report.py turns the results into the table, the checks and latest.json.
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


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="ReliAPI benchmark: gateway vs. bare aiohttp proxy",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--duration", type=float, default=10,
                    help="measured throughput seconds per proxy per round")
    ap.add_argument("--concurrency", type=int, default=64, help="connections for the rps test")
    ap.add_argument("--streams", type=int, default=1000, help="concurrent streams for the RSS test")
    ap.add_argument("--quick", action="store_true", help="~20-30 s smoke run (short runs, 1 round)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="throughput rounds per proxy (default 3, quick 1)")
    ap.add_argument("--warmup", type=float, default=None, help="warm-up seconds per proxy (default 2, quick 1)")
    ap.add_argument("--ttfb-streams", type=int, default=None,
                    help="streams per proxy for the TTFB test (default 400, quick 100)")
    ap.add_argument("--ttfb-concurrency", type=int, default=8)
    ap.add_argument("--ttfb-batch", type=int, default=16,
                    help="TTFB streams per proxy before switching to the other proxy")
    ap.add_argument("--slice", type=float, default=2.0,
                    help="throughput runs are split into alternating slices of ~this many seconds")
    ap.add_argument("--hold-s", type=int, default=None,
                    help="seconds each of the N streams stays open (1 chunk/s; default 12, quick 4)")
    ap.add_argument("--ramp-s", type=float, default=1.0, help="spread opening of the N streams over this")
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
    """Fill the --quick-dependent defaults, then clamp: every loop is bounded in count and time."""
    q = a.quick
    if a.rounds is None:
        a.rounds = 1 if q else 3
    if a.warmup is None:
        a.warmup = 1.0 if q else 2.0
    if a.ttfb_streams is None:
        a.ttfb_streams = 100 if q else 400
    if a.hold_s is None:
        a.hold_s = 4 if q else 12
    if q and a.duration == 10:
        a.duration = 3
    a.duration = max(1.0, min(a.duration, 300.0))
    a.concurrency = max(1, min(a.concurrency, 4096))
    a.streams = max(1, min(a.streams, 10000))
    a.rounds = max(1, min(a.rounds, 10))
    a.hold_s = max(2, min(a.hold_s, 120))
    a.ttfb_streams = max(10, min(a.ttfb_streams, 20000))
    a.slice = max(1.0, min(a.slice, a.duration))
    a.ttfb_batch = max(1, min(a.ttfb_batch, a.ttfb_streams))
    return a


def _estimate_s(a: argparse.Namespace) -> float:
    n_sl = a.rounds * max(1, round(a.duration / a.slice))
    return (4 + 2 * (a.warmup + 0.3) + 2 * a.rounds * a.duration + 2 * n_sl * 0.15
            + 2 + 2 * a.ttfb_streams / max(1, a.ttfb_concurrency) * 0.04
            + 2 * (a.hold_s + a.ramp_s + 3.5))


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
    nofile = raise_nofile(3 * a.streams + 200)  # per stream: client, proxy in and out sockets
    log(f"load generator: {loadgen}; {nofile}; cores={os.cpu_count()}; loadavg={loadavg()}; "
        f"estimated time ~{_estimate_s(a):.0f}s")
    res: dict = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": dict(vars(a)),
                 "environment": _environment(loadgen, nofile), "targets": {},
                 "runs": {"rps": [], "ttfb": [], "streams": []}, "errors": []}
    run = Run(a, loadgen, res)
    t_begin = time.monotonic()
    tmpdir = Path(tempfile.mkdtemp(prefix="reliapi-bench-cfg-"))
    try:
        run.start(tmpdir)
        run.throughput()
        run.stream_ttfb()
        run.rss_streams()
        if "gateway" in run.names:  # the size of its access log, as a hint at the logging cost
            try:
                res["targets"]["gateway"]["log_bytes"] = (RESULTS / "gateway.log").stat().st_size
            except OSError:
                pass
        res["checks"] = report.checks(res, run.names, run.labels)
        report.print_summary(res, run.names, run.labels)
        if a.strict and run.exit_code == 0 and any(not c["pass"] for c in res["checks"]):
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
