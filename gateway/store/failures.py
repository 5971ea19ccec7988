"""How a Redis connection failed, in words a user can act on — and the node it failed at.

``Refused`` is a refusal as configured (AUTH, SELECT, not a cluster node, a certificate, the wrong protocol):
retrying will not help, ``--check`` exits 2 and a reload is rejected. ``Stalled`` is a node that took the whole
timeout. ``Unlocated`` is a topology that named no node (no sentinel answered): its text already says why,
so nothing wraps it again.

A TLS client against a plain port, or a plain client against a TLS-only port, looks like a stall or a reset
from the socket; ``wrong_protocol`` asks the same port once more in the other protocol (only on that failure
path) and tells a clear mismatch from an outage.
"""

from __future__ import annotations

import asyncio
import os
import ssl

PROBE_TIMEOUT_S = 0.5  # one extra connection, on a failure path only


class Stalled(ConnectionError):
    """Redis took the whole timeout without answering (or accepting): it may be stalled, not gone."""


class Refused(ConnectionError):
    """Redis refused the connection as configured (AUTH, SELECT, not a cluster node): retrying will not help."""


class Unlocated(ConnectionError):
    """No node to connect to: the sentinels named none (the message says what each answered)."""


_PLAIN_REPLY = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST",
                "UNKNOWN_PROTOCOL")
NO_TLS = ("answers without TLS: it does not speak TLS on this port (use redis://, or leave tls: out of the store "
          "block — or give its TLS port)")
WANTS_TLS = ("speaks TLS on this port: use rediss:// (tls: in a store block) — or give its plain port")


def tls_refusal(e: ssl.SSLError, who: str = "Redis") -> Refused | None:
    """What a TLS failure says about the configuration, in one wording everywhere (the node, a sentinel, a
    Cluster seed, the pub/sub connection): a server certificate the CA does not vouch for (or not for this
    host), the server's alert that it does not take ours (none given, or not signed by its CA), or a server
    that answered in plain text. None for any other TLS failure — not a refusal as configured."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return Refused(f"TLS: {who}: the server's certificate was not accepted ({e.verify_message}); check ssl_ca_certs "
                       "(tls.ca_file in a store block) and the host name it was issued for")
    reason = e.reason or ""
    if "ALERT" in reason:
        return Refused(f"TLS: {who}: the server refused the connection ({reason}); check the client certificate "
                       "(ssl_certfile, tls.cert_file in a store block): the server may require one its CA signed")
    if reason in _PLAIN_REPLY:
        return Refused(f"{who} {NO_TLS}")
    return None


async def wrong_protocol(host: str, port: int, *, tls: bool, who: str) -> Refused | None:
    """After a TLS connection that got no answer (``tls``) or a plain one closed before any answer: a
    ``Refused`` when the same port clearly speaks the other protocol, else None (an outage, or unknown)."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            if tls:  # does a plain PING get a RESP answer (+PONG, -NOAUTH …)?
                reader, writer = await asyncio.open_connection(host, port)
                try:
                    writer.write(b"PING\r\n")
                    first = await reader.read(1)
                finally:
                    writer.close()
                return Refused(f"{who} {NO_TLS}") if first and first in b"+-" else None
            context = ssl.create_default_context()  # only: does a TLS handshake get anywhere?
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            try:
                _, writer = await asyncio.open_connection(host, port, ssl=context)
            except ssl.SSLError as e:
                return Refused(f"{who} {WANTS_TLS}") if "ALERT" in (e.reason or "") else None
            writer.close()
            return Refused(f"{who} {WANTS_TLS}")
    except (OSError, TimeoutError, UnicodeError):
        return None


async def tls_alert(host: str, port: int, context: ssl.SSLContext, *, who: str) -> Refused | None:
    """After a TLS connection reset before any answer: connect once more with the same TLS settings and listen,
    sending nothing. A TLS 1.3 server that does not take our certificate says so only after the handshake;
    with a command already on its way, its alert can turn into a bare reset (the kernel resets a socket closed
    with unread data), and the reason is lost. Listening, the alert arrives whole. None: no alert came."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(host, port, ssl=context)
            try:
                await reader.read(1)  # a server that takes us waits for a command: the timeout ends this
            finally:
                writer.close()
    except ssl.SSLError as e:
        return tls_refusal(e, who)
    except (OSError, TimeoutError, UnicodeError):
        return None
    return None


async def closed_early(host: str, port: int, context: ssl.SSLContext | None, *, who: str) -> Refused | None:
    """Why a connection closed before any answer, when it is a refusal as configured: over TLS, our
    certificate refused (``tls_alert``); in plain text, a TLS-only port (``wrong_protocol``)."""
    if context is not None:
        return await tls_alert(host, port, context, who=who)
    return await wrong_protocol(host, port, tls=False, who=who)


def reason(e: BaseException) -> str:
    """An OS error as words ("Connection refused"), not its errno and the address asyncio repeats."""
    if isinstance(e, OSError) and e.errno and not isinstance(e, ssl.SSLError):
        return os.strerror(e.errno)
    if isinstance(e, UnicodeError):
        return f"the host name cannot be resolved ({e})"
    return str(e) or type(e).__name__


def unechoed(e: BaseException) -> str:
    """A Redis error without the arguments it may quote back ("unknown command 'AUTH', with args beginning
    with: 'user' 'password'", where AUTH is renamed away): a refused AUTH must not repeat the password."""
    return str(e).partition(", with args")[0]
