"""One bench run: start the upstream, the bare proxy and the gateway, then the phases (throughput,
stream TTFB at c=8, stream TTFB tails at c=1 and c=32, open-loop latency at a fixed rate, --workers 2
against 1 worker, RSS at N open streams), each filling the results dict."""
from __future__ import annotations

import argparse
import os
import resource
import shlex
import shutil
import statistics
import time
from pathlib import Path

import report
from measure import CHAT_PATH, Bench, smoke, upstream_ctl
from procs import (
    BENCH_DIR,
    HOST,
    PY,
    REPO,
    RESULTS,
    Child,
    CpuMonitor,
    fd_count,
    fd_limit,
    free_port,
    log,
    machine_cpu,
    tree_cpu_s,
    wait_ready,
)

GATEWAY_CMD_DEFAULT = ("{python} -m gateway --config {config} --host {host} --port {port} "
                       "--log-level {log_level}")
BARE_CMD = "{python} {bench}/bare_proxy.py --host {host} --port {port} --upstream {upstream_url}"


def _gateway_config(up_url: str) -> str:
    return ("server: {default_target: up}\n"
            "targets:\n"
            "  up:\n"
            f"    base_url: {up_url}/v1\n"
            "    provider: openai\n"
            "    auth: {type: passthrough}\n")


class Run:
    """One bench run: the proxies under test and the results dict that the phases fill."""

    def __init__(self, a: argparse.Namespace, loadgen: str, res: dict):
        self.a, self.loadgen, self.res = a, loadgen, res
        self.labels = {"bare": "bare", "gateway": "gateway*" if a.gateway_cmd else "gateway"}
        self.exit_code = 0
        self.procs: dict[str, tuple[Child, int]] = {}  # proxy name -> (process, port)
        self.names: list[str] = []

    def start(self, tmpdir: Path) -> None:
        """Start upstream, bare proxy and gateway; a gateway that fails to start or to pass the
        smoke test is reported and left out, the bare proxy failing is fatal."""
        a, res = self.a, self.res
        up_port, bare_port, gw_port = free_port(), free_port(), free_port()
        while len({up_port, bare_port, gw_port}) < 3:  # bounded in practice (ephemeral ports)
            gw_port = free_port()
        self.up_port, self.up_url = up_port, f"http://{HOST}:{up_port}"
        cfg = tmpdir / "gateway.yaml"
        cfg.write_text(_gateway_config(self.up_url))
        shutil.copy(cfg, RESULTS / "gateway-config.yaml")
        subst = {"python": PY, "host": HOST, "log_level": a.gateway_log_level, "upstream_port": up_port,
                 "upstream_url": self.up_url, "repo": str(REPO), "bench": str(BENCH_DIR), "config": str(cfg)}

        upstream = Child("upstream", [PY, str(BENCH_DIR / "fake_upstream.py"), "--host", HOST,
                                      "--port", str(up_port)], RESULTS / "upstream.log")
        bare = Child("bare", shlex.split(BARE_CMD.format(port=bare_port, **subst)), RESULTS / "bare.log")
        gw_template = BARE_CMD if a.gateway_cmd == "bare" else a.gateway_cmd or GATEWAY_CMD_DEFAULT
        gw_cmd = shlex.split(gw_template.format(port=gw_port, **subst))
        self.gw_template, self.subst = gw_template, subst
        res["config"]["gateway_cmd_resolved"] = gw_cmd
        gateway = Child("gateway", gw_cmd, RESULTS / "gateway.log")
        wait_ready(upstream, up_port, 15)
        wait_ready(bare, bare_port, 15)
        self.procs = {"bare": (bare, bare_port)}
        try:
            wait_ready(gateway, gw_port, a.startup_timeout)
            self.procs["gateway"] = (gateway, gw_port)
        except RuntimeError as e:
            log(f"GATEWAY DID NOT START: {e}")
            res["errors"].append(f"gateway start: {e}")
            self.exit_code = 2
        log(f"upstream pid {upstream.pid} :{up_port} | bare pid {bare.pid} :{bare_port} | "
            f"gateway pid {gateway.pid} :{gw_port}  cmd: {' '.join(gw_cmd)}")

        for name, (_, port) in list(self.procs.items()):
            try:
                smoke(f"http://{HOST}:{port}{CHAT_PATH}")
            except Exception as e:  # noqa: BLE001
                log(f"SMOKE TEST FAILED for {name}: {e}")
                res["errors"].append(f"{name} smoke: {e}")
                self.exit_code = 2
                if name == "bare":
                    raise
                del self.procs[name]
        self.names = list(self.procs)
        for n in self.names:
            res["targets"][n] = {"pid": self.procs[n][0].pid}
        self.urls = {n: f"http://{HOST}:{port}{CHAT_PATH}" for n, (_, port) in self.procs.items()}
        self.bench = Bench(a, self.loadgen, up_port)
        self.upstream = upstream

    def alive_or_fail(self, n: str) -> bool:
        """Is proxy n still running? If not, record its death (once) in the errors."""
        ch = self.procs[n][0]
        if ch.alive():
            return True
        msg = f"{n} process died (code {ch.p.returncode}); log tail:\n{ch.log_tail()}"
        if msg not in self.res["errors"]:
            log(msg)
            self.res["errors"].append(msg)
        return False

    def throughput(self) -> None:
        """(a) Non-streaming load in short slices alternating between the proxies in ABBA
        order, so that machine noise hits both alike."""
        a, res = self.a, self.res
        log(f"warm-up {a.warmup:g}s per proxy ...")
        upstream_ctl(self.up_port, chunks=3, interval_ms=10)
        for n in self.names:
            try:
                self.bench.rps(self.urls[n], a.warmup)
            except Exception as e:  # noqa: BLE001
                log(f"warm-up {n} failed: {e}")
        n_slices = max(1, round(a.duration / a.slice))
        slice_s = a.duration / n_slices
        if self.loadgen == "wrk":  # wrk takes whole seconds
            slice_s = max(1, round(slice_s))
        total_slices = n_slices * a.rounds
        if total_slices > 1 and total_slices % 2:
            total_slices += 1  # even, so the ABBA quads are complete
        log(f"throughput: {a.rounds} x {a.duration:g}s per proxy at c={a.concurrency}, run as "
            f"{total_slices} alternating {slice_s:g}s slices per proxy (ABBA order) ...")
        cpu = CpuMonitor()
        for k in range(1, total_slices + 1):  # bounded
            line = []
            for n in self.names if k % 2 else self.names[::-1]:
                if not self.alive_or_fail(n):
                    continue
                try:
                    m = self.bench.rps(self.urls[n], slice_s)
                except Exception as e:  # noqa: BLE001
                    log(f"rps {n} slice {k} failed: {e}")
                    res["errors"].append(f"rps {n}: {e}")
                    continue
                m.update(target=n, slice=k)
                res["runs"]["rps"].append(m)
                line.append(f"{self.labels[n]} {m['rps']:6.0f}/s p50 {m['p50_ms']:6.2f} p99 {m['p99_ms']:6.2f}"
                            + (f" ERR {m['errors']}" if m["errors"] else ""))
            log(f"rps slice {k:2d}/{total_slices}: " + " | ".join(line))
        res["cpu"]["throughput"] = cpu.result()
        report.summarize_rps(res, self.names, total_slices)

    def stream_ttfb(self) -> None:
        """(b) Time to first byte of short streams, with the upstream itself as reference."""
        a, res = self.a, self.res
        log(f"stream TTFB: {a.ttfb_streams} streams per proxy at concurrency {a.ttfb_concurrency},"
            f" batches of {a.ttfb_batch} alternating between proxies ...")
        cpu = CpuMonitor()
        live = [n for n in self.names if self.alive_or_fail(n)]
        direct = f"{self.up_url}{CHAT_PATH}"  # reference: no proxy at all
        try:
            m = self.bench.ttfb([self.urls[n] for n in live] + [direct])
            d = m["targets"][direct]
            res["upstream_direct"] = {"ttfb_p50_ms": d["p50_ms"], "ttfb_p99_ms": d["p99_ms"], "ttfb_n": d["n"]}
            log(f"ttfb  {'direct':<9}: p50 {report.fmt(d['p50_ms'], '.3f')} ms  p99 "
                f"{report.fmt(d['p99_ms'], '.3f')} ms  (upstream without proxy, reference)")
            for n in live:
                t = m["targets"][self.urls[n]]
                t.pop("ttfb_ms", None)  # the raw samples: too bulky for the JSON
                res["targets"][n].update(ttfb_p50_ms=t["p50_ms"], ttfb_p99_ms=t["p99_ms"],
                                         ttfb_n=t["n"], ttfb_errors=sum(t["errors"].values()))
                t["target"] = n
                res["runs"]["ttfb"].append(t)
                log(f"ttfb  {self.labels[n]:<9}: p50 {report.fmt(t['p50_ms'], '.3f')} ms  p99 "
                    f"{report.fmt(t['p99_ms'], '.3f')} ms  ok {t['ok']}  errors {t['errors'] or 0}")
        except Exception as e:  # noqa: BLE001
            log(f"ttfb failed: {e}")
            res["errors"].append(f"ttfb: {e}")
        res["cpu"]["ttfb"] = cpu.result()

    def ttfb_tails(self) -> None:
        """(b2) Stream TTFB at c=1 (p50) and at c=32 (p99), lean raw-socket client (rawload.py): each
        proxy's TTFB minus the upstream's own, measured in the same batches, is what it adds."""
        a, res = self.a, self.res
        live = [n for n in self.names if self.alive_or_fail(n)]
        direct = f"{self.up_url}{CHAT_PATH}"
        ud = res.setdefault("upstream_direct", {})
        cpu = CpuMonitor()
        levels = (("c1", 1, a.ttfb_c1_streams, 25, 1, 5), ("c32", a.ttfb_tail_concurrency, a.ttfb_tail_streams,
                                                            4 * a.ttfb_tail_concurrency, 3, 10))
        for key, conc, count, batch, chunks, interval in levels:
            log(f"stream TTFB tails: {count} streams per proxy and direct at c={conc} ({chunks} chunk(s) "
                f"{interval} ms apart after the first), raw client, batches of {batch} rotating ...")
            try:
                m = self.bench.ttfb_raw([self.urls[n] for n in live] + [direct], conc, count, batch, chunks,
                                        interval)
            except Exception as e:  # noqa: BLE001
                log(f"ttfb tails c={conc} failed: {e}")
                res["errors"].append(f"ttfb {key}: {e}")
                continue
            d = m["targets"][direct]
            ud.update({f"ttfb_{key}_p50_ms": d["p50_ms"], f"ttfb_{key}_p99_ms": d["p99_ms"], f"ttfb_{key}_n": d["n"]})
            res.setdefault("ttfb_tails", {})[key] = {"concurrency": conc, "loadgen_cpu_pct_of_core":
                                                     m["loadgen_cpu_pct_of_core"], "elapsed_s": m["elapsed_s"],
                                                     "priority": m.get("priority")}
            log(f"ttfb c={conc:<3} {'direct':<9}: p50 {report.fmt(d['p50_ms'], '.3f')} ms  p99 "
                f"{report.fmt(d['p99_ms'], '.3f')} ms  (load generator {m['loadgen_cpu_pct_of_core']}% of a core)")
            for n in live:
                t = m["targets"][self.urls[n]]
                add50 = None if t["p50_ms"] is None or d["p50_ms"] is None else t["p50_ms"] - d["p50_ms"]
                add99 = None if t["p99_ms"] is None or d["p99_ms"] is None else t["p99_ms"] - d["p99_ms"]
                res["targets"][n].update({f"ttfb_{key}_p50_ms": t["p50_ms"], f"ttfb_{key}_p99_ms": t["p99_ms"],
                                          f"ttfb_{key}_added_p50_ms": add50, f"ttfb_{key}_added_p99_ms": add99,
                                          f"ttfb_{key}_errors": sum(t["errors"].values())})
                log(f"ttfb c={conc:<3} {self.labels[n]:<9}: p50 {report.fmt(t['p50_ms'], '.3f')} ms  p99 "
                    f"{report.fmt(t['p99_ms'], '.3f')} ms  added p50 {report.fmt(add50, '+.3f')} p99 "
                    f"{report.fmt(add99, '+.3f')} ms  ok {t['ok']}  errors {t['errors'] or 0}")
        res["cpu"]["ttfb tails"] = cpu.result()

    def open_loop(self) -> None:
        """(d) Non-streaming requests at a fixed rate, open loop (each sent at its scheduled time
        whatever is outstanding), latency from the scheduled time; slices rotate bare / gateway /
        direct, so "added" = proxy minus direct is taken at the same moments."""
        a, res = self.a, self.res
        live = [n for n in self.names if self.alive_or_fail(n)]
        direct = f"{self.up_url}{CHAT_PATH}"
        log(f"open loop: {a.openloop_rate:g} req/s, {a.openloop_rounds} x {a.openloop_slice:g}s slices per "
            f"proxy and direct, rotating (latency from the scheduled send time) ...")
        upstream_ctl(self.up_port, chunks=3, interval_ms=10)
        cpu = CpuMonitor()
        try:
            m = self.bench.openloop([self.urls[n] for n in live] + [direct])
        except Exception as e:  # noqa: BLE001
            log(f"open loop failed: {e}")
            res["errors"].append(f"openloop: {e}")
            res["cpu"]["open loop"] = cpu.result()
            return
        res["cpu"]["open loop"] = cpu.result()
        d = m["targets"][direct]
        ol = res["openloop"] = {"rate": m["rate"], "ticker": m["ticker"], "priority": m.get("priority"),
                                "loadgen_cpu_pct_of_core": m["loadgen_cpu_pct_of_core"],
                                "direct": {k: d["latency"][k] for k in ("n", "p50_ms", "p99_ms", "p999_ms", "max_ms")},
                                "slices_p99_ms": {}}
        ol["direct"]["errors"] = sum(d["errors"].values())
        ol["slices_p99_ms"]["direct"] = [s["p99_ms"] and round(s["p99_ms"], 3) for s in d["slices"]]
        lag = [m["targets"][u]["send_lag"]["p99_ms"] for u in m["targets"]]
        ol["send_lag_p99_ms_max"] = max((x for x in lag if x is not None), default=None)
        log(f"open loop {'direct':<9}: p50 {report.fmt(d['latency']['p50_ms'], '.3f')} ms  p99 "
            f"{report.fmt(d['latency']['p99_ms'], '.3f')} ms  (n {d['ok']}, errors {d['errors'] or 0}; load "
            f"generator {m['loadgen_cpu_pct_of_core']}% of a core, ticker {m['ticker']}, send lag p99 "
            f"{report.fmt(d['send_lag']['p99_ms'], '.3f')} ms)")
        for n in live:
            t = m["targets"][self.urls[n]]
            lat = t["latency"]
            add = {q: None if lat[q] is None or d["latency"][q] is None else lat[q] - d["latency"][q]
                   for q in ("p50_ms", "p99_ms")}
            # the median of the slices' p99s minus direct's median: a burst of other work during one slice
            # decides nothing, as the median of ABBA quads does for rps. (Not the median of per-round
            # differences: that adds the noise of direct's slices to every round.)
            mine = [x["p99_ms"] for x in t["slices"] if x["p99_ms"] is not None]
            theirs = [x["p99_ms"] for x in d["slices"] if x["p99_ms"] is not None]
            add_med = statistics.median(mine) - statistics.median(theirs) if mine and theirs else None
            res["targets"][n].update(ol_p50_ms=lat["p50_ms"], ol_p99_ms=lat["p99_ms"], ol_p999_ms=lat["p999_ms"],
                                     ol_max_ms=lat["max_ms"], ol_added_p50_ms=add["p50_ms"],
                                     ol_added_p99_ms=add["p99_ms"], ol_added_p99_median_ms=add_med,
                                     ol_service_p99_ms=t["service"]["p99_ms"],
                                     ol_send_lag_p99_ms=t["send_lag"]["p99_ms"], ol_n=t["ok"],
                                     ol_errors=sum(t["errors"].values()), ol_connections=t["connections_opened"])
            ol["slices_p99_ms"][n] = [s["p99_ms"] and round(s["p99_ms"], 3) for s in t["slices"]]
            log(f"open loop {self.labels[n]:<9}: p50 {report.fmt(lat['p50_ms'], '.3f')} ms  p99 "
                f"{report.fmt(lat['p99_ms'], '.3f')} ms  added p99 {report.fmt(add['p99_ms'], '+.3f')} ms, of the "
                f"median slice {report.fmt(add_med, '+.3f')} ms  (n "
                f"{t['ok']}, errors {t['errors'] or 0}, connections {t['connections_opened']}, send lag p99 "
                f"{report.fmt(t['send_lag']['p99_ms'], '.3f')} ms)")

    def workers_scaling(self) -> None:
        """(e) The gateway with --workers N (a second gateway, started for this phase) against the
        1-worker gateway: closed-loop requests/s with the lean client, ABBA slices. Also where the
        machine's CPU went in each slice: the proxy, the upstream, the load generator, the rest —
        with 2 cores, the upstream and the load generator leave the gateway well under 2."""
        a, res = self.a, self.res
        if "gateway" not in self.names or a.gateway_cmd == "bare" or not self.alive_or_fail("gateway"):
            log("workers: skipped (no gateway, or the gateway slot is a bare proxy)")
            return
        port = free_port()
        cmd = shlex.split(self.gw_template.format(port=port, **self.subst)) + ["--workers", str(a.workers)]
        name = f"gateway-w{a.workers}"
        log(f"workers: starting {name}: {' '.join(cmd)}")
        child = Child(name, cmd, RESULTS / f"{name}.log")
        try:
            wait_ready(child, port, a.startup_timeout)
            url = f"http://{HOST}:{port}{CHAT_PATH}"
            smoke(url)
        except Exception as e:  # noqa: BLE001
            log(f"workers: {name} did not start: {e}")
            res["errors"].append(f"{name} start: {e}")
            child.stop()
            return
        urls = {"gateway": self.urls["gateway"], name: url}
        pids = {"gateway": self.procs["gateway"][0].pid, name: child.pid}
        conc = a.concurrency
        try:
            for n in urls:  # warm-up
                self.bench.rps_raw(urls[n], a.warmup, conc)
            n_sl = 2 * a.workers_rounds
            log(f"workers: {n_sl} x {a.workers_slice:g}s slices each, 1 worker vs {a.workers} (ABBA order), "
                f"c={conc}, raw client ...")
            slices = []
            order = ["gateway", name]
            for k in range(1, n_sl + 1):
                line = []
                for n in order if k % 2 else order[::-1]:
                    t0, idle0, si0 = machine_cpu()
                    c_gw, c_up = tree_cpu_s(pids[n]), tree_cpu_s(self.upstream.pid)
                    m = self.bench.rps_raw(urls[n], a.workers_slice, conc)
                    t1, idle1, si1 = machine_cpu()
                    wall = t1 - t0
                    sl = {"target": n, "slice": k, "rps": m["rps"], "p99_ms": m["p99_ms"],
                          "errors": sum(m["errors"].values()),
                          "cores": {"proxy": (tree_cpu_s(pids[n]) - c_gw) / wall,
                                    "upstream": (tree_cpu_s(self.upstream.pid) - c_up) / wall,
                                    "loadgen": m["loadgen_cpu_pct_of_core"] / 100 * m["elapsed_s"] / wall,
                                    "softirq": (si1 - si0) / wall, "idle": (idle1 - idle0) / wall}}
                    ncpu = os.cpu_count() or 1
                    c = sl["cores"]
                    c["other"] = max(0.0, ncpu - c["idle"] - c["proxy"] - c["upstream"] - c["loadgen"] - c["softirq"])
                    slices.append(sl)
                    line.append(f"{n} {m['rps']:6.0f}/s (proxy {c['proxy']:.2f} cores, upstream {c['upstream']:.2f}, "
                                f"loadgen {c['loadgen']:.2f}, softirq {c['softirq']:.2f}, other {c['other']:.2f}, "
                                f"idle {c['idle']:.2f})" + (f" ERR {m['errors']}" if m["errors"] else ""))
                log(f"workers slice {k:2d}/{n_sl}: " + " | ".join(line))
        finally:
            child.stop()
        w = res["workers"] = {"workers": a.workers, "concurrency": conc, "slices": slices, "name": name,
                              "cores_total": os.cpu_count()}
        by = {(x["target"], x["slice"]): x["rps"] for x in slices}
        quads = [(by[(name, k)] + by[(name, k + 1)]) / (by[("gateway", k)] + by[("gateway", k + 1)])
                 for k in range(1, n_sl, 2)]
        w["ratio_per_quad"] = [round(x, 3) for x in quads]
        w["ratio"] = statistics.median(quads) if quads else None
        for n in ("gateway", name):
            mine = [x for x in slices if x["target"] == n]
            w[n] = {"rps": statistics.median(x["rps"] for x in mine), "errors": sum(x["errors"] for x in mine),
                    "cores": {k: round(statistics.median(x["cores"][k] for x in mine), 2)
                              for k in mine[0]["cores"]}}
        c2 = w[name]["cores"]
        # what the N-worker gateway had: what it used plus what stayed idle
        w["cores_free_for_gateway"] = round(c2["proxy"] + c2["idle"], 2)
        log(f"workers: {name}/gateway requests/s {report.fmt(w['ratio'], '.2f')}x (median of ABBA quads "
            f"{w['ratio_per_quad']}); with {a.workers} workers the gateway used {c2['proxy']:.2f} of "
            f"{os.cpu_count()} cores, the upstream {c2['upstream']:.2f}, the load generator {c2['loadgen']:.2f}, "
            f"softirq {c2['softirq']:.2f}, idle {c2['idle']:.2f}")

    def stream_capacity(self) -> int:
        """How many streams every process can hold: a proxy needs two sockets per stream (client and
        upstream side), the upstream and the load generator one. The hard fd limit cannot always be
        raised (a container without CAP_SYS_RESOURCE): then N is cut to what fits, and said. A proxy
        keeps 64 fds in reserve, as the gateway's own default server.max_connections does:
        (RLIMIT_NOFILE - 64) / 2 client connections, beyond which it answers 503."""
        caps = {"loadgen": resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 64}
        for n in self.names:
            pid = self.procs[n][0].pid
            lim = fd_limit(pid)
            if lim is not None:
                caps[n] = (lim - max(64, fd_count(pid) + 32)) // 2
        lim = fd_limit(self.upstream.pid)
        if lim is not None:
            caps["upstream"] = lim - fd_count(self.upstream.pid) - 32
        n = min([self.a.streams, *caps.values()])
        if n < self.a.streams:
            log(f"RSS: {self.a.streams} streams asked, but the fd limits fit only {n} "
                f"(streams each process can hold: {caps}); measuring {n}")
            self.res.setdefault("notes", []).append(
                f"streams: {self.a.streams} asked, the fd limits allow {n}: measured {n} (bench/README.md, --scale)")
        self.res["streams_capacity"] = caps
        return max(1, n)

    def rss_streams(self) -> None:
        """(c) Peak RSS while --streams streams are open, one proxy at a time."""
        a, res = self.a, self.res
        n_streams = self.stream_capacity()
        res["streams_measured"] = n_streams
        log(f"RSS: {n_streams} concurrent streams per proxy (at most {a.max_pending} opening at a time, over "
            f">= {a.ramp_s:g}s), all held open together {a.hold_s}s (a chunk every {a.stream_interval_ms} ms), "
            f"then released ...")
        cpu = CpuMonitor()
        for n in self.names:
            if not self.alive_or_fail(n):
                continue
            try:
                m = self.bench.streams(self.urls[n], self.procs[n][0].pid, n_streams)
            except Exception as e:  # noqa: BLE001
                log(f"streams {n} failed: {e}")
                res["errors"].append(f"streams {n}: {e}")
                continue
            m["target"] = n
            res["runs"]["streams"].append(m)
            res["targets"][n].update(
                peak_rss_kb=m["peak_rss_kb"], vm_hwm_kb=m["vm_hwm_kb"],
                rss_at_all_open_kb=m["rss_at_all_open_kb"], rss_before_kb=m["rss_before_kb"],
                rss_after_kb=m["rss_after_kb"], streams_ok=m["completed_ok"], streams_count=m["count"],
                streams_max_open=m["max_open_concurrently"], streams_errors=m["errors"],
                streams_all_open_s=m["all_open_at_s"], streams_held_s=m["held_all_open_s"],
                streams_ttfb_p50_ms=m["p50_ms"], streams_upstream=m["upstream"])
            self.alive_or_fail(n)  # did the streams kill it?
            mib = {k: m[k] and m[k] / 1024 for k in
                   ("rss_before_kb", "rss_at_all_open_kb", "peak_rss_kb", "vm_hwm_kb", "rss_after_kb")}
            log(f"streams {self.labels[n]:<9}: ok {m['completed_ok']}/{m['count']}  first-chunk "
                f"{m['got_first_chunk']}  max open {m['max_open_concurrently']} (all open after "
                f"{report.fmt(m['all_open_at_s'], '.1f')}s, held {m['held_all_open_s']}s)  "
                f"RSS before {mib['rss_before_kb']:.1f} MiB, at all-open "
                f"{report.fmt(mib['rss_at_all_open_kb'], '.1f')} MiB, "
                f"peak {mib['peak_rss_kb']:.1f} MiB (VmHWM {mib['vm_hwm_kb']:.1f}), "
                f"after {mib['rss_after_kb']:.1f} MiB  errors {m['errors'] or 0}"
                + (f" e.g. {m['error_samples'][0]}" if m.get("error_samples") else ""))
            time.sleep(1.0)  # let the proxy settle before the next one is measured
        res["cpu"]["streams"] = cpu.result()
