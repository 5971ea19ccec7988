"""Fast fake OpenAI-compatible upstream for the ReliAPI benchmark.

POST /v1/chat/completions
  * body without ``"stream": true`` -> a precomputed ~400 byte chat.completion JSON
  * body with ``"stream": true``    -> text/event-stream: the first chunk is sent
    immediately, then CHUNKS more chunks every INTERVAL ms, then the last one (``finish_reason``), the
    usage-only chunk when the body asks ``"include_usage":true`` (and then ``"usage":null`` in the others, as
    OpenAI does), and ``data: [DONE]``.

Stream shape, per request (headers win) or per process (control endpoint / CLI):
  X-Bench-Chunks: 5          number of chunks after the first one
  X-Bench-Interval-Ms: 20    delay before each of those chunks
  X-Bench-Hold: 1            held stream: a chunk every INTERVAL ms until POST /_bench/release
                             (at most MAX_HOLD_S seconds), then the last chunk and [DONE]
  POST /_bench/config {"chunks": 5, "interval_ms": 20, "hold": false, "close": false, "reset_stats": true}
                             sets defaults; "close": true answers streams with Connection: close, so a
                             proxy does not keep thousands of idle upstream connections after the RSS test
  POST /_bench/release       ends every held stream (at its next chunk)
  GET  /_bench/stats         counters (requests, streams started/completed/aborted, open, max open)
  GET  /healthz              200

The request body is never JSON-parsed: "stream" detection is a byte search, and
every response body is precomputed bytes, so the upstream stays cheap.
"""
from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web

MAX_CHUNKS = 1000
MAX_INTERVAL_MS = 60_000
MAX_HOLD_S = 900  # a held stream ends after this even if nobody releases it

COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench0000000000000000000000",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hello! How can I assist you today?",
                    "refusal": None,
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 8, "completion_tokens": 9, "total_tokens": 17},
        "system_fingerprint": "fp_bench00000",
    },
    separators=(",", ":"),
).encode()


def _chunk(delta: dict, finish: str | None = None, usage_asked: bool = False) -> bytes:
    obj = {
        "id": "chatcmpl-bench0000000000000000000000",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_bench00000",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage_asked:  # as OpenAI: once asked, every chunk has "usage": null
        obj["usage"] = None
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


FIRST_CHUNK = _chunk({"role": "assistant", "content": "", "refusal": None})
MID_CHUNK = _chunk({"content": " hello"})
LAST = _chunk({}, "stop") + b"data: [DONE]\n\n"
# as OpenAI answers ``stream_options: {"include_usage": true}``: "usage": null in every chunk, and a usage-only
# chunk before [DONE]
USAGE_CHUNK = (b'data: {"id":"chatcmpl-bench0000000000000000000000","object":"chat.completion.chunk","created":1700000000,'
               b'"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_bench00000","choices":[],'
               b'"usage":{"prompt_tokens":8,"completion_tokens":9,"total_tokens":17}}\n\n')
CHUNKS = {False: (FIRST_CHUNK, MID_CHUNK, LAST),
          True: (_chunk({"role": "assistant", "content": "", "refusal": None}, usage_asked=True),
                 _chunk({"content": " hello"}, usage_asked=True),
                 _chunk({}, "stop", usage_asked=True) + USAGE_CHUNK + b"data: [DONE]\n\n")}

JSON_HEADERS = {"Content-Type": "application/json"}
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def _int_header(request: web.Request, name: str, default: int, hi: int) -> int:
    raw = request.headers.get(name)
    if raw is None:
        return default
    try:
        return max(0, min(hi, int(raw)))
    except ValueError:
        return default


async def chat(request: web.Request) -> web.StreamResponse:
    st = request.app["stats"]
    st["requests"] += 1
    body = await request.read()
    if b'"stream":true' not in body and b'"stream": true' not in body:
        return web.Response(body=COMPLETION, headers=JSON_HEADERS)

    cfg = request.app["cfg"]
    chunks = _int_header(request, "X-Bench-Chunks", cfg["chunks"], MAX_CHUNKS)
    interval = _int_header(request, "X-Bench-Interval-Ms", cfg["interval_ms"], MAX_INTERVAL_MS) / 1000.0
    hold = request.headers.get("X-Bench-Hold") == "1" or cfg["hold"]
    gen = request.app["release"]["gen"]
    st["streams_started"] += 1
    st["open_streams"] += 1
    st["max_open_streams"] = max(st["max_open_streams"], st["open_streams"])
    try:
        resp = web.StreamResponse(status=200, headers=SSE_HEADERS)
        if cfg["close"]:
            resp.force_close()
        await resp.prepare(request)
        first_chunk, mid_chunk, last = CHUNKS[b'"include_usage":true' in body]
        await resp.write(first_chunk)
        if hold:  # until released; bounded by MAX_HOLD_S
            step = max(interval, 0.05)
            for _ in range(int(MAX_HOLD_S / step)):
                await asyncio.sleep(step)
                if request.app["release"]["gen"] != gen:
                    break
                await resp.write(mid_chunk)
        else:
            for _ in range(chunks):  # bounded: chunks <= MAX_CHUNKS
                if interval:
                    await asyncio.sleep(interval)
                await resp.write(mid_chunk)
        await resp.write(last)
        await resp.write_eof()
        st["streams_completed"] += 1
        return resp
    except (ConnectionError, asyncio.CancelledError):
        st["streams_aborted"] += 1
        raise
    finally:
        st["open_streams"] -= 1


async def set_config(request: web.Request) -> web.Response:
    data = await request.json()
    cfg = request.app["cfg"]
    if "chunks" in data:
        cfg["chunks"] = max(0, min(MAX_CHUNKS, int(data["chunks"])))
    if "interval_ms" in data:
        cfg["interval_ms"] = max(0, min(MAX_INTERVAL_MS, int(data["interval_ms"])))
    for k in ("hold", "close"):
        if k in data:
            cfg[k] = bool(data[k])
    if data.get("reset_stats"):
        st = request.app["stats"]
        for k in st:
            if k != "open_streams":
                st[k] = 0
    return web.json_response(cfg)


async def release(request: web.Request) -> web.Response:
    request.app["release"]["gen"] += 1
    return web.json_response({"released": request.app["stats"]["open_streams"]})


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app["stats"])


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--chunks", type=int, default=5)
    ap.add_argument("--interval-ms", type=int, default=20)
    a = ap.parse_args()

    app = web.Application(client_max_size=64 * 1024 * 1024)  # bench/large_bodies.py sends 10 MB bodies
    app["cfg"] = {"chunks": a.chunks, "interval_ms": a.interval_ms, "hold": False, "close": False}
    app["release"] = {"gen": 0}  # POST /_bench/release bumps it: held streams end
    app["stats"] = dict.fromkeys(
        ("requests", "streams_started", "streams_completed", "streams_aborted",
         "open_streams", "max_open_streams"), 0)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/chat/completions", chat)
    app.router.add_post("/_bench/config", set_config)
    app.router.add_post("/_bench/release", release)
    app.router.add_get("/_bench/stats", stats)
    app.router.add_get("/healthz", healthz)

    import uvloop

    web.run_app(app, host=a.host, port=a.port, access_log=None, print=None,
                backlog=4096, shutdown_timeout=2.0, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
