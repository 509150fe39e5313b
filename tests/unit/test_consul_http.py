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
from hypothesis import given, settings
from hypothesis import strategies as st

from watcher.consul_http import Answer, Transport, TransportError, _Connection, _Stale


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


@contextmanager
def canned(*answers: bytes, close: bool = False) -> Iterator[tuple[int, list[bytes]]]:
    """A server that answers the n-th request on a connection with ``answers[n]`` sent as
    is (then closes, with ``close``, or when the answers run out)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    heads: list[bytes] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            for answer in answers:
                head = _read_request(conn)
                if not head:
                    return
                heads.append(head)
                conn.sendall(answer)
            if close:
                conn.shutdown(socket.SHUT_RDWR)
            else:
                time.sleep(0.5)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1], heads
    finally:
        listener.close()


def _get(port: int, method: str = "GET", **kw: object) -> Answer:
    return Transport("127.0.0.1", port).request(
        method,
        "/v1/kv/a",
        connect_timeout=2,
        read_timeout=2,
        **kw,  # type: ignore[arg-type]
    )


class TestAnswers:
    """What the transport reads of an answer: every way HTTP/1.1 may frame a body, and
    every broken answer a clean TransportError (sent: the request reached the server)."""

    def test_a_chunked_body(self) -> None:
        answer = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Consul-Index: 7\r\n\r\n"
            b'4;ext=1\r\n[{"a\r\n3\r\n":1\r\n2\r\n}]\r\n0\r\nX-Trailer: t\r\n\r\n'
        )
        with canned(answer) as (port, _):
            got = _get(port)
        assert got.body == b'[{"a":1}]'
        assert got.headers["X-Consul-Index"] == "7"

    def test_interim_answers_are_skipped(self) -> None:
        answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        with canned(answer) as (port, _):
            got = _get(port)
        assert (got.status, got.body) == (200, b"ok")

    def test_fields_by_any_case_and_repeated_fields_joined(self) -> None:
        answer = (
            b"HTTP/1.1 404 Not Found\r\nx-consul-INDEX: 12\r\nVary: a\r\nVary: b\r\n"
            b"Content-Length: 0\r\n\r\n"
        )
        with canned(answer) as (port, _):
            got = _get(port)
        assert got.status == 404 and got.body == b""
        assert got.headers.get("X-Consul-Index") == "12" and "X-CONSUL-INDEX" in got.headers
        assert got.headers["vary"] == "a, b"
        assert got.headers.get("X-Missing") is None

    def test_lf_only_line_ends(self) -> None:
        with canned(b"HTTP/1.1 200 OK\nContent-Length: 3\n\nabc") as (port, _):
            assert _get(port).body == b"abc"

    def test_a_body_up_to_the_close_and_connection_close_are_not_kept(self) -> None:
        for answer in (
            b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        ):
            with canned(answer, close=True) as (port, _):
                t = Transport("127.0.0.1", port)
                got = t.request("GET", "/x", connect_timeout=2, read_timeout=2)
                assert got.status == 200 and got.body in (b"until the end", b"ok")
                assert t._idle == []  # not kept for the next request

    def test_no_body_after_head_204_or_304(self) -> None:
        answers = (
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx",
        )
        with canned(*answers) as (port, heads):
            t = Transport("127.0.0.1", port)
            assert t.request("GET", "/a", connect_timeout=2, read_timeout=2).status == 204
            assert t.request("GET", "/b", connect_timeout=2, read_timeout=2).status == 304
            # the next answer on the same connection is read as its own
            assert t.request("GET", "/c", connect_timeout=2, read_timeout=2).body == b"x"
        assert len(heads) == 3

    def test_bytes_past_the_answer_are_not_read_as_the_next_one(self) -> None:
        both = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\naHTTP/1.1 200 OK\r\n\r\n"
        with canned(both) as (port, _):
            t = Transport("127.0.0.1", port)
            assert t.request("GET", "/a", connect_timeout=2, read_timeout=2).body == b"a"
            assert t._idle == []

    def test_the_request_head(self) -> None:
        ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        with canned(ok, ok) as (port, heads):
            t = Transport("127.0.0.1", port)
            t.request(
                "PUT",
                "/v1/kv/k?cas=0",
                headers={"X-Consul-Token": "secret"},
                connect_timeout=2,
                read_timeout=2,
            )
            t.request("PUT", "/v1/txn", body=b"[]", connect_timeout=2, read_timeout=2)
        first = heads[0].split(b"\r\n")
        assert first[0] == b"PUT /v1/kv/k?cas=0 HTTP/1.1"
        assert f"Host: 127.0.0.1:{port}".encode() in first
        assert b"X-Consul-Token: secret" in first and b"Content-Length: 0" in first
        assert b"Content-Length: 2" in heads[1].split(b"\r\n")

    @pytest.mark.parametrize(
        "answer, says",
        [
            (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x status line"),
            (b"HTTP/1.1 2000 OK\r\n\r\n", "invalid status code"),
            (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "invalid header field"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "invalid Content-Length"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\nx", "invalid Content-Length"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "after 5 of 10 bytes"),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "unsupported Transfer"),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n", "a chunk"),
            (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000, "longer than"),
            (b"HTTP/1.1 200 OK\r\n" + b"X: 1\r\n" * 101 + b"\r\n", "more than 100"),
            (b"HTTP/1.1 200 OK\r\nContent-Le", "in the middle of the answer's header"),
        ],
    )
    def test_a_broken_answer_is_a_clean_error(self, answer: bytes, says: str) -> None:
        with canned(answer, close=True) as (port, _), pytest.raises(TransportError) as info:
            _get(port)
        assert says in str(info.value)
        assert info.value.sent is True

    @pytest.mark.parametrize(
        "target, headers",
        [
            ("/v1/kv/a b", {}),
            ("/v1/kv/a\r\nX-Evil: 1", {}),
            ("/v1/kv/a", {"X-Consul-Token": "t\r\nX-Evil: 1"}),
            ("/v1/kv/a", {"Bad Name": "v"}),
        ],
    )
    def test_nothing_a_caller_passes_can_add_to_the_head(
        self, target: str, headers: dict[str, str]
    ) -> None:
        with pytest.raises(ValueError, match="invalid"):
            Transport("127.0.0.1", 9).request(
                "GET", target, headers=headers, connect_timeout=1, read_timeout=1
            )

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=300))
    def test_any_bytes_read_as_an_answer_or_rejected_cleanly(self, garbage: bytes) -> None:
        conn = _Connection(_BytesSocket(garbage))
        try:
            answer, _ = conn.exchange(b"GET / HTTP/1.1\r\n\r\n", "GET", 1.0)
        except (TransportError, _Stale):
            return
        assert 200 <= answer.status <= 999


class _BytesSocket:
    """Just enough of a socket to feed a connection ``data``, then a close."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def settimeout(self, value: float) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        pass

    def recv(self, size: int) -> bytes:
        chunk, self.data = self.data[:7], self.data[7:]  # small reads: every boundary
        return chunk
