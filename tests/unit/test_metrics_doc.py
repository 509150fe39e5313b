"""docs/metrics.md lists every metric the daemon and `watcher web` export, and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry

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
