"""docs/metrics.md lists every metric the daemon and `watcher web` export, and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from watcher import daemon, hooks
from watcher.config import parse_config
from watcher.health import Metrics
from watcher.web.app import WebState

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def exposed(registry: CollectorRegistry) -> set[str]:
    return {f.name + ("_total" if f.type == "counter" else "") for f in registry.collect()}


def test_every_metric_is_documented_once() -> None:
    config = parse_config({"s3": {"bucket": "b"}, "apps": {"web": {"root": "/srv"}}})
    daemon = exposed(Metrics().registry)
    web = exposed(WebState(config, listen_host="127.0.0.1").registry)
    rows = re.findall(r"^\| `([a-z_]+)` \| (\w+) \|[^|]*\| (daemon|web) \|", DOC.read_text(), re.M)
    documented = {(name, where) for name, _, where in rows}
    assert len(rows) == len(documented), "a metric is listed twice"
    assert documented == {(n, "daemon") for n in daemon} | {(n, "web") for n in web}


def test_no_series_beyond_the_documented_suffixes() -> None:
    """Only `_total`, `_bucket`, `_sum`, `_count` beside the names (no `_created`), as the
    docs say, in the text both processes serve once each metric has a sample."""
    config = parse_config({"s3": {"bucket": "b"}, "apps": {"web": {"root": "/srv"}}})
    metrics = Metrics()
    metrics.deploy_phase_seconds.labels(app="web", phase="prepare").observe(0.2)
    web = WebState(config, listen_host="127.0.0.1")
    web.requests.labels(route="/healthz", method="GET", status=200).inc()
    for registry in (metrics.registry, web.registry):
        names = {
            line.split("{")[0].split(" ")[0]
            for line in generate_latest(registry).decode().splitlines()
            if line and not line.startswith("#")
        }
        base = exposed(registry)
        stems = {n.removesuffix("_total") for n in base}
        allowed = base | {f"{s}{x}" for s in stems for x in ("_bucket", "_sum", "_count")}
        assert names and names <= allowed, sorted(names - allowed)


def doc_row(metric: str) -> str:
    rows = [line for line in DOC.read_text().splitlines() if line.startswith(f"| `{metric}` |")]
    assert len(rows) == 1, metric
    return rows[0]


def test_label_values_are_the_ones_the_code_uses() -> None:
    """The values a dashboard matches on: every one the code emits is in the docs, and
    the docs promise none the code never emits."""
    events = doc_row("watcher_events_handled_total")
    for value in (
        daemon.EVENT_ACTED,
        daemon.EVENT_DUPLICATE,
        daemon.EVENT_HISTORY,
        daemon.EVENT_REFUSED,
        daemon.EVENT_FAILED,
        daemon.EVENT_INVALID,
    ):
        assert f"`{value}`" in events, value
    hook_runs = doc_row("watcher_hook_runs_total")
    assert all(f"`{value}`" in hook_runs for value in hooks.HOOK_RESULTS), hook_runs
    # Observed: prepare and apply (agent._observe); no "decide" phase.
    phases = doc_row("watcher_deploy_phase_seconds")
    assert (
        "`prepare`" in phases
        and "`apply`" in phases
        and "`decide`" not in phases
        and "decide," not in phases
    )
    # An abort that was not established within the request's wait answers "undecided".
    writes = doc_row("watcher_web_writes_total")
    assert all(
        f"`{v}`" in writes for v in ("started", "aborted", "undecided", "stalled", "refused")
    )
    assert "`reconcile`" in doc_row("watcher_consul_errors_total")
    deploys = doc_row("watcher_deploys_total")
    for value in ("committed", "failed_after_commit", "aborted", "contested"):
        assert f"`{value}`" in deploys, value
