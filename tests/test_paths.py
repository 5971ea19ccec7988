"""SSRF and path rules: the client can never choose where a request goes (SPEC §2, §8)."""

from __future__ import annotations

import msgspec
import pytest

from gateway.errors import InvalidRequest
from gateway.upstream.paths import UpstreamBase, validate_path, validate_query
from tests.support.config import llm_config
from tests.support.gateway import raw_http

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


# ------------------------------------------ what normalising upstreams would still resolve (issue #12)

# Each trick, with what the 400 says about it. Tomcat/Spring drop ';' parameters, some servers
# decode twice, read overlong UTF-8 or fold Unicode look-alikes: all of these walk out of the base.
TRICKS = {
    "..;/..;/admin": "';' parameters on a '.' or '..' segment",
    ".;/admin": "';' parameters on a '.' or '..' segment",
    "x/..;jsessionid=1/..;/admin": "';' parameters on a '.' or '..' segment",
    "..%3b/admin": "';' parameters on a '.' or '..' segment",
    "x/..%3B/admin": "';' parameters on a '.' or '..' segment",
    "%252e%252e/admin": "double-encoded percent-escape",
    "x/%252fadmin": "double-encoded percent-escape",
    "x/%2525": "double-encoded percent-escape",
    "%c0%ae%c0%ae/admin": "percent-escapes must encode UTF-8",
    "x/%e0%80%ae": "percent-escapes must encode UTF-8",
    "x/%ff": "percent-escapes must encode UTF-8",
    "%e3%80%82%e3%80%82/admin": "a Unicode look-alike of '.', '/' or",  # U+3002 ideographic full stop
    "%ef%bc%8e%ef%bc%8e/admin": "a Unicode look-alike of '.', '/' or",  # U+FF0E fullwidth full stop
    "%ef%bd%a1%ef%bd%a1/admin": "a Unicode look-alike of '.', '/' or",  # U+FF61 halfwidth ideographic full stop
    "%ef%b9%92%ef%b9%92/admin": "a Unicode look-alike of '.', '/' or",  # U+FE52 small full stop
    "%e2%80%a5/admin": "a Unicode look-alike of '.', '/' or",  # U+2025 two dot leader
    "%e2%80%a4%e2%80%a4/admin": "a Unicode look-alike of '.', '/' or",  # U+2024 one dot leader
    "%e2%80%a6/admin": "a Unicode look-alike of '.', '/' or",  # U+2026 horizontal ellipsis: '...'
    "..%ef%bc%9b/admin": "a Unicode look-alike of '.', '/' or",  # '..；': U+FF1B folds to ';'
    ".%e3%80%82/admin": "a Unicode look-alike of '.', '/' or",  # '.。'
    "%e3%80%82%e3%80%82%c2%a5admin": "a Unicode look-alike of '.', '/' or",  # '。。¥admin': '..\\admin'
    "..%ef%bc%8fadmin": "a Unicode look-alike of '.', '/' or",  # U+FF0F fullwidth solidus
    "..%e2%88%95admin": "a Unicode look-alike of '.', '/' or",  # U+2215 division slash
    "..%e2%81%84admin": "a Unicode look-alike of '.', '/' or",  # U+2044 fraction slash
    "..%e2%a7%b8admin": "a Unicode look-alike of '.', '/' or",  # U+29F8 big solidus
    "..%ef%bc%bcadmin": "a Unicode look-alike of '.', '/' or",  # U+FF3C fullwidth reverse solidus
    "%ef%bc%85%ef%bc%92%ef%bd%85/admin": "a Unicode look-alike of '%'",  # '％２ｅ' folds to '%2e'
    "x/%c2%85": "control characters",  # U+0085, a C1 control
    "%25%32%65%25%32%65/%25%32%65%25%32%65/admin": "double-encoded",  # the escaped hex digits: '%2e' once decoded
    "%252%65%252%65/admin": "double-encoded",
    "x/%25%35%63admin": "double-encoded",  # '\\' decoded twice
    "x/..%c2%a5admin": "a Unicode look-alike of '.', '/' or",  # U+00A5 yen: '\\' in Japanese code pages
    "x/..%e2%82%a9admin": "a Unicode look-alike of '.', '/' or",  # U+20A9 won: '\\' in Korean code pages
    "..%20/admin": "a segment that is dots",  # Windows drops the trailing space
    ".../admin": "a segment that is dots",
    "a/..%23/b": "a segment that is dots",  # '..#': a fragment once decoded and re-parsed
    "a/..%3f/b": "a segment that is dots",  # '..?': a query
    "a/...;/b": "a segment that is dots",
    "x/..::$DATA/b": "a segment that is dots",  # an NTFS stream name: '..'
    "x/..%e2%80%8b/b": "a segment that is dots",  # a zero-width space
    "x/.%ef%bb%bf./b": "a segment that is dots",  # a BOM between the dots
    "x/.%c2%a0./b": "a segment that is dots",  # a no-break space
}


@pytest.mark.parametrize(("rel", "says"), TRICKS.items())
def test_validate_path_names_each_normalisation_trick(rel, says):
    with pytest.raises(InvalidRequest) as info:
        validate_path(rel)
    assert says in info.value.message and info.value.param == "path"


@pytest.mark.parametrize("rel", ["chat/completions", "v1/models/gpt-4o", "files/file-abc123/content",
                                 "users/caf%C3%A9", "users/%E4%B8%AD%E6%96%87", "a;b=c", "x/a;v=1.2",
                                 "100%25", "x/%25zz", "x/a%3Bb", "models/gpt-4o%3Alatest",
                                 # ordinary text with characters that are look-alikes elsewhere
                                 "notes/%E3%81%93%E3%82%93%E3%81%AB%E3%81%A1%E3%81%AF%E3%80%82",  # 'こんにちは。'
                                 "prices/%C2%A5100", "x/%E2%82%A95000",  # '¥100', '₩5000'
                                 "files/report%E3%80%82txt", "x/wait%E2%80%A6", "recipes/%C2%BD-cup"])
def test_legitimate_paths_still_pass(rel):
    assert validate_path(rel) == rel
    assert validate_path(rel) == rel  # and again, from the cache of known-good paths


async def _exchange(client, request: bytes) -> tuple[int, dict[str, str], dict]:
    """A raw request's status, headers (last value wins) and JSON body."""
    data = await raw_http(client, request)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ", 2)[1]), headers, msgspec.json.decode(body)


def _message(body: dict) -> str:
    return body["error"]["message"]  # the same place in the OpenAI and the envelope dialect


@pytest.mark.parametrize("prefix", ["/v1/", "/t/rest/", "/proxy/http"])
@pytest.mark.parametrize(("rel", "says"), TRICKS.items())
async def test_normalisation_tricks_are_a_400_on_every_surface(fake, gateway, prefix, rel, says):
    client, _ = await gateway(llm_config(fake.url), env={})
    if prefix == "/proxy/http":
        envelope = msgspec.json.encode({"target": "rest", "method": "GET", "path": "/" + rel})
        request = (f"POST /proxy/http HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(envelope)}\r\nConnection: close\r\n\r\n").encode() + envelope
    else:
        request = f"GET {prefix}{rel} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    status, headers, body = await _exchange(client, request)
    assert status == 400 and body["error"]["code"] == "invalid_request", body
    assert says in _message(body)
    assert headers["X-Request-Id"]
    assert fake.requests == []


# ------------------------------------------ the query and header values of /v1 and /t requests


@pytest.mark.parametrize("query", ["a=b c", "a=\x01", "a=\x7f", "a=caf\u00e9", "a=\u4e2d", "a=b#frag", "#"])
def test_validate_query_refuses_what_http_cannot_carry(query):
    with pytest.raises(InvalidRequest) as info:
        validate_query(query)
    assert info.value.param == "query" and "query" in info.value.message


@pytest.mark.parametrize("query", ["", "a=1&b=2", "q=caf%C3%A9", "a=%20b", "x=[1]&y={}", "100%", "a=b?c/d"])
def test_validate_query_keeps_what_http_carries(query):
    assert validate_query(query) == query


@pytest.mark.parametrize("prefix", ["/v1/files", "/t/rest/x"])
async def test_a_query_http_cannot_carry_never_leaves_the_gateway(fake, gateway, prefix):
    client, _ = await gateway(llm_config(fake.url), env={})
    # '#' gets past aiohttp's parser and would be cut off as a fragment on the way up: the
    # upstream would see another query than the client sent
    status, headers, body = await _exchange(
        client, f"GET {prefix}?a=b#frag HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert status == 400 and "query" in _message(body) and headers["X-Request-Id"]
    # raw non-ASCII, space and control bytes are refused by aiohttp's parser already
    for query in (b"a=caf\xc3\xa9", b"a=b c", b"a=\x01", b"a=\x7f"):
        data = await raw_http(client, b"GET " + prefix.encode() + b"?" + query + b" HTTP/1.1\r\nHost: x\r\n"
                              b"Connection: close\r\n\r\n")
        assert data.startswith(b"HTTP/1.") and data.split(b" ", 2)[1] == b"400", data[:200]
    assert fake.requests == []


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/v1/chat/completions", b'{"model": "gpt-4o-mini", "messages": []}'),
    ("GET", "/t/rest/x", b""),
])
@pytest.mark.parametrize("value", [b"caf\xe9", b"\xff\xfe", b"a\xc2\x85b", b"\xed\xa0\x80"])
async def test_a_header_value_that_is_not_utf8_text_is_a_400_naming_the_header(fake, gateway, method, path, body, value):
    """Latin-1 bytes, a C1 control, an encoded surrogate: aiohttp lets them through, but no upstream
    would get them as they were sent."""
    client, _ = await gateway(llm_config(fake.url), env={})
    request = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n").encode()
    status, headers, answer = await _exchange(client, request + b"X-Title: " + value + b"\r\n\r\n" + body)
    assert status == 400 and answer["error"]["code"] == "invalid_request", answer
    assert "headers.X-Title" in _message(answer) and headers["X-Request-Id"]
    assert fake.requests == []


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/v1/chat/completions", b'{"model": "gpt-4o-mini", "messages": []}'),
    ("GET", "/t/rest/x", b""),
])
@pytest.mark.parametrize("value", [b"caf\xc3\xa9", b"\xe4\xb8\xad\xe6\x96\x87", b"MyApp/1.0 (Jos\xc3\xa9)"])
async def test_utf8_text_in_a_header_value_is_relayed_as_sent(fake, gateway, method, path, body, value):
    client, _ = await gateway(llm_config(fake.url), env={})
    request = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n").encode()
    status, _, answer = await _exchange(client, request + b"X-Title: " + value + b"\r\n\r\n" + body)
    assert status == 200, answer
    assert fake.requests[0].headers["X-Title"].encode("utf-8", "surrogateescape") == value
