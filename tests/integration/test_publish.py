"""`watcherctl publish` against a real Consul agent and the moto S3 server."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.support.cluster import ClusterSpec, ConsulCluster
from tests.support.s3server import s3_client
from watcher import publish as publish_module
from watcher.config import Config, S3Settings, parse_config
from watcher.consul_api import ConsulClient
from watcher.errors import (
    ArtifactIdTaken,
    ArtifactRefused,
    ConfigError,
    ConsulUnavailable,
    PayloadError,
    S3Error,
    S3Unavailable,
)
from watcher.publish import BUILD_FINISHED, publish_artifact
from watcher.records import ArtifactRecord, Keys
from watcher.s3 import S3Store

CLUSTER = ClusterSpec(hosts=1)
COMMIT = "15eb13af0123456789abcdef0123456789abcdef"
ARTIFACT = "master-15eb13af"
WATCHERCTL = Path(sys.executable).parent / "watcherctl"
# Nothing listens here: connections are refused at once.
DEAD_ADDRESS = "127.0.0.1:9"


def write_config(
    cluster: ConsulCluster, s3: S3Settings, root: Path, **consul: Any
) -> dict[str, Any]:
    return {
        "kv_prefix": "watcher",
        "consul": {"address": cluster.hosts[0].http_addr, **consul},
        "s3": {
            "bucket": s3.bucket,
            "prefix": s3.prefix,
            "region": s3.region,
            "endpoint_url": s3.endpoint_url,
        },
        "apps": {"web": {"root": str(root)}},
    }


@pytest.fixture
def config_data(cluster: ConsulCluster, s3_settings: S3Settings, tmp_path: Path) -> dict[str, Any]:
    return write_config(cluster, s3_settings, tmp_path / "srv")


@pytest.fixture
def config(config_data: dict[str, Any]) -> Config:
    return parse_config(config_data, env={})


@pytest.fixture
def consul(cluster: ConsulCluster) -> Any:
    client = ConsulClient(cluster.hosts[0].consul_settings())
    yield client
    client.close()


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    (root / ".watcher/hooks").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "app.py").write_text("print('v1')\n")
    (root / "tests/test_app.py").write_text("def test(): pass\n")
    (root / ".watcher/hooks/post_release").write_text("#!/bin/sh\ntrue\n")
    (root / ".watcher/hooks/post_release").chmod(0o755)
    (root / ".watcher/manifest.yaml").write_text("exclude: ['tests/**']\n")
    return root


def publish(config: Config, src: Path, **kwargs: Any) -> ArtifactRecord:
    args: dict[str, Any] = {
        "branch": "master",
        "commit": COMMIT,
        "build_number": "42",
        "build_url": "https://buildkite.example/acme/web/builds/42",
        "created_by": "ci@test",
        "retry_deadline": 1.0,
    }
    args.update(kwargs)
    return publish_artifact(config, "web", src, **args)


def events_for(consul: ConsulClient, artifact: str, *, count: int = 0) -> list[dict[str, Any]]:
    """The agent's ``build-finished`` events for ``artifact``.

    Events reach the agent's list through gossip, a moment after they were fired: wait for
    ``count`` of them, or (count 0) for a marker fired now, so absent ones are really absent.
    """
    marker = f"marker-{uuid.uuid4().hex[:8]}"
    if not count:
        consul.event_fire(BUILD_FINISHED, json.dumps({"app": "web", "artifact": marker}).encode())
    deadline = time.monotonic() + 10
    while True:
        _, events = consul.event_list(BUILD_FINISHED)
        payloads = [json.loads(e.payload or b"{}") for e in events]
        found = [p for p in payloads if p.get("artifact") == artifact]
        ready = len(found) >= count if count else any(p["artifact"] == marker for p in payloads)
        if ready or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def kv_record(consul: ConsulClient, artifact: str) -> ArtifactRecord | None:
    entry = consul.kv_get(Keys("watcher", "web").artifact(artifact))
    return None if entry is None else ArtifactRecord.from_json(entry.value)


def s3_object(s3: S3Settings, artifact: str) -> dict[str, Any] | None:
    client = s3_client(s3.endpoint_url)
    key = f"{s3.prefix}/web/{artifact}.tar.gz"
    try:
        got = client.get_object(Bucket=s3.bucket, Key=key)
    except client.exceptions.NoSuchKey:
        return None
    return {"body": got["Body"].read(), "metadata": got["Metadata"]}


def put_object(s3: S3Settings, artifact: str, body: bytes, *, sha256: str) -> None:
    """An object at ``artifact``'s key that no publish of this test uploaded."""
    key = f"{s3.prefix}/web/{artifact}.tar.gz"
    s3_client(s3.endpoint_url).put_object(
        Bucket=s3.bucket, Key=key, Body=body, Metadata={"sha256": sha256}
    )


def nothing_written(consul: ConsulClient, s3: S3Settings, keys_before: list[str]) -> None:
    """No key added under the prefix since ``keys_before``, and no object in the bucket."""
    assert consul.kv_keys("watcher/", separator=None) == keys_before
    listed = s3_client(s3.endpoint_url).list_objects_v2(Bucket=s3.bucket)
    assert listed["KeyCount"] == 0


class TestPublish:
    def test_publish_uploads_records_and_announces(
        self, config: Config, consul: ConsulClient, s3_settings: S3Settings, src: Path
    ) -> None:
        seen: list[tuple[int, int]] = []
        record = publish(config, src, progress=lambda sent, total: seen.append((sent, total)))

        obj = s3_object(s3_settings, ARTIFACT)
        assert obj is not None
        digest = hashlib.sha256(obj["body"]).hexdigest()
        assert obj["metadata"] == {"sha256": digest}
        assert seen and seen[-1] == (len(obj["body"]), len(obj["body"]))

        stored = kv_record(consul, ARTIFACT)
        assert stored == record
        assert stored.id == ARTIFACT
        assert stored.url == f"s3://{s3_settings.bucket}/artifacts/web/{ARTIFACT}.tar.gz"
        assert (stored.sha256, stored.size) == (digest, len(obj["body"]))
        assert (stored.branch, stored.commit) == ("master", COMMIT)
        assert stored.build_number == "42"
        assert stored.build_url == "https://buildkite.example/acme/web/builds/42"
        assert stored.created_at.endswith("Z") and stored.created_by == "ci@test"
        assert stored.format == "tar.gz"
        raw = consul.kv_get(Keys("watcher", "web").artifact(ARTIFACT))
        assert raw is not None and "uploading" not in json.loads(raw.value or b"")  # finished

        assert events_for(consul, ARTIFACT, count=1) == [{"app": "web", "artifact": ARTIFACT}]

    def test_publishing_the_same_tree_again_is_idempotent(
        self, config: Config, consul: ConsulClient, src: Path
    ) -> None:
        first = publish(config, src, artifact_id="idem-1")
        (src / "app.py").touch()  # mtimes do not matter
        again = publish(config, src, artifact_id="idem-1", created_by="someone@else")

        assert again == first  # the original record, created_at and created_by kept
        assert kv_record(consul, "idem-1") == first
        assert len(events_for(consul, "idem-1", count=2)) == 2  # re-announced

    def test_a_record_published_with_another_prefix_is_named_as_the_problem(
        self, config_data: dict[str, Any], src: Path
    ) -> None:
        """A first publish with a wrong s3.prefix, then the fixed config: the same bytes
        find that record, whose url is outside the prefix; the refusal says the record is
        the problem and what to do, not only that the url is outside the prefix."""
        wrong = parse_config(
            {**config_data, "s3": {**config_data["s3"], "prefix": "builds"}}, env={}
        )
        publish(wrong, src, artifact_id="prefix-1")
        with pytest.raises(ArtifactRefused) as caught:
            publish(parse_config(config_data, env={}), src, artifact_id="prefix-1")
        message = str(caught.value)
        assert "outside the configured prefix" in message, message
        key = "watcher/apps/web/artifacts/prefix-1"
        assert f"the existing record {key} of artifact prefix-1 points there" in message
        assert f"consul kv delete {key}" in message, message

    def test_other_content_under_an_existing_id_is_refused(
        self, config: Config, consul: ConsulClient, s3_settings: S3Settings, src: Path
    ) -> None:
        first = publish(config, src, artifact_id="clash-1")
        (src / "app.py").write_text("print('v2')\n")

        with pytest.raises(ArtifactRefused) as err:
            publish(config, src, artifact_id="clash-1")

        message = str(err.value)
        assert f"already exists with sha256 {first.sha256}" in message
        assert "this build is " in message
        theirs = message.rsplit("this build is ", 1)[1][:64]
        assert len(theirs) == 64 and theirs != first.sha256
        assert kv_record(consul, "clash-1") == first
        obj = s3_object(s3_settings, "clash-1")
        assert obj is not None and hashlib.sha256(obj["body"]).hexdigest() == first.sha256
        assert len(events_for(consul, "clash-1")) == 1  # only the first publish's

    def test_an_id_whose_pin_does_not_parse_is_refused_before_anything_is_written(
        self, config: Config, consul: ConsulClient, s3_settings: S3Settings, src: Path
    ) -> None:
        """Hosts refuse every record of an id whose pin does not parse: publish says so
        at once instead of uploading a build nobody can deploy."""
        pin_key = Keys("watcher", "web").pin("badpin-1")
        assert consul.kv_put(pin_key, b"{not json")
        keys_before = consul.kv_keys("watcher/", separator=None)
        with pytest.raises(ArtifactRefused) as err:
            publish(config, src, artifact_id="badpin-1")
        assert f"its pin {pin_key} does not parse" in str(err.value), err.value
        assert "publish under another --artifact-id" in str(err.value)
        nothing_written(consul, s3_settings, keys_before)
        assert events_for(consul, "badpin-1") == []

    def test_a_rival_that_wrote_the_record_and_withdrew_it_is_told_apart(
        self,
        config: Config,
        consul: ConsulClient,
        s3_settings: S3Settings,
        src: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Another publish creates the record just before this one's create (which then
        fails), and withdraws it again (its upload failed) before this one reads the
        winner: nothing to compare with, so "publish again", not "already exists"."""
        key = Keys("watcher", "web").artifact("race-1")
        real = publish_module._write_record

        def rival_around(*args: Any, **kwargs: Any) -> bool:
            assert consul.kv_put(key, b'{"rival": true}', cas=0)
            wrote = real(*args, **kwargs)
            consul.kv_delete(key)
            return wrote

        monkeypatch.setattr(publish_module, "_write_record", rival_around)
        before = consul.kv_keys("watcher/", separator=None)
        with pytest.raises(ArtifactRefused) as err:
            publish(config, src, artifact_id="race-1")
        assert not isinstance(err.value, ArtifactIdTaken)
        assert str(err.value) == (
            f"artifact race-1: another publish wrote {key} first and withdrew it again; "
            "publish again"
        )
        nothing_written(consul, s3_settings, before)
        monkeypatch.undo()
        assert publish(config, src, artifact_id="race-1") == kv_record(consul, "race-1")

    def test_a_record_replaced_while_this_publish_uploaded_is_not_reported_published(
        self,
        config: Config,
        consul: ConsulClient,
        src: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """While this publish uploads, another publish of other bytes (a retry of a build
        that is not reproducible) finds no object yet, judges the record stale and replaces
        it: this publish used to report "published" over a record of other bytes."""
        key = Keys("watcher", "web").artifact("mid-1")
        real = S3Store.create_file

        def replaced_meanwhile(self: S3Store, *args: Any, **kwargs: Any) -> bool:
            created = real(self, *args, **kwargs)
            entry = consul.kv_get(key)
            assert entry is not None and entry.value is not None
            theirs = {**json.loads(entry.value), "sha256": "e" * 64}
            assert consul.kv_put(key, json.dumps(theirs).encode(), cas=entry.modify_index)
            return created

        monkeypatch.setattr(S3Store, "create_file", replaced_meanwhile)
        with pytest.raises(ArtifactIdTaken) as err:
            publish(config, src, artifact_id="mid-1")
        assert "e" * 64 in str(err.value)
        assert not events_for(consul, "mid-1")  # never announced

    def test_two_branches_that_give_one_id_are_told_apart_in_the_refusal(
        self, config: Config, consul: ConsulClient, src: Path
    ) -> None:
        """`release/1.2` and `release-1.2` at one commit both become `release-1.2-<sha>`: the
        refusal says so and how to publish the second (otherwise it reads as a mystery)."""
        first = publish(config, src, branch="release/1.2")
        assert first.id == f"release-1.2-{COMMIT[:8]}"
        (src / "app.py").write_text("print('the other branch')\n")
        with pytest.raises(ArtifactRefused) as err:
            publish(config, src, branch="release-1.2")
        message = str(err.value)
        assert "published from branch 'release/1.2', and this build's branch" in message
        assert "'release-1.2' gives the same id" in message and "--artifact-id" in message
        assert kv_record(consul, first.id) == first

    def test_an_unrecorded_object_with_other_content_is_replaced(
        self, config: Config, consul: ConsulClient, s3_settings: S3Settings, src: Path
    ) -> None:
        """No record and no pin names it: an orphan of a failed publish, nobody can have
        verified it; the publish that holds the record replaces it."""
        put_object(s3_settings, "stray-1", b"not ours", sha256="0" * 64)
        record = publish(config, src, artifact_id="stray-1")
        assert kv_record(consul, "stray-1") == record
        obj = s3_object(s3_settings, "stray-1")
        assert obj is not None and hashlib.sha256(obj["body"]).hexdigest() == record.sha256
        assert obj["metadata"] == {"sha256": record.sha256}
        assert events_for(consul, "stray-1", count=1) == [{"app": "web", "artifact": "stray-1"}]

    def test_an_orphan_a_host_pinned_is_not_replaced(
        self, config: Config, consul: ConsulClient, s3_settings: S3Settings, src: Path
    ) -> None:
        put_object(s3_settings, "stray-2", b"not ours", sha256="0" * 64)
        pin = {"version": 1, "artifact": "stray-2", "sha256": "0" * 64, "size": 8}
        pin["url"] = f"s3://{s3_settings.bucket}/artifacts/web/stray-2.tar.gz"
        consul.kv_put(Keys("watcher", "web").pin("stray-2"), json.dumps(pin).encode())
        with pytest.raises(ArtifactRefused, match=f"already exists with sha256 {'0' * 64}"):
            publish(config, src, artifact_id="stray-2")
        assert kv_record(consul, "stray-2") is None
        obj = s3_object(s3_settings, "stray-2")
        assert obj is not None and obj["body"] == b"not ours"

    def test_a_missing_bucket_withdraws_the_record_and_says_no_object_remains(
        self,
        cluster: ConsulCluster,
        s3_settings: S3Settings,
        consul: ConsulClient,
        src: Path,
        tmp_path: Path,
    ) -> None:
        """The install review's first publish (the bucket not created yet) said its object
        'may remain': nothing can have been uploaded to a bucket that does not exist."""
        missing = replace(s3_settings, bucket=f"no-such-bucket-{uuid.uuid4().hex[:8]}")
        config = parse_config(write_config(cluster, missing, tmp_path / "srv"), env={})
        with pytest.raises(S3Error) as err:
            publish(config, src, artifact_id="nobucket-1")
        said = str(err.value)
        key = Keys("watcher", "web").artifact("nobucket-1")
        assert f"withdrew its record {key}" in said and "may remain" not in said, said
        assert kv_record(consul, "nobucket-1") is None

    def test_s3_failing_the_first_look_says_no_object_remains(
        self, config: Config, consul: ConsulClient, src: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The newcomer pass: S3 failing the HEAD before any upload, the publish still said
        its object "may remain", though nothing was sent."""

        def head_503(self: S3Store, key: str) -> dict[str, Any] | None:
            raise S3Unavailable("S3 unavailable: HEAD: 503: Service Unavailable")

        monkeypatch.setattr(S3Store, "head", head_503)
        with pytest.raises(S3Unavailable) as err:
            publish(config, src, artifact_id="nohead-1")
        key = Keys("watcher", "web").artifact("nohead-1")
        assert f"withdrew its record {key}" in str(err.value), str(err.value)
        assert "may remain" not in str(err.value), str(err.value)
        assert kv_record(consul, "nohead-1") is None
        monkeypatch.undo()

    def test_a_failed_verification_leaves_an_object_the_next_build_replaces(
        self,
        config: Config,
        consul: ConsulClient,
        s3_settings: S3Settings,
        src: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """S3 answers 503 to the HEAD that verifies a PUT that succeeded: the record is
        withdrawn, the object stays. A rebuild with other bytes was refused forever."""
        real_head = S3Store.head
        calls: list[str] = []

        def head_503_after_put(self: S3Store, key: str) -> dict[str, Any] | None:
            calls.append(key)
            if len(calls) == 2:  # the verifying HEAD
                raise S3Unavailable("S3 unavailable: HEAD: 503: Service Unavailable")
            return real_head(self, key)

        monkeypatch.setattr(S3Store, "head", head_503_after_put)
        with pytest.raises(S3Unavailable) as err:
            publish(config, src, artifact_id="orphan-1")
        key = Keys("watcher", "web").artifact("orphan-1")
        assert f"withdrew its record {key}; its object" in str(err.value)
        assert "may remain: the next publish of this id re-uses it" in str(err.value)
        assert kv_record(consul, "orphan-1") is None
        left = s3_object(s3_settings, "orphan-1")
        assert left is not None
        monkeypatch.undo()

        (src / "app.py").write_text("print('v1, built again')\n")  # other bytes, same id
        record = publish(config, src, artifact_id="orphan-1")
        assert record.sha256 != hashlib.sha256(left["body"]).hexdigest()
        assert kv_record(consul, "orphan-1") == record
        obj = s3_object(s3_settings, "orphan-1")
        assert obj is not None and hashlib.sha256(obj["body"]).hexdigest() == record.sha256

    def test_a_tmpdir_inside_the_tree_keeps_publish_scratch_out_of_the_artifact(
        self,
        config: Config,
        consul: ConsulClient,
        s3_settings: S3Settings,
        src: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """CI sets TMPDIR to a directory of the checkout: publish's scratch directory (a
        random name) must not become a member, or every retry is another artifact."""
        (src / "tmp").mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(src / "tmp"))
        first = publish(config, src, artifact_id="tmpdir-1")
        again = publish(config, src, artifact_id="tmpdir-1")  # a retry of the same build
        assert again == first
        obj = s3_object(s3_settings, "tmpdir-1")
        assert obj is not None
        with tarfile.open(fileobj=io.BytesIO(obj["body"])) as tar:
            names = tar.getnames()
        assert not [n for n in names if n.startswith("tmp/")], names
        assert "app.py" in names

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"artifact_id": "../etc"}, "invalid artifact id '../etc'"),
            ({"artifact_id": "-x"}, "invalid artifact id '-x'"),
            ({"commit": "HEAD"}, "commit 'HEAD' is not a hex SHA"),
        ],
    )
    def test_bad_id_is_refused_before_anything_is_written(
        self,
        config: Config,
        consul: ConsulClient,
        s3_settings: S3Settings,
        src: Path,
        kwargs: dict[str, Any],
        message: str,
    ) -> None:
        before = consul.kv_keys("watcher/", separator=None)
        with pytest.raises(PayloadError, match=re.escape(message)):
            publish(config, src, **kwargs)
        nothing_written(consul, s3_settings, before)

    def test_a_tree_the_hosts_would_refuse_is_refused_before_anything_is_written(
        self,
        config_data: dict[str, Any],
        consul: ConsulClient,
        s3_settings: S3Settings,
        src: Path,
    ) -> None:
        config_data["apps"]["web"]["limits"] = {"max_members": 2}
        config = parse_config(config_data, env={})
        before = consul.kv_keys("watcher/", separator=None)
        with pytest.raises(ArtifactRefused, match=r"limits.max_members of app web in this config"):
            publish(config, src, artifact_id="toobig-1")
        nothing_written(consul, s3_settings, before)
        assert events_for(consul, "toobig-1") == []

    def test_missing_directory_is_a_clear_error(self, config: Config, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match=f"{tmp_path / 'nope'}: no such directory"):
            publish(config, tmp_path / "nope", artifact_id="missing-1")

    def test_empty_manifest_match_is_a_clear_error(
        self, config: Config, consul: ConsulClient, src: Path
    ) -> None:
        (src / ".watcher/manifest.yaml").write_text("include: ['dist/**']\n")
        with pytest.raises(ConfigError, match=f"manifest matched no files in {src}"):
            publish(config, src, artifact_id="empty-1")
        assert kv_record(consul, "empty-1") is None

    def test_no_s3_access_leaves_no_record_and_no_event(
        self, config_data: dict[str, Any], consul: ConsulClient, src: Path
    ) -> None:
        config_data["s3"]["endpoint_url"] = f"http://{DEAD_ADDRESS}"
        config = parse_config(config_data, env={})

        with pytest.raises(S3Unavailable, match=DEAD_ADDRESS):
            publish(config, src, artifact_id="nos3-1")

        assert kv_record(consul, "nos3-1") is None
        assert events_for(consul, "nos3-1") == []

    def test_an_s3_that_accepts_and_never_answers_is_given_up_within_retry_for(
        self, config_data: dict[str, Any], consul: ConsulClient, src: Path
    ) -> None:
        """A server that accepts connections and never answers: `--retry-for 5s` took 30 s
        (botocore's read timeout, per attempt); now one attempt waits at most max(5 s,
        retry-for)."""
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        try:
            config_data["s3"]["endpoint_url"] = f"http://127.0.0.1:{silent.getsockname()[1]}"
            config = parse_config(config_data, env={})
            started = time.monotonic()
            with pytest.raises(S3Unavailable):
                publish(config, src, artifact_id="stall-1", retry_deadline=5.0)
            took = time.monotonic() - started
        finally:
            silent.close()
        assert took < 20, f"gave up after {took:.1f} s"
        assert kv_record(consul, "stall-1") is None  # withdrawn

    def test_no_consul_leaves_no_record_and_no_upload(
        self,
        config_data: dict[str, Any],
        consul: ConsulClient,
        s3_settings: S3Settings,
        src: Path,
    ) -> None:
        config_data["consul"]["address"] = DEAD_ADDRESS
        config = parse_config(config_data, env={})

        with pytest.raises(
            ConsulUnavailable, match=f"cannot reach Consul at http://{DEAD_ADDRESS}"
        ):
            publish(config, src, artifact_id="noconsul-1")

        assert kv_record(consul, "noconsul-1") is None
        assert events_for(consul, "noconsul-1") == []
        # Consul is asked before the upload, so nothing is uploaded either; had Consul failed
        # after the upload, the next publish of the same tree would re-use the object.
        assert s3_object(s3_settings, "noconsul-1") is None


class TestPublishCommand:
    def test_buildkite_environment_gives_the_defaults(
        self,
        config_data: dict[str, Any],
        consul: ConsulClient,
        src: Path,
        tmp_path: Path,
    ) -> None:
        config_file = tmp_path / "watcher.yaml"
        config_file.write_text(json.dumps(config_data))  # JSON is YAML
        env = {
            **os.environ,
            "WATCHER_CONFIG": str(config_file),
            "BUILDKITE": "true",
            "BUILDKITE_PIPELINE_SLUG": "web-app",
            "BUILDKITE_BRANCH": "feature/x",
            "BUILDKITE_COMMIT": COMMIT.upper(),
            "BUILDKITE_BUILD_NUMBER": "7",
            "BUILDKITE_BUILD_URL": "https://buildkite.example/b/7",
        }
        for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN"):
            env.pop(name, None)
        result = subprocess.run(
            [str(WATCHERCTL), "publish", "web", str(src), "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        assert data["id"] == "feature-x-15eb13af"
        assert data["commit"] == COMMIT.lower()
        assert data["created_by"] == "buildkite:web-app#7"
        assert data["build_url"] == "https://buildkite.example/b/7"
        assert kv_record(consul, "feature-x-15eb13af") is not None

        def publish_human() -> subprocess.CompletedProcess[str]:
            argv = [str(WATCHERCTL), "publish", "web", str(src)]
            return subprocess.run(
                argv, env=env, capture_output=True, text=True, timeout=60, check=False
            )

        human = publish_human()
        assert human.returncode == 0, human.stderr
        assert "published web artifact feature-x-15eb13af" in human.stdout
        assert f"sha256  {data['sha256']}" in human.stdout
        assert "warning" not in human.stderr, human.stderr  # the same branch: nothing to say

        # Another branch whose name gives the same id, same bytes: published (the id holds
        # this build), with a warning that the record keeps the first branch.
        env["BUILDKITE_BRANCH"] = "feature-x"
        twin = publish_human()
        assert twin.returncode == 0, twin.stderr
        assert "was published before from branch 'feature/x'" in twin.stderr, twin.stderr
        assert "this build's branch 'feature-x' gives the same id" in twin.stderr
        kept = kv_record(consul, "feature-x-15eb13af")
        assert kept is not None and kept.branch == "feature/x", kept
        # with an id of its own, the branch made no id: nothing to warn of
        argv = [str(WATCHERCTL), "publish", "web", str(src), "--artifact-id", "feature-x-15eb13af"]
        named = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        assert named.returncode == 0 and "warning" not in named.stderr, named
        env["BUILDKITE_BRANCH"] = "feature/x"

        # The same id with other bytes: refused because of state (4, not 1: nothing failed),
        # saying how to publish this build after all.
        (src / "app.py").write_text("print('changed')\n")
        clash = publish_human()
        assert clash.returncode == 4, clash
        assert "already exists with sha256" in clash.stderr, clash.stderr
        assert "publish this build under another id (--artifact-id)" in clash.stderr

    def test_an_app_the_config_does_not_list_is_published_with_a_warning(
        self, config_data: dict[str, Any], consul: ConsulClient, src: Path, tmp_path: Path
    ) -> None:
        """A config that lists apps, and not this one: most often a typo that would publish
        where no host looks. It is published (a CI config need not list the hosts' apps),
        and stderr says so, naming the apps it does list; one the config lists: no warning."""
        config_file = tmp_path / "watcher.yaml"
        config_file.write_text(json.dumps(config_data))
        base = [str(WATCHERCTL), "publish", "-c", str(config_file), "--commit", COMMIT]
        runs = {
            app: subprocess.run(
                [*base, "--branch", "app-check", app, str(src)],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            for app in ("wbe", "web")
        }
        typo, listed = runs["wbe"], runs["web"]
        assert typo.returncode == 0, typo.stderr
        assert "warning: no app 'wbe'" in typo.stderr and "(configured: web)" in typo.stderr
        prefix = config_data["kv_prefix"]
        assert consul.kv_get(f"{prefix}/apps/wbe/artifacts/app-check-15eb13af") is not None
        assert listed.returncode == 0 and "warning" not in listed.stderr, listed.stderr

    def test_a_ci_config_without_apps_publishes(
        self, config_data: dict[str, Any], consul: ConsulClient, src: Path, tmp_path: Path
    ) -> None:
        """A CI machine's config needs `consul` and `s3` only: no `apps:` to make up, no
        warning. The daemon still refuses such a config (it would watch nothing)."""
        ci = {k: v for k, v in config_data.items() if k != "apps"}
        config_file = tmp_path / "ci.yaml"
        config_file.write_text(json.dumps(ci))
        argv = [str(WATCHERCTL), "publish", "-c", str(config_file), "--commit", COMMIT]
        result = subprocess.run(
            [*argv, "--branch", "ci-only", "web", str(src)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0 and "warning" not in result.stderr, result.stderr
        prefix = config_data["kv_prefix"]
        assert consul.kv_get(f"{prefix}/apps/web/artifacts/ci-only-15eb13af") is not None
        check = subprocess.run(
            [str(WATCHERCTL.parent / "watcher"), "check-config", "-c", str(config_file)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert check.returncode == 2, check
        assert "apps: must be a mapping with at least one app" in check.stderr

    def test_missing_commit_is_a_usage_error(
        self, config_data: dict[str, Any], src: Path, tmp_path: Path
    ) -> None:
        config_file = tmp_path / "watcher.yaml"
        config_file.write_text(json.dumps(config_data))
        env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDKITE")}
        result = subprocess.run(
            [str(WATCHERCTL), "publish", "-c", str(config_file), "web", str(src)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2
        # under the command's usage, as argparse's own errors are
        assert result.stderr.startswith("usage: watcherctl publish "), result.stderr
        assert result.stderr.splitlines()[-2:] == [
            "watcherctl publish: error: --branch (or $BUILDKITE_BRANCH) is required without "
            "--artifact-id",
            "watcherctl publish: error: --commit (or $BUILDKITE_COMMIT) is required without "
            "--artifact-id",
        ], result.stderr


class StallingS3:
    """A proxy to the S3 test server that takes every PUT's body and never answers it: an
    upload that is still running when a signal reaches watcherctl. Everything else is
    forwarded as it is."""

    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.put_started = threading.Event()
        self.release = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

            def do_PUT(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.put_started.set()
                proxy.release.wait(60)
                self.close_connection = True

            def forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    headers = {
                        k: v
                        for k, v in self.headers.items()
                        if k.lower() not in ("connection", "content-length")
                    }
                    headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    payload = resp.read()
                    answer = [
                        (k, v)
                        for k, v in resp.getheaders()
                        if k.lower() not in ("connection", "transfer-encoding", "content-length")
                    ]
                    length_header = resp.getheader("Content-Length", "0")
                finally:
                    conn.close()
                self.send_response(resp.status)
                for key, value in answer:
                    self.send_header(key, value)
                head = self.command == "HEAD"
                self.send_header("Content-Length", length_header if head else str(len(payload)))
                self.end_headers()
                if not head:
                    self.wfile.write(payload)

            do_GET = do_HEAD = do_POST = do_DELETE = forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> StallingS3:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_publish(
    config_data: dict[str, Any], tmp_path: Path, src: Path, artifact: str
) -> subprocess.Popen[str]:
    """`watcherctl publish` in a process of its own, as the Buildkite hook runs it."""
    config_file = tmp_path / f"watcher-{uuid.uuid4().hex[:8]}.yaml"
    config_file.write_text(json.dumps(config_data))  # JSON is YAML
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BUILDKITE", "CONSUL_"))}
    argv = [str(WATCHERCTL), "publish", "-c", str(config_file), "web", str(src)]
    argv += ["--artifact-id", artifact, "--commit", COMMIT, "--branch", "master"]
    argv += ["--retry-for", "30s"]
    return subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A suite started under nohup or in the background inherits SIGHUP or SIGINT
        # ignored (and watcherctl leaves an ignored signal ignored): give the child the
        # dispositions a CI agent's job has.
        preexec_fn=default_signals,
    )


@contextlib.contextmanager
def publish_held_in_upload(
    config_data: dict[str, Any], tmp_path: Path, src: Path, artifact: str
) -> Iterator[subprocess.Popen[str]]:
    """`watcherctl publish` in a process of its own, held in its upload (its record written)
    by a stalling S3 proxy for the block; killed at the end of it if it still runs."""
    s3 = config_data["s3"]
    with StallingS3(s3["endpoint_url"] or "") as slow:
        held = {**config_data, "s3": {**s3, "endpoint_url": slow.endpoint_url}}
        proc = start_publish(held, tmp_path, src, artifact)
        try:
            if not slow.put_started.wait(30):
                ended = proc.communicate(timeout=30) if proc.poll() is not None else ""
                raise AssertionError(f"the upload never started: {ended}")
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()  # SIGKILL: nothing of watcherctl runs any more
                proc.wait()


def consul_gone_at_complete(*_args: Any, **_kwargs: Any) -> None:
    """In place of ``publish._complete``: Consul lost between the verified upload and the
    CAS that drops the record's ``uploading`` mark."""
    raise ConsulUnavailable("Consul agent at 127.0.0.1:8500 unreachable (test)")


def watcherctl(
    config_data: dict[str, Any], tmp_path: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    config_file = tmp_path / f"watcher-{uuid.uuid4().hex[:8]}.yaml"
    config_file.write_text(json.dumps(config_data))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BUILDKITE", "CONSUL_"))}
    argv = [str(WATCHERCTL), *args, "-c", str(config_file)]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)


def default_signals() -> None:
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)


def stale_record(s3: S3Settings, artifact: str) -> ArtifactRecord:
    """A record whose object was never uploaded (its publisher was killed mid-upload)."""
    return ArtifactRecord(
        id=artifact,
        url=f"s3://{s3.bucket}/{s3.prefix}/web/{artifact}.tar.gz",
        sha256="ab" * 32,
        size=1234,
        format="tar.gz",
        branch="master",
        commit=COMMIT,
        build_number="41",
        build_url="",
        created_at="2024-01-01T00:00:00Z",
        created_by="ci@test",
    )


class TestConcurrentRetries:
    """Two retries of one build (same bytes) take over the record a stalled publish left at
    once: the one whose CAS lost tries again on the other's write, and both report it
    published (one failed with "publish again")."""

    def test_a_lost_take_over_is_tried_again_on_the_same_bytes(
        self, consul: ConsulClient, s3_settings: S3Settings
    ) -> None:
        key = Keys("watcher", "web").artifact("retries-1")
        left = replace(stale_record(s3_settings, "retries-1"), uploading=True)
        assert consul.kv_put(key, left.to_json())
        read = consul.kv_get(key)  # what both retries read
        assert read is not None
        publish_module._adopt(consul, key, read, "retries-1", left.sha256)  # the first retry
        after_first = consul.kv_get(key)
        assert after_first is not None and after_first.modify_index != read.modify_index

        publish_module._adopt(consul, key, read, "retries-1", left.sha256)  # the second

        taken = consul.kv_get(key)
        assert taken is not None and taken.value == left.to_json()
        assert taken.modify_index != after_first.modify_index  # its own write now
        assert taken.flags == after_first.flags + 1

    @pytest.mark.parametrize("meanwhile", ["other bytes", "withdrawn"])
    def test_a_record_of_other_bytes_or_none_is_not_taken_over(
        self, consul: ConsulClient, s3_settings: S3Settings, meanwhile: str
    ) -> None:
        key = Keys("watcher", "web").artifact("retries-2")
        left = stale_record(s3_settings, "retries-2")
        assert consul.kv_put(key, left.to_json())
        read = consul.kv_get(key)
        assert read is not None
        if meanwhile == "withdrawn":
            consul.kv_delete(key)
        else:
            assert consul.kv_put(key, replace(left, sha256="cd" * 32).to_json())
        with pytest.raises(ArtifactRefused, match="while this one took it over; publish again"):
            publish_module._adopt(consul, key, read, "retries-2", left.sha256)


class TestPublishInterrupted:
    """A Buildkite cancel or job timeout sends SIGTERM in the middle of the upload: the record
    written before the upload must not stay behind without its object."""

    @pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
    def test_a_signal_mid_upload_withdraws_the_record(
        self,
        signum: signal.Signals,
        config_data: dict[str, Any],
        consul: ConsulClient,
        s3_settings: S3Settings,
        src: Path,
        tmp_path: Path,
    ) -> None:
        artifact = f"sig-{signum.name.lower()}"
        with publish_held_in_upload(config_data, tmp_path, src, artifact) as proc:
            assert kv_record(consul, artifact) is not None  # written before the upload
            proc.send_signal(signum)
            _, err = proc.communicate(timeout=30)

        assert proc.returncode == 128 + signum, err
        assert f"publish of web artifact {artifact} stopped by {signum.name}" in err
        assert f"withdrew its record watcher/apps/web/artifacts/{artifact}" in err
        assert kv_record(consul, artifact) is None
        assert s3_object(s3_settings, artifact) is None
        assert events_for(consul, artifact) == []

    def test_a_retry_that_adopted_the_record_keeps_it_when_the_original_is_cancelled(
        self,
        config_data: dict[str, Any],
        config: Config,
        consul: ConsulClient,
        s3_settings: S3Settings,
        src: Path,
        tmp_path: Path,
    ) -> None:
        """A Buildkite retry (B) finds the record of the job it retries (A, stuck in its
        upload) with the same bytes, uploads and reports "published"; then A is cancelled:
        A must not withdraw the record B reported."""
        with publish_held_in_upload(config_data, tmp_path, src, "adopted-1") as proc:
            record = publish(config, src, artifact_id="adopted-1")  # B, the retry
            proc.send_signal(signal.SIGTERM)  # A, cancelled
            _, err = proc.communicate(timeout=30)

        assert proc.returncode == 143, err
        assert "was finished by another publish (its object verified); left it" in err
        assert kv_record(consul, "adopted-1") == record
        obj = s3_object(s3_settings, "adopted-1")
        assert obj is not None and hashlib.sha256(obj["body"]).hexdigest() == record.sha256

    def test_consul_lost_as_the_mark_is_dropped_says_what_is_left(
        self,
        config: Config,
        consul: ConsulClient,
        src: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Consul goes away between the verified upload and the CAS that drops the
        record's ``uploading`` mark: the operator read only "Consul unavailable", while the
        build stayed undeployable. The error says so and how to finish it, which works."""

        monkeypatch.setattr(publish_module, "_complete", consul_gone_at_complete)
        with pytest.raises(ConsulUnavailable) as raised:
            publish(config, src, artifact_id="unmarked-1")
        said = str(raised.value)
        assert "its object was uploaded and verified" in said, said
        assert "publish the same file again to finish it" in said, said
        left = kv_record(consul, "unmarked-1")
        assert left is not None and left.uploading
        monkeypatch.undo()
        record = publish(config, src, artifact_id="unmarked-1")
        assert record == replace(left, uploading=False)
        assert kv_record(consul, "unmarked-1") == record

    def test_other_bytes_under_the_id_finish_a_build_its_publish_left_uploading(
        self,
        config: Config,
        consul: ConsulClient,
        src: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A's publish uploaded and verified its object, then lost Consul before it dropped
        the record's ``uploading`` mark. A rebuild of the same commit with other bytes (B)
        is refused "id taken", as it must be; A stayed undeployable until someone edited KV
        by hand. Its object verifies as a publish checks it: B's publish finishes A's
        record, and says so in its refusal."""

        monkeypatch.setattr(publish_module, "_complete", consul_gone_at_complete)
        with pytest.raises(ConsulUnavailable):
            publish(config, src, artifact_id="rebuilt-1")
        monkeypatch.undo()
        left = kv_record(consul, "rebuilt-1")
        assert left is not None and left.uploading

        (src / "app.py").write_text("print('v1, built again with other bytes')\n")
        with pytest.raises(ArtifactIdTaken) as raised:
            publish(config, src, artifact_id="rebuilt-1")
        said = str(raised.value)
        assert f"artifact rebuilt-1 already exists with sha256 {left.sha256}" in said, said
        assert "it is marked complete now, and announced (hosts prefetch it)" in said, said
        assert kv_record(consul, "rebuilt-1") == replace(left, uploading=False)
        # Its own publish never fired build-finished: the refusal that finished it did.
        assert len(events_for(consul, "rebuilt-1", count=1)) == 1

    def test_a_build_is_not_deployable_until_its_upload_is_done(
        self,
        config_data: dict[str, Any],
        config: Config,
        consul: ConsulClient,
        s3_settings: S3Settings,
        src: Path,
        tmp_path: Path,
    ) -> None:
        """The record, written before the upload (the permission check), says the build is
        uploading until its object is uploaded and verified: `watcherctl deploy` refuses it
        meanwhile (every host's download would fail, and the deploy abort). A publish
        killed in between leaves it so; publishing the same tree again finishes it."""
        with publish_held_in_upload(config_data, tmp_path, src, "uploading-1"):
            left = kv_record(consul, "uploading-1")
            assert left is not None and left.uploading
            deploy = watcherctl(config_data, tmp_path, "deploy", "web", "uploading-1")
        # (killed by SIGKILL there: the record stays as it was)
        assert deploy.returncode == 4, deploy.stderr  # refused
        assert (
            f"artifact uploading-1 is still being uploaded (its publish by {left.created_by} "
            f"since {left.created_at} has not finished)"
        ) in deploy.stderr, deploy.stderr
        assert "publish it again" in deploy.stderr
        assert consul.kv_get(Keys("watcher", "web").inflight) is None
        assert events_for(consul, "uploading-1") == []

        record = publish(config, src, artifact_id="uploading-1")  # the same tree again

        assert record == replace(left, uploading=False)  # its record, taken over and finished
        raw = consul.kv_get(Keys("watcher", "web").artifact("uploading-1"))
        assert raw is not None and "uploading" not in json.loads(raw.value or b"")
        assert kv_record(consul, "uploading-1") == record
        obj = s3_object(s3_settings, "uploading-1")
        assert obj is not None and hashlib.sha256(obj["body"]).hexdigest() == record.sha256
        assert events_for(consul, "uploading-1", count=1) == [
            {"app": "web", "artifact": "uploading-1"}
        ]

    def test_a_record_left_by_a_killed_publish_is_replaced_by_the_next(
        self,
        config_data: dict[str, Any],
        config: Config,
        consul: ConsulClient,
        s3_settings: S3Settings,
        src: Path,
        tmp_path: Path,
    ) -> None:
        with publish_held_in_upload(config_data, tmp_path, src, "killed-1"):
            pass  # killed by SIGKILL at the end of the block
        left = kv_record(consul, "killed-1")
        assert left is not None and s3_object(s3_settings, "killed-1") is None

        (src / "app.py").write_text("print('v1, built again')\n")  # other bytes, same id
        record = publish(config, src, artifact_id="killed-1")

        assert record.sha256 != left.sha256
        assert kv_record(consul, "killed-1") == record
        obj = s3_object(s3_settings, "killed-1")
        assert obj is not None and hashlib.sha256(obj["body"]).hexdigest() == record.sha256
        assert events_for(consul, "killed-1", count=1) == [{"app": "web", "artifact": "killed-1"}]

    def test_a_stale_record_that_a_host_pinned_is_not_replaced(
        self, config: Config, consul: ConsulClient, s3_settings: S3Settings, src: Path
    ) -> None:
        stale = stale_record(s3_settings, "pinned-1")
        keys = Keys("watcher", "web")
        consul.kv_put(keys.artifact("pinned-1"), stale.to_json())
        pin = {"version": 1, "artifact": "pinned-1", "url": stale.url, "size": stale.size}
        consul.kv_put(keys.pin("pinned-1"), json.dumps({**pin, "sha256": stale.sha256}).encode())

        with pytest.raises(ArtifactRefused, match=f"already exists with sha256 {stale.sha256}"):
            publish(config, src, artifact_id="pinned-1")

        assert kv_record(consul, "pinned-1") == stale
        assert s3_object(s3_settings, "pinned-1") is None

    def test_a_stale_record_whose_object_holds_other_bytes_is_replaced(
        self, config: Config, consul: ConsulClient, s3_settings: S3Settings, src: Path
    ) -> None:
        """A put-back record and the object of the publish that failed after replacing it:
        the object's bytes are not the record's, so no host can have verified either."""
        stale = stale_record(s3_settings, "stale-3")
        consul.kv_put(Keys("watcher", "web").artifact("stale-3"), stale.to_json())
        put_object(s3_settings, "stale-3", b"a failed publish's", sha256="cd" * 32)
        record = publish(config, src, artifact_id="stale-3")
        assert kv_record(consul, "stale-3") == record
        obj = s3_object(s3_settings, "stale-3")
        assert obj is not None and hashlib.sha256(obj["body"]).hexdigest() == record.sha256

    def test_an_interrupted_replacement_puts_the_stale_record_back(
        self,
        config_data: dict[str, Any],
        consul: ConsulClient,
        s3_settings: S3Settings,
        src: Path,
        tmp_path: Path,
    ) -> None:
        stale = stale_record(s3_settings, "stale-2")
        consul.kv_put(Keys("watcher", "web").artifact("stale-2"), stale.to_json())

        with publish_held_in_upload(config_data, tmp_path, src, "stale-2") as proc:
            replaced = kv_record(consul, "stale-2")
            assert replaced is not None and replaced.sha256 != stale.sha256
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)

        assert proc.returncode == 143, err
        assert "put back the record it replaced at watcher/apps/web/artifacts/stale-2" in err
        assert kv_record(consul, "stale-2") == stale


class TestPublishFreeText:
    """--branch, --build-number and --build-url end up in KV, the web page and chat."""

    @pytest.mark.parametrize(
        ("option", "value", "message"),
        [
            ("--branch", "main\x7f", "argument --branch: invalid branch"),
            ("--branch", "main\x85", "argument --branch: invalid branch"),
            ("--build-number", "42\n", "argument --build-number: control character"),
            ("--build-number", "4\udcff2", "argument --build-number: not valid UTF-8"),
            ("--build-url", "https://ci/\x1b[31m", "argument --build-url: control character"),
            ("--build-url", "javascript:alert(1)", "argument --build-url: must be an http"),
            ("--build-url", "ci.example/b/1", "argument --build-url: must be an http"),
            ("--build-url", "https://ci.example/b 1", "argument --build-url: must be an http"),
        ],
    )
    def test_bad_free_text_is_a_usage_error(
        self,
        config_data: dict[str, Any],
        consul: ConsulClient,
        src: Path,
        tmp_path: Path,
        option: str,
        value: str,
        message: str,
    ) -> None:
        config_file = tmp_path / "watcher.yaml"
        config_file.write_text(json.dumps(config_data))
        env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDKITE")}
        argv = [str(WATCHERCTL), "publish", "-c", str(config_file), "web", str(src)]
        artifact = f"text-{uuid.uuid4().hex[:8]}"
        argv += ["--artifact-id", artifact, "--commit", COMMIT, option, value]
        result = subprocess.run(
            [os.fsencode(a) for a in argv],
            env=env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        stderr = result.stderr.decode("utf-8", "backslashreplace")
        assert result.returncode == 2, stderr
        assert message in stderr
        assert kv_record(consul, artifact) is None

    @pytest.mark.parametrize(
        ("name", "value", "message"),
        [
            ("BUILDKITE_BRANCH", "\x7f", "$BUILDKITE_BRANCH: invalid branch"),
            ("BUILDKITE_BUILD_NUMBER", "7\x1b", "$BUILDKITE_BUILD_NUMBER: control character"),
            ("BUILDKITE_BUILD_URL", "ftp://ci/7", "$BUILDKITE_BUILD_URL: must be an http"),
        ],
    )
    def test_bad_buildkite_variables_are_refused(
        self,
        config_data: dict[str, Any],
        consul: ConsulClient,
        src: Path,
        tmp_path: Path,
        name: str,
        value: str,
        message: str,
    ) -> None:
        config_file = tmp_path / "watcher.yaml"
        config_file.write_text(json.dumps(config_data))
        env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDKITE")}
        branch = f"env-{uuid.uuid4().hex[:8]}"
        env.update(BUILDKITE_BRANCH=branch, BUILDKITE_COMMIT=COMMIT, BUILDKITE_BUILD_NUMBER="7")
        env.update(BUILDKITE_BUILD_URL="https://buildkite.example/b/7")
        env[name] = branch + value if name == "BUILDKITE_BRANCH" else value
        result = subprocess.run(
            [str(WATCHERCTL), "publish", "-c", str(config_file), "web", str(src)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
        published = consul.kv_keys(Keys("watcher", "web").artifacts_prefix)
        assert not [key for key in published if branch in key]

    def test_plain_values_and_an_empty_url_are_kept(
        self, config_data: dict[str, Any], consul: ConsulClient, src: Path, tmp_path: Path
    ) -> None:
        config_file = tmp_path / "watcher.yaml"
        config_file.write_text(json.dumps(config_data))
        env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDKITE")}
        argv = [str(WATCHERCTL), "publish", "-c", str(config_file), "web", str(src)]
        argv += ["--branch", "release/café", "--commit", COMMIT, "--build-number", "42 (retry)"]
        argv += ["--build-url", "", "--artifact-id", "text-2", "--json"]
        result = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stderr
        stored = kv_record(consul, "text-2")
        assert stored is not None
        assert (stored.branch, stored.build_number, stored.build_url) == (
            "release/café",
            "42 (retry)",
            "",
        )
