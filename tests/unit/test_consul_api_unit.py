"""Pure logic of the Consul boundary: txn encoding, index and timeout rules, error mapping,
and the retry policy against a scripted local HTTP server (not a Consul fake: it only
answers with the statuses a test needs)."""

from __future__ import annotations

import base64
import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from structlog.testing import capture_logs

from watcher.config import ConsulSettings
from watcher.consul_api import (
    MAX_TXN_OPS,
    ConsulClient,
    ConsulEvent,
    KVEntry,
    TxnOp,
    _reason,
    blocking_timeout,
    classify_response,
    go_duration,
    is_transient_status,
    next_kv_index,
    request_counts,
)
from watcher.errors import (
    ConsulPermissionDenied,
    ConsulRequestError,
    ConsulUnavailable,
)


def b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


class TestGoDuration:
    @pytest.mark.parametrize(
        ("text", "seconds"),
        [
            ("1s", 1.0),
            ("0s", 0.0),
            ("10s", 10.0),
            ("1m30s", 90.0),
            ("500ms", 0.5),
            ("1h0m0s", 3600.0),
            ("1.5s", 1.5),
        ],
    )
    def test_what_consul_prints(self, text: str, seconds: float) -> None:
        assert go_duration(text) == pytest.approx(seconds)

    @pytest.mark.parametrize(
        ("said", "seconds"),
        [("1s", 1.0), ("15s", 15.0), ("0s", None), (None, None), ("soon", None)],
    )
    def test_the_agents_session_ttl_min(
        self, monkeypatch: pytest.MonkeyPatch, said: str | None, seconds: float | None
    ) -> None:
        """A stock agent says "0s" (not set: its servers use their 10 s default), which
        must not read as "any TTL goes" (what 0.0 would)."""
        client = ConsulClient(ConsulSettings())
        body = json.dumps({"DebugConfig": {} if said is None else {"SessionTTLMin": said}})
        monkeypatch.setattr(client, "_direct", lambda *a, **k: type("R", (), {"body": body})())
        assert client.agent_session_ttl_min() == seconds
        client.close()

    @pytest.mark.parametrize("text", ["", "1", "s", "1x", "1s ", "-1s", "1s2", "None"])
    def test_anything_else_is_refused(self, text: str) -> None:
        with pytest.raises(ValueError):
            go_duration(text)


class TestTxnOp:
    def test_set_encodes_value_as_base64(self) -> None:
        assert TxnOp.set("a/b", b"\x00hi") == {
            "KV": {"Verb": "set", "Key": "a/b", "Value": b64(b"\x00hi")}
        }

    def test_cas_carries_index(self) -> None:
        assert TxnOp.cas("k", b"v", 0) == {
            "KV": {"Verb": "cas", "Key": "k", "Value": b64(b"v"), "Index": 0}
        }

    def test_lock_and_unlock_carry_session(self) -> None:
        assert TxnOp.lock("k", b"", "s1")["KV"] == {
            "Verb": "lock",
            "Key": "k",
            "Value": "",
            "Session": "s1",
        }
        assert TxnOp.unlock("k", b"x", "s1")["KV"]["Verb"] == "unlock"

    def test_checks_and_deletes(self) -> None:
        assert TxnOp.get("k") == {"KV": {"Verb": "get", "Key": "k"}}
        assert TxnOp.delete("k") == {"KV": {"Verb": "delete", "Key": "k"}}
        assert TxnOp.delete_cas("k", 7) == {"KV": {"Verb": "delete-cas", "Key": "k", "Index": 7}}
        assert TxnOp.delete_tree("p/") == {"KV": {"Verb": "delete-tree", "Key": "p/"}}
        assert TxnOp.check_index("k", 3) == {"KV": {"Verb": "check-index", "Key": "k", "Index": 3}}
        assert TxnOp.check_not_exists("k") == {"KV": {"Verb": "check-not-exists", "Key": "k"}}
        assert TxnOp.check_session("k", "s") == {
            "KV": {"Verb": "check-session", "Key": "k", "Session": "s"}
        }

    def test_ops_are_json_serialisable(self) -> None:
        json.dumps([TxnOp.set("k", b"\xff\xfe"), TxnOp.check_index("k", 1)])


class TestDecoding:
    def test_kv_entry_from_json(self) -> None:
        entry = KVEntry.from_json(
            {
                "Key": "a",
                "Value": b64(b"v1"),
                "ModifyIndex": 9,
                "CreateIndex": 5,
                "LockIndex": 1,
                "Session": "s",
                "Flags": 2,
            }
        )
        assert entry == KVEntry("a", b"v1", 9, 5, 1, "s", 2)

    def test_kv_entry_without_value_or_session(self) -> None:
        entry = KVEntry.from_json({"Key": "a", "Value": None, "ModifyIndex": 3})
        assert entry.value is None and entry.session is None and entry.lock_index == 0

    def test_event_from_json_decodes_payload(self) -> None:
        ev = ConsulEvent.from_json(
            {
                "ID": "x",
                "Name": "deploy",
                "Payload": b64(b'{"a":1}'),
                "NodeFilter": "",
                "ServiceFilter": "",
                "TagFilter": "",
                "Version": 1,
                "LTime": 42,
            }
        )
        assert ev.payload == b'{"a":1}' and ev.ltime == 42 and ev.name == "deploy"

    def test_event_without_payload(self) -> None:
        assert ConsulEvent.from_json({"ID": "x", "Name": "n", "Payload": None}).payload is None

    def test_undecodable_value_is_a_request_error(self) -> None:
        with pytest.raises(ConsulRequestError, match="undecodable KV value"):
            KVEntry.from_json({"Key": "a", "Value": "!!not base64!!"})


class TestIndexAndTimeouts:
    def test_index_moves_forward(self) -> None:
        assert next_kv_index(10, 12) == 12

    def test_same_index_on_timeout(self) -> None:
        assert next_kv_index(10, 10) == 10

    def test_index_going_backwards_resets_to_zero(self) -> None:
        assert next_kv_index(10, 4) == 0

    def test_index_never_below_one(self) -> None:
        assert next_kv_index(0, 0) == 1

    def test_plain_timeout(self) -> None:
        assert blocking_timeout(10.0, None) == 10.0

    def test_short_wait_gets_one_second_of_jitter_slack(self) -> None:
        assert blocking_timeout(10.0, 5.0) == 5.0 + 1.0 + 10.0

    def test_long_wait_gets_a_sixteenth_of_jitter_slack(self) -> None:
        assert blocking_timeout(10.0, 320.0) == 320.0 + 20.0 + 10.0


class TestErrorMapping:
    addr = "http://127.0.0.9:8500"

    def test_success_maps_to_none(self) -> None:
        assert classify_response(200, "true", what="kv put k", address=self.addr) is None

    def test_403_names_operation_and_token(self) -> None:
        err = classify_response(
            403,
            "Permission denied: token lacks 'key:write' on \"k\"",
            what="kv put watcher/k",
            address=self.addr,
        )
        assert isinstance(err, ConsulPermissionDenied)
        assert "kv put watcher/k" in str(err) and "lacks a permission (Permiss" in str(err)
        assert self.addr in str(err)

    @pytest.mark.parametrize(
        ("status", "body", "said"),
        [
            (403, "ACL not found", "the ACL token is unknown to Consul (ACL not found)"),
            (500, "rpc error: ACL not found", "the ACL token is unknown to Consul"),
            (403, "Permission denied: token lacks 'key:read' on \"k\"", "lacks a permission"),
            (500, "rpc error making call: Permission denied", "lacks a permission"),
            (403, "Forbidden", "the ACL token lacks permission or is unknown (Forbidden)"),
        ],
    )
    def test_a_refusal_says_which_of_unknown_or_lacking_consul_said(
        self, status: int, body: str, said: str
    ) -> None:
        """The attacker review: every refusal said "lacks permission or is unknown", also
        when Consul's own text, quoted after it, said which."""
        err = classify_response(status, body, what="kv get watcher/k", address=self.addr)
        assert isinstance(err, ConsulPermissionDenied)
        assert said in str(err), err
        assert err.unknown_token is ("unknown to Consul" in said), err

    def test_400_is_a_request_error_with_consuls_message(self) -> None:
        err = classify_response(
            400, "Request decode failed: bad\nthing", what="txn of 2 ops", address=self.addr
        )
        assert isinstance(err, ConsulRequestError)
        assert "Request decode failed: bad thing" in str(err) and "\n" not in str(err)
        assert not is_transient_status(400, "x")

    def test_413_says_too_large(self) -> None:
        err = classify_response(413, "payload too large", what="event fire x", address=self.addr)
        assert isinstance(err, ConsulRequestError) and "too large" in str(err)

    @pytest.mark.parametrize("status", [500, 502, 503, 429])
    def test_server_errors_and_throttling_are_transient(self, status: int) -> None:
        err = classify_response(status, "No cluster leader", what="kv get k", address=self.addr)
        assert isinstance(err, ConsulUnavailable) and self.addr in str(err)
        assert is_transient_status(status, "No cluster leader")

    def test_invalid_session_500_is_permanent(self) -> None:
        body = 'rpc error making call: invalid session "abc"'
        err = classify_response(500, body, what="kv put k", address=self.addr)
        assert isinstance(err, ConsulRequestError) and "invalid session" in str(err)
        assert not is_transient_status(500, body)

    def test_permission_denied_inside_a_500_is_permission_denied(self) -> None:
        err = classify_response(500, "rpc error: Permission denied", what="x", address=self.addr)
        assert isinstance(err, ConsulPermissionDenied)


@dataclass
class Script:
    """What the scripted server answers, in order; the last answer repeats."""

    answers: list[tuple[int, str]]
    seen: list[tuple[str, str, str | None]] = field(default_factory=list)
    delay: float = 0.0  # seconds to sleep before answering
    index: str | None = "7"  # the X-Consul-Index header sent (None: none, as a non-Consul server)


@pytest.fixture
def scripted() -> Iterator[tuple[Script, str]]:
    script = Script(answers=[(200, "true")])

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            script.seen.append((self.command, self.path, self.headers.get("X-Consul-Token")))
            status, body = script.answers.pop(0) if len(script.answers) > 1 else script.answers[0]
            time.sleep(script.delay)
            data = body.encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if script.index is not None:
                    self.send_header("X-Consul-Index", script.index)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                pass  # the client gave up (a timeout test)

        do_GET = do_PUT = do_DELETE = _answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield script, f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class TestRetryPolicy:
    def client(self, address: str, deadline: float = 5.0) -> ConsulClient:
        return ConsulClient(
            ConsulSettings(address=address, token="tok-1", timeout=2.0), retry_deadline=deadline
        )

    def test_5xx_is_retried_until_success(self, scripted: tuple[Script, str]) -> None:
        script, address = scripted
        script.answers = [(503, "busy"), (500, "No cluster leader"), (200, "true")]
        assert self.client(address).kv_put("k", b"v") is True
        assert len(script.seen) == 3

    def test_the_same_failure_is_warned_of_once_a_minute_whichever_request(
        self, scripted: tuple[Script, str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A stopped agent made ~9 `consul_retry` warnings a second, one per retry of each
        watch (the review): the same failure again is a debug line for a minute, another
        failure is a warning at once."""
        script, address = scripted
        client = self.client(address)
        with capture_logs() as logs:
            for answers, key in (
                ([(503, "busy"), (503, "busy"), (200, "true")], "a/b"),
                ([(503, "busy"), (200, "true")], "c/d"),  # the same failure, another key
                ([(500, "No cluster leader"), (200, "true")], "a/b"),
            ):
                script.answers = answers
                assert client.kv_put(key, b"v") is True
            warned = [(e["what"], e["error"]) for e in logs if e["log_level"] == "warning"]
            assert [w for w, _ in warned] == ["kv put a/b", "kv put a/b"], warned
            assert "No cluster leader" in warned[1][1]
            assert len([e for e in logs if e["event"] == "consul_retry"]) == 4
            monkeypatch.setattr(client._retry_said, "every", 0.0)  # a minute later
            script.answers = [(500, "No cluster leader"), (200, "true")]
            assert client.kv_put("c/d", b"v") is True
            assert logs[-1]["log_level"] == "warning" and logs[-1]["what"] == "kv put c/d"

    def test_4xx_is_never_retried(self, scripted: tuple[Script, str]) -> None:
        script, address = scripted
        script.answers = [(400, "bad request"), (200, "true")]
        with pytest.raises(ConsulRequestError, match="bad request"):
            self.client(address).kv_put("k", b"v")
        assert len(script.seen) == 1

    def test_403_is_never_retried(self, scripted: tuple[Script, str]) -> None:
        script, address = scripted
        script.answers = [(403, "ACL not found"), (200, "true")]
        with pytest.raises(ConsulPermissionDenied, match="kv get a/b"):
            self.client(address).kv_get("a/b")
        assert len(script.seen) == 1

    def test_a_404_is_an_empty_kv_only_from_consul(self, scripted: tuple[Script, str]) -> None:
        """Consul sends X-Consul-Index with a KV 404; another server's 404 (the address of
        an app, a proxy) must not read as "no such key", "no deploy in flight"."""
        script, address = scripted
        script.answers = [(404, "")]
        client = self.client(address)
        assert client.kv_get("a/b") is None
        assert client.kv_list_checked("a/") == ([], False)
        script.index = None
        for read in (
            lambda: client.kv_get("a/b"),
            lambda: client.kv_list("a/"),
            lambda: client.kv_list_checked("a/"),
            lambda: client.kv_keys("a/"),
        ):
            with pytest.raises(ConsulRequestError, match="without the X-Consul-Index header"):
                read()

    def test_an_error_says_when_its_call_began(self, scripted: tuple[Script, str]) -> None:
        """Retries and timeouts included: how long Consul could not be read is counted from
        the call's start, not from its error (the undecided wait, watcher/daemon.py)."""
        script, address = scripted
        script.answers = [(500, "No cluster leader")]
        script.delay = 0.2  # each answer takes at least this long
        client = self.client(address, deadline=1.0)
        before = time.monotonic()
        with pytest.raises(ConsulUnavailable) as err:
            client.kv_get("k")
        failed_at = time.monotonic()
        assert len(script.seen) >= 2, script.seen  # retried
        assert before <= err.value.started_at
        # the first attempt and every retry came after it: not the last attempt's start
        assert failed_at - err.value.started_at >= script.delay * len(script.seen)
        script.delay = 0.0
        script.answers = [(403, "ACL not found")]
        before = time.monotonic()
        with pytest.raises(ConsulPermissionDenied) as denied:
            client.kv_get("k")
        assert before <= denied.value.started_at <= time.monotonic()

    def test_persistent_5xx_gives_up_at_the_deadline(self, scripted: tuple[Script, str]) -> None:
        script, address = scripted
        script.answers = [(500, "No cluster leader")]
        started = time.monotonic()
        with pytest.raises(ConsulUnavailable, match="No cluster leader"):
            self.client(address, deadline=1.0).kv_get("k")
        assert time.monotonic() - started < 2.5
        assert len(script.seen) >= 3

    def test_txn_over_the_limit_is_refused_before_sending(
        self, scripted: tuple[Script, str]
    ) -> None:
        script, address = scripted
        ops = [TxnOp.set(f"k{i}", b"") for i in range(MAX_TXN_OPS + 1)]
        with pytest.raises(ConsulRequestError, match=f"limit of {MAX_TXN_OPS}"):
            self.client(address).txn(ops)
        assert script.seen == []

    def test_every_endpoint_sends_the_token(self, scripted: tuple[Script, str]) -> None:
        script, address = scripted
        c = self.client(address)
        script.answers = [(200, '[{"Key": "k", "Value": null}]')]
        c.kv_get("k")
        c.kv_get_blocking("k", 3, 0.1)
        c.kv_list("p/")
        c.kv_list_blocking("p/", 3, 0.1)
        script.answers = [(200, '["a"]')]
        c.kv_keys("p/")
        script.answers = [(200, "true")]
        c.kv_put("k", b"v")
        c.kv_delete("k")
        c.session_destroy("s")
        script.answers = [(200, '{"Results": [], "Errors": null}')]
        c.txn([TxnOp.get("k")])
        script.answers = [(200, '{"ID": "x"}')]
        c.session_create("n", 2)
        c.event_fire("e", b"")
        script.answers = [(200, "[]")]
        c.event_list("e")
        c.event_list("e", index="5", wait=0.1)
        c.session_info("s")
        script.answers = [(200, '[{"ID": "s"}]')]
        c.session_renew("s")
        script.answers = [(200, '{"Config": {"NodeName": "n"}}')]
        c.agent_node_name()
        script.answers = [(200, '"127.0.0.1:8300"')]
        c.leader()
        script.answers = [(200, '{"AccessorID": "a"}')]
        c.acl_token_self()
        assert len(script.seen) == 18
        assert {token for _, _, token in script.seen} == {"tok-1"}

    def test_blocking_query_sends_index_and_wait(self, scripted: tuple[Script, str]) -> None:
        script, address = scripted
        script.answers = [(404, "")]
        index, entry = self.client(address).kv_get_blocking("a b", 3, 1.5)
        assert (index, entry) == (7, None)
        method, path, _ = script.seen[0]
        assert method == "GET" and path == "/v1/kv/a%20b?index=3&wait=1500ms"

    def test_a_timed_out_read_is_retried(self, scripted: tuple[Script, str]) -> None:
        script, address = scripted
        script.delay = 0.8
        client = ConsulClient(ConsulSettings(address=address, timeout=0.5), retry_deadline=1.5)
        with pytest.raises(ConsulUnavailable, match="timed out") as info:
            client.kv_get("k")
        assert len(script.seen) >= 2
        # The agent took the connection: not "is the agent running?", but what to look at.
        assert "is the agent running" not in str(info.value)
        assert "gave no answer in 0.5 s: it is stuck, or the Consul servers" in str(info.value)

    def test_a_name_that_does_not_resolve_says_so(self) -> None:
        with pytest.raises(ConsulUnavailable, match="host name does not resolve"):
            self.client("nosuchhost.invalid:8500", deadline=1.0).kv_get("k")

    def test_a_timed_out_txn_is_not_retried(self, scripted: tuple[Script, str]) -> None:
        script, address = scripted
        script.delay = 0.8
        client = ConsulClient(ConsulSettings(address=address, timeout=0.5), retry_deadline=1.5)
        with pytest.raises(ConsulUnavailable, match="may or may not have been applied"):
            client.txn([TxnOp.check_not_exists("d"), TxnOp.set("d", b"commit")])
        with pytest.raises(ConsulUnavailable, match="may or may not have been applied"):
            client.kv_put("k", b"v", cas=3)
        assert len(script.seen) == 2

    def test_a_refused_connection_was_not_sent_so_a_write_is_retried(self) -> None:
        # A txn is retried only when it surely never reached Consul: a refused connection.
        before = request_counts().get("txn", 0)
        with pytest.raises(ConsulUnavailable, match="is the agent running") as info:
            self.client("127.0.0.1:9", deadline=1.0).txn([TxnOp.set("k", b"v")])
        assert "may or may not have been applied" not in str(info.value)
        assert request_counts()["txn"] - before >= 2

    def test_on_retry_is_told_once_what_failed_and_how_long_retries_go_on(self) -> None:
        told: list[tuple[str, float]] = []
        client = ConsulClient(
            ConsulSettings(address="127.0.0.1:9", timeout=0.5),
            retry_deadline=1.0,
            on_retry=lambda error, left: told.append((error, left)),
        )
        for _ in range(2):
            with pytest.raises(ConsulUnavailable):
                client.kv_get("k")
        [(error, left)] = told  # once for the client, not per attempt nor per request
        assert error.startswith("cannot reach Consul at http://127.0.0.1:9 for kv get k")
        assert 0.0 < left <= 1.0

    def test_a_slow_answer_is_said_while_it_is_awaited(
        self, scripted: tuple[Script, str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # A hung agent: the first attempt waited out the whole budget in silence (10 s).
        from watcher import consul_api

        # (1 s: a local answer under a full test run's load took over 0.3 s once.)
        monkeypatch.setattr(consul_api, "SLOW_AFTER", 1.0)
        script, address = scripted
        script.answers = [(404, "")]  # no such key (Consul's 404, with its index)
        told: list[tuple[str, float]] = []
        client = ConsulClient(
            ConsulSettings(address=address, timeout=5.0),
            retry_deadline=5.0,
            on_retry=lambda error, left: told.append((error, left)),
        )
        client.kv_get("fast")
        assert told == []  # an answer in time: nothing said
        script.delay = 2.5
        client.kv_get("slow")  # answered after 2.5 s: said once, while it waited
        client.kv_get("slow")
        [(error, left)] = told
        assert error == f"no answer yet from Consul at http://{address} for kv get slow after 1 s"
        assert 3.0 < left <= 5.0  # said at 1 s (4 s left), not once answered (2.5 s left)

    def test_unreachable_address_fails_fast(self) -> None:
        started = time.monotonic()
        with pytest.raises(ConsulUnavailable, match=r"127\.0\.0\.1:9 .*is the agent running"):
            self.client("127.0.0.1:9", deadline=1.0).kv_get("k")
        assert time.monotonic() - started < 2.5


class TestSettingsOnly:
    """py-consul reads CONSUL_HTTP_* itself and HTTP libraries read proxies and CA bundles
    from the environment; the client must use its ConsulSettings and nothing else."""

    def test_env_token_does_not_override_the_configured_one(
        self, scripted: tuple[Script, str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        script, address = scripted
        monkeypatch.setenv("CONSUL_HTTP_TOKEN", "env-token")
        monkeypatch.setenv("CONSUL_HTTP_ADDR", "127.0.0.1:9")
        monkeypatch.setenv("CONSUL_HTTP_SSL", "true")
        client = ConsulClient(ConsulSettings(address=address, token="tok-1", timeout=2.0))
        script.answers = [(200, "true")]
        assert client.kv_put("k", b"v") is True
        script.answers = [(200, "[]")]
        client.event_list()
        assert [token for _, _, token in script.seen] == ["tok-1", "tok-1"]

    def test_env_token_is_not_used_when_none_is_configured(
        self, scripted: tuple[Script, str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        script, address = scripted
        monkeypatch.setenv("CONSUL_HTTP_TOKEN", "env-token")
        client = ConsulClient(ConsulSettings(address=address, token=None, timeout=2.0))
        script.answers = [(404, "")]
        assert client.kv_get("k") is None
        script.answers = [(200, '{"AccessorID": "a"}')]
        client.acl_token_self()
        assert [token for _, _, token in script.seen] == [None, None]

    def test_proxy_variables_are_ignored(
        self, scripted: tuple[Script, str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        script, address = scripted
        for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(var, "http://127.0.0.1:9")
        for var in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(var, raising=False)
        script.answers = [(200, '"127.0.0.1:8300"')]
        client = ConsulClient(ConsulSettings(address=address, timeout=2.0), retry_deadline=1.0)
        assert client.leader() == "127.0.0.1:8300"
        assert len(script.seen) == 1


class TestStatusFromPyConsul:
    """Statuses reach the error mapping from the response py-consul raised for, not from
    its exception messages."""

    def client(self, address: str) -> ConsulClient:
        return ConsulClient(
            ConsulSettings(address=address, token="tok-1", timeout=2.0), retry_deadline=5.0
        )

    def test_429_from_a_py_consul_endpoint_is_retried(self, scripted: tuple[Script, str]) -> None:
        script, address = scripted
        script.answers = [(429, "rate limit exceeded"), (200, '{"ID": "e1"}')]
        assert self.client(address).event_fire("deploy", b"x") == "e1"
        assert len(script.seen) == 2

    def test_unknown_session_renew_is_false(self, scripted: tuple[Script, str]) -> None:
        script, address = scripted
        script.answers = [(404, "Session id 's' not found")]
        assert self.client(address).session_renew("s") is False
        assert len(script.seen) == 1

    def test_invalid_json_from_a_py_consul_endpoint_is_a_request_error(
        self, scripted: tuple[Script, str]
    ) -> None:
        script, address = scripted
        script.answers = [(200, "not json")]
        with pytest.raises(ConsulRequestError, match="kv list p/"):
            self.client(address).kv_list("p/")
        assert len(script.seen) == 1

    def test_oversized_event_payload_names_the_limit(self, scripted: tuple[Script, str]) -> None:
        script, address = scripted
        script.answers = [(413, "Payload exceeds 300 bytes")]
        with pytest.raises(ConsulRequestError, match="over Consul's user event size limit"):
            self.client(address).event_fire("deploy", b"x" * 400)
        assert len(script.seen) == 1


class _ClientError(Exception):
    """Stands for botocore's ClientError (an S3 answer), which is no OSError."""


_ClientError.__module__ = "botocore.exceptions"


class TestTheReasonOfATransportFailure:
    def test_it_is_not_the_error_the_caller_was_handling(self) -> None:
        """publish withdraws its record while it handles an S3 error: a Consul failure
        then read "cannot reach Consul ...: An error occurred (503) when calling the
        HeadObject operation", the S3 error found through ``__context__``."""
        try:
            raise _ClientError("An error occurred (503) when calling the HeadObject operation")
        except _ClientError:
            try:
                raise ConnectionRefusedError(111, "Connection refused")
            except OSError as exc:
                refused = exc
        assert _reason(refused) == "[Errno 111] Connection refused"

    def test_it_follows_the_transports_own_context(self) -> None:
        try:
            try:
                raise ConnectionResetError(104, "Connection reset by peer")
            except OSError:
                raise RuntimeError("")  # noqa: B904 (implicit context, as urllib3 raises some)
        except RuntimeError as outer:
            wrapped = outer
        assert isinstance(wrapped.__context__, ConnectionResetError)
        assert _reason(wrapped) == "[Errno 104] Connection reset by peer"


class TestOneRetryWindowPerCommand:
    def test_deploys_first_read_does_not_swallow_an_unreachable_consul(self) -> None:
        """`deploy` read the host records first and took any Consul error as "cannot be
        read, check later": with Consul down that spent one retry window (10 s) there and
        another on the next read, so "retrying for up to 10s" failed after ~20 s."""
        from watcher.barrier import DeployStore
        from watcher.ctl_fleet import host_records

        with socket.socket() as sock:  # a port nothing listens on
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        settings = ConsulSettings(address=f"127.0.0.1:{port}", timeout=0.5)
        client = ConsulClient(settings, retry_deadline=0.2)
        try:
            with pytest.raises(ConsulUnavailable):
                host_records(DeployStore(client, "watcher", "web"))
        finally:
            client.close()
