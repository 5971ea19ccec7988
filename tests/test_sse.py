"""SSE framing (``gateway.streaming.sse``): the usual one-event chunk takes a short cut that must read the same."""

from __future__ import annotations

import pytest

from gateway.streaming.sse import Aligner, events


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (b'data: {"a":1}\n\n', [(b"", b'{"a":1}')]),  # the usual chunk
        (b'data: {"a":1}\r\n\r\n', [(b"", b'{"a":1}')]),
        (b"data: [DONE]\n\n", [(b"", b"[DONE]")]),
        (b"data: a\n\ndata: b\n\n", [(b"", b"a"), (b"", b"b")]),
        (b"data: a\ndata: b\n\n", [(b"", b"a\nb")]),  # one event, two data lines
        (b"event: message_stop\ndata: {}\n\n", [(b"message_stop", b"{}")]),
        (b"event: a\ndata: 1\n\nevent: b:c\ndata: 2:3\n\n", [(b"a", b"1"), (b"b:c", b"2:3")]),
        (b"event: a\r\ndata: 1\r\n\r\n", [(b"a", b"1")]),
        (b"event:a\ndata:1\n\n", [(b"a", b"1")]),
        (b"event: a\ndata: 1\nid: 7\n\n", [(b"a", b"1")]),
        (b"event: a\nid: 7\ndata: 1\n\n", [(b"a", b"1")]),
        (b"event: ping\n\n", []),
        (b": keep-alive\n\n", []),
        (b"data:x\n\n", [(b"", b"x")]),  # no space after the colon
        (b"data: a\nb", [(b"", b"a")]),  # no blank line (an overlong event forwarded as it is)
    ],
)
def test_events_of_a_block(block: bytes, expected: list[tuple[bytes, bytes]]) -> None:
    assert list(events(block)) == expected


def test_aligner_forwards_whole_events_only() -> None:
    a = Aligner()
    assert a.feed(b"data: 1\n\n") == b"data: 1\n\n"
    assert a.feed(b"data: 2\n\nda") == b"data: 2\n\n"
    assert a.pending == b"da"
    assert a.feed(b"ta: 3\n\n") == b"data: 3\n\n"
    assert a.pending == b""
    assert a.feed(b"data: 4\r\n\r\n") == b"data: 4\r\n\r\n"
