"""Every error body a client gets is scrubbed of configured keys (issue #12 point 4, SPEC §8).

The upstream here is careless in every way an error can reach a client: it quotes the
gateway's upstream key in a 4xx sent as an event stream, in a chunked 4xx, in a 4xx larger
than the gateway holds in memory (with the key split across two chunks), in a gzip-compressed
4xx, and in an in-band error event of a 2xx stream.
"""

from __future__ import annotations

import asyncio
import gzip
from urllib.parse import quote

import msgspec
import pytest
from aiohttp import web

from gateway.scrub import Scrubber, unescaped
from tests.support.config import NO_5XX_RETRY, GatewayConfig, bearer_env

KEY = "sk-up-SECRET-0a1b2c3d4e5f"
SLASHED = "rest/SECRET+99887766/ab=="  # a base64 key: JSON-escaped as rest\/SECRET… by PHP, …\u003d by Gson, %2F in a URL
ENV = {"UP_KEY": KEY, "REST_KEY": SLASHED}


def config(url: str) -> GatewayConfig:
    """``up`` (OpenAI) and ``rest`` (plain HTTP), each with a key from the environment, errors not retried."""
    cfg = GatewayConfig(url, default_target="up")
    cfg.up(models=None, auth=bearer_env("UP_KEY"), retry_matrix={"5xx": {"attempts": 0}, "429": {"attempts": 0}})
    return cfg.rest(auth=bearer_env("REST_KEY"), retry_matrix=NO_5XX_RETRY)


def _key(request: web.Request) -> bytes:
    return request.headers.get("Authorization", "").removeprefix("Bearer ").encode()


async def _sse_4xx(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(status=401, headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(b'data: {"error": {"message": "bad key ' + _key(request) + b'"}}\n\n')
    await resp.write_eof()
    return resp


async def _chunked_4xx_split(request: web.Request) -> web.StreamResponse:
    """A 4xx over the gateway's 1 MB buffer, the key split across two chunks (and repeated at the end)."""
    key = _key(request)
    resp = web.StreamResponse(status=400, headers={"Content-Type": "application/json"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    await resp.write(b'{"error": {"message": "' + b"x" * (1 << 20) + b" your key " + key[:7])
    await asyncio.sleep(0.05)  # the two halves arrive as two chunks
    await resp.write(key[7:] + b' is wrong", "pad": "' + b"y" * 1000 + b'", "again": "' + key + b'"}}')
    await resp.write_eof()
    return resp


async def _gzip_4xx(request: web.Request) -> web.Response:
    body = b'{"error": {"message": "invalid key ' + _key(request) + b'", "type": "invalid_request_error"}}'
    return web.Response(status=401, body=gzip.compress(body),
                        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})


async def _gzip_chunked_4xx(request: web.Request) -> web.StreamResponse:
    body = gzip.compress(b'{"error": {"message": "invalid key ' + _key(request) + b'"}}')
    resp = web.StreamResponse(status=403, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    for i in range(0, len(body), 5):
        await resp.write(body[i:i + 5])
    await resp.write_eof()
    return resp


async def _sse_inband_error(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": null}]}\n\n')
    await resp.write(b'data: {"error": {"message": "key ' + _key(request) + b' was revoked mid-stream"}}\n\n')
    await resp.write_eof()
    return resp


async def _escaped_4xx(request: web.Request) -> web.Response:
    key = _key(request).decode()
    gson = key.replace("=", "\\u003d")  # Java's Gson escapes = < > & ' by default
    every = "".join(c if c.isalnum() else f"\\u{ord(c):04X}" for c in key)  # an encoder that escapes all the rest
    body = ('{"error": {"message": "bad key ' + key.replace("/", "\\/") + '", "url": "https://x/?k='
            + quote(key, safe="") + '", "gson": "' + gson + '", "every": "' + every + '"}}')
    return web.Response(status=401, body=body.encode(), content_type="application/json",
                        headers={"WWW-Authenticate": f'Bearer error="invalid_token", token="{key}"',
                                 "X-Debug-Key": key})


def _one_escaped(key: str, at: int) -> str:
    return key[:at] + f"\\u{ord(key[at]):04x}" + key[at + 1:]


async def _one_char_escaped_4xx(request: web.Request) -> web.Response:
    key = _key(request).decode()
    at = int(request.query.get("at", "1"))
    body = '{"error": {"message": "bad key Bearer ' + _one_escaped(key, at) + ' "}}'
    return web.Response(status=401, body=body.encode(), content_type="application/json")


async def _one_char_escaped_inband(request: web.Request) -> web.StreamResponse:
    key = _key(request).decode()
    resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": null}]}\n\n')
    event = ('data: {"error": {"message": "key ' + _one_escaped(key, 9) + ' was revoked"}}\n\n').encode()
    for i in range(0, len(event), 7):  # in small pieces: an escape split across reads
        await resp.write(event[i:i + 7])
        await asyncio.sleep(0.005)
    await resp.write_eof()
    return resp


async def _gzip_sse_200(request: web.Request) -> web.StreamResponse:
    events = gzip.compress(b'data: {"ok": 1}\n\nevent: error\ndata: {"message": "key ' + _key(request)
                           + b' expired"}\n\n')
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Content-Encoding": "gzip"})
    await resp.prepare(request)
    await resp.write(events)
    await resp.write_eof()
    return resp


async def _ndjson_200(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": request.query.get("ct", "application/x-ndjson")})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    await resp.write(b'{"status": "pulling"}\n')
    await resp.write(b'{"error": "key ' + _key(request) + b' revoked"}\n')
    await resp.write_eof()
    return resp


@pytest.fixture
async def careless(aiohttp_server):
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _sse_4xx)
    app.router.add_post("/v1/big/completions", _chunked_4xx_split)
    app.router.add_post("/v1/gz/completions", _gzip_4xx)
    app.router.add_get("/api/gz", _gzip_chunked_4xx)
    app.router.add_post("/v1/inband/completions", _sse_inband_error)
    app.router.add_get("/api/escaped", _escaped_4xx)
    app.router.add_post("/v1/escaped1/completions", _one_char_escaped_4xx)
    app.router.add_post("/v1/escaped1stream/completions", _one_char_escaped_inband)
    app.router.add_get("/api/gzsse", _gzip_sse_200)
    app.router.add_get("/api/ndjson", _ndjson_200)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}


async def test_a_4xx_event_stream_that_quotes_the_key_is_scrubbed(careless, gateway) -> None:
    client, _ = await gateway(config(careless), env=ENV)
    resp = await client.post("/v1/chat/completions", json=CHAT)
    body = await resp.read()
    assert resp.status == 401
    assert b"bad key ***" in body and KEY.encode() not in body


async def test_a_4xx_too_large_to_hold_is_scrubbed_as_it_streams_even_split_across_chunks(careless, gateway) -> None:
    client, _ = await gateway(config(careless), env=ENV)
    resp = await client.post("/v1/big/completions", json={"model": "gpt-4o-mini", "prompt": "x"})
    body = await resp.read()
    assert resp.status == 400
    assert len(body) > 1 << 20
    assert KEY.encode() not in body and KEY[:7].encode() + KEY[7:].encode() not in body
    assert body.count(b"***") == 2 and b"your key *** is wrong" in body


async def test_a_gzip_4xx_is_decoded_and_scrubbed(careless, gateway) -> None:
    client, _ = await gateway(config(careless), env=ENV)
    resp = await client.post("/v1/gz/completions", json={"model": "gpt-4o-mini", "prompt": "x"},
                             headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    raw = await resp.read()
    assert resp.status == 401
    assert "Content-Encoding" not in resp.headers  # sent on decoded: compressed bytes cannot be scrubbed
    assert msgspec.json.decode(raw)["error"]["message"] == "invalid key ***"


async def test_a_gzip_chunked_4xx_of_a_plain_http_target_is_decoded_and_scrubbed(careless, gateway) -> None:
    client, _ = await gateway(config(careless), env=ENV)
    resp = await client.get("/t/rest/gz", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    raw = await resp.read()
    assert resp.status == 403 and "Content-Encoding" not in resp.headers
    assert raw == b'{"error": {"message": "invalid key ***"}}'


async def test_an_in_band_error_event_of_a_2xx_stream_is_scrubbed(careless, gateway) -> None:
    client, _ = await gateway(config(careless), env=ENV)
    resp = await client.post("/v1/inband/completions", json=CHAT)
    body = await resp.read()
    assert resp.status == 200
    assert b"key *** was revoked" in body and KEY.encode() not in body


async def test_a_key_quoted_json_escaped_url_encoded_or_in_a_header_is_scrubbed(careless, gateway) -> None:
    client, _ = await gateway(config(careless), env=ENV)
    resp = await client.get("/t/rest/escaped")
    raw = await resp.read()
    assert resp.status == 401
    every = [SLASHED, SLASHED.replace("/", "\\/"), quote(SLASHED, safe="")]
    assert not any(form.encode() in raw for form in every), raw
    assert msgspec.json.decode(raw)["error"]["message"] == "bad key ***"
    assert SLASHED not in str(msgspec.json.decode(raw)), raw  # in no spelling a JSON decoder reads back as the key
    assert SLASHED not in resp.headers["WWW-Authenticate"] and resp.headers["X-Debug-Key"] == "***"
    envelope = await (await client.post("/proxy/http", json={"target": "rest", "method": "GET", "path": "escaped"})).read()
    assert not any(form.encode() in envelope for form in every)  # the envelope decodes the body: still clean


@pytest.mark.parametrize("at", [1, 5, 12, len(KEY) - 1])
async def test_a_key_with_any_one_character_json_escaped_is_scrubbed(careless, gateway, at) -> None:
    """A JSON encoder may escape any character (``s\\u006b-…``): what a client's JSON decoder reads is the key."""
    client, _ = await gateway(config(careless), env=ENV)
    resp = await client.post(f"/v1/escaped1/completions?at={at}", json=CHAT)
    raw = await resp.read()
    assert resp.status == 401 and KEY not in str(msgspec.json.decode(raw)), raw
    assert msgspec.json.decode(raw)["error"]["message"] == "bad key Bearer *** "


async def test_a_key_one_character_escaped_in_an_in_band_error_split_across_reads_is_scrubbed(careless, gateway) -> None:
    client, _ = await gateway(config(careless), env=ENV)
    resp = await client.post("/v1/escaped1stream/completions", json=CHAT)
    raw = await resp.read()
    assert resp.status == 200 and b"key *** was revoked" in raw
    assert KEY.encode() not in unescaped(raw)


def test_an_escaped_key_is_held_whole_however_a_stream_splits_it() -> None:
    scrub = Scrubber([KEY])
    every = "".join(f"\\u{ord(c):04x}" for c in KEY)
    for spelled in (_one_escaped(KEY, 3), every):
        event = ('data: {"m": "' + spelled + '"}\n\n').encode()
        for cut in range(1, len(event)):
            feed = scrub.feeder()
            out = feed.feed(event[:cut]) + feed.feed(event[cut:]) + feed.end()
            assert KEY.encode() not in unescaped(out) and b"***" in out, (cut, out)
    plain = b'data: {"c": "line\\nnext \\u00e9 \\u003c"}\n\n'
    assert scrub.feeder().feed(plain) == plain  # no key: escapes left as they came


async def test_a_compressed_2xx_event_stream_with_an_in_band_error_is_decoded_and_scrubbed(careless, gateway) -> None:
    client, _ = await gateway(config(careless), env=ENV)
    resp = await client.get("/t/rest/gzsse", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    raw = await resp.read()
    assert resp.status == 200 and "Content-Encoding" not in resp.headers
    assert b"key *** expired" in raw and SLASHED.encode() not in raw


@pytest.mark.parametrize("ctype", ["application/x-ndjson", "application/json", "TEXT/PLAIN"])
async def test_a_2xx_text_stream_with_an_error_line_is_scrubbed(careless, gateway, ctype) -> None:
    client, _ = await gateway(config(careless), env=ENV)
    resp = await client.get("/t/rest/ndjson", params={"ct": ctype})
    raw = await resp.read()
    assert resp.status == 200 and b'"key *** revoked"' in raw and SLASHED.encode() not in raw


def test_a_streamed_scrub_holds_back_only_what_could_start_a_secret() -> None:
    scrub = Scrubber(["sk-abcdef123456"])
    feed = scrub.feeder()
    assert feed.feed(b'data: {"x": 1}\n\n') == b'data: {"x": 1}\n\n'  # an event: nothing held, nothing delayed
    assert feed.feed(b"the key sk-abc") == b"the key "
    assert feed.feed(b"def123456 ok sk") == b"*** ok "
    assert feed.feed(b"y") == b"sky"  # not a secret after all: released with the next chunk
    assert feed.feed(b"sk-abcdef12") == b""
    assert feed.end() == b"sk-abcdef12"  # the stream ended: what was held goes out as it came


async def _corrupt_gzip_4xx(request: web.Request) -> web.Response:
    packed = gzip.compress(b'{"error": {"message": "invalid key ' + _key(request) + b'"}}')
    return web.Response(status=401, body=packed + b"trailing garbage",
                        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})


async def test_a_compressed_4xx_that_cannot_be_decoded_is_not_passed_on(aiohttp_server, gateway) -> None:
    """Bytes the gateway cannot read it cannot scrub, and a lenient client decompressor reads the key out of them."""
    app = web.Application()
    app.router.add_get("/api/bad", _corrupt_gzip_4xx)
    server = await aiohttp_server(app)
    client, _ = await gateway(config(str(server.make_url("")).rstrip("/")), env=ENV)
    resp = await client.get("/t/rest/bad", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    raw = await resp.read()
    assert resp.status == 401 and "Content-Encoding" not in resp.headers
    assert b"not shown" in raw and b"SECRET" not in raw
