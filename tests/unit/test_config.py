"""The configuration file: defaults, every error named by its path, Consul environment."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from watcher import config as config_module
from watcher.config import (
    AppConfig,
    Config,
    ConsulSettings,
    DaemonSettings,
    Limits,
    Timeouts,
    env_overridden_warnings,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)
from watcher.errors import ConfigError


def minimal(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"s3": {"bucket": "artifacts"}, "apps": {"web": {"root": "/srv"}}}
    data.update(overrides)
    return data


def with_app(**app: Any) -> dict[str, Any]:
    return minimal(apps={"web": {"root": "/srv", **app}})


def problems(
    data: Any, env: dict[str, str] | None = None, *, source: str = "test.yaml"
) -> list[str]:
    """The problems parse_config finds; ``source``: the one they are said of (the file's
    path, or "environment" when every problem is an environment variable's)."""
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="test.yaml", env=env or {})
    assert info.value.source == source
    assert str(info.value) == f"{source}: " + "; ".join(info.value.problems)
    return info.value.problems


def parse(data: Any, env: dict[str, str] | None = None) -> Config:
    return parse_config(data, source="test.yaml", env=env or {})


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


class TestDefaults:
    def test_minimal_config(self) -> None:
        config = parse(minimal())
        assert config.source == "test.yaml"
        assert config.node is None
        assert config.kv_prefix == "watcher"
        assert config.consul == ConsulSettings()
        assert config.consul.base_url == "http://127.0.0.1:8500"
        assert config.s3.bucket == "artifacts"
        assert (config.s3.prefix, config.s3.region, config.s3.endpoint_url) == ("", None, None)
        assert config.daemon == DaemonSettings()
        web = config.app("web")
        assert web.name == "web"
        assert web.app_dir == Path("/srv/web")
        assert web.keep_releases == 5
        assert (web.user, web.group, web.umask) == (None, None, 0o022)
        assert (web.prefetch, web.on_validate_failure) == ("extract", "rollback")
        assert web.flip_delay == 0.2
        assert web.shared == ()
        phases = ("post_release", "post_symlink", "validate", "post_abort")
        assert dict(web.hooks) == dict.fromkeys(phases, ())
        assert web.timeouts == Timeouts()
        assert web.limits == Limits()

    def test_everything_set(self, tmp_path: Path) -> None:
        token_file = write(tmp_path / "token", "  tok-from-file\n")
        ca = write(tmp_path / "ca.pem", "x")
        config = parse(
            {
                "node": "host-1",
                "kv_prefix": "/fleet/watcher/",
                "consul": {
                    "address": "https://10.0.0.1:8501",
                    "token_file": str(token_file),
                    "ca_file": str(ca),
                    "verify": False,
                    "timeout": "3s",
                },
                "s3": {
                    "bucket": "b",
                    "prefix": "/builds/",
                    "region": "eu-west-1",
                    "endpoint_url": "http://127.0.0.1:9000",
                },
                "daemon": {
                    "state_dir": "/tmp/w",
                    "session_ttl": "2s",
                    "listen": None,
                    "history_keep": 3,
                    "undecided_after": "1m",
                    "handled_events_keep": 256,
                },
                "apps": {
                    "web": {
                        "root": "/srv/apps",
                        "keep_releases": 2,
                        "user": "www-data",
                        "group": "www-data",
                        "umask": "0027",
                        "prefetch": "download",
                        "on_validate_failure": "hold",
                        "shared": ["log", "./public/uploads"],
                        "artifact_cache_bytes": "1GiB",
                        "aborted_staging_max_age": "2d",
                        "hooks": {
                            "post_release": "/bin/true",
                            "validate": ["/bin/true", ["/usr/bin/env", "check", "--fast"]],
                        },
                        "timeouts": {
                            "download": 60,
                            "hook": "90s",
                            "prepare": "2m",
                            "apply": "1h",
                            "lock": "250ms",
                        },
                        "limits": {
                            "max_members": 10,
                            "max_bytes": "10MB",
                            "max_ratio": 40,
                            "disk_fraction": 0.25,
                            "disk_reserve": "2GiB",
                        },
                    },
                    "api": {"root": "/srv/other"},
                },
            }
        )
        assert config.node == "host-1"
        assert config.kv_prefix == "fleet/watcher"
        assert config.consul == ConsulSettings(
            address="10.0.0.1:8501",
            scheme="https",
            token="tok-from-file",
            ca_file=str(ca),
            verify=False,
            timeout=3.0,
        )
        assert config.s3.prefix == "builds"
        assert config.daemon == DaemonSettings(
            state_dir="/tmp/w",
            session_ttl=2.0,
            listen=None,
            history_keep=3,
            undecided_after=60.0,
            handled_events_keep=256,
        )
        web = config.apps["web"]
        assert web.umask == 0o027
        assert web.shared == ("log", "public/uploads")
        assert web.artifact_cache_bytes == 1024**3
        assert web.aborted_staging_max_age == 2 * 86400
        assert web.hooks["post_release"] == (("/bin/true",),)
        assert web.hooks["validate"] == (("/bin/true",), ("/usr/bin/env", "check", "--fast"))
        assert web.hooks["post_symlink"] == ()
        assert web.timeouts == Timeouts(download=60, hook=90, prepare=120, apply=3600, lock=0.25)
        assert web.limits == Limits(
            max_members=10,
            max_bytes=10_000_000,
            max_ratio=40.0,
            disk_fraction=0.25,
            disk_reserve=2 * 1024**3,
        )
        assert config.apps["api"].app_dir == Path("/srv/other/api")
        assert sorted(config.apps) == ["api", "web"]

    def test_unknown_app_lookup_names_the_configured_ones(self) -> None:
        with pytest.raises(ConfigError, match=r"apps\.nope: no such app \(configured: web\)"):
            parse(minimal()).app("nope")


class TestFrozen:
    def test_attribute_assignment_raises(self) -> None:
        config = parse(minimal())
        for obj, name in (
            (config, "kv_prefix"),
            (config.consul, "token"),
            (config.s3, "bucket"),
            (config.daemon, "session_ttl"),
            (config.apps["web"], "keep_releases"),
            (config.apps["web"].timeouts, "hook"),
            (config.apps["web"].limits, "max_bytes"),
        ):
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(obj, name, 1)

    def test_mappings_are_read_only(self) -> None:
        config = parse(with_app(hooks={"validate": "/bin/true"}))
        with pytest.raises(TypeError):
            config.apps["other"] = config.apps["web"]  # type: ignore[index]
        with pytest.raises(TypeError):
            config.apps["web"].hooks["validate"] = ()  # type: ignore[index]

    def test_objects_are_hashable_values(self) -> None:
        a, b = parse(minimal()), parse(minimal())
        assert a.consul == b.consul and hash(a.consul) == hash(b.consul)
        assert a.apps["web"].timeouts == b.apps["web"].timeouts


# (input, the one problem it must produce)
BAD: list[tuple[dict[str, Any], str]] = [
    (with_app(keep_releases="five"), 'apps.web.keep_releases: must be an integer >= 1, got "five"'),
    (with_app(keep_releases=0), "apps.web.keep_releases: must be an integer >= 1, got 0"),
    (with_app(keep_releases=True), "apps.web.keep_releases: must be an integer >= 1, got True"),
    (with_app(keep_releases=2.5), "apps.web.keep_releases: must be an integer >= 1, got 2.5"),
    (with_app(root="srv"), 'apps.web.root: must be an absolute directory path, got "srv"'),
    (
        with_app(user=1000),
        "apps.web.user: must be a user name, got 1000 (YAML read it as the number 1000: quote it)",
    ),
    (
        with_app(umask="0777"),
        "apps.web.umask: 0777 takes read permission from the files' owner: the app could not "
        "use its own release (0022 or 0027 is usual)",
    ),
    (
        with_app(umask="0177"),
        "apps.web.umask: 0177 takes execute permission from the files' owner: the app could "
        "not use its own release (0022 or 0027 is usual)",
    ),
    (
        {"s3": {"bucket": "b"}, "apps": {123: {"root": "/srv"}}},
        "apps.123: an app name must be a string; YAML read this key as the number 123: quote it",
    ),
    (
        {"s3": {"bucket": "b"}, "apps": {None: {"root": "/srv"}}},
        "apps.null: an app name must be a string; YAML read this key as null: quote it",
    ),
    (
        {"s3": {"bucket": "b"}, "apps": {True: {"root": "/srv"}}},
        "apps.true: an app name must be a string; YAML read this key as the boolean true: quote it",
    ),
    (
        {"s3": {"bucket": "b"}, "daemon": {"state_dir": "/srv/web/.state"}, **with_app()},
        "daemon.state_dir: /srv/web/.state is inside /srv/web/.state, which app web's "
        "watcher keeps for itself: give the daemon a directory of its own, like "
        "/var/lib/watcher",
    ),
    (
        {"s3": {"bucket": "b"}, "daemon": {"state_dir": "/srv/web/releases/s"}, **with_app()},
        "daemon.state_dir: /srv/web/releases/s is inside /srv/web/releases, which app web's "
        "watcher keeps for itself: give the daemon a directory of its own, like "
        "/var/lib/watcher",
    ),
    (
        with_app(umask="abc"),
        'apps.web.umask: must be an octal umask like "0022" (quoted: YAML reads 27 as '
        'twenty-seven), got "abc"',
    ),
    (
        with_app(umask=0o1777),
        'apps.web.umask: must be an octal umask like "0022" (quoted: YAML reads 27 as '
        "twenty-seven), got 1023",
    ),
    (
        with_app(prefetch="lazy"),
        'apps.web.prefetch: must be one of extract, download, off, got "lazy"',
    ),
    (
        with_app(on_validate_failure="ignore"),
        'apps.web.on_validate_failure: must be one of rollback, hold, got "ignore"',
    ),
    (with_app(shared="log"), 'apps.web.shared: must be a list of relative paths, got "log"'),
    (
        with_app(shared=["log", "/var/log"]),
        'apps.web.shared[1]: must be a relative path inside the release, got "/var/log"',
    ),
    (
        with_app(shared=["../up"]),
        'apps.web.shared[0]: must be a relative path inside the release, got "../up"',
    ),
    (
        with_app(shared=[".watcher/x"]),
        'apps.web.shared[0]: must be a relative path inside the release, got ".watcher/x"',
    ),
    (
        with_app(shared=["log", "log/app"]),
        'apps.web.shared[1]: "log/app" overlaps "log" listed before it',
    ),
    (
        with_app(shared=["log/app", "./log"]),
        'apps.web.shared[1]: "log" overlaps "log/app" listed before it',
    ),
    (with_app(shared=["log", "log/"]), 'apps.web.shared[1]: "log" overlaps "log" listed before it'),
    (
        with_app(artifact_cache_bytes="lots"),
        'apps.web.artifact_cache_bytes: must be a size (bytes, or like "512M", "2GiB"), got "lots"',
    ),
    (
        with_app(aborted_staging_max_age="soon"),
        'apps.web.aborted_staging_max_age: must be a duration (seconds, or like "30s", "5m"), '
        'got "soon"',
    ),
    (
        with_app(flip_delay="6s"),
        'apps.web.flip_delay: must be a duration from 0 to 5s (like "100ms"; 0 flips at once), '
        'got "6s"',
    ),
    (
        with_app(flip_delay=True),
        'apps.web.flip_delay: must be a duration from 0 to 5s (like "100ms"; 0 flips at once), '
        "got True",
    ),
    (
        with_app(timeouts={"hook": "0s"}),
        'apps.web.timeouts.hook: must be a duration of at least 1 s (like "30s", "5m"; "ms" '
        'is milliseconds), got "0s"',
    ),
    (
        with_app(timeouts={"lock": -1}),
        'apps.web.timeouts.lock: must be a duration (seconds, or like "30s", "5m"), got -1',
    ),
    (
        with_app(limits={"max_members": 0}),
        "apps.web.limits.max_members: must be an integer >= 1, got 0",
    ),
    (
        with_app(limits={"max_ratio": 0.5}),
        "apps.web.limits.max_ratio: must be a number >= 1, got 0.5",
    ),
    (
        with_app(limits={"max_ratio": float("nan")}),
        "apps.web.limits.max_ratio: must be a number >= 1, got nan",
    ),
    (
        with_app(limits={"disk_fraction": 0}),
        "apps.web.limits.disk_fraction: must be a number > 0 and <= 1, got 0",
    ),
    (
        with_app(limits={"disk_fraction": 1.5}),
        "apps.web.limits.disk_fraction: must be a number > 0 and <= 1, got 1.5",
    ),
    (
        with_app(limits={"disk_fraction": "half"}),
        'apps.web.limits.disk_fraction: must be a number > 0 and <= 1, got "half"',
    ),
    (
        with_app(limits={"disk_reserve": -1}),
        'apps.web.limits.disk_reserve: must be a size (bytes, or like "512M", "2GiB"), got -1',
    ),
    (
        with_app(limits={"max_bytes": "1 parsec"}),
        'apps.web.limits.max_bytes: must be a size (bytes, or like "512M", "2GiB"), got "1 parsec"',
    ),
    (
        with_app(hooks={"validate": "check.sh"}),
        'apps.web.hooks.validate: must be an absolute path to an executable, got "check.sh"',
    ),
    (
        with_app(hooks={"validate": [["/bin/true"], "rel/x"]}),
        'apps.web.hooks.validate[1]: must be an absolute path to an executable, got "rel/x"',
    ),
    (  # [path, arg] for [[path, arg]]: the error names the nested form
        with_app(hooks={"validate": ["/bin/true", "rel/x"]}),
        'apps.web.hooks.validate[1]: "rel/x" is not an executable file; if it is an argument '
        "of apps.web.hooks.validate[0], write the hook as one list: [[/bin/true, rel/x]]",
    ),
    (
        with_app(hooks={"post_abort": [[]]}),
        "apps.web.hooks.post_abort[0]: must be an executable path or a list of arguments, "
        "got a list",
    ),
    (
        with_app(hooks={"post_abort": [{"cmd": "/bin/x"}]}),
        "apps.web.hooks.post_abort[0]: must be an executable path or a list of arguments, "
        "got a mapping",
    ),
    (
        with_app(hooks={"pre_release": "/bin/true"}),
        "apps.web.hooks.pre_release: unknown key "
        "(known: post_abort, post_release, post_symlink, validate)",
    ),
    (with_app(hooks="/bin/true"), 'apps.web.hooks: must be a mapping, got "/bin/true"'),
    (with_app(timeouts=[1]), "apps.web.timeouts: must be a mapping, got a list"),
    (minimal(apps={"web": {}}), "apps.web.root: is required"),
    (minimal(apps={"web": None}), "apps.web.root: is required"),
    (minimal(apps={"web": "/srv"}), 'apps.web: must be a mapping, got "/srv"'),
    (
        minimal(apps={"we b": {"root": "/srv"}}),
        "apps.we b: app names must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}",
    ),
    (minimal(apps={}), "apps: must be a mapping with at least one app"),
    (minimal(apps=["web"]), "apps: must be a mapping with at least one app"),
    (minimal(s3={"prefix": "x"}), "s3.bucket: is required"),
    (minimal(s3={"bucket": ""}), 's3.bucket: must be a bucket name, got ""'),
    (
        minimal(s3={"bucket": "b", "region": 5}),
        "s3.region: must be a region name, got 5 (YAML read it as the number 5: quote it)",
    ),
    (minimal(node="bad node"), 'node: must match [A-Za-z0-9][A-Za-z0-9._-]*, got "bad node"'),
    (
        minimal(node=7),
        "node: must be a node name, got 7 (YAML read it as the number 7: quote it)",
    ),
    (minimal(node="web-1\n"), 'node: must match [A-Za-z0-9][A-Za-z0-9._-]*, got "web-1\\n"'),
    (
        minimal(kv_prefix="bad prefix!"),
        'kv_prefix: must be a KV path like "watcher", got "bad prefix!"',
    ),
    (minimal(kv_prefix="/"), 'kv_prefix: must be a KV path like "watcher", got ""'),
    *[
        (
            minimal(kv_prefix=bad),
            'kv_prefix: must be a KV path like "watcher/prod": no empty, "." or ".." part '
            f'between its slashes, got "{bad.strip("/")}"',
        )
        for bad in ("x/../watcher", "/watcher/../x", "a//b", "a/./b", "a/..", "w/.")
    ],
    (
        minimal(consul={"address": "not an address"}),
        'consul.address: must be an address like "127.0.0.1:8500" or "https://host:8501", '
        'got "not an address"',
    ),
    (minimal(consul={"verify": "yes"}), 'consul.verify: must be true or false, got "yes"'),
    (
        minimal(consul={"timeout": "forever"}),
        'consul.timeout: must be a duration like "10s", got "forever"',
    ),
    (
        minimal(consul={"ca_file": "/nonexistent/ca.pem"}),
        "consul.ca_file: cannot read /nonexistent/ca.pem",
    ),
    (
        minimal(consul={"token_file": "/nonexistent/token"}),
        "consul.token_file: cannot read /nonexistent/token: No such file or directory",
    ),
    (minimal(consul="127.0.0.1:8500"), 'consul: must be a mapping, got "127.0.0.1:8500"'),
    (minimal(daemon={"session_ttl": "0.5s"}), "daemon.session_ttl: must be between 1s and 24h"),
    (
        minimal(daemon={"history_keep": "all"}),
        'daemon.history_keep: must be an integer from 2 to 1000, got "all"',
    ),
    (
        # any host's token writes the history: hosts read at most HISTORY_MAX ids of it
        minimal(daemon={"history_keep": 1001}),
        "daemon.history_keep: must be an integer from 2 to 1000, got 1001",
    ),
    (
        minimal(daemon={"handled_events_keep": 100}),
        "daemon.handled_events_keep: must be an integer >= 256, got 100",
    ),
    (
        minimal(daemon={"listen": 9473}),
        'daemon.listen: must be an address like "127.0.0.1:9473", or null to disable, got 9473',
    ),
]


class TestErrorsNameTheirPath:
    @pytest.mark.parametrize(("data", "expected"), BAD, ids=[e for _, e in BAD])
    def test_one_problem(self, data: dict[str, Any], expected: str) -> None:
        assert problems(data) == [expected]

    def test_every_problem_is_reported_at_once(self) -> None:
        found = problems(
            {
                "s3": {"bucket": "b"},
                "daemon": {"history_keep": 0},
                "apps": {
                    "web": {"root": "/srv", "keep_releases": "five"},
                    "api": {"root": "rel", "timeouts": {"hook": "x"}},
                },
            }
        )
        assert found == [
            "daemon.history_keep: must be an integer from 2 to 1000, got 0",
            'apps.web.keep_releases: must be an integer >= 1, got "five"',
            'apps.api.root: must be an absolute directory path, got "rel"',
            'apps.api.timeouts.hook: must be a duration of at least 1 s (like "30s", "5m"; '
            '"ms" is milliseconds), got "x"',
        ]

    @pytest.mark.parametrize(
        ("data", "where", "known"),
        [
            (minimal(colour="blue"), "colour", "apps, consul, daemon, kv_prefix, node, s3"),
            (
                minimal(consul={"addr": "x"}),
                "consul.addr",
                "address, ca_file, cert_file, key_file, timeout, token, token_file, verify",
            ),
            (
                minimal(s3={"bucket": "b", "bukcet": "c"}),
                "s3.bukcet",
                "bucket, endpoint_url, prefix, region",
            ),
            (
                minimal(daemon={"ttl": 1}),
                "daemon.ttl",
                "handled_events_keep, history_keep, listen, session_ttl, state_dir, "
                "undecided_after",
            ),
            (
                with_app(keep=3),
                "apps.web.keep",
                "aborted_staging_max_age, artifact_cache_bytes, flip_delay, group, hooks, "
                "keep_releases, limits, on_validate_failure, prefetch, prune_ignore, raw_events, "
                "root, shared, timeouts, umask, user, webhook",
            ),
            (
                with_app(timeouts={"hooks": 1}),
                "apps.web.timeouts.hooks",
                "apply, download, hook, lock, prepare",
            ),
            (
                with_app(limits={"members": 1}),
                "apps.web.limits.members",
                "disk_fraction, disk_reserve, max_bytes, max_members, max_ratio",
            ),
            (minimal(**{"1": 2}), "1", "apps, consul, daemon, kv_prefix, node, s3"),
        ],
    )
    def test_unknown_keys_at_every_level(
        self, data: dict[str, Any], where: str, known: str
    ) -> None:
        assert problems(data) == [f"{where}: unknown key (known: {known})"]

    def test_top_level_must_be_a_mapping(self) -> None:
        # only that: every required key would be missing too, which is only noise
        assert problems(["s3", "apps"]) == ["<top>: must be a mapping, got a list"]
        assert problems("s3") == ['<top>: must be a mapping, got "s3"']

    def test_watcherctl_takes_a_config_without_apps(self) -> None:
        """A CI machine's config (consul, s3): watcherctl reads it, the daemon does not."""
        data = minimal()
        del data["apps"]
        assert parse_config(data, apps_required=False).apps == {}
        assert problems(data) == [
            "apps: must be a mapping with at least one app (watcher runs a host's apps; a "
            "config that only `watcherctl publish` reads, a CI machine's, needs none and is "
            "not for watcher)"
        ]
        assert problems(minimal(apps=["web"])) == ["apps: must be a mapping with at least one app"]
        with pytest.raises(ConfigError) as caught:
            parse_config(minimal(apps=["web"]), apps_required=False)
        assert caught.value.problems == ["apps: must be a mapping of app names to their settings"]

    def test_raw_events_default_on_and_take_a_boolean(self) -> None:
        assert parse(minimal()).apps["web"].raw_events is True
        assert parse(with_app(raw_events=False)).apps["web"].raw_events is False
        assert problems(with_app(raw_events="no")) == [
            'apps.web.raw_events: must be true or false, got "no"'
        ]

    def test_listen_can_be_disabled(self) -> None:
        assert parse(minimal(daemon={"listen": None})).daemon.listen is None
        assert parse(minimal(daemon={"listen": False})).daemon.listen is None
        assert parse(minimal(daemon={"listen": "0.0.0.0:1"})).daemon.listen == "0.0.0.0:1"

    @pytest.mark.parametrize("where", ["999.1.1.1:80", "10.0.0:80", "8500"])
    def test_an_address_of_digits_is_an_ipv4_address_or_refused(self, where: str) -> None:
        """The operator review: `check-config` said OK of `999.1.1.1:80`, which failed only
        at `watcher run`."""
        said = problems(minimal(daemon={"listen": where}))
        assert len(said) == 1 and said[0].startswith("daemon.listen: must be"), said
        assert said[0].endswith(f'got "{where}"'), said
        said = problems(minimal(consul={"address": where}))
        assert len(said) == 1 and said[0].startswith("consul.address: must be"), said
        assert parse(minimal(consul={"address": "10.0.0.1:8500"})).consul.address

    def test_a_yaml_boolean_where_a_word_goes_says_why(self, tmp_path: Path) -> None:
        # `prefetch: yes` is True to YAML: the message said "got True" of what was "yes".
        path = write(
            tmp_path / "w.yaml", "s3: {bucket: b}\napps:\n  web: {root: /srv, prefetch: yes}\n"
        )
        with pytest.raises(ConfigError) as info:
            load_config(path, env={})
        [said] = info.value.problems
        assert said.startswith("apps.web.prefetch: must be one of extract, download, off, got True")
        assert said.endswith("(YAML reads yes, no, on and off unquoted as true or false: quote it)")
        # not where a boolean is what is asked for
        assert problems(with_app(raw_events="no")) == [
            'apps.web.raw_events: must be true or false, got "no"'
        ]


class TestFiles:
    def test_load_from_a_file(self, tmp_path: Path) -> None:
        path = write(tmp_path / "w.yaml", "s3:\n  bucket: b\napps:\n  web:\n    root: /srv\n")
        config = load_config(path, env={})
        assert config.source == str(path)
        assert config.apps["web"].root == "/srv"

    def test_path_from_watcher_config_variable(self, tmp_path: Path) -> None:
        path = write(tmp_path / "w.yaml", "s3: {bucket: b}\napps: {web: {root: /srv}}\n")
        assert load_config(env={"WATCHER_CONFIG": str(path)}).source == str(path)

    def test_default_path(self) -> None:
        with pytest.raises(ConfigError) as info:
            load_config(env={})
        assert info.value.source == "/etc/watcher/watcher.yaml"

    def test_malformed_yaml_names_line_and_column(self, tmp_path: Path) -> None:
        path = write(tmp_path / "w.yaml", "s3:\n  bucket: b\napps:\n  web: [1\n  api: 2\n")
        with pytest.raises(ConfigError) as info:
            load_config(path, env={})
        [problem] = info.value.problems
        assert problem.startswith("line 5, column 6: invalid YAML: ")
        assert str(info.value).startswith(f"{path}: line 5, column 6: invalid YAML")

    def test_libyaml_parses_and_the_python_parser_says_where_it_refuses(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # PyYAML's wheels carry LibYAML: every start parses the config with it.
        assert yaml.__with_libyaml__
        assert issubclass(config_module._UniqueKeyLoader, yaml.CSafeLoader)
        seen: list[type] = []
        parse = yaml.parse

        def spy(text: str, Loader: type) -> Any:
            seen.append(Loader)
            return parse(text, Loader=Loader)

        monkeypatch.setattr(yaml, "parse", spy)
        good = write(tmp_path / "good.yaml", yaml.safe_dump(minimal()))
        assert load_config(good, env={}).app("web").name == "web"
        assert seen == [config_module._UniqueKeyLoader]
        seen.clear()
        bad = write(tmp_path / "bad.yaml", "s3:\n  bucket: b\napps:\n  web: [1\n  api: 2\n")
        with pytest.raises(ConfigError, match="line 5, column 6: invalid YAML"):
            load_config(bad, env={})
        assert seen == [config_module._UniqueKeyLoader, yaml.SafeLoader]

    def test_tab_indentation(self, tmp_path: Path) -> None:
        path = write(tmp_path / "w.yaml", "s3:\n\tbucket: b\n")
        with pytest.raises(ConfigError, match=r"line 2, column 1: invalid YAML: "):
            load_config(path, env={})

    def test_duplicate_keys_are_an_error(self, tmp_path: Path) -> None:
        # YAML silently keeps the last of two equal keys: a second "web:" would replace the
        # first app without a word.
        path = write(
            tmp_path / "w.yaml",
            "s3: {bucket: b}\napps:\n  web:\n    root: /srv\n  web:\n    root: /opt\n",
        )
        with pytest.raises(ConfigError) as info:
            load_config(path, env={})
        [problem] = info.value.problems
        assert problem.startswith("line 5, column 3: ")
        assert 'duplicate key "web"' in problem

    def test_a_merge_key_shares_an_apps_settings_and_its_own_keys_win(self, tmp_path: Path) -> None:
        """The newcomer test: `<<: *defaults` failed with "could not determine a
        constructor for the tag 'tag:yaml.org,2002:merge'" (the duplicate-key check
        constructed the merge key as a key). A key written twice is still refused."""
        text = (
            "s3: {bucket: b}\napps:\n  web: &defaults\n    root: /srv\n    keep_releases: 3\n"
            "  api:\n    <<: *defaults\n    keep_releases: 4\n"
        )
        apps = load_config(write(tmp_path / "w.yaml", text), env={}).apps
        assert [(a.name, a.root, a.keep_releases) for a in apps.values()] == [
            ("web", "/srv", 3),
            ("api", "/srv", 4),
        ]
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path / "w.yaml", text + "    keep_releases: 5\n"), env={})
        assert info.value.problems == [
            'line 9, column 5: invalid YAML: duplicate key "keep_releases"'
        ], info.value.problems

    @pytest.mark.parametrize(
        ("merge", "where"),
        [
            ("{keep_releases: 3, keep_releases: 4}", "line 4, column 28"),
            ("[{root: /opt}, {keep_releases: 3, keep_releases: 4}]", "line 4, column 43"),
            ("\n      <<: {root: /opt, root: /srv}", "line 5, column 24"),
            ("{root: /opt}\n    <<: {keep_releases: 3}", "line 5, column 5"),
        ],
    )
    def test_a_key_given_twice_in_an_inline_merged_mapping_is_refused(
        self, tmp_path: Path, merge: str, where: str
    ) -> None:
        """The review: `<<: {a: 1, a: 2}` took the first value without a word (the
        inline mapping is merged from its nodes, never built as a mapping of its own)."""
        text = f"s3: {{bucket: b}}\napps:\n  web:\n    <<: {merge}\n    umask: '022'\n"
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path / "w.yaml", text), env={})
        [problem] = info.value.problems
        assert problem.startswith(where + ": invalid YAML: duplicate key "), problem

    def test_missing_file(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        with pytest.raises(ConfigError) as info:
            load_config(tmp_path / "nope.yaml", env={})
        assert str(info.value) == f"{tmp_path / 'nope.yaml'}: no such file"
        with pytest.raises(ConfigError) as info:
            load_config(None, env={"WATCHER_CONFIG": str(tmp_path / "env.yaml")})
        assert str(info.value).endswith("env.yaml: no such file (named by $WATCHER_CONFIG)")
        monkeypatch.setattr("watcher.config.DEFAULT_PATH", tmp_path / "default.yaml")
        with pytest.raises(ConfigError) as info:
            load_config(None, env={})
        assert str(info.value) == (
            f"{tmp_path / 'default.yaml'}: no such file (the default; give a config with "
            "-c FILE or $WATCHER_CONFIG)"
        )

    def test_unreadable_file(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError) as info:
            load_config(tmp_path, env={})
        assert info.value.problems == ["cannot read: Is a directory"]

    def test_not_utf8(self, tmp_path: Path) -> None:
        path = tmp_path / "w.yaml"
        path.write_bytes(b"s3: {bucket: \xff}\n")
        with pytest.raises(ConfigError) as info:
            load_config(path, env={})
        assert info.value.problems == ["cannot read: not UTF-8 text"]

    def test_empty_file(self, tmp_path: Path) -> None:
        for text in ("", "# only a comment\n", "---\n"):
            path = write(tmp_path / "w.yaml", text)
            with pytest.raises(ConfigError) as info:
                load_config(path, env={})
            assert info.value.problems == ["<top>: the file is empty"]


class TestDurationsAndSizes:
    @pytest.mark.parametrize(
        ("value", "seconds"),
        [
            (30, 30.0),
            (1.5, 1.5),
            ("30", 30.0),
            ("30s", 30.0),
            ("5m", 300.0),
            ("1h", 3600.0),
            ("2d", 172800.0),
            ("250ms", 0.25),
            (" 10 s ", 10.0),
            ("1.5m", 90.0),
        ],
    )
    def test_durations(self, value: Any, seconds: float) -> None:
        assert parse_duration(value) == seconds

    @pytest.mark.parametrize(
        "value",
        [
            0,
            -1,
            "0s",
            "-5s",
            "5 minutes",
            "5M",
            "",
            "s",
            True,
            None,
            [1],
            math.inf,
            math.nan,
            ".inf",
        ],
    )
    def test_bad_durations(self, value: Any) -> None:
        with pytest.raises(ValueError):
            parse_duration(value)

    @pytest.mark.parametrize(
        ("value", "seconds"),
        [
            (0, 0.0),
            ("0", 0.0),
            ("0ms", 0.0),
            (0.0, 0.0),
            ("0.0s", 0.0),
            ("250ms", 0.25),
            (5, 5.0),
            ("1.5s", 1.5),
        ],
    )
    def test_flip_delay(self, value: Any, seconds: float) -> None:
        assert parse(with_app(flip_delay=value)).app("web").flip_delay == seconds

    @pytest.mark.parametrize("value", [-0.1, "-1s", "5.1s", "1m", "soon", False, math.nan])
    def test_bad_flip_delays(self, value: Any) -> None:
        assert [p.split(":")[0] for p in problems(with_app(flip_delay=value))] == [
            "apps.web.flip_delay"
        ]

    @pytest.mark.parametrize("key", ["prepare", "apply", "hook", "download"])
    def test_a_step_timeout_under_a_second_is_refused_saying_what_ms_is(self, key: str) -> None:
        """`prepare: 1ms` for `1m` passed check-config and aborted every deploy (the
        operator review); `lock` may be short (it is a wait, not a step)."""
        found = problems(with_app(timeouts={key: "1ms"}))
        assert found == [
            f'apps.web.timeouts.{key}: must be a duration of at least 1 s (like "30s", '
            '"5m"; "ms" is milliseconds), got "1ms"'
        ]
        timeouts = parse(with_app(timeouts={key: "1s", "lock": "250ms"})).app("web").timeouts
        assert (getattr(timeouts, key), timeouts.lock) == (1.0, 0.25)

    def test_non_finite_durations_are_refused_in_the_file(self) -> None:
        data = yaml.safe_load("timeouts: {hook: .inf, apply: .nan}")
        found = problems(with_app(**data))
        assert [p.split(":")[0] for p in found] == [
            "apps.web.timeouts.hook",
            "apps.web.timeouts.apply",
        ]

    @pytest.mark.parametrize(
        ("value", "size"),
        [
            (0, 0),
            (1048576, 1048576),
            ("100", 100),
            ("100b", 100),
            ("512K", 512_000),
            ("512KiB", 524288),
            ("512M", 512_000_000),
            ("512MB", 512_000_000),
            ("2GiB", 2 * 1024**3),
            ("1.5G", 1_500_000_000),
            ("1TiB", 1024**4),
            ("3 mib", 3 * 1024**2),
        ],
    )
    def test_sizes(self, value: Any, size: int) -> None:
        assert parse_size(value) == size

    @pytest.mark.parametrize("value", [-1, "-1", "12 parsecs", "M", "", 1.5, True, None, "1e9"])
    def test_bad_sizes(self, value: Any) -> None:
        with pytest.raises(ValueError):
            parse_size(value)

    def test_umask_forms(self) -> None:
        assert parse(with_app(umask="0027")).apps["web"].umask == 0o027
        assert parse(with_app(umask="027")).apps["web"].umask == 0o027
        # YAML 1.1 reads an unquoted leading-zero number as octal.
        assert parse(with_app(**yaml.safe_load("umask: 0077"))).apps["web"].umask == 0o077

    def test_an_unquoted_decimal_umask_in_the_file_is_refused(self, tmp_path: Path) -> None:
        # `umask: 27` is twenty-seven to YAML (0o33: files world-readable), not 0o027.
        text = "s3: {bucket: b}\napps:\n  web: {root: /srv, umask: %s}\n"
        path = write(tmp_path / "w.yaml", text % "27")
        with pytest.raises(ConfigError) as info:
            load_config(path, env={})
        assert info.value.problems == [
            'apps.web.umask: must be an octal umask like "0022" (quoted: YAML reads 27 as '
            "twenty-seven), got 27"
        ]
        for written, umask in (("027", 0o027), ('"0027"', 0o027), ("0", 0), ("7", 7)):
            path.write_text(text % written)
            assert load_config(path, env={}).apps["web"].umask == umask, written
        # Other integers of the file are plain integers to everything else.
        path.write_text(text % "022" + "daemon: {handled_events_keep: 300}\n")
        assert load_config(path, env={}).daemon.handled_events_keep == 300


class TestConsulEnvironment:
    def test_address(self) -> None:
        consul = parse(minimal(), env={"CONSUL_HTTP_ADDR": "10.1.2.3:8500"}).consul
        assert (consul.scheme, consul.address) == ("http", "10.1.2.3:8500")

    def test_https_scheme_in_the_address(self) -> None:
        consul = parse(minimal(), env={"CONSUL_HTTP_ADDR": "https://consul.local:8501"}).consul
        assert (consul.scheme, consul.address) == ("https", "consul.local:8501")
        assert consul.base_url == "https://consul.local:8501"

    def test_http_scheme_in_the_address(self) -> None:
        consul = parse(minimal(), env={"CONSUL_HTTP_ADDR": "http://127.0.0.2:8500/"}).consul
        assert consul.base_url == "http://127.0.0.2:8500"

    def test_http_ssl_variable(self) -> None:
        env = {"CONSUL_HTTP_ADDR": "127.0.0.1:8501", "CONSUL_HTTP_SSL": "true"}
        assert parse(minimal(), env=env).consul.base_url == "https://127.0.0.1:8501"

    @pytest.mark.parametrize("value", ["maybe", "on", "enabled", "2"])
    def test_an_http_ssl_value_that_is_neither_true_nor_false_is_refused(self, value: str) -> None:
        """The newcomer test: any such value meant plain HTTP, the token sent unencrypted
        (the Consul CLI refuses it)."""
        env = {"CONSUL_HTTP_ADDR": "127.0.0.1:8501", "CONSUL_HTTP_SSL": value}
        with pytest.raises(ConfigError) as info:
            parse(minimal(), env=env)
        assert info.value.problems == [
            "CONSUL_HTTP_SSL: must be true or false (1, t, true, yes or 0, f, false, no), got "
            f'"{value}": read as false it would send the token unencrypted'
        ], info.value.problems
        for plain in ("false", "0", "No", " f "):
            env["CONSUL_HTTP_SSL"] = plain
            assert parse(minimal(), env=env).consul.base_url == "http://127.0.0.1:8501"
        # Where an address names its scheme, the variable decides nothing: not refused.
        env = {"CONSUL_HTTP_SSL": value}
        consul = parse(minimal(consul={"address": "https://c:8501"}), env=env).consul
        assert consul.base_url == "https://c:8501"
        env["CONSUL_HTTP_ADDR"] = "http://127.0.0.1:8500"
        assert parse(minimal(), env=env).consul.base_url == "http://127.0.0.1:8500"

    def test_a_state_dir_beside_the_watchers_own_directories_is_fine(self) -> None:
        """Only the trees the watcher keeps for itself in <root>/<app> are refused."""
        for state_dir in ("/srv/web/watcher-state", "/srv/web", "/srv", "/srv/webx/.state"):
            config = parse({**with_app(), "daemon": {"state_dir": state_dir}})
            assert config.daemon.state_dir == state_dir

    def test_token(self) -> None:
        assert parse(minimal(), env={"CONSUL_HTTP_TOKEN": "s3cr3t"}).consul.token == "s3cr3t"

    def test_empty_variables_are_unset(self) -> None:
        env = {"CONSUL_HTTP_TOKEN": "", "CONSUL_HTTP_ADDR": "", "CONSUL_CACERT": ""}
        assert parse(minimal(), env=env).consul == ConsulSettings()

    def test_token_file(self, tmp_path: Path) -> None:
        token = write(tmp_path / "token", "\n  from-file \n")
        env = {"CONSUL_HTTP_TOKEN_FILE": str(token)}
        assert parse(minimal(), env=env).consul.token == "from-file"

    def test_token_file_wins_over_token_like_consul(self, tmp_path: Path) -> None:
        # Consul's api.NewClient: "-token-file, -token, CONSUL_HTTP_TOKEN_FILE,
        # CONSUL_HTTP_TOKEN" in that order of precedence.
        token = write(tmp_path / "token", "from-file\n")
        env = {"CONSUL_HTTP_TOKEN": "from-env", "CONSUL_HTTP_TOKEN_FILE": str(token)}
        assert parse(minimal(), env=env).consul.token == "from-file"

    def test_unreadable_token_file_names_the_variable_that_named_it(self, tmp_path: Path) -> None:
        env = {"CONSUL_HTTP_TOKEN_FILE": str(tmp_path / "missing")}
        # Said of the environment, not of the config file (which is not at fault).
        assert problems(minimal(), env=env, source="environment") == [
            f"CONSUL_HTTP_TOKEN_FILE: cannot read {tmp_path / 'missing'}: No such file or directory"
        ]

    def test_an_empty_token_file_is_refused(self, tmp_path: Path) -> None:
        # `consul acl token create ... | jq -r .SecretID > file` after a failed create:
        # taken as "no token", every request would run with the agent's anonymous token.
        empty = write(tmp_path / "token", "\n  \n")
        assert problems(minimal(consul={"token_file": str(empty)}), env={}) == [
            f"consul.token_file: {empty} is empty (it should hold the token's SecretID)"
        ]
        assert problems(
            minimal(), env={"CONSUL_HTTP_TOKEN_FILE": str(empty)}, source="environment"
        ) == [f"CONSUL_HTTP_TOKEN_FILE: {empty} is empty (it should hold the token's SecretID)"]

    def test_a_token_file_holding_more_than_the_secret_is_refused_unechoed(
        self, tmp_path: Path
    ) -> None:
        # `consul acl token create` prints a table; saved whole, it would reach an HTTP
        # header, and the error naming the header would print the secret.
        table = write(tmp_path / "token", "AccessorID: abc\nSecretID:   0d1e-secret\n")
        (problem,) = problems(
            minimal(), env={"CONSUL_HTTP_TOKEN_FILE": str(table)}, source="environment"
        )
        assert problem.startswith(f"CONSUL_HTTP_TOKEN_FILE ({table}): the token holds spaces")
        assert "secret" not in problem.replace("SecretID", "")
        (problem,) = problems(minimal(), env={"CONSUL_HTTP_TOKEN": "a b"}, source="environment")
        assert problem.startswith("CONSUL_HTTP_TOKEN: the token holds")
        # With a problem of the file's own, each is said of the file, the variable named.
        both = problems(
            minimal(s3={"bucket": 5}), env={"CONSUL_HTTP_TOKEN": "a b"}, source="test.yaml"
        )
        assert len(both) == 2 and both[1].startswith("s3.bucket: "), both
        assert both[0].startswith("CONSUL_HTTP_TOKEN (from the environment): the token holds")
        data = minimal()
        data["consul"] = {"token": "a b"}
        (problem,) = problems(data, env={"CONSUL_HTTP_TOKEN": "fine"})
        assert problem.startswith("consul.token: the token holds spaces")
        binary = tmp_path / "binary"
        binary.write_bytes(b"\xff\xfe\x00")
        assert problems(
            minimal(), env={"CONSUL_HTTP_TOKEN_FILE": str(binary)}, source="environment"
        ) == [f"CONSUL_HTTP_TOKEN_FILE: {binary} is not text (a token is one line)"]

    def test_tls_files(self, tmp_path: Path) -> None:
        ca, cert, key = (write(tmp_path / n, "x") for n in ("ca.pem", "cert.pem", "key.pem"))
        env = {
            "CONSUL_CACERT": str(ca),
            "CONSUL_CLIENT_CERT": str(cert),
            "CONSUL_CLIENT_KEY": str(key),
        }
        consul = parse(minimal(), env=env).consul
        assert (consul.ca_file, consul.cert_file, consul.key_file) == (str(ca), str(cert), str(key))

    def test_client_cert_needs_its_key(self, tmp_path: Path) -> None:
        env = {"CONSUL_CLIENT_CERT": str(write(tmp_path / "cert.pem", "x"))}
        assert problems(minimal(), env=env) == [
            "consul: cert_file and key_file must be given together"
        ]

    def test_missing_ca_file(self, tmp_path: Path) -> None:
        env = {"CONSUL_CACERT": str(tmp_path / "nope.pem")}
        assert problems(minimal(), env=env, source="environment") == [
            f"CONSUL_CACERT: cannot read {tmp_path}/nope.pem"
        ]

    @pytest.mark.parametrize(
        ("value", "verify"),
        [
            ("false", False),
            ("0", False),
            ("FALSE", False),
            ("False", False),
            ("f", False),
            ("true", True),
            ("1", True),
            ("TRUE", True),
            ("t", True),
        ],
    )
    def test_ssl_verify(self, value: str, verify: bool) -> None:
        # Go's strconv.ParseBool, which the Consul CLI uses for CONSUL_HTTP_SSL_VERIFY.
        env = {"CONSUL_HTTP_SSL_VERIFY": value}
        assert parse(minimal(), env=env).consul.verify is verify

    @pytest.mark.parametrize("value", ["off", "on", "disable", "nope"])
    def test_an_ssl_verify_that_is_no_yes_or_no_is_said(self, value: str) -> None:
        """`off` was read as true, silently (the review): the Consul CLI refuses it, and
        so does the config now, unless the file says `verify:` itself."""
        with pytest.raises(ConfigError) as err:
            parse(minimal(), env={"CONSUL_HTTP_SSL_VERIFY": value})
        # said of the environment, not of the file
        assert (err.value.source, err.value.problems) == (
            "environment",
            [
                "CONSUL_HTTP_SSL_VERIFY: must be true or false (1, t, true, yes or 0, f, "
                f'false, no), got "{value}"'
            ],
        )
        assert parse(minimal(consul={"verify": False}), env={"CONSUL_HTTP_SSL_VERIFY": value})

    def test_the_file_wins_over_the_environment(self, tmp_path: Path) -> None:
        ca_env, ca_file = write(tmp_path / "env-ca.pem", "x"), write(tmp_path / "ca.pem", "x")
        token_file = write(tmp_path / "token", "file-token-file\n")
        env = {
            "CONSUL_HTTP_ADDR": "https://10.0.0.9:8501",
            "CONSUL_HTTP_TOKEN": "env-token",
            "CONSUL_CACERT": str(ca_env),
            "CONSUL_HTTP_SSL_VERIFY": "false",
        }
        consul = parse(
            minimal(
                consul={
                    "address": "127.0.0.5:8500",
                    "token": "file-token",
                    "ca_file": str(ca_file),
                    "verify": True,
                }
            ),
            env=env,
        ).consul
        assert consul.base_url == "http://127.0.0.5:8500"
        assert consul.token == "file-token"
        assert consul.ca_file == str(ca_file)
        assert consul.verify is True
        # The file's token_file beats the environment's token, and vice versa.
        consul = parse(minimal(consul={"token_file": str(token_file)}), env=env).consul
        assert consul.token == "file-token-file"
        env2 = {"CONSUL_HTTP_TOKEN_FILE": str(token_file)}
        assert parse(minimal(consul={"token": "t"}), env=env2).consul.token == "t"

    def test_a_variable_the_file_overrides_is_named_for_a_warning(self, tmp_path: Path) -> None:
        """The careless-operator review: CONSUL_HTTP_ADDR naming one cluster while the file
        names another did nothing, and nothing said so."""
        ca = write(tmp_path / "ca.pem", "x")
        env = {
            "CONSUL_HTTP_ADDR": "https://10.0.0.9:8501",
            "CONSUL_HTTP_TOKEN": "env-token",
            "CONSUL_CACERT": str(ca),
            "CONSUL_HTTP_SSL_VERIFY": "yes",  # the file's true, said otherwise: the same
        }
        file = {"address": "127.0.0.5:8500", "token": "file-token", "verify": True}
        config = parse(minimal(consul=file), env=env)
        assert config.consul.env_overridden == ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN")
        assert config.consul.token_from == "consul.token"
        assert env_overridden_warnings(config, leave=frozenset({"CONSUL_HTTP_TOKEN"})) == [
            "consul.address: the file's value is used, not CONSUL_HTTP_ADDR of the "
            "environment, which names another address (unset it, or remove the key from "
            "the file to use it)"
        ]
        # A no against the file's yes, or a yes against its no, is said too (the docs
        # review: the file's `verify: false` silently beat CONSUL_HTTP_SSL_VERIFY=true).
        for written, exported in ((True, "false"), (False, "1")):
            env_verify = {**env, "CONSUL_HTTP_SSL_VERIFY": exported}
            verify = parse(minimal(consul={**file, "verify": written}), env=env_verify).consul
            assert verify.verify is written
            assert "CONSUL_HTTP_SSL_VERIFY" in verify.env_overridden
            assert (
                "consul.verify: the file's value is used, not CONSUL_HTTP_SSL_VERIFY of the "
                "environment, which differs (unset it, or remove the key from the file to use it)"
            ) in env_overridden_warnings(dataclasses.replace(config, consul=verify))
        # The file's token_file overrides an exported token as well (one token is sent).
        (tmp_path / "tok").write_text("file-token\n")
        by_file = {"token_file": str(tmp_path / "tok")}
        assert parse(minimal(consul=by_file), env=env).consul.env_overridden == (
            "CONSUL_HTTP_TOKEN",
        )
        # The same address spelled otherwise, the same token, or nothing in the file: none.
        same = {"address": "https://10.0.0.9:8501/", "token": "env-token"}
        env["CONSUL_HTTP_ADDR"] = "10.0.0.9:8501"
        assert parse(minimal(consul=same), env=env).consul.env_overridden == ()
        consul = parse(minimal(), env=env).consul
        assert consul.env_overridden == ()
        assert consul.token_from == "CONSUL_HTTP_TOKEN (from the environment)"

    def test_environment_fills_what_the_file_leaves_out(self) -> None:
        env = {"CONSUL_HTTP_TOKEN": "env-token"}
        consul = parse(minimal(consul={"address": "127.0.0.5:8500"}), env=env).consul
        assert (consul.address, consul.token) == ("127.0.0.5:8500", "env-token")

    def test_bad_address_from_the_environment_is_reported(self) -> None:
        # Named by its variable: the value is not in the file the error is about.
        found = problems(
            minimal(), env={"CONSUL_HTTP_ADDR": "not an address"}, source="environment"
        )
        assert len(found) == 1
        assert found[0].startswith("CONSUL_HTTP_ADDR: must be")
        assert "not an address" in found[0]
        data = minimal()
        data["consul"] = {"address": "not an address"}
        found = problems(data, env={"CONSUL_HTTP_ADDR": "127.0.0.1:8500"})
        assert len(found) == 1 and found[0].startswith("consul.address: must be")

    def test_process_environment_is_the_default(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CONSUL_HTTP_ADDR", "https://127.0.0.9:8501")
        assert parse_config(minimal()).consul.base_url == "https://127.0.0.9:8501"


def test_app_config_is_constructible_directly() -> None:
    """Other modules' tests build AppConfig by hand; the defaults must stay usable."""
    app = AppConfig(name="web", root="/srv")
    assert app.hooks == {} and app.timeouts.hook == 300.0


class TestPruneIgnore:
    def test_names_as_the_kernel_keeps_them(self) -> None:
        app = parse_config(with_app(prune_ignore=["process_api", "init"]), env={}).app("web")
        assert app.prune_ignore == ("process_api", "init")
        assert parse_config(minimal(), env={}).app("web").prune_ignore == ()

    @pytest.mark.parametrize(
        ("value", "where", "said"),
        [
            ("process_api", "apps.web.prune_ignore", "must be a list of process names"),
            ([""], "apps.web.prune_ignore[0]", "must be a process name"),
            ([5], "apps.web.prune_ignore[0]", "must be a process name, got 5"),
            (
                ["ok", "a-very-long-process-name"],
                "apps.web.prune_ignore[1]",
                "longer than the 15 bytes the kernel keeps of a process's name: it would "
                'never match; write "a-very-long-pro"',
            ),
        ],
    )
    def test_what_is_wrong_and_where(self, value: Any, where: str, said: str) -> None:
        found = problems(with_app(prune_ignore=value))
        assert len(found) == 1 and found[0].startswith(where) and said in found[0], found
