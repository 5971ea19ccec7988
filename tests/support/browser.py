"""A small Chrome DevTools Protocol driver: headless Chromium for the status page's tests.

``async with Browser.launch() as b``: starts Chromium (Debian's ``/usr/bin/chromium``, or
``RELIAPI_CHROMIUM``) headless on a throwaway profile, connects to its page over the CDP
websocket (aiohttp's client), and kills the whole browser by its process group when done.
``navigate``, ``evaluate`` (read the DOM), ``viewport``, ``screenshot`` — nothing else.

For local use: ``python -m tests.support.browser --screenshot out.png [--width 375] http://127.0.0.1:8000/``
(``make screenshot`` takes one at 1280 and one at 375 px).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 30.0
FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
    "--no-default-browser-check", "--disable-extensions", "--disable-background-networking", "--disable-sync",
    "--disable-component-update", "--mute-audio", "--hide-scrollbars", "--remote-debugging-port=0",
    "--remote-allow-origins=*",
)


def find_chromium() -> str | None:
    """The browser to drive: ``RELIAPI_CHROMIUM``, else Debian's chromium, else any on PATH."""
    explicit = os.environ.get("RELIAPI_CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def need_browser() -> str:
    """The Chromium to drive; the test skips with the reason when there is none — or fails, with
    ``RELIAPI_REQUIRE_BROWSER=1`` (set by ``.ci/run``)."""
    found = find_chromium()
    if found is not None:
        return found
    import pytest

    reason = "no Chromium to drive (apt-get install chromium, or set RELIAPI_CHROMIUM)"
    if os.environ.get("RELIAPI_REQUIRE_BROWSER") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


class CDPError(RuntimeError):
    pass


class Browser:
    def __init__(self, proc: asyncio.subprocess.Process, profile: str, session: aiohttp.ClientSession,
                 ws: aiohttp.ClientWebSocketResponse) -> None:
        self.proc = proc
        self.profile = profile
        self.session = session
        self.ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._waiters: list[tuple[str, asyncio.Future[dict[str, Any]]]] = []
        self.console_errors: list[str] = []  # uncaught exceptions and console.error, as the page reported them
        self._reader = asyncio.create_task(self._read())

    @classmethod
    @contextlib.asynccontextmanager
    async def launch(cls, executable: str | None = None, *, width: int = 1280, height: int = 900) -> AsyncIterator[Browser]:
        executable = executable or find_chromium()
        if executable is None:
            raise FileNotFoundError("no Chromium found (apt-get install chromium, or set RELIAPI_CHROMIUM)")
        profile = tempfile.mkdtemp(prefix="reliapi-chromium-")
        log = open(Path(profile) / "stderr.log", "wb")  # noqa: SIM115 - closed in the finally below
        proc = await asyncio.create_subprocess_exec(
            executable, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=log,
            start_new_session=True,  # its own process group: renderers and helpers go with it
        )
        session: aiohttp.ClientSession | None = None
        browser: Browser | None = None
        try:
            try:
                port = await _devtools_port(profile, proc)
                session = aiohttp.ClientSession()
                ws_url = await _page_websocket(session, port)
                ws = await session.ws_connect(ws_url, max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=5))
                browser = cls(proc, profile, session, ws)
                for domain in ("Page", "Runtime", "Log"):
                    await browser.call(f"{domain}.enable")
                await browser.viewport(width, height)
            except (OSError, TimeoutError, aiohttp.ClientError) as e:
                log.flush()
                tail = (Path(profile) / "stderr.log").read_bytes()[-2000:].decode(errors="replace")
                raise CDPError(f"Chromium did not start or answer: {e!r}\n{tail}") from e
            yield browser
        finally:
            if browser is not None:
                browser._reader.cancel()
                with contextlib.suppress(BaseException):
                    await browser._reader
            if session is not None:
                with contextlib.suppress(Exception):
                    await session.close()
            await _kill(proc)
            log.close()
            shutil.rmtree(profile, ignore_errors=True)

    # -- protocol ------------------------------------------------------------------------

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        await self.ws.send_json({"id": msg_id, "method": method, "params": params})
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                reply = await future
        finally:
            self._pending.pop(msg_id, None)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def expect(self, event: str) -> asyncio.Future[dict[str, Any]]:
        """A future for the next ``event`` (register it before the call that causes it)."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.append((event, future))
        return future

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = msg.json()
            if "id" in data:
                future = self._pending.get(data["id"])
                if future is not None and not future.done():
                    future.set_result(data)
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                self.console_errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                self.console_errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                self.console_errors.append(params["entry"].get("text", ""))
            for waiter in [w for w in self._waiters if w[0] == method]:
                self._waiters.remove(waiter)
                if not waiter[1].done():
                    waiter[1].set_result(params)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(CDPError("the browser closed the DevTools connection"))

    # -- what tests use --------------------------------------------------------------------

    async def navigate(self, url: str) -> None:
        """Go to ``url`` and wait for its load event."""
        loaded = self.expect("Page.loadEventFired")
        result = await self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise CDPError(f"navigating to {url}: {result['errorText']}")
        async with asyncio.timeout(CALL_TIMEOUT_S):
            await loaded

    async def evaluate(self, expression: str) -> Any:
        """Run JavaScript in the page and return its (JSON-able) value; promises are awaited."""
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise CDPError(details.get("exception", {}).get("description") or details.get("text", "evaluate failed"))
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 10.0, interval_s: float = 0.1) -> Any:
        """Poll ``expression`` until it is truthy; returns its value, or raises TimeoutError
        with the last value seen. A bound on how long to look, not a speed assertion."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{expression!r} still {value!r} after {timeout_s} s")
            await asyncio.sleep(interval_s)

    async def viewport(self, width: int, height: int = 900, *, mobile: bool | None = None) -> None:
        mobile = width < 600 if mobile is None else mobile
        await self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                        deviceScaleFactor=2 if mobile else 1, mobile=mobile)

    async def screenshot(self, path: str | Path, *, full_page: bool = True) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            metrics = await self.call("Page.getLayoutMetrics")
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            params |= {"captureBeyondViewport": True,
                       "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}}
        result = await self.call("Page.captureScreenshot", **params)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(result["data"]))
        return path


async def _devtools_port(profile: str, proc: asyncio.subprocess.Process) -> int:
    """Chromium writes the port it chose to ``<profile>/DevToolsActivePort`` once it listens."""
    marker = Path(profile) / "DevToolsActivePort"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise OSError(f"chromium exited with status {proc.returncode}")
        with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
            return int(marker.read_text().splitlines()[0])
        await asyncio.sleep(0.05)
    raise TimeoutError(f"no DevToolsActivePort after {START_TIMEOUT_S} s")


async def _page_websocket(session: aiohttp.ClientSession, port: int) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json(content_type=None)
        for target in targets:
            if target.get("type") == "page" and target.get("webSocketDebuggerUrl"):
                return target["webSocketDebuggerUrl"]
        await asyncio.sleep(0.05)
    raise TimeoutError("Chromium opened no page target")


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """End the browser we started — its own process group, by its id."""
    if proc.returncode is None:
        for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                async with asyncio.timeout(wait_s):
                    await proc.wait()
                break
            except TimeoutError:
                continue
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # helpers left in the group after the main process exited


async def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.browser", description=__doc__.split("\n\n")[0])
    parser.add_argument("url", nargs="?", default="http://127.0.0.1:8000/")
    parser.add_argument("--screenshot", metavar="PNG", required=True, help="where to write the screenshot")
    parser.add_argument("--width", type=int, default=1280, help="viewport width in CSS pixels (375: a phone)")
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--wait", type=float, default=0.0, help="seconds to let the page refresh itself first")
    args = parser.parse_args(argv)
    async with Browser.launch(width=args.width, height=args.height) as browser:
        await browser.viewport(args.width, args.height)
        await browser.navigate(args.url)
        if args.wait:
            await asyncio.sleep(args.wait)
        path = await browser.screenshot(args.screenshot)
        for line in browser.console_errors:
            print(f"page error: {line}", file=sys.stderr)
    print(f"{path} ({args.width} px wide) from {args.url}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(_main()))
