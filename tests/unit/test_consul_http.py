"""The transport under py-consul (watcher/consul_http.py) against small local servers:
keep-alive, an agent that closes idle connections, timeouts and what each says about
whether the request could have reached the agent."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from watcher.consul_http import Transport, TransportError


def _read_request(conn: socket.socket) -> bytes:
    """One request's head and body (by Content-Length), or b"" when the peer closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        body += conn.recv(65536)
    return head


@contextmanager
def server(behave: str) -> Iterator[tuple[int, list[str]]]:
    """A raw HTTP server on loopback. ``behave``:
    keepalive: answers every request on a connection and keeps it open;
    close-after-one: answers one request, then closes the idle connection;
    silent: reads the request and never answers;
    hangup: reads the request and closes without answering."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    seen: list[str] = []
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while not stop.is_set():
                head = _read_request(conn)
                if not head:
                    return
                seen.append(head.split(b"\r\n")[0].decode())
                if behave == "silent":
                    stop.wait(10)
                    return
                if behave == "hangup":
                    return
                body = b'{"ok":true}'
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Consul-Index: 9\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                if behave == "close-after-one":
                    time.sleep(0.05)
                    conn.shutdown(socket.SHUT_RDWR)
                    return

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1], seen
    finally:
        stop.set()
        listener.close()


def test_keep_alive_reuses_one_connection() -> None:
    with server("keepalive") as (port, seen):
        t = Transport("127.0.0.1", port)
        for _ in range(3):
            answer = t.request("GET", "/v1/kv/a", connect_timeout=2, read_timeout=2)
            assert answer.status == 200 and answer.body == b'{"ok":true}'
            assert answer.headers["x-consul-index"] == "9"
        assert len(t._idle) == 1  # one connection carried all three
        assert seen == ["GET /v1/kv/a HTTP/1.1"] * 3
        t.close()


def test_a_get_on_a_connection_the_agent_closed_goes_out_on_a_new_one() -> None:
    with server("close-after-one") as (port, seen):
        t = Transport("127.0.0.1", port)
        t.request("GET", "/v1/kv/a", connect_timeout=2, read_timeout=2)
        time.sleep(0.3)  # the agent closed the idle connection
        answer = t.request("GET", "/v1/kv/b", connect_timeout=2, read_timeout=2)
        assert answer.status == 200
        assert seen == ["GET /v1/kv/a HTTP/1.1", "GET /v1/kv/b HTTP/1.1"]


def test_a_refused_connection_was_not_sent() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TransportError) as info:
        Transport("127.0.0.1", port).request(
            "PUT", "/v1/txn", body=b"[]", connect_timeout=2, read_timeout=2
        )
    assert info.value.sent is False and not info.value.timeout
    assert "refused" in str(info.value).lower()


def test_no_answer_is_a_timeout_that_may_have_been_applied() -> None:
    with server("silent") as (port, seen):
        started = time.monotonic()
        with pytest.raises(TransportError) as info:
            Transport("127.0.0.1", port).request(
                "PUT", "/v1/txn", body=b"[]", connect_timeout=2, read_timeout=0.3
            )
        assert info.value.sent is True and info.value.timeout is True
        assert time.monotonic() - started < 2
        assert seen == ["PUT /v1/txn HTTP/1.1"]


def test_a_write_whose_connection_broke_is_not_resent() -> None:
    with server("hangup") as (port, seen):
        with pytest.raises(TransportError, match="closed before Consul answered") as info:
            Transport("127.0.0.1", port).request(
                "PUT", "/v1/kv/k?cas=3", body=b"v", connect_timeout=2, read_timeout=2
            )
        assert info.value.sent is True
        assert seen == ["PUT /v1/kv/k?cas=3 HTTP/1.1"]  # once, never repeated


def test_many_threads_share_one_transport() -> None:
    with server("keepalive") as (port, seen):
        t = Transport("127.0.0.1", port)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(20):
                    assert t.request("GET", "/x", connect_timeout=2, read_timeout=2).status == 200
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(12)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        assert not errors
        assert len(seen) == 240
        assert len(t._idle) <= 8  # the pool keeps at most POOL_SIZE idle connections
        t.close()
        assert t._idle == []
