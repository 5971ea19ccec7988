"""JSON logs: one line per request (the access log) plus the gateway's own events.

Both go to stdout as JSON lines. The access log bypasses the ``logging`` machinery
(it is on the hot path) and is written through its own buffer, flushed twice a
second and at shutdown. Secrets never reach either: request headers are
not logged, and messages are scrubbed of configured key values.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import select
import stat
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec

from gateway.observe.trace import CURRENT
from gateway.scrub import Scrubber

_encode = msgspec.json.encode


_second: list = [-1, ""]  # the last whole second formatted, reused within that second
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))  # a line's ".mmmZ" is looked up, not formatted


def _ts(t: float) -> str:
    """RFC 3339 UTC with milliseconds; strftime runs once per second, not once per line."""
    sec = int(t)
    if sec != _second[0]:
        _second[0], _second[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return _second[1] + _MILLIS[int((t - sec) * 1000)]


_USERINFO = re.compile(r"//[^/@\s'\"]*@")


def hide_userinfo(text: str) -> str:
    """``text`` with any URL's ``user:password@`` shown as ``***@``."""
    return _USERINFO.sub("//***@", text) if "@" in text else text


class JsonFormatter(logging.Formatter):
    """``pid``: each line names its process (under ``--workers N``, N processes share one stdout)."""

    def __init__(self, scrub: Scrubber | None = None, *, pid: bool = False) -> None:
        super().__init__()
        self.scrub = scrub or Scrubber()
        self.pid = pid

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _ts(record.created), "level": record.levelname.lower(), "logger": record.name,
            "message": self.scrub(record.getMessage()),
        }
        if self.pid:
            line["pid"] = record.process
        trace = CURRENT.get()
        if trace is not None:  # made while a request runs: its trace
            line["trace_id"], line["span_id"] = trace.trace_id, trace.span_id
        extra = getattr(record, "fields", None)
        if extra:
            line.update(extra)
        if record.exc_info:
            line["stack"] = self.scrub(self.formatException(record.exc_info))
        return _encode(line).decode()


def setup_logging(level: str = "info", scrub: Scrubber | None = None, *, pid: bool = False) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(scrub, pid=pid))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").disabled = True


def use_scrubber(scrub: Scrubber) -> None:
    """Scrub the JSON log handler's lines of the running config's secrets."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, JsonFormatter):
            handler.formatter.scrub = scrub


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


class AccessLog:
    """Writes one JSON line per request when the log level lets INFO through.

    Lines are encoded straight into one buffer that goes to stdout's file descriptor
    in a single write when it fills, twice a second and at shutdown — so the hot
    path costs no system call and no per-line allocation, even under
    PYTHONUNBUFFERED, and the output is always whole lines.
    """

    FLUSH_AT = 1 << 16

    def __init__(self, write: Callable[[str], Any] | None = None) -> None:
        self._write_text = write
        self._encoder = msgspec.json.Encoder()
        self._buf = bytearray()
        self._fd: int | None = None
        # An injected writer always gets the lines; stdout follows the log level set at startup.
        self.enabled = write is not None or logging.getLogger("reliapi.access").isEnabledFor(logging.INFO)
        # a pipe (docker, `| jq`, several --workers on one stdout): written at most PIPE_BUF bytes of whole lines at a
        # time, which the kernel never interleaves with another process's write — a larger one may be split anywhere
        self._piece: int | None = None
        if write is None and self.enabled:
            self._fd = os.dup(sys.stdout.fileno())
            try:
                self._piece = select.PIPE_BUF if stat.S_ISFIFO(os.fstat(self._fd).st_mode) else None
            except OSError:
                pass

    def __call__(self, fields: dict[str, Any]) -> None:
        fields["ts"] = _ts(time.time())
        if self._fd is None:
            if self._write_text is not None:
                self._write_text(self._encoder.encode(fields).decode() + "\n")
            return
        buf = self._buf
        self._encoder.encode_into(fields, buf, -1)
        buf += b"\n"
        if len(buf) >= self.FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        if self._fd is None or not self._buf:
            return
        data, self._buf = self._buf, bytearray()
        try:
            if self._piece is None or len(data) <= self._piece:
                _write_all(self._fd, memoryview(data))
                return
            start, end, piece = 0, len(data), self._piece
            while start < end:
                stop = start + piece
                if stop < end:  # whole lines up to PIPE_BUF; a longer line alone
                    nl = data.rfind(b"\n", start, stop)
                    stop = nl + 1 if nl >= start else (data.find(b"\n", stop) + 1 or end)
                else:
                    stop = end
                _write_all(self._fd, memoryview(data)[start:stop])
                start = stop
        except OSError:
            pass  # stdout closed or full: losing log lines must never stop the proxy

    def close(self) -> None:
        if self._fd is not None:
            self.flush()
            os.close(self._fd)
            self._fd = None

    async def flush_periodically(self, interval_s: float = 0.5) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.flush()
