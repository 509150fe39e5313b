"""Deploy notifications: the webhook config, the sender against a real local HTTP receiver."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.support.receiver import Receiver
from watcher.barrier import DeployView
from watcher.config import AppConfig, WebhookSettings, parse_config
from watcher.errors import ConfigError
from watcher.health import Metrics
from watcher.records import Decision, DeployRecord, NodeProgress
from watcher.webhook import DeployNotifier, WebhookSender, chat_text, notifier_for


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.stop()


def wait_until(cond: Any, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


@contextlib.contextmanager
def dribbling(head: bytes, then: bytes) -> Iterator[tuple[str, list[int]]]:
    """A receiver that answers each POST with ``head`` at once, then ``then`` a byte every
    0.2 s; yields its URL and a list that grows by one per POST it took."""
    server = socket.create_server(("127.0.0.1", 0))
    posts: list[int] = []
    stop = threading.Event()

    def answer() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                posts.append(1)
                try:
                    conn.sendall(head)
                    for byte in then:
                        if stop.wait(0.2):
                            return
                        conn.sendall(bytes([byte]))
                except OSError:
                    continue

    threading.Thread(target=answer, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/hook", posts
    finally:
        stop.set()
        server.close()


def view(decision: str | None = None, states: dict[str, tuple[str, str]] | None = None) -> Any:
    rec = DeployRecord(
        id="20260101T000000Z-abc123",
        app="web",
        kind="deploy",
        artifact="main-15eb13af",
        sha256="0" * 64,
        release="20260101T000000Z-main-15eb13af",
        requested_by="alice (web)",
        requested_at="2026-01-01T00:00:00Z",
        expected=["h1", "h2"],
        prepare_deadline="2026-01-01T00:10:00Z",
        apply_deadline="2026-01-01T00:20:00Z",
    )
    nodes = {n: NodeProgress(node=n, state=s, error=e) for n, (s, e) in (states or {}).items()}
    dec = None if decision is None else Decision(decision, "why", "h1", "2026-01-01T00:01:00Z")
    return DeployView(rec, dec, nodes, {}, None, None)


class TestWebhookConfig:
    def parse(self, webhook: Any) -> Any:
        return parse_config(
            {"s3": {"bucket": "b"}, "apps": {"web": {"root": "/srv", "webhook": webhook}}}
        )

    def test_defaults_and_values(self) -> None:
        assert self.parse(None).apps["web"].webhook is None
        hook = self.parse({"url": "https://chat.example/hook"}).apps["web"].webhook
        assert hook == WebhookSettings("https://chat.example/hook", 5.0, 2)
        hook = self.parse({"url": "http://h/x", "timeout": "2s", "retries": 0}).apps["web"].webhook
        assert hook == WebhookSettings("http://h/x", 2.0, 0)

    def test_every_problem_named(self) -> None:
        with pytest.raises(ConfigError) as err:
            self.parse({"url": "ftp://h/x", "timeout": "5m", "retries": 50, "secret": 1})
        text = str(err.value)
        assert "apps.web.webhook.url: must be an http:// or https:// URL" in text
        assert "apps.web.webhook.timeout: must be between 0 and 60 seconds" in text
        assert "apps.web.webhook.retries: must be at most 10" in text
        assert "apps.web.webhook.secret: unknown key" in text
        with pytest.raises(ConfigError, match=r"apps.web.webhook.url: is required"):
            self.parse({"timeout": "1s"})

    def test_a_url_is_never_said_with_its_secret(self) -> None:
        """The attacker review: a scheme typo printed the whole URL (a Slack webhook's
        secret is its path) to the journal at each reload; a user:password in it, which
        urllib never sends, was said in the error logged at every message."""
        secret = "T000/B000/XXXXSECRETXXXX"
        with pytest.raises(ConfigError) as err:
            self.parse({"url": f"htps://hooks.slack.com/services/{secret}"})
        assert 'got "htps://hooks.slack.com/..."' in str(err.value), err.value
        assert secret not in str(err.value)
        with pytest.raises(ConfigError) as err:
            self.parse({"url": "https://bot:S3CRETPASS@hooks.example.com/hook"})
        assert "must not hold a user or password" in str(err.value)
        assert "S3CRETPASS" not in str(err.value)
        for port in ("44x3", "99999"):
            with pytest.raises(ConfigError, match="has no valid port"):
                self.parse({"url": f"https://hooks.example.com:{port}/{secret}"})


class TestWebhookSender:
    def test_posts_json_with_text(self, receiver: Receiver) -> None:
        metrics = Metrics()
        sender = WebhookSender(WebhookSettings(receiver.url, 2.0, 0), app="web", metrics=metrics)
        sender.send({"text": "hello", "event": "committed"})
        wait_until(lambda: len(receiver.bodies) == 1)
        assert receiver.bodies == [{"text": "hello", "event": "committed"}]
        wait_until(lambda: metrics.webhook_sent.labels(app="web")._value.get() == 1)

    def test_retries_a_server_error_then_counts_the_failure(self, receiver: Receiver) -> None:
        receiver.status = 500
        metrics = Metrics()
        sender = WebhookSender(WebhookSettings(receiver.url, 2.0, 2), app="web", metrics=metrics)
        sender.send({"text": "x", "event": "aborted"})
        failures = metrics.webhook_failures.labels(app="web", reason="http")
        wait_until(lambda: failures._value.get() == 1)
        assert len(receiver.bodies) == 3  # the first try and two retries

    def test_a_redirect_is_a_failure_and_is_not_followed(self, receiver: Receiver) -> None:
        """It was followed, as a GET to wherever it pointed (any host the daemon reaches),
        the message lost and counted as sent (the attacker review)."""
        receiver.status = 302
        receiver.location = receiver.url.replace("/hook", "/internal-admin?x=1")
        metrics = Metrics()
        sender = WebhookSender(WebhookSettings(receiver.url, 2.0, 0), app="web", metrics=metrics)
        sender.send({"text": "x", "event": "committed"})
        failures = metrics.webhook_failures.labels(app="web", reason="http")
        wait_until(lambda: failures._value.get() == 1)
        assert receiver.gets == [] and metrics.webhook_sent.labels(app="web")._value.get() == 0

    def test_an_answer_that_is_not_http_is_retried_and_counted(self) -> None:
        """BadStatusLine is no OSError: it was neither retried nor counted (the review)."""
        server = socket.create_server(("127.0.0.1", 0))
        port = server.getsockname()[1]
        served: list[int] = []

        def answer() -> None:
            while len(served) < 2:
                conn, _ = server.accept()
                with conn:
                    conn.recv(65536)
                    # counted before it answers: the sender may count its failure before
                    # this thread runs again (a CI run saw 1 of the 2 tries counted here)
                    served.append(1)
                    conn.sendall(b"HELLO\r\n\r\n")

        threading.Thread(target=answer, daemon=True).start()
        metrics = Metrics()
        sender = WebhookSender(
            WebhookSettings(f"http://127.0.0.1:{port}/hook", 2.0, 1), app="web", metrics=metrics
        )
        try:
            sender.send({"text": "x"})
            failures = metrics.webhook_failures.labels(app="web", reason="network")
            wait_until(lambda: failures._value.get() == 1)
            assert len(served) == 2  # the first try and its retry
        finally:
            server.close()

    def test_a_receiver_that_answers_a_byte_at_a_time_is_cut_at_the_timeout(self) -> None:
        """``timeout`` bounds the whole POST, not each read: a receiver that sent a byte
        every 0.2 s held the thread 20 s against a 1 s timeout, then counted as sent."""
        metrics = Metrics()
        with dribbling(b"", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") as (url, _):
            sender = WebhookSender(WebhookSettings(url, 1.0, 1), app="web", metrics=metrics)
            started = time.monotonic()
            sender.send({"text": "x"})
            failures = metrics.webhook_failures.labels(app="web", reason="network")
            wait_until(lambda: failures._value.get() == 1, timeout=15)
            took = time.monotonic() - started
            # two tries of 1 s and the 0.5 s pause between them; the answer takes 7.6 s
            assert took < 4.0, took
            assert metrics.webhook_sent.labels(app="web")._value.get() == 0

    def test_a_slow_body_after_a_2xx_is_sent_once(self) -> None:
        """The status line says the receiver took the message: a body that dribbles past
        the timeout is cut, and the message is counted sent, not posted again."""
        metrics = Metrics()
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
        with dribbling(head, b"y" * 100) as (url, posts):
            sender = WebhookSender(WebhookSettings(url, 1.0, 2), app="web", metrics=metrics)
            started = time.monotonic()
            sender.send({"text": "x"})
            wait_until(lambda: metrics.webhook_sent.labels(app="web")._value.get() == 1)
            assert time.monotonic() - started < 3.0
            time.sleep(0.5)
            assert posts == [1]

    def test_a_refusing_receiver_is_counted(self) -> None:
        metrics = Metrics()
        # A port nothing listens on: connection refused.
        server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
        port = server.server_address[1]
        server.server_close()
        sender = WebhookSender(
            WebhookSettings(f"http://127.0.0.1:{port}/", 1.0, 1), app="web", metrics=metrics
        )
        sender.send({"text": "x"})
        wait_until(
            lambda: metrics.webhook_failures.labels(app="web", reason="network")._value.get() == 1
        )

    def test_a_hanging_receiver_never_blocks_the_caller(self, receiver: Receiver) -> None:
        receiver.hang.set()
        sender = WebhookSender(WebhookSettings(receiver.url, 30.0, 0), app="web")
        started = time.monotonic()
        for i in range(5):
            sender.send({"text": str(i)})
        took = time.monotonic() - started
        assert receiver.arrived.acquire(timeout=10)  # the first is being posted (and hangs)
        assert took < 10, f"send() blocked for {took:.2f}s (the receiver holds each POST 30 s)"
        receiver.release.set()
        wait_until(lambda: len(receiver.bodies) == 5)
        assert [b["text"] for b in receiver.bodies] == ["0", "1", "2", "3", "4"]

    def test_a_closed_sender_sends_what_it_had_then_ends(self, receiver: Receiver) -> None:
        metrics = Metrics()
        sender = WebhookSender(WebhookSettings(receiver.url, 2.0, 0), app="web", metrics=metrics)
        sender.send({"text": "queued before"})
        sender.close()
        sender.send({"text": "sent after"})
        sender._thread.join(10)
        assert not sender._thread.is_alive()
        assert [b["text"] for b in receiver.bodies] == ["queued before"]
        assert metrics.webhook_failures.labels(app="web", reason="reloaded")._value.get() == 1

    def test_close_never_blocks_on_a_full_queue(self, receiver: Receiver) -> None:
        receiver.hang.set()
        sender = WebhookSender(WebhookSettings(receiver.url, 30.0, 0), app="web")
        sender.send({"text": "0"})
        assert receiver.arrived.acquire(timeout=10)  # the first is being posted (and hangs)
        for i in range(1, 101):
            sender.send({"text": str(i)})  # the queue is full now
        started = time.monotonic()
        sender.close()
        assert time.monotonic() - started < 3.0  # not the receiver's 30 s
        receiver.release.set()
        sender._thread.join(20)
        assert not sender._thread.is_alive()
        assert [b["text"] for b in receiver.bodies] == [str(i) for i in range(101)]

    def test_drain_sends_what_is_queued_before_returning(self, receiver: Receiver) -> None:
        receiver.hang.set()
        sender = WebhookSender(WebhookSettings(receiver.url, 30.0, 0), app="web")
        for i in range(3):
            sender.send({"text": str(i)})
        assert receiver.arrived.acquire(timeout=10)  # the first is being posted (and hangs)
        receiver.release.set()
        assert sender.drain(10.0) == 0
        # Returned only once all three were answered: nothing is left for the exit to lose.
        assert [b["text"] for b in receiver.bodies] == ["0", "1", "2"]
        assert not sender._thread.is_alive()

    def test_drain_gives_up_at_its_timeout_and_counts_what_is_left(
        self, receiver: Receiver
    ) -> None:
        receiver.hang.set()
        sender = WebhookSender(WebhookSettings(receiver.url, 30.0, 0), app="web")
        for i in range(3):
            sender.send({"text": str(i)})
        assert receiver.arrived.acquire(timeout=10)
        started = time.monotonic()
        assert sender.drain(0.5) == 3  # one hanging in its POST, two behind it
        assert 0.4 < time.monotonic() - started < 5.0
        sender.send({"text": "after"})  # a drained sender takes nothing new
        receiver.release.set()
        wait_until(lambda: not sender._thread.is_alive(), 20)
        assert [b["text"] for b in receiver.bodies] == ["0", "1", "2"]


class TestReload:
    def test_a_new_webhook_takes_over_without_sending_an_event_twice(self) -> None:
        old_r, new_r = Receiver(), Receiver()
        try:
            old = notifier_for(AppConfig("web", "/srv", webhook=WebhookSettings(old_r.url, 2.0, 0)))
            assert old is not None
            old.started(view(), node="h1")
            changed = AppConfig("web", "/srv", webhook=WebhookSettings(new_r.url, 2.0, 0))
            new = notifier_for(changed, replacing=old)
            assert new is not None
            new.started(view(), node="h1")  # already sent by the notifier it replaces
            new.ended(view("commit", {"h1": ("live", "")}), "committed", node="h1")
            wait_until(lambda: len(new_r.bodies) == 1)
            old.sender._thread.join(10)
            assert not old.sender._thread.is_alive()  # no thread left idle per reload
            time.sleep(0.3)
            assert [b["event"] for b in old_r.bodies] == ["started"]
            assert [b["event"] for b in new_r.bodies] == ["committed"]
            # A reload that removes the webhook ends the sender too.
            assert notifier_for(AppConfig("web", "/srv"), replacing=new) is None
            new.sender._thread.join(10)
            assert not new.sender._thread.is_alive()
        finally:
            old_r.stop()
            new_r.stop()


class TestDeployNotifier:
    def test_one_message_per_event(self, receiver: Receiver) -> None:
        notifier = DeployNotifier(WebhookSender(WebhookSettings(receiver.url, 2.0, 0), app="web"))
        undecided = view()
        notifier.started(undecided, node="h1")
        notifier.started(undecided, node="h1")  # same deploy: no second
        committed = view("commit", {"h1": ("live", ""), "h2": ("live", "")})
        notifier.ended(committed, "committed", node="h1")
        notifier.ended(committed, "committed", node="h1")  # once per deploy and event
        wait_until(lambda: len(receiver.bodies) == 2)
        time.sleep(0.3)
        assert [b["event"] for b in receiver.bodies] == ["started", "committed"]
        assert receiver.bodies[1]["requested_by"] == "alice (web)"
        assert "committed" in receiver.bodies[1]["text"]

    def test_abort_names_failing_hosts_and_reasons(self, receiver: Receiver) -> None:
        notifier = DeployNotifier(WebhookSender(WebhookSettings(receiver.url, 2.0, 0), app="web"))
        aborted = view("abort", {"h1": ("aborted", ""), "h2": ("failed", "post_release: status 3")})
        notifier.ended(aborted, "aborted", node="h1")
        notifier.ended(aborted, "aborted", node="h1")
        wait_until(lambda: len(receiver.bodies) == 1)
        time.sleep(0.3)
        [body] = receiver.bodies
        assert body["event"] == "aborted"
        assert body["failing_hosts"] == {"h2": "post_release: status 3"}
        assert "h2: post_release: status 3" in body["text"]

    def test_the_chat_text_names_ten_failing_hosts_and_cuts_each_error(
        self, receiver: Receiver
    ) -> None:
        """Every host may write a 4,000-character error: 40 of them made a 160 KB chat
        message (the review). The text names ten, each cut; the fields keep them whole."""
        notifier = DeployNotifier(WebhookSender(WebhookSettings(receiver.url, 2.0, 0), app="web"))
        states = {f"h{i:02d}": ("failed", f"h{i:02d} says " + "x" * 3990) for i in range(40)}
        notifier.ended(view("abort", states), "aborted", node="h00")
        wait_until(lambda: len(receiver.bodies) == 1)
        [body] = receiver.bodies
        text = body["text"]
        assert len(text) < 5000, len(text)
        assert "h09: h09 says xxx" in text and "h10:" not in text
        assert text.endswith("; and 30 more failing hosts")
        assert "(3999 characters)" in text  # "h00 says " and 3,990 x
        # the fields: every host, each error cut at 2,000 characters (the review: the
        # body was 160 KB)
        assert len(body["failing_hosts"]) == 40
        assert body["failing_hosts"]["h39"] == ("h39 says " + "x" * 3990)[:2000] + " [cut]"
        assert len(json.dumps(body)) < 100_000

    def test_what_hosts_wrote_is_escaped_in_the_chat_text(self, receiver: Receiver) -> None:
        """A host's error (any host's token writes its own) cannot ping the channel, hide a
        link or carry a terminal escape in the text chats show; the structured fields keep
        the raw values for programs."""
        notifier = DeployNotifier(WebhookSender(WebhookSettings(receiver.url, 2.0, 0), app="web"))
        error = "\x1b[2J<!channel> <https://evil.example|details> & more"
        aborted = view("abort", {"h1": ("aborted", ""), "h2": ("failed", error)})
        notifier.ended(aborted, "aborted", node="h1")
        wait_until(lambda: len(receiver.bodies) == 1)
        [body] = receiver.bodies
        assert body["failing_hosts"] == {"h2": error}
        assert (
            "h2: \\x1b[2J&lt;!channel&gt; &lt;https://evil.example|details&gt; &amp; more"
            in body["text"]
        )
        assert "<" not in body["text"] and "\x1b" not in body["text"]

    def test_mentions_of_everyone_and_markdown_links_are_inert(self) -> None:
        """Mattermost (and Slack, when a hook links names) pings a whole channel for
        ``@channel``/``@all``/``@here`` and renders ``[text](url)`` as a hidden link:
        anything a reason or a host's error says is shown as written, and does neither."""
        text = chat_text("@channel @ALL see @here: [details](https://evil.example) @alice")
        assert text == (
            "@\u200bchannel @\u200bALL see @\u200bhere: "
            "[details]\u200b(https://evil.example) @\u200balice"
        )
        # A person or a group is paged as well as everyone: none of them, from what hosts
        # wrote (the review). An address is not a mention and stays whole.
        assert chat_text("mail ops@all.example, @channels, @on-call, @jörg") == (
            "mail ops@all.example, @\u200bchannels, @\u200bon-call, @\u200björg"
        )
        assert chat_text("requested by alice@web-1 (web)") == "requested by alice@web-1 (web)"
        # Mattermost trims underscores off a mention: those ping too.
        assert chat_text("_@channel @here__ (@all)") == (
            "_@\u200bchannel @\u200bhere__ (@\u200ball)"
        )
        # A line of its own would define a hidden reference link: kept on one line.
        error = "disk full\n[r]: https://evil.example\nsee [details][r]"
        assert chat_text(error) == "disk full\\n[r]: https://evil.example\\nsee [details][r]"
