"""The public listener's built-in HTTP/1.1 server (gateway.http1.server), over real sockets.

A recording ASGI application runs behind ``serve_http1`` in a thread of its own; the tests
speak raw bytes to it. The generated requests are also parsed by h11 (the parser Hypercorn
uses): wherever the server takes a request, h11 must read the same method, target, headers
and body from the same bytes, so that no peer and no other proxy can disagree with the
gateway about where a request ends.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import h11
import pytest
import trio
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.http1.server import ServerSettings, serve_http1, tls_context

KEEP_ALIVE = 1.0


@dataclass
class Seen:
    method: str
    raw_path: bytes
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    http_version: str


@dataclass
class Recorder:
    """Answers every request with what it read; a few paths behave specially."""

    seen: list[Seen] = field(default_factory=list)
    disconnects: int = 0
    #: what receive() said when asked again after a disconnect
    after_disconnect: list[str] = field(default_factory=list)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnects += 1
                self.after_disconnect.append((await receive())["type"])
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        seen = Seen(
            scope["method"],
            scope["raw_path"],
            scope["query_string"],
            list(scope["headers"]),
            body,
            scope["http_version"],
        )
        self.seen.append(seen)
        path = scope["raw_path"]
        if path == b"/stream":
            # No Content-Length: chunked for HTTP/1.1, close-delimited for HTTP/1.0.
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for piece in (b"one,", b"two,", b"three"):
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        if path == b"/slow":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"a", "more_body": True})
            # The client goes away; receive tells.
            message = await receive()
            assert message["type"] == "http.disconnect"
            self.disconnects += 1
            return
        if path == b"/too-long":
            headers = [(b"content-length", b"2")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            fake = b"okHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nEVIL!"
            await send({"type": "http.response.body", "body": fake})
            return
        if path == b"/bad-header":
            headers = [(b"x-evil", b"a\r\nx-injected: 1")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            return
        if path == b"/head-only":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            raise RuntimeError("a bug after the head")
        if path == b"/no-content":
            headers = [(b"content-length", b"0"), (b"x-a", b"1")]
            await send({"type": "http.response.start", "status": 204, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        if path == b"/boom":
            raise RuntimeError("a bug in the application")
        if path == b"/boom-late":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"par", "more_body": True})
            raise RuntimeError("a bug in the application, half way through")
        if path == b"/wait":
            await trio.sleep(0.5)
        answer = json.dumps({"method": seen.method, "length": len(body)}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(answer)),
                ],
            }
        )
        await send({"type": "http.response.body", "body": answer})


@dataclass
class Running:
    port: int
    app: Recorder
    stop: Any  # a callable that starts the graceful shutdown


@pytest.fixture(scope="module")
def server() -> Iterator[Running]:
    yield from _running()


def _running(
    ssl_context: ssl.SSLContext | None = None, max_connections: int | None = None
) -> Iterator[Running]:
    app = Recorder()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        stop = trio.Event()
        box["token"] = trio.lowlevel.current_trio_token()
        box["stop"] = stop
        settings = ServerSettings(
            keep_alive_timeout=KEEP_ALIVE,
            write_timeout=5,
            graceful_timeout=2,
            max_connections=max_connections,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: serve_http1(
                    app,
                    sock,
                    settings=settings,
                    ssl_context=ssl_context,
                    shutdown_trigger=stop.wait,
                    task_status=task_status,
                )
            )
            ready.set()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert ready.wait(10)

    def stop() -> None:
        trio.from_thread.run_sync(box["stop"].set, trio_token=box["token"])

    try:
        yield Running(port, app, stop)
    finally:
        stop()
        thread.join(10)
        sock.close()


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    return s


def read_all(s: socket.socket) -> bytes:
    """Reads until the server closes; a reset fails the test."""
    out = b""
    while data := s.recv(65536):
        out += data
    return out


def read_answer(s: socket.socket, buffer: bytearray) -> tuple[bytes, bytes]:
    """One answer framed by Content-Length or chunked: (head, body)."""
    while b"\r\n\r\n" not in buffer:
        data = s.recv(65536)
        assert data, bytes(buffer)
        buffer += data
    end = buffer.index(b"\r\n\r\n")
    head = bytes(buffer[:end])
    del buffer[: end + 4]
    lower = head.lower()
    if b"content-length:" in lower:
        length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
        while len(buffer) < length:
            buffer += s.recv(65536)
        body = bytes(buffer[:length])
        del buffer[:length]
        return head, body
    assert b"transfer-encoding: chunked" in lower, head
    body = b""
    while True:
        while b"\r\n" not in buffer:
            buffer += s.recv(65536)
        line_end = buffer.index(b"\r\n")
        size = int(bytes(buffer[:line_end]), 16)
        while len(buffer) < line_end + 2 + size + 2:
            buffer += s.recv(65536)
        body += bytes(buffer[line_end + 2 : line_end + 2 + size])
        del buffer[: line_end + 2 + size + 2]
        if size == 0:
            return head, body


def get(path: str = "/x", extra: bytes = b"") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: gateway.test\r\n".encode() + extra + b"\r\n"


# --- keep-alive, pipelining, framing of answers ------------------------------------------


def test_one_connection_carries_many_requests_and_pipelined_ones_in_order(server: Running) -> None:
    with connect(server.port) as s:
        buffer = bytearray()
        for _ in range(3):
            s.sendall(get())
            head, body = read_answer(s, buffer)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"connection: close" not in head.lower()
        body = b'{"a": 1}'
        post = b"POST /p?q=1 HTTP/1.1\r\nHost: g\r\nContent-Length: %d\r\n\r\n%b" % (
            len(body),
            body,
        )
        s.sendall(get("/one") + post + get("/three"))
        answers = [read_answer(s, buffer) for _ in range(3)]
    assert [json.loads(b)["method"] for _, b in answers] == ["GET", "POST", "GET"]
    assert json.loads(answers[1][1])["length"] == len(body)
    last = server.app.seen[-3:]
    assert [x.raw_path for x in last] == [b"/one", b"/p", b"/three"]
    assert last[1].query_string == b"q=1" and last[1].body == body


def test_an_answer_without_length_is_chunked_for_http11_and_ends_the_connection_for_http10(
    server: Running,
) -> None:
    with connect(server.port) as s:
        s.sendall(get("/stream"))
        head, body = read_answer(s, bytearray())
    assert body == b"one,two,three"
    with connect(server.port) as s:
        s.sendall(b"GET /stream HTTP/1.0\r\n\r\n")
        answer = read_all(s)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower() and b"connection: close" in head.lower()
    assert body == b"one,two,three"


def test_http10_keeps_the_connection_only_when_asked(server: Running) -> None:
    with connect(server.port) as s:
        s.sendall(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        buffer = bytearray()
        head, _ = read_answer(s, buffer)
        assert b"connection: keep-alive" in head.lower()
        s.sendall(b"GET /b HTTP/1.0\r\n\r\n")
        head, _ = read_answer(s, buffer)
        assert b"connection: close" in head.lower()
        assert s.recv(10) == b""
    assert [x.http_version for x in server.app.seen[-2:]] == ["1.0", "1.0"]


def test_head_answers_carry_no_body(server: Running) -> None:
    with connect(server.port) as s:
        s.sendall(b"HEAD /x HTTP/1.1\r\nHost: g\r\n\r\n" + get("/after"))
        buffer = bytearray()
        while buffer.count(b"\r\n\r\n") < 2:
            buffer += s.recv(65536)
    first, second = bytes(buffer).split(b"\r\n\r\n", 1)
    assert first.startswith(b"HTTP/1.1 200") and b"content-length:" in first.lower()
    # The next bytes are the second answer's head, not the first one's body.
    assert second.startswith(b"HTTP/1.1 200"), second


# --- request bodies ------------------------------------------------------------------------


def test_chunked_bodies_are_decoded_with_extensions_and_trailers(server: Running) -> None:
    chunked = b"3;ext=1\r\nabc\r\n1\r\nd\r\n0\r\nTrailer: x\r\n\r\n"
    request = b"PUT /c HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
    with connect(server.port) as s:
        buffer = bytearray()
        s.sendall(request + get("/next"))
        read_answer(s, buffer)
        read_answer(s, buffer)
    assert server.app.seen[-2].body == b"abcd"
    assert server.app.seen[-1].raw_path == b"/next"


def test_an_absolute_form_target_is_read_as_its_path_with_its_authority_as_host(
    server: Running,
) -> None:
    # RFC 9112 §3.2.2: a server takes the absolute form, and its authority over Host.
    requests = [
        b"GET http://other.example:8448/_matrix/x?y=1 HTTP/1.1\r\nHost: g\r\n\r\n",
        b"GET https://[::1]:8448?q HTTP/1.1\r\nHost: g\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: g\r\n\r\n",
    ]
    with connect(server.port) as s:
        buffer = bytearray()
        s.sendall(b"".join(requests))
        for _ in requests:
            read_answer(s, buffer)
    seen = server.app.seen[-3:]
    assert [(x.raw_path, x.query_string) for x in seen] == [
        (b"/_matrix/x", b"y=1"),
        (b"/", b"q"),
        (b"*", b""),
    ]
    hosts = [[v for k, v in x.headers if k == b"host"] for x in seen]
    assert hosts == [[b"other.example:8448"], [b"[::1]:8448"], [b"g"]]


def test_expect_100_continue_is_answered_before_the_body_is_sent(server: Running) -> None:
    with connect(server.port) as s:
        s.sendall(
            b"PUT /e HTTP/1.1\r\nHost: g\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = s.recv(65536)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"body")
        _, body = read_answer(s, bytearray())
    assert json.loads(body)["length"] == 4


def test_a_body_cut_short_by_the_client_gets_a_400(server: Running) -> None:
    with connect(server.port) as s:
        s.sendall(b"PUT /cut HTTP/1.1\r\nHost: g\r\nContent-Length: 100\r\n\r\nonly this")
        s.shutdown(socket.SHUT_WR)
        answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "Incomplete request body"


def test_a_client_that_goes_away_is_seen_by_the_application(server: Running) -> None:
    before = server.app.disconnects
    with connect(server.port) as s:
        s.sendall(get("/slow"))
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
    deadline = time.monotonic() + 5
    while server.app.disconnects == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.app.disconnects == before + 1


# --- refusals ------------------------------------------------------------------------------

BIG = b"X-Big: " + b"b" * 70_000 + b"\r\n"

REFUSED = {
    "both lengths": (
        b"PUT /x HTTP/1.1\r\nHost: g\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        400,
        "Request has both Content-Length and Transfer-Encoding",
    ),
    "gzip": (
        b"PUT /x HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
        "Transfer coding not implemented",
    ),
    "chunked twice": (
        b"PUT /x HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        501,
        "Transfer coding not implemented",
    ),
    "te in 1.0": (
        b"PUT /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "Transfer-Encoding in an HTTP/1.0 request",
    ),
    "two lengths": (
        b"PUT /x HTTP/1.1\r\nHost: g\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        400,
        "Malformed Content-Length",
    ),
    "signed length": (
        b"PUT /x HTTP/1.1\r\nHost: g\r\nContent-Length: +5\r\n\r\nhello",
        400,
        "Malformed Content-Length",
    ),
    "hex chunk size": (
        b"PUT /x HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0x5\r\nhello\r\n0\r\n\r\n",
        400,
        "Malformed chunked body",
    ),
    "malformed chunk extension": (
        b"PUT /x HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'3;"=\t\x80 x\r\nabc\r\n0\r\n\r\n',
        400,
        "Malformed chunked body",
    ),
    "Host not a host": (
        b"GET /x HTTP/1.1\r\nHost: a b/c@d\r\n\r\n",
        400,
        "Malformed Host header",
    ),
    "fragment in target": (
        b"GET /x#f HTTP/1.1\r\nHost: g\r\n\r\n",
        400,
        "Malformed request target",
    ),
    "relative target": (b"GET x HTTP/1.1\r\nHost: g\r\n\r\n", 400, "Malformed request target"),
    "asterisk not OPTIONS": (b"GET * HTTP/1.1\r\nHost: g\r\n\r\n", 400, "Malformed request target"),
    "bad authority": (
        b"GET http://a b/x HTTP/1.1\r\nHost: g\r\n\r\n",
        400,
        "Malformed request line",
    ),
    "bad absolute authority": (
        b"GET http://a@b/x HTTP/1.1\r\nHost: g\r\n\r\n",
        400,
        "Malformed request target",
    ),
    "bare LF": (b"GET /x HTTP/1.1\nHost: g\n\n", 400, "Malformed request head"),
    "no host": (b"GET /x HTTP/1.1\r\n\r\n", 400, "A request needs exactly one Host header"),
    "two hosts": (
        b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        400,
        "A request needs exactly one Host header",
    ),
    "obs-fold": (
        b"GET /x HTTP/1.1\r\nHost: g\r\nX: a\r\n b\r\n\r\n",
        400,
        "Malformed header field",
    ),
    "space before colon": (b"GET /x HTTP/1.1\r\nHost : g\r\n\r\n", 400, "Malformed header field"),
    "NUL in a value": (
        b"GET /x HTTP/1.1\r\nHost: g\r\nX: a\x00b\r\n\r\n",
        400,
        "Malformed header field",
    ),
    "space in target": (b"GET /a b HTTP/1.1\r\nHost: g\r\n\r\n", 400, "Malformed request line"),
    "non-ASCII target": (
        b"GET /\xc3\xa9 HTTP/1.1\r\nHost: g\r\n\r\n",
        400,
        "Malformed request target",
    ),
    "HTTP/2.0": (b"GET / HTTP/2.0\r\nHost: g\r\n\r\n", 400, "Unsupported HTTP version"),
    "h2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "Unsupported HTTP version"),
    "huge head": (b"GET /x HTTP/1.1\r\nHost: g\r\n" + BIG + b"\r\n", 431, "Request head too large"),
    "garbage": (b"\x16\x03\x01\x00\x2a\x01\x00\x00\x26\r\n\r\n", 400, "Malformed request line"),
}


@pytest.mark.parametrize("case", list(REFUSED), ids=list(REFUSED))
def test_what_http11_does_not_allow_is_refused_with_a_matrix_error_and_no_reset(
    server: Running, case: str
) -> None:
    request, status, reason = REFUSED[case]
    before = len(server.app.seen)
    with connect(server.port) as s:
        # Much more data than the answer: a close without draining it would reset the
        # connection before the client read the answer.
        s.sendall(request + b"x" * 300_000)
        answer = read_all(s)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    assert b"connection: close" in head.lower()
    assert json.loads(body) == {"errcode": "M_UNKNOWN", "error": reason}
    assert len(server.app.seen) == before  # the application never saw it


def test_a_connection_without_a_complete_head_is_closed_unanswered(server: Running) -> None:
    with connect(server.port) as s:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: g\r\n")
        started = time.monotonic()
        assert read_all(s) == b""
        waited = time.monotonic() - started
    assert KEEP_ALIVE * 0.8 < waited < KEEP_ALIVE + 2
    with connect(server.port) as s:
        assert read_all(s) == b""  # idle from the start


def test_an_application_that_fails_costs_one_answer_not_the_listener(server: Running) -> None:
    with connect(server.port) as s:
        s.sendall(get("/boom"))
        answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 500"), answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["errcode"] == "M_UNKNOWN"
    with connect(server.port) as s:
        s.sendall(get("/boom-late"))
        answer = read_all(s)
    # The head was out: the answer ends short (no last chunk), the connection with it.
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"3\r\npar\r\n"), answer
    with connect(server.port) as s:
        s.sendall(get())
        head, _ = read_answer(s, bytearray())
    assert head.startswith(b"HTTP/1.1 200")


def test_a_body_longer_than_its_content_length_never_reaches_the_client(server: Running) -> None:
    with connect(server.port) as s:
        s.sendall(get("/too-long") + get("/after"))
        answer = read_all(s)
    # Nothing of the body goes out (the head waits for it), and no second answer follows:
    # the pipelined request behind it is not served on this connection.
    assert b"EVIL" not in answer and answer.count(b"HTTP/1.1 ") <= 1, answer


@pytest.mark.parametrize("path", ["/bad-header", "/head-only"])
def test_an_answer_the_application_could_not_start_becomes_a_500(
    server: Running, path: str
) -> None:
    with connect(server.port) as s:
        s.sendall(get(path))
        answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 500"), answer
    assert b"x-injected" not in answer.lower()


def test_a_204_carries_no_content_length(server: Running) -> None:
    with connect(server.port) as s:
        s.sendall(get("/no-content") + get("/after"))
        buffer = bytearray()
        while buffer.count(b"\r\n\r\n") < 2:
            buffer += s.recv(65536)
    first, second = bytes(buffer).split(b"\r\n\r\n", 1)
    assert first.startswith(b"HTTP/1.1 204") and b"x-a: 1" in first
    assert b"content-length" not in first.lower()
    assert second.startswith(b"HTTP/1.1 200"), second


def test_http10_gets_no_100_continue(server: Running) -> None:
    with connect(server.port) as s:
        s.sendall(b"PUT /e HTTP/1.0\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\nbody")
        answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 200"), answer


def test_receive_keeps_saying_disconnect(server: Running) -> None:
    before = len(server.app.after_disconnect)
    with connect(server.port) as s:
        s.sendall(b"PUT /cut HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        assert read_all(s).startswith(b"HTTP/1.1 400")
    assert server.app.after_disconnect[before:] == ["http.disconnect"]


def test_graceful_shutdown_finishes_the_answer_in_progress() -> None:
    for running in _running():
        with connect(running.port) as busy, connect(running.port) as idle:
            idle.sendall(get())
            read_answer(idle, bytearray())
            busy.sendall(get("/wait"))
            time.sleep(0.1)
            running.stop()
            answer = read_all(busy)
            assert answer.startswith(b"HTTP/1.1 200") and b"connection: close" in answer.lower()
            assert read_all(idle) == b""


# --- the same bytes, read by h11 -----------------------------------------------------------


@dataclass
class Parsed:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


def h11_parse(data: bytes) -> tuple[list[Parsed], bool]:
    """The requests h11 reads from ``data``, and whether it refused what followed them."""
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(data)
    connection.receive_data(b"")
    out: list[Parsed] = []
    current: Parsed | None = None
    try:
        while True:
            event = connection.next_event()
            if isinstance(event, h11.Request):
                current = Parsed(event.method, event.target, list(event.headers), b"")
            elif isinstance(event, h11.Data):
                assert current is not None
                current.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert current is not None
                out.append(current)
                connection.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
                connection.send(h11.EndOfMessage())
                connection.start_next_cycle()
            else:
                return out, False  # NEED_DATA or ConnectionClosed
    except h11.RemoteProtocolError:
        return out, True


TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
names = st.text(TOKEN_CHARS, min_size=1, max_size=12).filter(
    lambda n: (
        n.lower() not in {"host", "content-length", "transfer-encoding", "connection", "expect"}
    )
)
values = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20)
paths = st.lists(st.text("abcxyz019%-._~!$&'()*+,;=:@", min_size=1, max_size=8), max_size=4)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(["GET", "PUT", "POST", "DELETE", "OPTIONS"]))
    target = "/" + "/".join(draw(paths))
    if draw(st.booleans()):
        target += "?" + draw(st.text("abc=&%20", max_size=10))
    headers = [(draw(names), draw(values)) for _ in range(draw(st.integers(0, 4)))]
    head = f"{method} {target} HTTP/1.1\r\nHost: gateway.test\r\n"
    for name, value in headers:
        before = draw(st.sampled_from(["", " ", "  ", "\t"]))
        after = draw(st.sampled_from(["", " "]))
        head += f"{name}:{before}{value}{after}\r\n"
    body = draw(st.binary(max_size=300))
    framing = draw(
        st.sampled_from(["length", "chunked", "none"] if not body else ["length", "chunked"])
    )
    if framing == "length":
        return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    if framing == "none":
        return (head + "\r\n").encode()
    out = (head + "Transfer-Encoding: chunked\r\n\r\n").encode()
    rest = body
    while rest:
        size = draw(st.integers(1, max(1, len(rest))))
        ext = draw(st.sampled_from([b"", b";a=b", b";x"]))
        out += b"%x%b\r\n%b\r\n" % (size, ext, rest[:size])
        rest = rest[size:]
    return out + b"0\r\n" + draw(st.sampled_from([b"", b"T: v\r\n"])) + b"\r\n"


def our_parse(server: Running, data: bytes, splits: list[int]) -> list[Parsed] | None:
    """The requests the server's application saw (None if the server refused one)."""
    before = len(server.app.seen)
    with connect(server.port) as s:
        last = 0
        for at in [*sorted(set(splits)), len(data)]:
            if at > last:
                s.sendall(data[last:at])
                last = at
        s.shutdown(socket.SHUT_WR)
        answer = read_all(s)
    seen = server.app.seen[before:]
    statuses = [
        int(line.split(b" ")[1]) for line in answer.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")
    ]
    if any(status >= 400 for status in statuses):
        return None
    return [
        Parsed(
            x.method.encode(),
            x.raw_path + (b"?" + x.query_string if x.query_string else b""),
            x.headers,
            x.body,
        )
        for x in seen
    ]


def comparable(
    parsed: list[Parsed],
) -> list[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]]:
    # ASGI has no way to say "an empty query" apart from "no query": "/?" reads as "/".
    return [
        (p.method, p.target.removesuffix(b"?"), [(k.lower(), v) for k, v in p.headers], p.body)
        for p in parsed
    ]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(requests(), min_size=1, max_size=3), st.lists(st.integers(0, 2000), max_size=4))
def test_generated_requests_read_as_h11_reads_them(
    server: Running, messages: list[bytes], splits: list[int]
) -> None:
    data = b"".join(messages)
    theirs, refused = h11_parse(data)
    assert not refused and len(theirs) == len(messages)
    ours = our_parse(server, data, splits)
    assert ours is not None
    assert comparable(ours) == comparable(theirs)


MUTATIONS = [b"\r", b"\n", b" ", b"\t", b"\x00", b":", b",", b";", b"0", b"a", b"\x7f", b"\xff"]


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(requests(), st.data())
def test_a_mutated_request_the_server_takes_is_read_as_h11_reads_it(
    server: Running, message: bytes, data: st.DataObject
) -> None:
    at = data.draw(st.integers(0, len(message)))
    how = data.draw(st.sampled_from(["insert", "replace", "delete"]))
    byte = data.draw(st.sampled_from(MUTATIONS))
    if how == "insert":
        mutated = message[:at] + byte + message[at:]
    elif how == "replace":
        mutated = message[:at] + byte + message[at + 1 :]
    else:
        mutated = message[:at] + message[at + 1 :]
    ours = our_parse(server, mutated, [])
    if not ours:
        return  # refused (or nothing complete to read): nothing to disagree about
    theirs, _ = h11_parse(mutated)
    # Every request taken here is one h11 reads the same way (it may refuse, or read, what
    # follows: a stray byte after the last request, say).
    assert len(ours) <= len(theirs), f"taken here, refused by h11: {mutated!r}"
    assert comparable(ours) == comparable(theirs[: len(ours)]), mutated


# --- TLS -----------------------------------------------------------------------------------


def test_tls_serves_http11_only_and_drops_a_silent_handshake(tmp_path: Any) -> None:
    authority = trustme.CA()
    certificate = authority.issue_cert("gateway.test")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    certificate.cert_chain_pems[0].write_to_path(cert_path)
    certificate.private_key_pem.write_to_path(key_path)
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    client_context.set_alpn_protocols(["h2", "http/1.1"])
    for running in _running(tls_context(str(cert_path), str(key_path))):
        with client_context.wrap_socket(connect(running.port), server_hostname="gateway.test") as s:
            # A peer that offers HTTP/2 first is answered in HTTP/1.1.
            assert s.selected_alpn_protocol() == "http/1.1"
            buffer = bytearray()
            for path in ("/one", "/two"):
                s.sendall(get(path))
                head, body = read_answer(s, buffer)
                assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["method"] == "GET"
        assert [x.raw_path for x in running.app.seen] == [b"/one", b"/two"]
        # A connection that never starts its handshake is closed at the keep-alive timeout.
        with connect(running.port) as silent:
            started = time.monotonic()
            assert read_all(silent) == b""
            assert time.monotonic() - started < KEEP_ALIVE + 2


# --- the connection cap --------------------------------------------------------------------


def test_connections_beyond_the_cap_wait_until_one_closes() -> None:
    for running in _running(max_connections=2):
        first, second = connect(running.port), connect(running.port)
        buffers = [bytearray(), bytearray()]
        for s, buffer in zip((first, second), buffers, strict=True):
            s.sendall(get())
            assert read_answer(s, buffer)[0].startswith(b"HTTP/1.1 200")
        # The kernel completes the third connection, but the server does not take it yet.
        with connect(running.port) as third:
            third.sendall(get("/third"))
            third.settimeout(0.3)
            with pytest.raises(TimeoutError):
                third.recv(10)
            first.close()
            third.settimeout(5)
            head, _ = read_answer(third, bytearray())
            assert head.startswith(b"HTTP/1.1 200")
        second.close()
        assert [x.raw_path for x in running.app.seen][-1] == b"/third"
