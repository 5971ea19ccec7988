"""SSRF and path rules: the client can never choose where a request goes (SPEC §2, §8)."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidRequest
from gateway.paths import UpstreamBase, validate_path
from tests.conftest import llm_config, raw_http

BAD_PATHS = [
    "//evil.example/x",
    "https://evil.example/x",
    "http:/evil.example",
    "../admin",
    "chat/../../admin",
    "./chat",
    "%2e%2e/admin",
    "%2E%2E/admin",
    ".%2e/admin",
    "v1%2Fchat",
    "v1%2fchat",
    "a%5cb",
    "a\\b",
    "@evil.example/x",
    "user@evil.example",
    "a//b",
    "/",
    "a/%00b",
    "a/%0d%0aX-Injected:1",
    "a/%zz",
    "javascript:alert(1)",
]


@pytest.mark.parametrize("rel", BAD_PATHS)
def test_validate_path_rejects(rel):
    with pytest.raises(InvalidRequest):
        validate_path(rel)


@pytest.mark.parametrize("rel", ["", "chat/completions", "models/gpt-4o", "files/file-abc/content",
                                 "users/john%20doe/", "models/x:generateContent", "a/b~c_d-e.f"])
def test_validate_path_accepts_plain_segments(rel):
    assert validate_path(rel) == rel


def test_upstream_base_keeps_origin_and_base_path():
    b = UpstreamBase("https://api.openai.com/v1/")
    assert b.url("chat/completions", "", v1=True) == "https://api.openai.com/v1/chat/completions"
    assert b.url("chat/completions", "a=1", v1=False) == "https://api.openai.com/v1/chat/completions?a=1"
    a = UpstreamBase("https://api.anthropic.com")
    assert a.url("messages", "", v1=True) == "https://api.anthropic.com/v1/messages"
    assert a.url("", "", v1=False) == "https://api.anthropic.com/"


async def _raw(client, target: str) -> tuple[int, bytes]:
    """Send a request line exactly as written (no client-side normalisation)."""
    data = await raw_http(client, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    status = int(data.split(b" ", 2)[1])
    return status, data


@pytest.mark.parametrize("prefix", ["/v1/", "/t/rest/"])
@pytest.mark.parametrize("rel", [p for p in BAD_PATHS if "\\" not in p and "%0d" not in p])
async def test_bad_paths_never_leave_the_gateway(fake, gateway, prefix, rel):
    client, _ = await gateway(llm_config(fake.url), env={})
    status, data = await _raw(client, prefix + rel)
    assert status in (400, 404), data[:300]
    assert b"invalid" in data or b"unknown" in data or b"Bad Request" in data
    assert b"Traceback" not in data
    assert fake.requests == []


async def test_backslash_and_crlf_never_leave_the_gateway(fake, gateway):
    client, _ = await gateway(llm_config(fake.url), env={})
    for target in ("/t/rest/a\\b", "/v1/a%0d%0aX-Injected:1", "/t/rest/a%0d%0aX:1"):
        status, _ = await _raw(client, target)
        assert status == 400
    assert fake.requests == []


async def test_absolute_form_request_target_is_not_proxied(fake, gateway):
    client, _ = await gateway(llm_config(fake.url), env={})
    status, _ = await _raw(client, "http://169.254.169.254/latest/meta-data")
    assert status in (400, 404)
    assert fake.requests == []


async def test_body_cannot_choose_the_upstream(fake, gateway):
    client, _ = await gateway(llm_config(fake.url), env={})
    resp = await client.post("/v1/chat/completions", json={
        "model": "gpt-4o-mini", "messages": [], "api_base": "http://169.254.169.254", "base_url": "http://evil"})
    assert resp.status == 200
    assert fake.requests[0].path_qs == "/v1/chat/completions"  # went to the configured target only
