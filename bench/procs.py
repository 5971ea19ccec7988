"""Processes of the bench: long-running children and short-lived tools, readiness, cleanup,
and memory / CPU sampling from /proc. Standard library only."""
from __future__ import annotations

import ctypes
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"  # process logs, gateway config, latest.json
HOST = "127.0.0.1"
PY = sys.executable


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------ processes
def _child_setup() -> None:  # runs in the child between fork and exec
    try:  # die with the harness even if it is SIGKILLed (PR_SET_PDEATHSIG = 1)
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except Exception:  # noqa: BLE001
        pass


class Child:
    """A long-running child (upstream / proxy / gateway) in its own process group."""

    def __init__(self, name: str, cmd: list[str], log_path: Path):
        self.name, self.cmd, self.log_path = name, cmd, log_path
        self.logf = open(log_path, "wb")  # closed by stop()
        self.p = subprocess.Popen(cmd, cwd=str(REPO), stdin=subprocess.DEVNULL, stdout=self.logf,
                                  stderr=subprocess.STDOUT, start_new_session=True,
                                  preexec_fn=_child_setup)
        _children.append(self)

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            if self.p.poll() is not None:
                break
            try:
                os.killpg(self.p.pid, sig)  # its own group (start_new_session): pgid == pid
            except (ProcessLookupError, PermissionError):
                try:
                    self.p.send_signal(sig)
                except ProcessLookupError:
                    pass
            try:
                self.p.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        try:  # leftovers of its group (e.g. worker processes), by the group id we created
            os.killpg(self.p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.logf.close()

    def log_tail(self, n: int = 25) -> str:
        try:
            self.logf.flush()
            lines = self.log_path.read_text(errors="replace").splitlines()
            return "\n".join(lines[-n:])
        except OSError:
            return ""


_children: list[Child] = []


def child_pids() -> list[int]:
    return [c.pid for c in _children]


def cleanup() -> None:
    for c in reversed(_children):
        try:
            c.stop()
        except Exception as e:  # noqa: BLE001
            log(f"cleanup {c.name} (pid {c.pid}): {e!r}")
    _children.clear()


def spawn_tool(cmd: list[str]) -> subprocess.Popen:
    """Start a short-lived tool (wrk / loadgen) with stdout and stderr piped."""
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=_child_setup)


def kill_tool(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
        p.wait(5)


def run_tools(cmds: list[list[str]], timeout: float) -> list[str]:
    """Run tools in parallel and return their stdouts; kill them by PID if they overrun."""
    procs = [spawn_tool(c) for c in cmds]
    outs = []
    deadline = time.monotonic() + timeout
    try:
        for p, c in zip(procs, cmds, strict=True):
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            if p.returncode != 0:
                raise RuntimeError(f"{c[0]} exited {p.returncode}: "
                                   f"{(err or out).decode(errors='replace')[-800:]}")
            outs.append(out.decode(errors="replace"))
    finally:
        for p in procs:
            kill_tool(p)
    return outs


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 10.0) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def wait_ready(child: Child, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited with code {child.p.returncode} during startup;"
                               f" log {child.log_path}:\n{child.log_tail()}")
        try:
            st, _, _ = http("GET", f"http://{HOST}:{port}/healthz", timeout=1.0)
            if st == 200:
                return
            last = f"HTTP {st}"
        except OSError as e:
            last = repr(e)
        time.sleep(0.1)
    raise RuntimeError(f"{child.name} not ready on :{port} after {timeout:.0f}s ({last});"
                       f" log {child.log_path}:\n{child.log_tail()}")


# ------------------------------------------------------------------ /proc
def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0])  # kB
    except OSError:
        pass
    return out


def _descendants(pid: int, depth: int = 0) -> list[int]:
    if depth > 4:
        return []
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        return []
    return kids + [d for k in kids for d in _descendants(k, depth + 1)]


def mem_kb(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (kB) of pid, summed with its descendants (if a gateway forks workers)."""
    pids = [pid] + _descendants(pid)
    rss = hwm = 0
    for p in pids:
        s = _proc_status(p)
        rss += s.get("VmRSS", 0)
        hwm += s.get("VmHWM", 0)
    return {"rss_kb": rss, "hwm_kb": hwm, "nprocs": len(pids)}


def reset_hwm(pid: int) -> bool:
    ok = True
    for p in [pid] + _descendants(pid):
        try:
            with open(f"/proc/{p}/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        except OSError:
            ok = False
    return ok


class CpuMonitor:
    """How much machine CPU did processes other than this bench use during a phase?

    busy = user+nice+system jiffies from /proc/stat; ours = this harness + its finished tools
    (getrusage) + the long-running children (/proc/<pid>/stat, incl. waited-for descendants).
    softirq/irq (mostly our loopback traffic) is left out of both sides.
    """

    def __init__(self, pids_fn: Callable[[], list[int]] = child_pids):
        self.pids_fn = pids_fn
        self.hz = os.sysconf("SC_CLK_TCK")
        self.start = self._snap()

    def _snap(self) -> tuple[float, float, float, float]:
        """(monotonic time, machine busy s, our CPU s, steal s)"""
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = (v[0] + v[1] + v[2]) / self.hz
        steal = (v[7] if len(v) > 7 else 0) / self.hz
        ours = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            r = resource.getrusage(who)
            ours += r.ru_utime + r.ru_stime
        for pid in self.pids_fn():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                ours += sum(int(x) for x in fields[11:15]) / self.hz  # utime stime cutime cstime
            except (OSError, IndexError, ValueError):
                pass
        return time.monotonic(), busy, ours, steal

    def result(self) -> dict:
        t1, b1, o1, s1 = self._snap()
        t0, b0, o0, s0 = self.start
        wall = max(1e-6, t1 - t0)
        ncpu = os.cpu_count() or 1
        foreign = max(0.0, (b1 - b0) - (o1 - o0))
        return {"wall_s": round(wall, 1),
                "foreign_cpu_pct": round(100 * foreign / (wall * ncpu), 1),
                "bench_cpu_pct": round(100 * (o1 - o0) / (wall * ncpu), 1),
                "steal_pct": round(100 * (s1 - s0) / (wall * ncpu), 1)}


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def raise_nofile(need: int) -> str:
    """Raise the fd limit (inherited by the children) as far as allowed — the hard limit too when
    this process may (root with CAP_SYS_RESOURCE) and `need` is above it; describe the result."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            soft, hard = need, need
        except (ValueError, OSError):
            pass  # not allowed here: the streams phase sizes N to what fits (see stream_capacity)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    note = f"RLIMIT_NOFILE soft={soft} hard={hard}"
    if soft < need:
        note += f" (< {need} wanted: the hard limit cannot be raised here)"
    return note


def fd_limit(pid: int) -> int | None:
    """pid's soft RLIMIT_NOFILE, from /proc/PID/limits."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    v = line.split()[3]
                    return None if v == "unlimited" else int(v)
    except (OSError, ValueError, IndexError):
        pass
    return None


def fd_count(pid: int) -> int:
    """Open fds of pid and its descendants, the most any one of them has (each has its own limit)."""
    most = 0
    for p in [pid] + _descendants(pid):
        try:
            most = max(most, len(os.listdir(f"/proc/{p}/fd")))
        except OSError:
            pass
    return most


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by pid and its live descendants, plus the children
    they have waited for."""
    hz = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in [pid] + _descendants(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        except (OSError, IndexError, ValueError):
            pass
    return total / hz


def machine_cpu() -> tuple[float, float, float]:
    """(monotonic time, idle CPU seconds (idle + iowait), softirq + irq seconds) of the whole machine"""
    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return time.monotonic(), (v[3] + v[4]) / hz, (v[5] + v[6]) / hz
