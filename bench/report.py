"""From raw measurements to what the bench reports: per-proxy rps summaries and gateway/bare
ratios, the bare-vs-gateway table, the pass/fail checks against the targets, results JSON."""
from __future__ import annotations

import json
import os
import statistics

from procs import RESULTS, log

TARGET_RPS_RATIO = 0.8
TARGET_TTFB_DELTA_MS = 1.0         # stream TTFB p50 at c=8: gateway <= bare + this
TARGET_RSS_MIB = 150.0             # peak RSS with 1000 open streams (MiB)
TARGET_RSS_10K_MB = 250.0          # peak RSS with 10,000 open streams (MB, issue #19)
TARGET_TTFB_TAIL_DELTA_MS = 2.0    # stream TTFB added p99 at c=32: gateway <= bare + this (issue #19)
TARGET_OPENLOOP_DELTA_MS = 0.5     # added p99 at 1000 req/s open loop: gateway <= bare + this (issue #19)
TARGET_WORKERS_RATIO = 1.7         # --workers 2 / 1 worker requests/s, when two cores are free (issue #19)


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
        if bv is None and gv is None:
            return  # a phase this run left out
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
    ud = res.get("upstream_direct") or {}
    if "ttfb_p50_ms" in ud:
        rows.append(("  (info) TTFB p50 / p99 direct to upstream", "", "",
                     f"{fmt(ud['ttfb_p50_ms'], '.3f')} / {fmt(ud['ttfb_p99_ms'], '.3f')} ms"))
    tc = c.get("ttfb_tail_concurrency", 32)
    if "ttfb_c1_p50_ms" in b or "ttfb_c1_p50_ms" in g:
        row("stream TTFB p50 (ms, c=1, raw client)", "ttfb_c1_p50_ms", ".3f", diff=True, show_ratio=False)
        row("  added p50 c=1: minus direct's (ms)", "ttfb_c1_added_p50_ms", "+.3f", diff=True, show_ratio=False)
    if "ttfb_c32_p99_ms" in b or "ttfb_c32_p99_ms" in g:
        row(f"stream TTFB p99 (ms, c={tc}, raw client)", "ttfb_c32_p99_ms", ".3f", diff=True, show_ratio=False)
        row(f"  added p99 c={tc}: minus direct's (ms)", "ttfb_c32_added_p99_ms", "+.3f", diff=True,
            show_ratio=False)
    if "ttfb_c1_p50_ms" in ud or "ttfb_c32_p99_ms" in ud:
        rows.append((f"  (info) direct: TTFB p50 c=1 / p99 c={tc}", "", "",
                     f"{fmt(ud.get('ttfb_c1_p50_ms'), '.3f')} / {fmt(ud.get('ttfb_c32_p99_ms'), '.3f')} ms"))
    if ol := res.get("openloop"):
        rate = f"{ol['rate']:g}/s"
        row(f"open loop @{rate}: latency p50 (ms)", "ol_p50_ms", ".3f", diff=True, show_ratio=False)
        row(f"open loop @{rate}: latency p99 (ms)", "ol_p99_ms", ".3f", diff=True, show_ratio=False)
        row(f"  added p99 @{rate}: minus direct's (ms)", "ol_added_p99_ms", "+.3f", diff=True, show_ratio=False)
        row(f"  added p99, median of {c.get('openloop_rounds')} slices' p99 (ms)", "ol_added_p99_median_ms", "+.3f",
            diff=True, show_ratio=False)
        d = ol["direct"]
        rows.append((f"  (info) direct p50 / p99 @{rate}", "", "",
                     f"{fmt(d['p50_ms'], '.3f')} / {fmt(d['p99_ms'], '.3f')} ms"))
        row("  (info) send lag p99 (ms)", "ol_send_lag_p99_ms", ".3f", show_ratio=False)
    ns = res.get("streams_measured", c["streams"])
    row(f"peak RSS @{ns} streams (MiB)", "peak_rss_kb", ".1f", scale=1 / 1024)
    row("  RSS with all open (MiB)", "rss_at_all_open_kb", ".1f", scale=1 / 1024)
    row("  RSS before streams (MiB)", "rss_before_kb", ".1f", scale=1 / 1024)
    row("  RSS after streams closed (MiB)", "rss_after_kb", ".1f", scale=1 / 1024)
    row(f"  streams ok / {ns}", "streams_ok", "d", show_ratio=False)
    row(f"  (info) TTFB p50 while opening {ns} (ms)", "streams_ttfb_p50_ms", ".1f",
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

    phases = res["config"].get("phases") or ()
    if "rps" not in phases:
        pass
    elif b.get("rps") and g.get("rps") is not None:
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
    if "ttfb" in phases:
        if b.get("ttfb_p50_ms") is not None and g.get("ttfb_p50_ms") is not None:
            d = g["ttfb_p50_ms"] - b["ttfb_p50_ms"]
            chk("TTFB p50 delta (c=8)", d <= TARGET_TTFB_DELTA_MS,
                f"{d:+.3f} ms (target <= +{TARGET_TTFB_DELTA_MS} ms)")
        else:
            chk("TTFB p50 delta (c=8)", False, "not measured")
    if "tails" in phases:
        tc = res["config"].get("ttfb_tail_concurrency", 32)
        gv, bv = g.get("ttfb_c32_added_p99_ms"), b.get("ttfb_c32_added_p99_ms")
        if gv is not None and bv is not None:
            chk(f"stream TTFB added p99 c={tc}: gateway within +{TARGET_TTFB_TAIL_DELTA_MS:g} ms of bare",
                gv - bv <= TARGET_TTFB_TAIL_DELTA_MS,
                f"gateway {gv:+.3f} ms, bare {bv:+.3f} ms over direct: {gv - bv:+.3f} ms "
                f"(target <= +{TARGET_TTFB_TAIL_DELTA_MS:g} ms)")
        else:
            chk(f"stream TTFB added p99 c={tc}", False, "not measured")
    if "openloop" in phases:
        rate = res.get("openloop", {}).get("rate", res["config"].get("openloop_rate"))
        # the median of the slices' p99s when there are 3 or more slices (one burst of other work in one
        # slice does not decide it), else the pooled p99s; both are in the table
        key, how = (("ol_added_p99_median_ms", "median slice p99") if res["config"].get("openloop_rounds", 0) >= 3
                    else ("ol_added_p99_ms", "pooled"))
        gv, bv = g.get(key), b.get(key)
        if gv is not None and bv is not None:
            pg, pb = g.get("ol_added_p99_ms"), b.get("ol_added_p99_ms")
            chk(f"added p99 @{rate:g}/s open loop: gateway within +{TARGET_OPENLOOP_DELTA_MS:g} ms of bare",
                gv - bv <= TARGET_OPENLOOP_DELTA_MS,
                f"{how}: gateway {gv:+.3f} ms, bare {bv:+.3f} ms over direct: {gv - bv:+.3f} ms "
                f"(target <= +{TARGET_OPENLOOP_DELTA_MS:g} ms"
                + (f"; pooled: {fmt(pg, '+.3f')} vs {fmt(pb, '+.3f')} ms)" if how != "pooled" else ")"))
        else:
            chk(f"added p99 @{rate:g}/s open loop", False, "not measured")
    if "workers" in phases and (w := res.get("workers")):
        r, free = w.get("ratio"), w.get("cores_free_for_gateway")
        name = f"--workers {w['workers']} / 1 worker requests/s >= {TARGET_WORKERS_RATIO:g}x (two free cores)"
        detail = (f"{fmt(r, '.2f')}x; the {w['workers']}-worker gateway had {fmt(free, '.2f')} of "
                  f"{w['cores_total']} cores (its own use + idle), the upstream and the load generator the rest")
        if free is not None and free < 1.9:
            out.append({"check": name, "pass": None,
                        "detail": detail + ": not two free cores, the target cannot be judged on this machine"})
        else:
            chk(name, r is not None and r >= TARGET_WORKERS_RATIO, detail)
    if "rss" in phases:
        _rss_checks(res, names, labels, g, chk)
    for n in names if {"rps", "ttfb", "tails", "openloop"} & set(phases) else ():
        t = res["targets"][n]
        errs = t.get("rps_errors_total", 0)
        other = {k: t.get(k) or 0 for k in ("ttfb_errors", "ttfb_c1_errors", "ttfb_c32_errors", "ol_errors")}
        chk(f"{labels.get(n, n)}: no errors under load", errs == 0 and not any(other.values()),
            f"rps errors {errs}, " + ", ".join(f"{k.removesuffix('_errors')} errors {v}" for k, v in other.items()))
    return out


def _rss_checks(res: dict, names: list[str], labels: dict[str, str], g: dict, chk) -> None:
    asked = res["config"]["streams"]
    ns = res.get("streams_measured", asked)
    if g.get("peak_rss_kb"):
        mib = g["peak_rss_kb"] / 1024
        if asked >= 10000:
            mb = g["peak_rss_kb"] * 1024 / 1e6
            note = "" if ns >= asked else f"; {ns} measured of {asked} asked: the fd limit (see README)"
            chk(f"gateway peak RSS @{ns} streams", mb <= TARGET_RSS_10K_MB,
                f"{mb:.1f} MB = {mib:.1f} MiB (target <= {TARGET_RSS_10K_MB:.0f} MB at 10,000{note})")
        elif ns <= 1000:
            chk(f"gateway peak RSS @{ns} streams", mib <= TARGET_RSS_MIB,
                f"{mib:.1f} MiB (target <= {TARGET_RSS_MIB:.0f} MiB at 1000)")
    else:
        chk(f"gateway peak RSS @{ns} streams", False, "not measured")
    for n in names:
        t = res["targets"][n]
        up = t.get("streams_upstream") or {}
        ok = (t.get("streams_ok") == ns and t.get("streams_max_open") == ns
              and up.get("streams_completed") == ns and up.get("max_open_streams") == ns)
        chk(f"{labels.get(n, n)}: all {ns} streams open together and completed", ok,
            f"client: {t.get('streams_ok')}/{ns} ok, max open together "
            f"{t.get('streams_max_open')}, errors {t.get('streams_errors') or 0}; upstream: "
            f"{up.get('streams_completed')} completed, {up.get('streams_aborted')} aborted, "
            f"max open {up.get('max_open_streams')}")


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
    if ol := res.get("openloop"):
        print(f"open loop: p99 per slice (ms) {ol['slices_p99_ms']}")
        lag = ol.get("send_lag_p99_ms_max")
        print(f"           load generator used {ol['loadgen_cpu_pct_of_core']}% of one core at {ol['rate']:g}/s "
              f"(schedule: {ol['ticker']}, priority: {ol.get('priority')}); send lag p99 {fmt(lag, '.3f')} ms "
              f"(worst target)"
              + ("  <-- sends were late: the machine was short of CPU then; latencies count it, for every "
                 "target alike" if lag is not None and lag > 0.5 else ""))
    for key, tt in (res.get("ttfb_tails") or {}).items():
        print(f"ttfb {key}: load generator used {tt['loadgen_cpu_pct_of_core']}% of one core "
              f"(priority: {tt.get('priority')})")
    if w := res.get("workers"):
        name = w["name"]
        print()
        print(f"workers: gateway --workers {w['workers']} vs 1 worker, c={w['concurrency']}, raw client "
              f"(ABBA slices): {w['gateway']['rps']:.0f} -> {w[name]['rps']:.0f} req/s, "
              f"{fmt(w['ratio'], '.2f')}x (median of quads {w['ratio_per_quad']})")
        for n in ("gateway", name):
            c = w[n]["cores"]
            print(f"  cores used during the {n} slices (of {w['cores_total']}): proxy {c['proxy']:.2f}, "
                  f"upstream {c['upstream']:.2f}, load generator {c['loadgen']:.2f}, softirq {c['softirq']:.2f}, "
                  f"other {c['other']:.2f}, idle {c['idle']:.2f}")
        if w["cores_free_for_gateway"] < w["workers"] - 0.1:
            print(f"  -> with {w['workers']} workers the gateway had {w['cores_free_for_gateway']:.2f} cores "
                  f"(used + idle), not {w['workers']}: the upstream and the load generator share this machine")
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
        verdict = "N/A " if c["pass"] is None else "PASS" if c["pass"] else "FAIL"
        print(f"  [{verdict}] {c['check']}: {c['detail']}")
    if "gateway" not in names:
        print("  [FAIL] gateway was not measured (see errors above)")
    for e in res.get("notes", []):
        print(f"  note: {e}")
    for e in res["errors"]:
        print(f"  error: {e.splitlines()[0]}")


def write_json(res: dict) -> None:
    try:
        (RESULTS / "latest.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    except OSError as e:
        log(f"could not write latest.json: {e}")
