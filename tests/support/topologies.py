"""Redis topologies of the tests' own, started from ``redis-server`` on loopback ports, stopped by PID.

- ``SentinelGroup``: a primary, one replica and a sentinel watching them (failover after 1 s down);
  its ``url`` names a dead sentinel first, so asking the next one is exercised every time.
- ``ClusterGroup``: three primaries owning all 16384 slots (``redis-cli --cluster create``), and
  optionally one replica of the first primary (``CLUSTER REPLICATE``), node timeout 1 s.
- ``TLSRedis``: a redis-server with ``--tls-port`` only, certificates from a CA made by the test
  (``make_ca`` / ``make_cert`` with the openssl CLI).

The redis-server on this machine is used; when it is missing the tests skip with the reason (fail in CI).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.support.cli_harness import free_port
from tests.support.stores import PrivateRedis, unavailable


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        unavailable(f"{tool} is not installed: cannot run this Redis topology")
    return path  # type: ignore[return-value]


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def redis_cli(port: int, *args: str, timeout: float = 10) -> str:
    out = subprocess.run([_need("redis-cli"), "-h", "127.0.0.1", "-p", str(port), *args],
                         capture_output=True, text=True, timeout=timeout, check=False)
    return out.stdout.strip()


def wait_for(what: str, check, timeout_s: float = 15.0):  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Proc:
    """One redis-server (data node or sentinel) started with a config file in ``dir``."""

    def __init__(self, dir: Path, port: int, lines: list[str], *, sentinel: bool = False) -> None:
        self.port = port
        conf = dir / f"{'sentinel' if sentinel else 'redis'}-{port}.conf"
        conf.write_text("\n".join([f"port {port}", "bind 127.0.0.1", f"dir {dir}", *lines]) + "\n")
        self.proc = subprocess.Popen([_need("redis-server"), str(conf), *(["--sentinel"] if sentinel else [])],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(f"redis on {port}", lambda: self.proc.poll() is not None or redis_cli(port, "PING") == "PONG")
        assert self.proc.poll() is None, f"redis-server on {port} exited with {self.proc.returncode}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


_DATA = ['save ""', "appendonly no"]


class SentinelGroup:
    SERVICE = "mymaster"

    def __init__(self, dir: Path) -> None:
        self.dir = dir
        self.procs: list[Proc] = []

    def start(self) -> SentinelGroup:
        primary = self._add(free_port(), _DATA)
        self._add(free_port(), [*_DATA, f"replicaof 127.0.0.1 {primary.port}"])
        self.sentinel = self._add(free_port(), [
            f"sentinel monitor {self.SERVICE} 127.0.0.1 {primary.port} 1",
            f"sentinel down-after-milliseconds {self.SERVICE} 1000",
            f"sentinel failover-timeout {self.SERVICE} 10000",
        ], sentinel=True)
        self.dead_sentinel = free_port()
        wait_for("the replica in sync and known to the sentinel", self.ready)
        return self

    def _add(self, port: int, lines: list[str], *, sentinel: bool = False) -> Proc:
        proc = Proc(self.dir, port, lines, sentinel=sentinel)
        self.procs.append(proc)
        return proc

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.dead_sentinel},127.0.0.1:{self.sentinel.port}/{self.SERVICE}/0"

    def primary_port(self) -> int:
        reply = redis_cli(self.sentinel.port, "SENTINEL", "get-master-addr-by-name", self.SERVICE).split()
        return int(reply[1])

    def ready(self) -> bool:
        replicas = redis_cli(self.sentinel.port, "SENTINEL", "replicas", self.SERVICE)
        lines = replicas.splitlines()
        flags = [lines[i + 1] for i, line in enumerate(lines[:-1]) if line == "flags"]
        linked = "master_link_status:up" in redis_cli(self.procs[1].port, "INFO", "replication")
        return linked and flags == ["slave"]

    def kill_primary(self) -> int:
        port = self.primary_port()
        next(p for p in self.procs if p.port == port).kill()
        return port

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()


class ClusterGroup:
    def __init__(self, dir: Path, *, replica: bool = False) -> None:
        self.dir = dir
        self.replica = replica
        self.procs: list[Proc] = []

    def start(self) -> ClusterGroup:
        lines = [*_DATA, "cluster-enabled yes", "cluster-node-timeout 1000"]
        for _ in range(4 if self.replica else 3):
            port = cluster_port()
            self.procs.append(Proc(self.dir, port, [*lines, f"cluster-config-file nodes-{port}.conf"]))
        primaries = self.procs[:3]
        created = subprocess.run(
            [_need("redis-cli"), "--cluster", "create", *(f"127.0.0.1:{p.port}" for p in primaries),
             "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True, timeout=60, check=False)
        assert created.returncode == 0, created.stdout + created.stderr
        if self.replica:
            first = redis_cli(primaries[0].port, "CLUSTER", "MYID")
            redis_cli(self.procs[3].port, "CLUSTER", "MEET", "127.0.0.1", str(primaries[0].port))
            wait_for("the replica to join", lambda: first in redis_cli(self.procs[3].port, "CLUSTER", "NODES"))
            wait_for("the replica to attach", lambda: redis_cli(self.procs[3].port, "CLUSTER", "REPLICATE", first)
                     == "OK")
            wait_for("the replica in sync", lambda: "master_link_status:up"
                     in redis_cli(self.procs[3].port, "INFO", "replication"))
        for proc in self.procs:
            wait_for("cluster_state:ok", lambda p=proc: "cluster_state:ok" in redis_cli(p.port, "CLUSTER", "INFO"))
        return self

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.procs[0].port},127.0.0.1:{self.procs[1].port}"

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()


def openssl(*args: str) -> None:
    subprocess.run([_need("openssl"), *args], check=True, capture_output=True, timeout=60)


def make_ca(dir: Path, name: str) -> tuple[Path, Path]:
    key, cert = dir / f"{name}.key", dir / f"{name}.crt"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
            "-days", "2", "-subj", f"/CN={name}")
    return cert, key


def make_cert(dir: Path, name: str, ca: tuple[Path, Path], *, san: str = "IP:127.0.0.1") -> tuple[Path, Path]:
    key, csr, cert = dir / f"{name}.key", dir / f"{name}.csr", dir / f"{name}.crt"
    ext = dir / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
            "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return cert, key


class TLSRedis(PrivateRedis):
    """redis-server answering only TLS on ``tls_port`` (its plain port closed), clients' certificates
    required when ``client_ca`` is given."""

    def __init__(self, dir: Path, ca: tuple[Path, Path], *, client_certs: bool = False) -> None:
        cert, key = make_cert(dir, "redis", ca)
        self.tls_port = free_port()
        super().__init__("--tls-port", str(self.tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                         "--tls-ca-cert-file", str(ca[0]), "--tls-auth-clients", "yes" if client_certs else "no")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.tls_port), timeout=1):
                return True
        except OSError:
            return False
