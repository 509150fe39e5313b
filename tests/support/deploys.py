"""A deploy request written straight through the store, for tests that play the hosts."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

from watcher.barrier import DeployStore, Joined
from watcher.records import ArtifactRecord


def start_deploy(
    store: DeployStore,
    deploy_id: str,
    sessions: dict[str, str],
    artifact: ArtifactRecord,
    now: datetime | None = None,
    **over: Any,
) -> Joined:
    """Write the request for ``sessions``' nodes and `inflight`; return it as a host joins it.
    ``now``: when the requester's clock says it was made (its deadlines follow from it).
    ``over``: fields of the request set otherwise (as another watcherctl would write them)."""
    record = store.new_record(
        deploy_id=deploy_id,
        kind="deploy",
        artifact=artifact,
        release=None,
        requested_by="tests",
        expected=sessions,
        prepare_timeout=60,
        apply_timeout=60,
        now=now,
    )
    if over:
        record = dataclasses.replace(record, **over)
    assert store.start(record)
    request, entry = store.request(deploy_id, consistent=True)
    assert request is not None and entry is not None
    return Joined(request, request.digest(), entry.create_index)
