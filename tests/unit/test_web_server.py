"""`watcher web`'s HTTP protocol: a deadline for each request to arrive, a cap on open
connections. A real uvicorn server on a loopback socket, in a thread, serving a small
ASGI app (the guard does not depend on the app), with the limits made small."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from structlog.testing import capture_logs

from watcher.web import server as web_server
from watcher.web.server import _GuardedH11, bind_listen

DEADLINE = 0.6
LINGER = 0.5


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """``/early`` answers 413 without reading the body; ``/slow`` reads it, then answers
    after 1.7 s (longer than the deadline); anything else reads it and answers at once."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/early":  # answered before the body is read, as a 413 is
        headers = [(b"content-length", b"3")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": b"big"})
        return
    while (await receive()).get("more_body"):
        pass
    if scope["path"] == "/slow":
        await asyncio.sleep(2 * DEADLINE + 0.5)
    body = f"ok {scope['path']}".encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def port(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setattr(web_server, "REQUEST_DEADLINE", DEADLINE)
    monkeypatch.setattr(web_server, "MAX_CONNECTIONS", 3)
    monkeypatch.setattr(web_server, "LINGER", LINGER)
    monkeypatch.setattr(web_server, "_CAPPED_LOG_EVERY", 1.0)
    [sock] = bind_listen("127.0.0.1", 0)
    server = uvicorn.Server(
        uvicorn.Config(app, http=_GuardedH11, log_level="warning", timeout_keep_alive=30)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    end = time.monotonic() + 10
    while not server.started and time.monotonic() < end:
        time.sleep(0.02)
    assert server.started
    try:
        yield int(sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_all(conn: socket.socket) -> bytes:
    """Everything until the server closes the connection."""
    out = b""
    while chunk := conn.recv(65536):
        out += chunk
    return out


def closed_after(conn: socket.socket) -> float:
    """Seconds until the server closes ``conn`` without answering (it must not answer)."""
    started = time.monotonic()
    assert read_all(conn) == b""
    return time.monotonic() - started


class TestRequestDeadline:
    def test_a_connection_that_sends_nothing_is_closed(self, port: int) -> None:
        with connect(port) as conn:
            assert DEADLINE * 0.8 < closed_after(conn) < DEADLINE + 3

    def test_headers_that_never_end_are_cut_however_slowly_they_come(self, port: int) -> None:
        """A byte every tenth of a second: each byte would reset an idle timer."""
        with connect(port) as conn:
            started = time.monotonic()
            with pytest.raises(OSError):
                for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
                    conn.sendall(bytes([byte]))
                    time.sleep(0.1)
                    if time.monotonic() - started > DEADLINE + 5:
                        pytest.fail("the connection was still open")
                conn.recv(1)  # not closed yet: no answer either

    def test_a_body_that_never_ends_is_cut(self, port: int) -> None:
        with connect(port) as conn:
            conn.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
            assert closed_after(conn) < DEADLINE + 3

    def test_an_answer_that_takes_longer_than_the_deadline_is_not_cut(self, port: int) -> None:
        with connect(port) as conn:
            conn.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert read_all(conn).endswith(b"\r\n\r\nok /slow")

    def test_each_request_on_a_kept_alive_connection_has_its_own(self, port: int) -> None:
        with connect(port) as conn:
            for path in ("/a", "/slow", "/b"):  # the second's answer outlasts a deadline
                conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                answer = b""
                while not answer.endswith(f"ok {path}".encode()):
                    chunk = conn.recv(65536)
                    assert chunk, f"closed before the answer to {path}"
                    answer += chunk
            conn.sendall(b"GET /c HTTP/1.1\r\nHost: x\r\n")  # and never ends
            assert closed_after(conn) < DEADLINE + 3


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1a\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
)
def test_a_request_the_http_parser_refuses_is_a_json_400_with_the_apps_headers(
    port: int, request_bytes: bytes
) -> None:
    """The web API review: these got uvicorn's text/plain "Invalid HTTP request received."
    without the headers every other answer carries (nosniff, the CSP)."""
    with connect(port) as conn:
        conn.sendall(request_bytes)
        answer = read_all(conn)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer
    lines = head.decode().lower().split("\r\n")
    assert "content-type: application/json" in lines, head
    assert "x-content-type-options: nosniff" in lines, head
    assert any(line.startswith("content-security-policy: ") for line in lines), head
    assert json.loads(body)["error"].startswith("malformed HTTP request"), body


def test_a_request_with_both_content_length_and_transfer_encoding_is_refused_and_closed(
    port: int,
) -> None:
    """RFC 9112 6.1: the server MUST close the connection after such a request. h11 read
    the body as chunked and answered the request hidden behind it on the same connection,
    where a proxy that reads by Content-Length sees it as body (request smuggling)."""
    with connect(port) as conn:
        conn.sendall(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked"
            b"\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        answer = read_all(conn)
    assert b"/smuggled" not in answer and answer.count(b"HTTP/1.1 ") == 1, answer
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer
    assert "connection: close" in head.decode().lower().split("\r\n"), head
    error = json.loads(body)["error"]
    assert "both Content-Length and Transfer-Encoding" in error, error


class TestAnsweredEarly:
    def test_a_client_that_sends_its_whole_body_first_gets_the_answer(self, port: int) -> None:
        """Closed with the body unread, the kernel sent a reset and http.client or
        requests never saw the 413 (0 of 10 with 10 MB, the commit review)."""
        body = b"x" * 10_000_000
        with connect(port) as conn:
            head = f"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
            conn.sendall(head.encode() + body)
            answer = read_all(conn)
        assert answer.startswith(b"HTTP/1.1 413 ") and answer.endswith(b"\r\n\r\nbig"), answer

    def test_a_body_that_goes_on_after_the_answer_is_read_for_a_while_only(self, port: int) -> None:
        with connect(port) as conn:
            conn.sendall(b"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n")
            started = time.monotonic()
            with pytest.raises(OSError):
                while time.monotonic() - started < LINGER + 5:
                    conn.sendall(b"x" * 65536)
                    time.sleep(0.01)
                pytest.fail("still open")
            assert time.monotonic() - started < LINGER + 5


class TestConnectionCap:
    def test_one_over_the_cap_gets_a_503_and_the_slot_comes_back(self, port: int) -> None:
        held = [connect(port) for _ in range(3)]
        try:
            time.sleep(0.2)  # accepted
            with capture_logs() as logs:
                for _ in range(4):
                    with connect(port) as extra:
                        # the request sent before the answer is read: not a reset
                        extra.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 200)
                        answer = read_all(extra)
                    assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer
                    assert b"Retry-After: 5\r\n" in answer and b"Connection: close\r\n" in answer
                first = [e["refused"] for e in logs if e["event"] == "web_connections_capped"]
                time.sleep(1.5)  # _CAPPED_LOG_EVERY: the rest of the minute, summed
                later = [e["refused"] for e in logs if e["event"] == "web_connections_capped"]
            assert first == [1] and later == [1, 3], later
        finally:
            for conn in held:
                conn.close()
        time.sleep(0.2)
        with connect(port) as conn:
            conn.sendall(b"GET /again HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert read_all(conn).endswith(b"ok /again")
