"""Redis topologies of the tests' own, started from ``redis-server`` on loopback ports, stopped by PID.

- ``SentinelGroup``: a primary, one replica and a sentinel watching them (failover after 1 s down);
  its ``url`` names a dead sentinel first, so asking the next one is exercised every time.
- ``ClusterGroup``: three primaries owning all 16384 slots (``redis-cli --cluster create``), and
  optionally one replica of the first primary (``CLUSTER REPLICATE``), node timeout 1 s.
- ``TLSRedis``: a redis-server with ``--tls-port`` only, certificates from a CA made by the test
  (``make_ca`` / ``make_cert`` with the openssl CLI).
- ``ServerTLS`` (``make_server_tls``): the same for a whole group — ``SentinelGroup(dir, tls=…)`` and
  ``ClusterGroup(dir, tls=…)`` then speak TLS only, on every link: clients, replication, the sentinels
  (``tls-replication yes``) and the cluster bus (``tls-cluster yes``); clients need a certificate.
  ``password=`` (and a Sentinel group's ``sentinel_password=``) make the servers require one.

The redis-server on this machine is used; when it is missing the tests skip with the reason (fail in CI).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
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


def redis_cli(port: int, *args: str, timeout: float = 10, tls: ServerTLS | None = None,
              password: str | None = None) -> str:
    flags = [*(tls.cli_flags() if tls else []), *(["-a", password, "--no-auth-warning"] if password else [])]
    out = subprocess.run([_need("redis-cli"), "-h", "127.0.0.1", "-p", str(port), *flags, *args],
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
    """One redis-server (data node or sentinel) started with a config file in ``dir``; ``password`` is
    the one its clients give (its ``requirepass`` is among ``lines``)."""

    def __init__(self, dir: Path, port: int, lines: list[str], *, sentinel: bool = False,
                 tls: ServerTLS | None = None, password: str | None = None) -> None:
        self.port = port  # with ``tls`` the TLS port: the plain one is closed
        self.tls, self.password = tls, password
        conf = dir / f"{'sentinel' if sentinel else 'redis'}-{port}.conf"
        listen = tls.server_lines(port) if tls else [f"port {port}"]
        conf.write_text("\n".join([*listen, "bind 127.0.0.1", f"dir {dir}", *lines]) + "\n")
        self.proc = subprocess.Popen([_need("redis-server"), str(conf), *(["--sentinel"] if sentinel else [])],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(f"redis on {port}", lambda: self.proc.poll() is not None or self.cli("PING") == "PONG")
        assert self.proc.poll() is None, f"redis-server on {port} exited with {self.proc.returncode}"

    def cli(self, *args: str) -> str:
        return redis_cli(self.port, *args, tls=self.tls, password=self.password)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


_DATA = ['save ""', "appendonly no", "repl-diskless-sync-delay 0"]  # a replica syncs at once, not after 5 s


def _auth(password: str | None) -> list[str]:
    """A data node's password, which its replica gives its primary too."""
    return [f"requirepass {password}", f"masterauth {password}"] if password else []


class SentinelGroup:
    SERVICE = "mymaster"

    def __init__(self, dir: Path, *, tls: ServerTLS | None = None, sentinels: int = 1, password: str | None = None,
                 sentinel_password: str | None = None) -> None:
        self.dir = dir
        self.tls = tls
        self.count = sentinels
        self.password, self.sentinel_password = password, sentinel_password  # the data nodes', the sentinels'
        self.procs: list[Proc] = []

    def start(self) -> SentinelGroup:
        data = [*_DATA, *_auth(self.password)]
        primary = self._add(free_port(), data)
        self._add(free_port(), [*data, f"replicaof 127.0.0.1 {primary.port}"])
        watch = [f"sentinel monitor {self.SERVICE} 127.0.0.1 {primary.port} 1",
                 f"sentinel down-after-milliseconds {self.SERVICE} 1000",
                 f"sentinel failover-timeout {self.SERVICE} 10000"]
        if self.password:
            watch.append(f"sentinel auth-pass {self.SERVICE} {self.password}")
        if self.sentinel_password:
            watch += [f"requirepass {self.sentinel_password}", f"sentinel sentinel-pass {self.sentinel_password}"]
        self.sentinels = [self._add(free_port(), watch, sentinel=True) for _ in range(self.count)]
        self.sentinel = self.sentinels[0]
        self.dead_sentinel = free_port()
        wait_for("the replica in sync and known to the sentinel", self.ready)
        return self

    def _add(self, port: int, lines: list[str], *, sentinel: bool = False) -> Proc:
        proc = Proc(self.dir, port, lines, sentinel=sentinel, tls=self.tls,
                    password=self.sentinel_password if sentinel else self.password)
        self.procs.append(proc)
        return proc

    @property
    def hosts(self) -> list[str]:
        """The sentinels as ``host:port``, a dead one first."""
        return [f"127.0.0.1:{port}" for port in (self.dead_sentinel, *(s.port for s in self.sentinels))]

    @property
    def url(self) -> str:
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        return f"{scheme}://{','.join(self.hosts)}/{self.SERVICE}/0"

    def primary_port(self) -> int:
        return int(self.sentinel.cli("SENTINEL", "get-master-addr-by-name", self.SERVICE).split()[1])

    def ready(self) -> bool:
        for sentinel in self.sentinels:
            lines = sentinel.cli("SENTINEL", "replicas", self.SERVICE).splitlines()
            if [lines[i + 1] for i, line in enumerate(lines[:-1]) if line == "flags"] != ["slave"]:
                return False
        return "master_link_status:up" in self.procs[1].cli("INFO", "replication")

    def kill_primary(self) -> int:
        port = self.primary_port()
        next(p for p in self.procs if p.port == port).kill()
        return port

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()


class ClusterGroup:
    def __init__(self, dir: Path, *, replica: bool = False, tls: ServerTLS | None = None,
                 password: str | None = None) -> None:
        self.dir = dir
        self.replica = replica
        self.tls = tls
        self.password = password
        self.procs: list[Proc] = []

    def _cli(self, port: int, *args: str) -> str:
        return redis_cli(port, *args, tls=self.tls, password=self.password)

    def start(self) -> ClusterGroup:
        lines = [*_DATA, *_auth(self.password), "cluster-enabled yes", "cluster-node-timeout 1000"]
        for _ in range(4 if self.replica else 3):
            port = cluster_port()
            self.procs.append(Proc(self.dir, port, [*lines, f"cluster-config-file nodes-{port}.conf"], tls=self.tls,
                                   password=self.password))
        primaries = self.procs[:3]
        created = subprocess.run(
            [_need("redis-cli"), *(self.tls.cli_flags() if self.tls else []),
             *(["-a", self.password, "--no-auth-warning"] if self.password else []),
             "--cluster", "create", *(f"127.0.0.1:{p.port}" for p in primaries),
             "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True, timeout=60, check=False)
        assert created.returncode == 0, created.stdout + created.stderr
        if self.replica:
            first = self._cli(primaries[0].port, "CLUSTER", "MYID")
            self._cli(self.procs[3].port, "CLUSTER", "MEET", "127.0.0.1", str(primaries[0].port))
            wait_for("the replica to join", lambda: first in self._cli(self.procs[3].port, "CLUSTER", "NODES"))
            wait_for("the replica to attach", lambda: self._cli(self.procs[3].port, "CLUSTER", "REPLICATE", first)
                     == "OK")
            wait_for("the replica in sync", lambda: "master_link_status:up"
                     in self._cli(self.procs[3].port, "INFO", "replication"))
        for proc in self.procs:
            wait_for("cluster_state:ok", lambda p=proc: "cluster_state:ok" in self._cli(p.port, "CLUSTER", "INFO"))
        return self

    @property
    def nodes(self) -> list[str]:
        """Two seed nodes as ``host:port``."""
        return [f"127.0.0.1:{p.port}" for p in self.procs[:2]]

    @property
    def url(self) -> str:
        return f"{'rediss+cluster' if self.tls else 'redis+cluster'}://{','.join(self.nodes)}"

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


@dataclass(frozen=True)
class ServerTLS:
    """TLS for a whole group of the tests' own servers: one CA, one server certificate for 127.0.0.1 (also
    the certificate the servers present to each other), and a client certificate for the gateway."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path

    def server_lines(self, port: int) -> list[str]:
        return ["port 0", f"tls-port {port}", f"tls-cert-file {self.cert}", f"tls-key-file {self.key}",
                f"tls-ca-cert-file {self.ca}", "tls-auth-clients yes", "tls-replication yes", "tls-cluster yes"]

    def cli_flags(self) -> list[str]:
        return ["--tls", "--cacert", str(self.ca), "--cert", str(self.client_cert), "--key", str(self.client_key)]


def make_server_tls(dir: Path) -> ServerTLS:
    ca = make_ca(dir, "group-ca")
    cert, key = make_cert(dir, "group-server", ca)
    client_cert, client_key = make_cert(dir, "group-client", ca, san="DNS:client")
    return ServerTLS(ca[0], cert, key, client_cert, client_key)
