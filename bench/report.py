"""From raw measurements to what the bench reports: per-proxy rps summaries and gateway/bare
ratios, the bare-vs-gateway table, the pass/fail checks against the targets, results JSON."""
from __future__ import annotations

import json
import os
import statistics

from procs import RESULTS, log

TARGET_RPS_RATIO = 0.8
TARGET_TTFB_DELTA_MS = 1.0
TARGET_RSS_MIB = 150.0


def fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def ratio(g, b) -> str:
    return "-" if g is None or not b else f"{g / b:.2f}x"


# ------------------------------------------------------------------ rps summary
def summarize_rps(res: dict, names: list[str], total_slices: int) -> None:
    """Fold the throughput slices in res["runs"]["rps"] into res["targets"][name]."""
    for n in names:
        runs = [x for x in res["runs"]["rps"] if x["target"] == n]
        if not runs:
            continue
        med = statistics.median(x["rps"] for x in runs)
        res["targets"][n].update(
            rps=med, rps_aggregate=sum(x["requests_ok"] for x in runs) / sum(x["elapsed_s"] for x in runs),
            p50_ms=statistics.median(x["p50_ms"] for x in runs),
            p99_ms=statistics.median(x["p99_ms"] for x in runs),
            rps_all=[round(x["rps"]) for x in runs],
            rps_errors_total=sum(sum(x["errors"].values()) for x in runs),
            rps_spread=(max(x["rps"] for x in runs) - min(x["rps"] for x in runs)) / med)
    byk = {(x["target"], x["slice"]): x["rps"] for x in res["runs"]["rps"]}
    if not {"gateway", "bare"} <= {t for t, _ in byk}:
        return
    g = res["targets"]["gateway"]
    pr = [byk[("gateway", k)] / byk[("bare", k)] for k in range(1, total_slices + 1)
          if ("gateway", k) in byk and ("bare", k) in byk]
    if pr:
        g["rps_ratio_per_slice"] = [round(x, 3) for x in pr]
        g["rps_ratio_paired_median"] = statistics.median(pr)
    # ABBA quads (slices 2k-1, 2k: bare,gw | gw,bare): the sum ratio cancels both linear
    # drift and any first/second-in-pair effect; the median over quads drops bursts.
    quads = []
    for k in range(1, total_slices, 2):
        if all((t, j) in byk for t in ("gateway", "bare") for j in (k, k + 1)):
            quads.append((byk[("gateway", k)] + byk[("gateway", k + 1)])
                         / (byk[("bare", k)] + byk[("bare", k + 1)]))
    if len(quads) >= 2:
        g["rps_ratio_per_quad"] = [round(x, 3) for x in quads]
        g["rps_ratio_quad_median"] = statistics.median(quads)


# ------------------------------------------------------------------ table
def table(res: dict, labels: dict[str, str]) -> str:
    b = res["targets"].get("bare", {})
    g = res["targets"].get("gateway", {})
    rows = []

    def row(metric, key, spec=".2f", diff=False, scale=1.0, show_ratio=True):
        bv, gv = b.get(key), g.get(key)
        if scale != 1.0:
            bv = None if bv is None else bv * scale
            gv = None if gv is None else gv * scale
        extra = ratio(gv, bv) if show_ratio else ""
        if diff and bv is not None and gv is not None:
            extra += f"  ({gv - bv:+.2f} ms)"
        rows.append((metric, fmt(bv, spec), fmt(gv, spec), extra))

    c = res["config"]
    ns = len(b.get("rps_all") or g.get("rps_all") or [])
    row(f"requests/s (c={c['concurrency']}, median of {ns} slices)", "rps", ".0f")
    if g.get("rps_ratio_quad_median") is not None:
        rows.append((f"  rps ratio, median of {len(g['rps_ratio_per_quad'])} ABBA quads", "", "",
                     f"{g['rps_ratio_quad_median']:.2f}x"))
    elif g.get("rps_ratio_paired_median") is not None:
        rows.append(("  rps ratio, median of paired slices", "", "",
                     f"{g['rps_ratio_paired_median']:.2f}x"))
    row("latency p50 (ms)", "p50_ms", diff=True)
    row("latency p99 (ms)", "p99_ms", diff=True)
    row(f"stream TTFB p50 (ms, c={c['ttfb_concurrency']})", "ttfb_p50_ms", ".3f", diff=True)
    row("stream TTFB p99 (ms)", "ttfb_p99_ms", ".3f", diff=True)
    if ud := res.get("upstream_direct"):
        rows.append(("  (info) TTFB p50 / p99 direct to upstream", "", "",
                     f"{fmt(ud['ttfb_p50_ms'], '.3f')} / {fmt(ud['ttfb_p99_ms'], '.3f')} ms"))
    row(f"peak RSS @{c['streams']} streams (MiB)", "peak_rss_kb", ".1f", scale=1 / 1024)
    row("  RSS before streams (MiB)", "rss_before_kb", ".1f", scale=1 / 1024)
    row("  RSS after streams closed (MiB)", "rss_after_kb", ".1f", scale=1 / 1024)
    row(f"  streams ok / {c['streams']}", "streams_ok", "d", show_ratio=False)
    row(f"  (info) TTFB p50 while opening {c['streams']} (ms)", "streams_ttfb_p50_ms", ".1f",
        show_ratio=False)

    w0 = max(len(r[0]) for r in rows) + 2
    hb, hg = labels.get("bare", "bare"), labels.get("gateway", "gateway")
    lines = [f"{'metric':<{w0}}{hb:>12}{hg:>14}   gateway/bare", "-" * (w0 + 44)]
    lines += [f"{m:<{w0}}{bv:>12}{gv:>14}   {ex}" for m, bv, gv, ex in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------ pass / fail
def checks(res: dict, names: list[str], labels: dict[str, str]) -> list[dict]:
    b = res["targets"].get("bare", {})
    g = res["targets"].get("gateway", {})
    if not (b and g):
        return []
    out = []

    def chk(name, ok, detail):
        out.append({"check": name, "pass": bool(ok), "detail": detail})

    if b.get("rps") and g.get("rps") is not None:
        # the most noise-robust ratio available
        if g.get("rps_ratio_quad_median") is not None:
            r, how = g["rps_ratio_quad_median"], "median of ABBA quads"
        elif g.get("rps_ratio_paired_median") is not None:
            r, how = g["rps_ratio_paired_median"], "median of paired slices"
        else:
            r, how = g["rps"] / b["rps"], "medians"
        chk(f"rps ratio ({how})", r >= TARGET_RPS_RATIO, f"{r:.2f} (target >= {TARGET_RPS_RATIO})")
    else:
        chk("rps ratio", False, "not measured")
    if b.get("ttfb_p50_ms") is not None and g.get("ttfb_p50_ms") is not None:
        d = g["ttfb_p50_ms"] - b["ttfb_p50_ms"]
        chk("TTFB p50 delta", d <= TARGET_TTFB_DELTA_MS,
            f"{d:+.3f} ms (target <= +{TARGET_TTFB_DELTA_MS} ms)")
    else:
        chk("TTFB p50 delta", False, "not measured")
    ns = res["config"]["streams"]
    if g.get("peak_rss_kb"):
        mib = g["peak_rss_kb"] / 1024
        chk(f"gateway peak RSS @{ns} streams", mib <= TARGET_RSS_MIB,
            f"{mib:.1f} MiB (target <= {TARGET_RSS_MIB:.0f} MiB)")
    else:
        chk(f"gateway peak RSS @{ns} streams", False, "not measured")
    for n in names:
        t = res["targets"][n]
        up = t.get("streams_upstream") or {}
        ok = (t.get("streams_ok") == ns and t.get("streams_max_open") == ns
              and up.get("streams_completed") == ns)
        chk(f"{labels.get(n, n)}: all {ns} streams open together and completed", ok,
            f"client: {t.get('streams_ok')}/{ns} ok, max open together "
            f"{t.get('streams_max_open')}, errors {t.get('streams_errors') or 0}; upstream: "
            f"{up.get('streams_completed')} completed, {up.get('streams_aborted')} aborted, "
            f"max open {up.get('max_open_streams')}")
        errs = t.get("rps_errors_total", 0)
        chk(f"{labels.get(n, n)}: no errors under load", errs == 0 and not t.get("ttfb_errors"),
            f"rps errors {errs}, ttfb errors {t.get('ttfb_errors') or 0}")
    return out


# ------------------------------------------------------------------ output
def print_summary(res: dict, names: list[str], labels: dict[str, str]) -> None:
    """The table, the noise and CPU lines, then the checks and errors (res["checks"] is set)."""
    cfg = res["config"]
    print()
    print(f"ReliAPI bench  (load generator: {res['environment']['loadgen']}; {os.cpu_count()} "
          f"cores shared by load generator + upstream + proxy)")
    if cfg["gateway_cmd"]:
        print(f"NOTE: gateway slot overridden by --gateway-cmd: {' '.join(cfg['gateway_cmd_resolved'])}")
    print(table(res, labels))
    print()
    for n in names:
        t = res["targets"][n]
        if t.get("rps_all"):
            print(f"noise: {labels[n]:<9} rps per slice {t['rps_all']} "
                  f"(spread {100 * t['rps_spread']:.0f}% of median)")
    g = res["targets"].get("gateway", {})
    if pr := g.get("rps_ratio_per_slice"):
        print(f"       gateway/bare rps ratio per slice pair: {pr}")
    if pq := g.get("rps_ratio_per_quad"):
        print(f"       gateway/bare rps ratio per ABBA quad:  {pq}")
    for phase, cm in res.get("cpu", {}).items():
        warn = "  <-- machine NOT idle: results are noisy" if cm["foreign_cpu_pct"] > 5 else ""
        print(f"cpu ({phase}): other processes used {cm['foreign_cpu_pct']}% of the machine, "
              f"bench {cm['bench_cpu_pct']}%, steal {cm['steal_pct']}%{warn}")
    print()
    lb = g.get("log_bytes")
    if lb is not None:
        # the access log is part of the gateway's real cost: say so when it was not written
        print(f"gateway stdout/stderr -> {RESULTS / 'gateway.log'}: {lb} bytes"
              + ("  (no access log written at this --gateway-log-level: logging cost NOT "
                 "included; try --gateway-log-level info)"
                 if lb < 1000 and not cfg["gateway_cmd"] else ""))
    print()
    for c in res["checks"]:
        print(f"  [{'PASS' if c['pass'] else 'FAIL'}] {c['check']}: {c['detail']}")
    if "gateway" not in names:
        print("  [FAIL] gateway was not measured (see errors above)")
    for e in res["errors"]:
        print(f"  error: {e.splitlines()[0]}")


def write_json(res: dict) -> None:
    try:
        (RESULTS / "latest.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    except OSError as e:
        log(f"could not write latest.json: {e}")
