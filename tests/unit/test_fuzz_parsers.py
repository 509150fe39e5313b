"""Fuzzing of every parser of outside input: event payloads, KV records, the config file.

Each parser either returns a valid object or raises the project's own error (PayloadError,
ConfigError); any other exception is a crash and fails the test with the input that caused
it. Inputs are both blind (random bytes and text) and shaped (documents with the right keys
and wrong, borderline or hostile values), since blind bytes rarely get past ``json.loads``.

How many inputs run is a hypothesis settings profile chosen by $WATCHER_FUZZ_PROFILE:
``ci`` (the default, a few thousand in all, for `make test`) or ``long`` (at least
100,000 in all, for `make fuzz`). The total is printed at the end of the module.
"""

from __future__ import annotations

import json
import os
import re
import string
import types
import typing
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from watcher.agent import parse_journal
from watcher.config import Config, load_config, parse_config
from watcher.errors import ConfigError, PayloadError
from watcher.events import EVENT_NAMES, MAX_PAYLOAD, EventRequest, parse_event
from watcher.records import (
    ARTIFACT_ID_RE,
    DEPLOY_ID_RE,
    DOC_VERSION,
    MAX_EXPECTED,
    RELEASE_RE,
    ArtifactRecord,
    CurrentRecord,
    Decision,
    DeployRecord,
    Document,
    HostRecord,
    MemberRecord,
    NodeProgress,
    Outcome,
    ReleaseRef,
)

# Examples per test: 14 tests, so `ci` runs ~4,200 inputs and `long` ~140,000.
PROFILES = {"ci": 300, "long": 10_000}
for _name, _examples in PROFILES.items():
    settings.register_profile(
        _name,
        max_examples=_examples,
        deadline=None,  # the machine is shared: no per-input time limit
        database=None,  # nothing written into the work tree
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
PROFILE = os.environ.get("WATCHER_FUZZ_PROFILE", "ci")
if PROFILE not in PROFILES:
    raise RuntimeError(f"WATCHER_FUZZ_PROFILE must be one of {sorted(PROFILES)}, got {PROFILE!r}")
fuzz = settings(settings.get_profile(PROFILE))

RECORD_CLASSES: tuple[type[Document], ...] = (
    ArtifactRecord,
    ReleaseRef,
    CurrentRecord,
    DeployRecord,
    NodeProgress,
    Decision,
    Outcome,
    HostRecord,
    MemberRecord,
)

INPUTS: Counter[str] = Counter()


@pytest.fixture(autouse=True)
def report_inputs(request: pytest.FixtureRequest) -> Iterator[None]:
    """Say how many inputs each parser got (the long run's proof of its size): recorded on
    the test's report, summed and printed at the end of the run by tests/conftest.py
    (with pytest-xdist a worker's own output is never shown)."""
    before = INPUTS.copy()
    yield
    # (not record_property, which warns under --junitxml's default xunit2 family)
    request.node.user_properties.append(("fuzz_inputs", {"profile": PROFILE, **(INPUTS - before)}))


def expect_clean(
    what: str, error: type[Exception], fn: Callable[[], Any], raw: object, *, count: bool = True
) -> Any | None:
    """Run ``fn``; its result, or None for a clean ``error``; anything else fails the test.

    ``count``: the input is a generated one (not a re-parse of an accepted record)."""
    if count:
        INPUTS[what] += 1
    try:
        return fn()
    except error as exc:
        assert str(exc).strip(), f"{what}: empty error message for {raw!r}"
        assert "\n" not in str(exc) or what == "config", f"{what}: multi-line error {exc!r}"
        return None
    except Exception as exc:  # a crash: report the input
        pytest.fail(f"{what} crashed with {type(exc).__name__}: {exc} on input {raw!r}")


# ---------------------------------------------------------------- value strategies

ID_CHARS = string.ascii_letters + string.digits + "._-"
ids = st.text(alphabet=ID_CHARS, min_size=0, max_size=140)
hostile_text = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "a\x00b",
        "../..",
        "/etc/passwd",
        "\n",
        "é",
        "\ud7ff",
        "9" * 400,
        "1e999",
        "NaN",
        "-1",
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59-01:00",
        "2026-02-30T00:00:00Z",
        "2026-11-26T14:38:44.123Z",
        "20261126T143844Z-main-15eb13af",
        "main-15eb13af",
        "a" * 300,
        "0" * 64,
    ]
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=False),
    st.text(max_size=40),
    ids,
    hostile_text,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def valid_release() -> st.SearchStrategy[str]:
    return st.builds(
        lambda d, a: f"{d}-{a}",
        st.sampled_from(["20261126T143844Z", "19700101T000000Z", "99991231T235959Z"]),
        st.from_regex(ARTIFACT_ID_RE, fullmatch=True),
    )


# ---------------------------------------------------------------- event payloads


class TestEventPayloads:
    APPS = ("web", "api")

    def check(self, name: str, payload: bytes | None) -> None:
        result = expect_clean(
            "event",
            PayloadError,
            lambda: parse_event("ev-1", name, 7, payload, self.APPS),
            (name, payload),
        )
        if result is None:
            return
        # What was accepted is what the daemon relies on.
        assert isinstance(result, EventRequest)
        assert result.name in EVENT_NAMES and result.app in self.APPS
        assert payload is not None and len(payload) <= MAX_PAYLOAD
        assert result.artifact is None or ARTIFACT_ID_RE.match(result.artifact)
        assert result.release is None or RELEASE_RE.match(result.release)
        assert result.deploy is None or DEPLOY_ID_RE.match(result.deploy)

    @fuzz
    @given(
        name=st.one_of(st.sampled_from(EVENT_NAMES), st.text(max_size=20)),
        payload=st.one_of(st.none(), st.binary(max_size=MAX_PAYLOAD + 50)),
    )
    def test_raw_bytes(self, name: str, payload: bytes | None) -> None:
        self.check(name, payload)

    @fuzz
    @given(
        name=st.sampled_from(EVENT_NAMES),
        doc=st.dictionaries(
            st.one_of(
                st.sampled_from(["app", "artifact", "deploy", "release"]), st.text(max_size=6)
            ),
            st.one_of(
                json_values,
                st.sampled_from(["web", "api", "other"]),
                st.from_regex(ARTIFACT_ID_RE, fullmatch=True),
                valid_release(),
            ),
            max_size=4,
        ),
        spaces=st.booleans(),
    )
    def test_shaped_documents(self, name: str, doc: dict[str, Any], spaces: bool) -> None:
        sep = (", ", ": ") if spaces else (",", ":")
        self.check(name, json.dumps(doc, separators=sep).encode())

    @pytest.mark.parametrize(
        ("payload", "said"),
        [
            # what one reader takes as the first and another as the last is refused
            (b'{"app":"web","artifact":"x-1","artifact":"main-fb04dcb6"}', "'artifact' twice"),
            # RFC 8259 8.1: JSON between systems is UTF-8 (json.loads takes UTF-16 too)
            ('{"app":"web","artifact":"main-fb04dcb6"}'.encode("utf-16"), "is not UTF-8"),
            (b'{"app":"web","artifact":"main-\xff"}', "is not UTF-8"),
        ],
    )
    def test_examples_refused(self, payload: bytes, said: str) -> None:
        with pytest.raises(PayloadError, match=re.escape(said)):
            parse_event("ev-1", "deploy", 7, payload, self.APPS)

    def test_a_plain_payload_still_parses(self) -> None:
        got = parse_event("ev-1", "deploy", 7, b'{"app": "web", "artifact": "main-1"}', ["web"])
        assert (got.app, got.artifact) == ("web", "main-1")
        bom = b'\xef\xbb\xbf{"app": "web", "artifact": "main-1"}'  # a UTF-8 BOM: taken
        assert parse_event("ev-1", "deploy", 7, bom, ["web"]).artifact == "main-1"


# ---------------------------------------------------------------- KV records


def record_docs(cls: type[Document]) -> st.SearchStrategy[dict[str, Any]]:
    """Documents with ``cls``'s field names (some missing, some extra) and any values."""
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    plausible: dict[str, st.SearchStrategy[Any]] = {
        "id": st.from_regex(ARTIFACT_ID_RE, fullmatch=True),
        "url": st.sampled_from(["s3://bucket/a/web/x.tar.gz", "s3://", "http://x"]),
        "sha256": st.sampled_from(["0" * 64, "A" * 64, "0" * 63]),
        "size": st.integers(min_value=-2, max_value=2**70),
        "format": st.sampled_from(["tar.gz", "tar", "zip"]),
        "kind": st.sampled_from(["deploy", "rollback", "other"]),
        "release": valid_release(),
        "expected": st.lists(st.text(max_size=10), max_size=3),
        "state": st.sampled_from(["staging", "ready", "failed", "live", "aborted", "x"]),
        "outcome": st.sampled_from(["commit", "abort", "maybe"]),
        "requested_at": hostile_text,
        "prepare_deadline": hostile_text,
        "apply_deadline": hostile_text,
        "previous": st.one_of(json_values, st.fixed_dictionaries({"release": valid_release()})),
    }
    values = {n: st.one_of(plausible.get(n, json_values), json_values) for n in names}
    return st.fixed_dictionaries(
        {}, optional={**values, "version": json_values, "unknown": json_values}
    )


DEPLOY = {
    "id": "d1",
    "app": "web",
    "kind": "deploy",
    "artifact": "main-15eb13af",
    "sha256": "0" * 64,
    "release": "20261126T143844Z-main-15eb13af",
    "requested_by": "ops@host",
    "requested_at": "2026-11-26T14:38:44.123Z",
    "expected": ["web-1"],
    "prepare_deadline": "2026-11-26T14:48:44.123Z",
    "apply_deadline": "2026-11-26T14:58:44.123Z",
}
CURRENT = {
    "release": "20261126T143844Z-main-15eb13af",
    "artifact": "main-15eb13af",
    "sha256": "0" * 64,
    "deploy": "d1",
}


def conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the declared type ``hint`` (the kinds records use)."""
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (str, bool):
        return isinstance(value, hint)
    if origin is list:
        return isinstance(value, list) and all(conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            conforms(k, args[0]) and conforms(v, args[1]) for k, v in value.items()
        )
    raise AssertionError(f"no check for {hint!r}")


class TestRecords:
    def test_missing_fields_are_named(self) -> None:
        """Not Python's "__init__() missing 11 required positional arguments": the web
        API's 502 and watcherctl show this message."""
        with pytest.raises(PayloadError) as caught:
            ArtifactRecord.from_json(b'{"id": "main-1", "size": 3}', where="apps/web/x")
        assert str(caught.value) == "ArtifactRecord at apps/web/x: missing fields url, sha256"
        with pytest.raises(PayloadError, match=r"at k: missing field sha256$"):
            ArtifactRecord.from_json(b'{"id":"main-1","url":"s3://b/k","size":3}', where="k")

    def check(self, cls: type[Document], raw: bytes | str | None) -> None:
        what = f"record {cls.__name__}"
        record = expect_clean(what, PayloadError, lambda: cls.from_json(raw, where="k"), raw)
        if record is None:
            return
        assert isinstance(record, cls)
        # Every field of an accepted record has its declared type: readers format, compare
        # and hash them (a list in Outcome.result crashed the history page and API).
        for name, hint in typing.get_type_hints(cls).items():
            if name in {f.name for f in fields(cls)}:
                value = getattr(record, name)
                assert conforms(value, hint), f"{cls.__name__}.{name} = {value!r}: {raw!r}"
                if isinstance(value, int):  # readers format sizes and counts as floats
                    float(value)
        # An accepted record survives its own serialization unchanged.
        again = expect_clean(
            what, PayloadError, lambda: cls.from_json(record.to_json()), record, count=False
        )
        assert again == record, f"{cls.__name__} does not round-trip: {raw!r}"
        # ... and is text readers can send as UTF-8 (a lone surrogate made the page and the
        # JSON API answer 500).
        json.dumps(asdict(record), ensure_ascii=False).encode("utf-8")
        # to_json builds its dict without asdict's deep copy: the bytes (which hosts hash
        # into a request's digest) must stay exactly those of asdict.
        as_asdict = {**asdict(record), "version": DOC_VERSION}
        assert (
            record.to_json()
            == json.dumps(as_asdict, sort_keys=True, separators=(",", ":")).encode()
        ), raw
        if isinstance(record, HostRecord):
            # readers key their table of hosts by the record's node: it must be a name
            assert isinstance(record.node, str), raw
        if isinstance(record, CurrentRecord):
            previous = expect_clean(what, PayloadError, record.previous_ref, raw, count=False)
            assert previous is None or isinstance(previous, ReleaseRef)

    @fuzz
    @given(cls=st.sampled_from(RECORD_CLASSES), raw=st.one_of(st.none(), st.binary(max_size=200)))
    def test_raw_bytes(self, cls: type[Document], raw: bytes | None) -> None:
        self.check(cls, raw)

    @fuzz
    @given(
        cls=st.sampled_from(RECORD_CLASSES),
        raw=st.one_of(
            st.text(max_size=200),
            st.builds(lambda n: "[" * n + "]" * n, st.integers(0, 200_000)),
            st.builds(lambda n: '{"a":' * n + "1" + "}" * n, st.integers(0, 5_000)),
            st.sampled_from(["NaN", "Infinity", '{"size": 1e999}', '{"id": "\\ud800"}']),
        ),
    )
    # Crashes found by this fuzzing, kept as fixed examples.
    @example(cls=NodeProgress, raw='{"node": "a", "state": []}')  # TypeError: unhashable
    @example(cls=DeployRecord, raw=json.dumps({**DEPLOY, "requested_at": 5}))  # AttributeError
    @example(  # OverflowError
        cls=DeployRecord, raw=json.dumps({**DEPLOY, "apply_deadline": "0001-01-01T00:00:00+01:00"})
    )
    @example(cls=Decision, raw="[" * 100_000 + "]" * 100_000)  # RecursionError
    @example(cls=CurrentRecord, raw=json.dumps({**CURRENT, "previous": ["release"]}))  # TypeError
    @example(cls=HostRecord, raw='{"node": [], "release": null, "last_seen": ""}')  # readers
    @example(cls=Outcome, raw='{"result": ["x"], "at": "", "by": "h"}')  # the history page
    @example(cls=ReleaseRef, raw=json.dumps({**CURRENT, "artifact": 5}))  # current.previous
    @example(cls=DeployRecord, raw=json.dumps({**DEPLOY, "expected": 5}))  # TypeError: len()
    @example(cls=Decision, raw='{"outcome": "abort", "reason": 5, "by": "h", "at": ""}')
    @example(cls=Outcome, raw='{"result": "aborted", "at": "", "by": "h", "reason": NaN}')
    @example(  # an int too large for a float: the page's size column raised OverflowError
        cls=ArtifactRecord,
        raw=json.dumps({"id": "main-15eb13af", "url": "s3://b/k", "sha256": "0" * 64})[:-1]
        + ', "size": 1'
        + "0" * 400
        + "}",
    )
    @example(cls=NodeProgress, raw='{"node": "a", "state": "staging", "staged_bytes": "x"}')
    @example(  # a lone surrogate: the page and the JSON API could not encode it
        cls=HostRecord, raw='{"node": "h", "release": null, "last_seen": "", "hold": "\\ud800"}'
    )
    def test_raw_text(self, cls: type[Document], raw: str) -> None:
        self.check(cls, raw)

    def test_free_text_is_cut_to_what_a_reader_takes(self) -> None:
        """A host's token can write a 500 KB error or hold: the page and the live feed sent
        it (escaped, more than once) to every open page on every change."""
        ack = NodeProgress.from_json(
            json.dumps(
                {
                    "node": "a",
                    "state": "failed",
                    "error": "e" * 500_000,
                    "output_tail": "x" + "t" * 9_000,
                }
            )
        )
        assert ack.error == "e" * 4000 + " [cut]"
        assert ack.output_tail == "[cut] " + "t" * 8000  # the end of a tail is what matters
        host = HostRecord.from_json(
            json.dumps({"node": "a", "release": None, "last_seen": "", "hold": "h" * 3000})
        )
        assert host.hold == "h" * 2000 + " [cut]"
        # Every field of a host record: status --fleet, the page and its feed show them.
        host = HostRecord.from_json(
            json.dumps(
                {
                    "node": "a",
                    "release": "r" * 500_000,
                    "last_seen": "l" * 1000,
                    "watcher_version": "v" * 1000,
                    "state": "s" * 500_000,
                    "prefetched": [f"main-{i:08x}" for i in range(5000)] + ["x" * 500_000],
                }
            )
        )
        assert host.release == "r" * 200 + " [cut]" and host.state == "s" * 200 + " [cut]"
        assert host.last_seen == "l" * 64 + " [cut]"
        assert host.watcher_version == "v" * 100 + " [cut]"
        assert host.prefetched == [f"main-{i:08x}" for i in range(20)]
        long_id = HostRecord.from_json(
            json.dumps({"node": "a", "release": None, "last_seen": "", "prefetched": ["x" * 999]})
        )
        assert long_id.prefetched == ["x" * 200]
        with pytest.raises(PayloadError, match="prefetched must be a list of artifact ids"):
            HostRecord.from_json(
                json.dumps({"node": "a", "release": None, "last_seen": "", "prefetched": [1]})
            )
        assert NodeProgress.from_json(ack.to_json()) == ack  # cut once, not again
        # timings: the end copies every host's into the outcome, in one txn Consul caps at
        # 512 KB; a host's token padded its own, and no deploy ended (the attacker review).
        padded = NodeProgress.from_json(
            json.dumps(
                {
                    "node": "a",
                    "state": "live",
                    "release": "r" * 300,
                    "timings": {
                        "live_at": "2026-12-06T10:00:00.000Z",
                        "pad": "x" * 450_000,
                        "Not a name": "1",
                        **{f"t{i}_at": "1" for i in range(40)},
                    },
                }
            )
        )
        assert padded.release == "r" * 200 + " [cut]"
        assert len(padded.timings) == 16 and padded.timings["live_at"].startswith("2026")
        assert "pad" not in padded.timings and "Not a name" not in padded.timings
        with pytest.raises(PayloadError, match="timings must map names to strings"):
            NodeProgress.from_json(json.dumps({"node": "a", "state": "live", "timings": {"a": 1}}))
        short = NodeProgress.from_json(json.dumps({"node": "a", "state": "failed", "error": "e"}))
        assert short.error == "e"

    def test_an_artifact_records_uploading_mark_is_true_or_false(self) -> None:
        # Written by a publish before its upload; a record of an older publish has none.
        doc = {"id": "main-15eb13af", "url": "s3://b/k", "sha256": "0" * 64, "size": 1}
        assert ArtifactRecord.from_json(json.dumps(doc)).uploading is False
        assert ArtifactRecord.from_json(json.dumps({**doc, "uploading": True})).uploading
        for bad in ("no", 0, None):
            with pytest.raises(PayloadError, match="uploading must be true or false"):
                ArtifactRecord.from_json(json.dumps({**doc, "uploading": bad}))

    def test_an_artifact_records_free_text_is_cut(self) -> None:
        # CI's token writes it: a 300 KB `created_by` went into every refusal naming it,
        # and made a refused deploy's txn too large for Consul.
        doc = {"id": "main-15eb13af", "url": "s3://b/k", "sha256": "0" * 64, "size": 1}
        record = ArtifactRecord.from_json(json.dumps({**doc, "created_by": "x" * 300_000}))
        assert record.created_by == "x" * 500 + " [cut]"

    def test_a_request_names_at_most_max_expected_hosts(self) -> None:
        # Every reader of a deploy reads one key per expected host: a token's request with
        # 20,000 names made each page load send hundreds of Consul requests.
        names = [f"web-{i}" for i in range(MAX_EXPECTED + 1)]
        for cls, doc in (
            (DeployRecord, DEPLOY),
            (Decision, {"outcome": "abort", "reason": "", "by": "h", "at": ""}),
        ):
            assert isinstance(cls.from_json(json.dumps({**doc, "expected": names[:-1]})), cls)
            with pytest.raises(PayloadError, match=f"more than {MAX_EXPECTED}|at most"):
                cls.from_json(json.dumps({**doc, "expected": names}))

    @pytest.mark.parametrize("cls", RECORD_CLASSES, ids=lambda c: c.__name__)
    @fuzz
    @given(data=st.data())
    def test_shaped_documents(self, cls: type[Document], data: st.DataObject) -> None:
        doc = data.draw(record_docs(cls))
        self.check(cls, json.dumps(doc))


# ---------------------------------------------------------------- the config file

VALID_CONFIG: dict[str, Any] = {
    "node": "web-1",
    "kv_prefix": "watcher",
    "consul": {"address": "127.0.0.1:8500", "timeout": "10s"},
    "s3": {"bucket": "artifacts", "prefix": "apps", "region": "us-east-1"},
    "daemon": {"state_dir": "/var/lib/watcher", "session_ttl": "15s", "listen": None},
    "apps": {
        "web": {
            "root": "/srv",
            "keep_releases": 3,
            "umask": "0022",
            "prefetch": "extract",
            "shared": ["log"],
            "hooks": {"validate": "/bin/true", "post_release": [["/bin/echo", "x"]]},
            "timeouts": {"hook": "20s", "prepare": "5m"},
            "limits": {"max_members": 10, "max_bytes": "1GiB"},
        }
    },
}
CONSUL_ENV = (
    "CONSUL_HTTP_ADDR",
    "CONSUL_HTTP_SSL",
    "CONSUL_HTTP_TOKEN",
    "CONSUL_HTTP_TOKEN_FILE",
    "CONSUL_CACERT",
    "CONSUL_CLIENT_CERT",
    "CONSUL_CLIENT_KEY",
    "CONSUL_HTTP_SSL_VERIFY",
)
config_values = st.one_of(
    json_values,
    st.sampled_from(["1GiB", "9" * 400 + "G", "0022", "0999", "30s", "0s", "1e999", "/bin/true"]),
    st.sampled_from([10**400, -1, 0, 2**63, float("inf"), True]),
    st.dates(),
    st.binary(max_size=8),
)


def with_app(**app: Any) -> dict[str, Any]:
    return {**VALID_CONFIG, "apps": {"web": {"root": "/srv", **app}}}


@st.composite
def mutated_configs(draw: st.DrawFn) -> Any:
    """The valid config with a few values replaced, removed or added at any depth."""
    doc: Any = json.loads(json.dumps(VALID_CONFIG))
    for _ in range(draw(st.integers(1, 4))):
        node = doc
        while isinstance(node, dict) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node, key=str)))
            if not isinstance(node[key], dict):
                break
            node = node[key]
        if not isinstance(node, dict):
            break
        action = draw(st.sampled_from(["set", "delete", "add"]))
        if action == "delete" and node:
            del node[draw(st.sampled_from(sorted(node, key=str)))]
        elif action == "set" and node:
            node[draw(st.sampled_from(sorted(node, key=str)))] = draw(config_values)
        else:
            node[draw(st.one_of(st.text(max_size=8), st.integers()))] = draw(config_values)
    if draw(st.integers(0, 20)) == 0:
        doc = draw(config_values)  # not even a mapping
    return doc


YAML_FRAGMENTS = [
    "node: a\n",
    "apps:\n  web:\n    root: /srv\n",
    "s3: {bucket: b}\n",
    "kv_prefix: !!int x\n",
    "node: !!float abc\n",
    "node: 2001-02-30\n",
    "node: !!timestamp 2001-13-01\n",
    "node: !!binary '@@'\n",
    "node: &a [*a]\n",
    "x: *undefined\n",
    "? [a]\n: 1\n",
    "node: a\nnode: b\n",
    "- a\n",
    "\t",
    "\x00",
    "%YAML 9.9\n---\n",
    "!!python/object:os.system 'true'\n",
    "node: 0x\n",
    "node: 1_000_000_000_000_000_000e999\n",
    "[" * 40,
    "]",
    "{",
    "'",
    '"',
    "\\",
    ": ",
    "\n",
    "  ",
    "#",
    "---\n",
    "...\n",
]


class TestJournal:
    """The phase journal a host reads back after a crash: any bytes give a journal or
    None, never an exception (a crash can leave any tail)."""

    @fuzz
    @given(
        lines=st.lists(
            st.one_of(
                st.binary(max_size=40),
                st.dictionaries(
                    st.sampled_from(["deploy", "phases", "x"]), st.text(max_size=5)
                ).map(lambda d: json.dumps(d).encode()),
                st.builds(lambda n: b"[" * n + b"]" * n, st.integers(0, 100_000)),
            ),
            max_size=5,
        ),
        tail=st.binary(max_size=20),
    )
    @example(lines=[b"[" * 100_000 + b"]" * 100_000], tail=b"")  # RecursionError
    def test_any_bytes(self, lines: list[bytes], tail: bytes) -> None:
        raw = b"\n".join(lines) + b"\n" + tail
        data = parse_journal(raw)
        assert data is None or (isinstance(data, dict) and data.get("deploy")), raw


class TestConfig:
    def check_config(self, result: Any, raw: object) -> None:
        if result is None:
            return
        assert isinstance(result, Config), raw
        assert result.apps, raw
        for app in result.apps.values():
            assert Path(app.root).is_absolute() and "\0" not in app.root, raw

    @fuzz
    @given(
        doc=mutated_configs(),
        env=st.dictionaries(
            st.sampled_from(CONSUL_ENV),
            st.one_of(st.text(max_size=20), hostile_text),
            max_size=3,
        ),
    )
    # Crashes found by this fuzzing, kept as fixed examples.
    @example(doc=with_app(limits={"max_bytes": "9" * 400}), env={})  # OverflowError
    @example(doc=with_app(timeouts={"hook": 10**400}), env={})  # OverflowError
    @example(doc={**VALID_CONFIG, "consul": {"token_file": "/a\0b"}}, env={})  # ValueError
    @example(doc=VALID_CONFIG, env={"CONSUL_CACERT": "/a\0b"})  # ValueError
    def test_parsed_documents(self, doc: Any, env: dict[str, str]) -> None:
        result = expect_clean(
            "config", ConfigError, lambda: parse_config(doc, source="fuzz.yaml", env=env), doc
        )
        self.check_config(result, doc)

    @fuzz
    @given(
        text=st.one_of(
            st.lists(st.sampled_from(YAML_FRAGMENTS), max_size=8).map("".join),
            st.builds(
                lambda head, tail: head + tail,
                st.builds(yaml.safe_dump, mutated_configs()),
                st.lists(st.sampled_from(YAML_FRAGMENTS), max_size=3).map("".join),
            ),
            st.text(max_size=120),
            st.binary(max_size=120).map(lambda b: b.decode("latin-1")),
        ),
        as_bytes=st.one_of(st.none(), st.binary(min_size=1, max_size=8)),
    )
    @example(text="node: 2001-02-30\n", as_bytes=None)  # ValueError from PyYAML's dates
    @example(text="node: !!float abc\n", as_bytes=None)  # ValueError
    @example(text="a: " + "[" * 5000 + "]" * 5000, as_bytes=None)  # RecursionError
    def test_config_files(
        self, tmp_path_factory: pytest.TempPathFactory, text: str, as_bytes: bytes | None
    ) -> None:
        path = tmp_path_factory.getbasetemp() / "fuzz-watcher.yaml"
        # Mostly text, sometimes with bytes that are not UTF-8 appended.
        path.write_bytes(text.encode("utf-8", "surrogatepass") + (as_bytes or b""))
        result = expect_clean("config", ConfigError, lambda: load_config(path, env={}), text)
        self.check_config(result, text)
