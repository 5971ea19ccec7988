"""One bench run: start the upstream, the bare proxy and the gateway, then the three phases
(throughput, stream TTFB, RSS at N open streams), each filling the results dict."""
from __future__ import annotations

import argparse
import shlex
import shutil
import time
from pathlib import Path

import report
from measure import CHAT_PATH, Bench, smoke, upstream_ctl
from procs import BENCH_DIR, HOST, PY, REPO, RESULTS, Child, CpuMonitor, free_port, log, wait_ready

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
        res["cpu"] = {"throughput": cpu.result()}
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

    def rss_streams(self) -> None:
        """(c) Peak RSS while --streams streams are open, one proxy at a time."""
        a, res = self.a, self.res
        log(f"RSS: {a.streams} concurrent streams per proxy, each open ~{a.hold_s}s (1 chunk/s) ...")
        for n in self.names:
            if not self.alive_or_fail(n):
                continue
            try:
                m = self.bench.streams(self.urls[n], self.procs[n][0].pid)
            except Exception as e:  # noqa: BLE001
                log(f"streams {n} failed: {e}")
                res["errors"].append(f"streams {n}: {e}")
                continue
            m["target"] = n
            res["runs"]["streams"].append(m)
            res["targets"][n].update(
                peak_rss_kb=m["peak_rss_kb"], vm_hwm_kb=m["vm_hwm_kb"],
                rss_at_all_open_kb=m["rss_at_all_open_kb"], rss_before_kb=m["rss_before_kb"],
                rss_after_kb=m["rss_after_kb"], streams_ok=m["completed_ok"],
                streams_max_open=m["max_open_concurrently"], streams_errors=m["errors"],
                streams_ttfb_p50_ms=m["p50_ms"], streams_upstream=m["upstream"])
            self.alive_or_fail(n)  # did the streams kill it?
            mib = {k: m[k] and m[k] / 1024 for k in
                   ("rss_before_kb", "rss_at_all_open_kb", "peak_rss_kb", "vm_hwm_kb", "rss_after_kb")}
            log(f"streams {self.labels[n]:<9}: ok {m['completed_ok']}/{m['count']}  first-chunk "
                f"{m['got_first_chunk']}  max open {m['max_open_concurrently']}  "
                f"RSS before {mib['rss_before_kb']:.1f} MiB, at all-open "
                f"{report.fmt(mib['rss_at_all_open_kb'], '.1f')} MiB, "
                f"peak {mib['peak_rss_kb']:.1f} MiB (VmHWM {mib['vm_hwm_kb']:.1f}), "
                f"after {mib['rss_after_kb']:.1f} MiB  errors {m['errors'] or 0}")
            time.sleep(1.0)  # let the proxy settle before the next one is measured
