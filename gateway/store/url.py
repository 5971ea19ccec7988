"""The one reader of Redis store URLs: every topology, every option, or a reason why not.

    redis://[user:password@]host[:port][/db]          one node
    rediss://…                                         the same over TLS
    unix://[user:password@]/path/to/redis.sock[?db=N]  one node on a unix socket
    redis+sentinel://[user:pw@]s1:26379,s2:26379/mymaster[/db]   the primary that Sentinel names
    redis+cluster://[user:pw@]n1:7000,n2:7001           a Redis Cluster (seed nodes; db 0 only)
    (rediss+sentinel://, rediss+cluster://: the same over TLS, to the data nodes and the sentinels alike)

Query options (any other is an error — an option nobody reads must not look as if it applied):
``db``, ``username``, ``password``; with TLS ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``,
``ssl_cert_reqs`` (required | none), ``ssl_check_hostname`` (true | false); with Sentinel
``sentinel_username``, ``sentinel_password`` (the sentinels' own ACL user, when they have one).

Commands and pub/sub both connect from what ``parse_store_url`` returns, so they always reach the
same servers as the same user. ``display`` is the URL with every password masked (and the other options as
written, for reading); ``secrets`` are the passwords' spellings, for ``RedisStore._error``'s last guard only — no
message is built from the raw URL. Host names are checked here (RFC 1123 labels, IPv4, bracketed IPv6), so a
name the resolver cannot encode is a config error, never a failure at each connect.

The config's ``store:`` block (``sentinel:`` / ``cluster:`` with ``username``, ``password``, ``tls``,
``gateway.config.store``) is only another spelling: ``block_url`` writes it as the URL above, which this
parser reads like any other — one reading, one ``StoreURL``, one masking.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal
from urllib.parse import parse_qsl, quote, unquote, urlencode

Topology = Literal["single", "sentinel", "cluster"]

_SCHEMES: dict[str, tuple[Topology, bool]] = {
    "redis": ("single", False), "rediss": ("single", True), "unix": ("single", False),
    "redis+sentinel": ("sentinel", False), "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False), "rediss+cluster": ("cluster", True),
}
_DEFAULT_PORT = {"single": 6379, "sentinel": 26379, "cluster": 6379}
_COMMON = ("db", "username", "password")
_TLS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
_SENTINEL = ("sentinel_username", "sentinel_password")
_SECRET_OPTIONS = ("password", "sentinel_password")


class StoreURLError(ValueError):
    """The URL cannot be used as given; the message says why and never contains a password."""


@dataclass(frozen=True)
class TLSOptions:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True  # ssl_cert_reqs=required (the default) or none
    check_hostname: bool = True

    @cached_property
    def context(self) -> ssl.SSLContext:
        """The client context; files are read here, so a file that cannot be used is a ``StoreURLError``
        naming it at first use (``RedisStore`` and ``check_store_url`` ask at once)."""
        try:
            ctx = ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as e:
            raise StoreURLError(f"TLS: the CA file {self.ca_file!r} cannot be used: {e}") from None
        if self.cert_file:
            try:
                ctx.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as e:
                if not self.key_file and _holds_no_key(self.cert_file):
                    raise StoreURLError(f"TLS: the client certificate {self.cert_file!r} holds no private key: give "
                                        "its key file (tls.key_file in a store block, ssl_keyfile in a URL)") from None
                key = f" with the key {self.key_file!r}" if self.key_file else ""
                raise StoreURLError(f"TLS: the client certificate {self.cert_file!r}{key} cannot be used: {e}") \
                    from None
        ctx.check_hostname = self.verify and self.check_hostname
        if not self.verify:
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


def _holds_no_key(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return b"PRIVATE KEY-----" not in f.read(1 << 20)
    except OSError:
        return False  # it cannot be read at all: the error says so


@dataclass(frozen=True)
class StoreURL:
    scheme: str
    topology: Topology
    nodes: tuple[tuple[str, int], ...] = ()  # the node; the sentinels; the cluster's seed nodes
    path: str | None = None  # unix socket
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: TLSOptions | None = None
    service: str | None = None  # the primary's name at the sentinels
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    display: str = ""
    secrets: tuple[str, ...] = field(default=(), repr=False)


def parse_store_url(url: str) -> StoreURL:
    """Read a Redis store URL, or raise ``StoreURLError`` naming what is wrong with it — never quoting a password,
    even one whose ``/``, ``?``, ``&`` or ``#`` (not percent-encoded) made the rest of the URL unreadable."""
    try:
        return _parse(url)
    except StoreURLError as e:
        masked = _masked(url)
        if masked == url:
            raise
        try:
            _parse(masked)
        except StoreURLError as without:
            raise StoreURLError(str(without)) from None  # what is wrong elsewhere, said without the secrets
        raise StoreURLError("the user name or password cannot be read: percent-encode a / ? # @ & or : in it "
                            "(%2F %3F %23 %40 %26 %3A)") from e


_SECRET_OPTION = re.compile(r"(?<=[?&])((?:sentinel_)?password=)(.*?)(?=&(?:" + "|".join(_COMMON + _TLS + _SENTINEL)
                            + r")=|$)", re.S)


def _masked(url: str) -> str:
    """``url`` with what may be a password replaced by ``***``: everything before the last ``@`` of the part after
    the scheme, and the values of ``password=`` / ``sentinel_password=`` (up to the next known option)."""
    scheme, sep, rest = url.partition("://")
    at = rest.rfind("@")
    if at >= 0:
        rest = ("***:***" if ":" in rest[:at] else "***") + rest[at:]
    return _SECRET_OPTION.sub(lambda m: m.group(1) + "***", scheme + sep + rest)


def _parse(url: str) -> StoreURL:
    if not _is_text(url):
        raise StoreURLError("the URL holds a character that is not valid text (a lone surrogate such as \\ud800)")
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _SCHEMES:
        raise StoreURLError(f"unsupported store URL scheme {scheme + '://' if sep else '(none)'}: expected "
                            "memory://, redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// "
                            "(rediss+… for TLS)")
    topology, tls_on = _SCHEMES[scheme]
    rest, _, fragment = rest.partition("#")
    if fragment:
        raise StoreURLError("a store URL has no #fragment")
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username, password = _userinfo(userinfo) if at else (None, None)
    options = _options(query, topology, tls_on)
    for name, given in (("username", username), ("password", password)):
        if given is not None and name in options:  # which one was meant? Neither is dropped silently
            raise StoreURLError(f"the {name} is given twice, before the @ and as ?{name}=: give it once")
    username = username or options.get("username")
    password = password if password is not None else options.get("password")
    secrets = tuple(s for s in (password, options.get("sentinel_password")) if s)
    base = dict(scheme=scheme, topology=topology, username=username, password=password,
                display=_display(url), secrets=tuple({v for s in secrets for v in (s, quote(s, safe=""))}),
                tls=_tls(options) if tls_on else None)
    if scheme == "unix":
        if hosts:
            raise StoreURLError(f"unix:// takes a socket path, not a host ({hosts!r}): unix:///run/redis.sock")
        if not path:
            raise StoreURLError("unix:// needs the socket path: unix:///run/redis/redis.sock")
        return StoreURL(**base, path=unquote("/" + path), db=_db(options.get("db", "0")))
    nodes = _nodes(hosts, _DEFAULT_PORT[topology], allow_many=topology != "single")
    if topology == "sentinel":
        service, _, db = path.partition("/")
        if db.strip("/") and "db" in options:
            raise StoreURLError(f"the database is given twice, as /{db.strip('/')} and as ?db=: give it once")
        if not service:
            raise StoreURLError("redis+sentinel:// needs the primary's name: redis+sentinel://host:26379/mymaster/0")
        return StoreURL(**base, nodes=nodes, service=unquote(service), db=_db(options.get("db", db or "0")),
                        sentinel_username=options.get("sentinel_username"),
                        sentinel_password=options.get("sentinel_password"))
    if path.strip("/") and "db" in options:
        raise StoreURLError(f"the database is given twice, as /{path.strip('/')} and as ?db=: give it once")
    db = _db(options.get("db", path.rstrip("/") or "0") if slash or "db" in options else "0")
    if topology == "cluster" and db != 0:
        raise StoreURLError(f"a Redis Cluster has database 0 only, not {db}")
    return StoreURL(**base, nodes=nodes, db=db)


def _is_text(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


_NODE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:[0-9]+)?")


def check_node(item: str) -> None:
    """Raise ``StoreURLError`` unless ``item`` is ``host``, ``host:port`` or ``[v6]:port`` — nothing a URL
    would read as something else (``,``, ``/``, ``@``, ``?`` …)."""
    if not _NODE.fullmatch(item):
        raise StoreURLError(f"{item!r} is not host:port")
    _host_port(item, 1)


def block_url(topology: Topology, nodes: Sequence[str], *, service: str = "", db: int = 0,
              username: str | None = None, password: str | None = None, tls: TLSOptions | None = None,
              sentinel_username: str | None = None, sentinel_password: str | None = None) -> str:
    """The URL a config block stands for (``nodes`` as ``check_node`` accepts them); every other value is
    quoted, so whatever a password holds reads back the same. An empty password is no password."""
    user = quote(username or "", safe="")
    secret = f":{quote(password, safe='')}" if password else ""
    userinfo = f"{user}{secret}@" if user or secret else ""
    path = f"/{quote(service, safe='')}/{db}" if topology == "sentinel" else ""
    options: dict[str, str] = {}
    if tls is not None:
        options.update({k: v for k, v in (("ssl_ca_certs", tls.ca_file), ("ssl_certfile", tls.cert_file),
                                          ("ssl_keyfile", tls.key_file)) if v})
        if not tls.verify:
            options["ssl_cert_reqs"] = "none"
        if not tls.check_hostname:
            options["ssl_check_hostname"] = "false"
    if sentinel_username:
        options["sentinel_username"] = sentinel_username
    if sentinel_password:
        options["sentinel_password"] = sentinel_password
    query = f"?{urlencode(options)}" if options else ""
    return f"{'rediss' if tls else 'redis'}+{topology}://{userinfo}{','.join(nodes)}{path}{query}"


def _userinfo(userinfo: str) -> tuple[str | None, str | None]:
    user, colon, password = userinfo.partition(":")
    return unquote(user) or None, unquote(password) if colon else None


def _options(query: str, topology: Topology, tls_on: bool) -> dict[str, str]:
    allowed = _COMMON + (_TLS if tls_on else ()) + (_SENTINEL if topology == "sentinel" else ())
    options: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key in options:
            raise StoreURLError(f"option {key} is given twice")
        if key not in allowed:
            if key in _TLS:
                why = "is for TLS: use rediss://"
            elif key in _SENTINEL:
                why = "is for redis+sentinel://"
            else:
                why = "is not an option the gateway reads"
            raise StoreURLError(f"option {key} {why} (options here: {', '.join(allowed)})")
        options[key] = value
    return options


def _tls(options: dict[str, str]) -> TLSOptions:
    reqs = options.get("ssl_cert_reqs", "required").lower()
    if reqs not in ("required", "none"):
        raise StoreURLError(f"ssl_cert_reqs: expected required or none, got {reqs!r}")
    check = options.get("ssl_check_hostname", "true").lower()
    if check not in ("true", "false"):
        raise StoreURLError(f"ssl_check_hostname: expected true or false, got {check!r}")
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if name in options and not options[name]:
            raise StoreURLError(f"{name}: the path is empty (leave the option out for none)")
    if ("ssl_keyfile" in options) and "ssl_certfile" not in options:
        raise StoreURLError("ssl_keyfile needs ssl_certfile (the client certificate it belongs to)")
    return TLSOptions(ca_file=options.get("ssl_ca_certs"), cert_file=options.get("ssl_certfile"),
                      key_file=options.get("ssl_keyfile"), verify=reqs == "required",
                      check_hostname=check == "true" and reqs == "required")


def _db(text: str) -> int:
    if not text.isdigit():
        raise StoreURLError(f"the database must be a number, got {text!r}")
    return int(text)


def _nodes(hosts: str, default_port: int, *, allow_many: bool) -> tuple[tuple[str, int], ...]:
    items = hosts.split(",") if hosts else ["localhost"]
    if len(items) > 1 and not allow_many:
        raise StoreURLError("several hosts are for redis+sentinel:// or redis+cluster://, not one node")
    return tuple(_host_port(item, default_port) for item in items)


def _host_port(item: str, default_port: int) -> tuple[str, int]:
    if item.startswith("["):
        host, _, tail = item[1:].partition("]")
        port = tail[1:] if tail.startswith(":") else tail
    else:
        host, _, port = item.partition(":")
    if not host:
        raise StoreURLError(f"a host is missing in {item!r}")
    if not _valid_host(host, bracketed=item.startswith("[")):
        raise StoreURLError(f"{item!r} is not a valid host name")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise StoreURLError(f"{item!r}: the port must be a number 1-65535")
    return host, int(port) if port else default_port


_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")  # RFC 1123 (and the "_" some internal names carry)


def _valid_host(host: str, *, bracketed: bool) -> bool:
    """An IPv4 address, a bracketed IPv6 address, or a DNS name of 1-63 character labels (253 at most): what
    the resolver can encode — anything else (``a..b``, ``...``, a 64-character label) is refused here rather
    than failing at every connect."""
    if bracketed:
        try:
            return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
        except ValueError:
            return False
    name = host[:-1] if host.endswith(".") else host  # a fully qualified name's root dot
    return len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


def address(host: str | None, port: int | None) -> str:
    """``host:port`` as a user would write it: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if host and ":" in host else f"{host}:{port}"


def _display(url: str) -> str:
    """The URL with the userinfo password and secret options masked (also for a URL that does not parse)."""
    head, sep, rest = url.partition("://")
    rest, qmark, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{hosts}"
    if qmark:  # for reading, not parsing: values as written (a TLS file's path readable), secrets masked
        query = "&".join(f"{k}={'***' if k in _SECRET_OPTIONS else v}"
                         for k, v in parse_qsl(query, keep_blank_values=True))
    return f"{head}{sep}{netloc}{slash}{path}{qmark}{query}"
