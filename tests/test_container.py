"""The image and the compose file, run (issue #17 point 7): podman builds the unchanged ``Dockerfile`` and
runs it, and podman-compose brings up ``docker-compose.yml --profile lb``.

- the image: built, run as its non-root user, an OpenAI SDK call proxied through it to an upstream on the
  host, and an open stream drained to its end on SIGTERM (the process then exits 0);
- the compose file with ``--profile lb``: HAProxy in front of two gateways on one Redis; through the load
  balancer, with HAProxy's own log showing both gateways answered, a tenant's rate limit holds across both
  (5 a minute: 5 answered, the rest refused) and an idempotency key runs once whichever gateway gets it.

Slow (an image build, containers): it runs when ``RELIAPI_CONTAINER_TESTS=1`` — ``.ci/run`` runs it as a step
of its own where podman works — and skips with the reason otherwise, or where podman cannot run a container
(``RELIAPI_REQUIRE_CONTAINERS=1`` turns that skip into a failure). Podman comes from
``../shared/tools/containers.sh`` when it is there (local stand-ins for the base images, built with
``--pull=never``), else from PATH. Every container, network, volume and image a test makes is removed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from tests.support.cli_harness import free_port

REPO = Path(__file__).resolve().parent.parent
CONTAINERS_SH = Path(os.environ.get("RELIAPI_CONTAINERS_SH", REPO.parent / "shared" / "tools" / "containers.sh"))
ACME, BETA = "acme-key-123456", "beta-key-123456"


def _reason_not_to_run() -> str | None:
    if os.environ.get("RELIAPI_CONTAINER_TESTS") != "1":
        return "container tests are slow (an image build, containers): set RELIAPI_CONTAINER_TESTS=1 (.ci/run does)"
    if not CONTAINERS_SH.exists() and not (shutil.which("podman") and shutil.which("podman-compose")):
        return f"no podman: neither {CONTAINERS_SH} nor podman and podman-compose on PATH"
    try:
        run = podman("run", "--rm", "--pull=never", "docker.io/library/python:3.11-slim", "true", check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"podman cannot run a container here: {e}"
    if run.returncode != 0:
        return f"podman cannot run a container here: {run.stderr.strip()[-300:]}"
    return None


def podman(*args: str, check: bool = True, timeout: float = 300, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    cmd = [str(CONTAINERS_SH), "podman", *args] if CONTAINERS_SH.exists() else ["podman", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=check, env=env)


def compose(project: str, env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    base = [str(CONTAINERS_SH), "compose"] if CONTAINERS_SH.exists() else ["podman-compose"]
    cmd = [*base, "-p", project, "-f", "docker-compose.yml", "--profile", "lb", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})


@pytest.fixture(scope="module")
def containers() -> None:
    reason = _reason_not_to_run()
    if reason is None:
        return
    if os.environ.get("RELIAPI_REQUIRE_CONTAINERS") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


class Upstream:
    """An OpenAI stand-in on every interface of the host (containers reach it through their gateway
    address): chat completions, streamed when asked (``chunks`` every ``interval_s``), each one counted."""

    def __init__(self, chunks: int = 8, interval_s: float = 0.25) -> None:
        self.calls: Counter[str] = Counter()  # by the first message's content
        self.chunks, self.interval_s = chunks, interval_s
        self.port = free_port()

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        content = body["messages"][0]["content"]
        self.calls[content] += 1
        if not body.get("stream"):
            return web.json_response({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": f"echo: {content}"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(self.chunks):
            chunk = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                     "choices": [{"index": 0, "delta": {"content": f"part{i} "}, "finish_reason": None}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await asyncio.sleep(self.interval_s)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def __aenter__(self) -> Upstream:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "0.0.0.0", self.port).start()  # noqa: S104 - containers reach the host
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


async def wait_http(url: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
                    last = f"HTTP {r.status}"
            except (aiohttp.ClientError, TimeoutError) as e:
                last = repr(e)
            await asyncio.sleep(0.3)
    raise AssertionError(f"{url} not ready after {timeout_s:g}s: {last}")


@pytest.fixture
def image(containers: None) -> Iterator[str]:
    tag = f"localhost/reliapi-test:{uuid.uuid4().hex[:8]}"
    podman("build", "--pull=never", "-t", tag, ".", timeout=600)  # the Dockerfile as it is
    try:
        yield tag
    finally:
        podman("rmi", "-f", tag, check=False)


@pytest.fixture
async def container(image: str, tmp_path: Path) -> AsyncIterator[tuple[str, int, Upstream]]:
    """The image running on the host's network with a config pointing at an upstream on the host."""
    async with Upstream() as up:
        port, name = free_port(), f"reliapi-test-{uuid.uuid4().hex[:8]}"
        config = tmp_path / "config.yaml"
        config.write_text(f"server: {{default_target: up, shutdown_grace_s: 20}}\n"
                          f"targets:\n  up:\n    base_url: http://127.0.0.1:{up.port}/v1\n"
                          f"    provider: openai\n    auth: {{type: bearer_env, env_var: OPENAI_API_KEY}}\n")
        config.chmod(0o644)  # read by the image's user
        podman("run", "-d", "--name", name, "--network", "host", "-e", f"RELIAPI_PORT={port}",
               "-e", "OPENAI_API_KEY=sk-gateway-key", "-v", f"{config}:/app/config.yaml:ro", image)
        try:
            await wait_http(f"http://127.0.0.1:{port}/readyz")
            yield name, port, up
        finally:
            podman("rm", "-f", "-t", "0", name, check=False)


async def test_the_image_runs_as_its_user_proxies_an_sdk_call_and_drains_a_stream_on_sigterm(container):
    import openai

    name, port, up = container
    status = podman("exec", name, "cat", "/proc/1/status").stdout
    uid = re.search(r"^Uid:\s+(\d+)", status, re.M)
    assert uid is not None and uid.group(1) == "10001", status  # PID 1, the gateway, is the image's reliapi user
    assert podman("exec", name, "id", "-un").stdout.strip() == "reliapi"

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-client-key", max_retries=0)
    answer = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "echo: hi"
    assert up.calls["hi"] == 1

    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "long"}], stream=True)
    parts = []
    async for chunk in stream:
        parts.append(chunk.choices[0].delta.content)
        if len(parts) == 1:  # the stream is open: stop the container as an orchestrator would
            podman("kill", "--signal", "TERM", name)
    assert parts == [f"part{i} " for i in range(up.chunks)]  # drained to its end, not cut
    exit_code = podman("wait", name, timeout=60).stdout.strip()
    assert exit_code == "0", podman("logs", name, check=False).stderr[-2000:]
    logs = podman("logs", name, check=False)
    assert "Traceback" not in logs.stdout + logs.stderr


async def test_compose_lb_profile_two_gateways_on_one_redis_share_a_rate_limit_and_an_idempotency_key(
        containers: None, tmp_path: Path):
    project = f"reliapi-ct-{uuid.uuid4().hex[:8]}"
    async with Upstream() as up:
        config = tmp_path / "config.yaml"
        config.write_text(
            "server: {default_target: up}\n"
            "store: {url: \"redis://redis:6379/0\", key_prefix: reliapi}\n"
            "targets:\n"
            f"  up: {{base_url: \"http://host.containers.internal:{up.port}/v1\", provider: openai, auth: {{type: none}}}}\n"
            "tenants:\n"
            f"  - {{name: acme, api_key: {ACME}, rate_limit: {{rpm: 5, burst: 5}}}}\n"
            f"  - {{name: beta, api_key: {BETA}}}\n")
        config.chmod(0o644)
        lb_port = free_port()
        env = {"RELIAPI_CONFIG_FILE": str(config), "RELIAPI_HOST_PORT": str(free_port()),
               "RELIAPI_LB_HOST_PORT": str(lb_port)}
        try:
            up_run = compose(project, env, "up", "-d", "--build", timeout=600)
            assert up_run.returncode == 0, up_run.stderr[-3000:]
            base = f"http://127.0.0.1:{lb_port}"
            await wait_http(f"{base}/readyz")
            await _both_backends_up(project)
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                async def chat(key: str, content: str, **headers: str) -> tuple[int, CIMultiDict[str], dict]:
                    async with s.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {key}", **headers},
                                      json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}
                                      ) as r:
                        return r.status, CIMultiDict(r.headers), await r.json()  # (HAProxy lower-cases names)

                before = _served(project)
                limited = [await chat(ACME, f"limited {i}") for i in range(8)]
                statuses = [status for status, _, _ in limited]
                # one limit of 5 for both: alone, each gateway would have let its own share (4 of 8) through
                assert statuses == [200] * 5 + [429] * 3, statuses
                assert all(h.get("Retry-After") for status, h, _ in limited if status == 429)
                served = _served(project) - before
                assert served["reliapi-1"] >= 2 and served["reliapi-2"] >= 2, served

                before = _served(project)
                keyed = [await chat(BETA, "charge once", **{"Idempotency-Key": "order-17"}) for _ in range(4)]
                assert [status for status, _, _ in keyed] == [200] * 4
                assert up.calls["charge once"] == 1  # one upstream call, whichever gateway answered
                assert [h.get("Idempotent-Replayed") for _, h, _ in keyed] == [None, "true", "true", "true"]
                assert len({json.dumps(body, sort_keys=True) for _, _, body in keyed}) == 1
                served = _served(project) - before
                assert served["reliapi-1"] >= 1 and served["reliapi-2"] >= 1, served
        finally:
            down = compose(project, env, "down", "-v", "-t", "5", timeout=180)
            assert down.returncode == 0, down.stderr[-2000:]


def _served(project: str) -> Counter[str]:
    """Requests HAProxy sent to each gateway so far, from its own log."""
    log = podman("logs", f"{project}_lb_1", check=False)
    return Counter(re.findall(r" gateways/(reliapi-\d) .*\"POST /v1/chat/completions", log.stdout + log.stderr))


async def _both_backends_up(project: str, timeout_s: float = 60) -> None:
    """HAProxy marks a server up after two good health checks: wait until it has said so of both."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log = podman("logs", f"{project}_lb_1", check=False)
        text = log.stdout + log.stderr
        down = set(re.findall(r"Server gateways/(reliapi-\d) is DOWN", text))
        up = set(re.findall(r"Server gateways/(reliapi-\d) is UP", text))
        if not down - up:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"HAProxy did not see both gateways up: {text[-2000:]}")
