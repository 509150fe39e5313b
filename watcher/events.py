"""Consul user events: strict payload validation and the bounded set of handled event IDs."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from watcher.errors import PayloadError
from watcher.fsutil import atomic_write_bytes
from watcher.log import get_logger
from watcher.records import DEPLOY_ID_RE, check_artifact_id, check_release

EVENT_NAMES = ("build-finished", "deploy", "rollback")
# Under Consul's own 300-byte user event limit; the largest valid payload is 235 bytes.
MAX_PAYLOAD = 256

log = get_logger(module="events")

# name -> (required keys, allowed key sets)
_SHAPES: dict[str, tuple[frozenset[str], ...]] = {
    "build-finished": (frozenset({"app", "artifact"}),),
    "deploy": (frozenset({"app", "artifact"}), frozenset({"app", "deploy"})),
    "rollback": (frozenset({"app"}), frozenset({"app", "release"}), frozenset({"app", "deploy"})),
}


@dataclass(frozen=True)
class EventRequest:
    """A validated event: what it asks for."""

    event_id: str
    name: str
    ltime: int
    app: str
    artifact: str | None = None
    deploy: str | None = None
    release: str | None = None


def parse_event(
    event_id: str, name: str, ltime: int, payload: bytes | None, apps: Iterable[str]
) -> EventRequest:
    """Validate one event's payload; PayloadError says what is wrong (size, JSON, app, ids)."""
    if name not in EVENT_NAMES:
        # repr: the name is outside input and may hold anything, a newline included
        raise PayloadError(f"event {name!r} {event_id}: not an event this daemon handles")
    where = f"event {name} {event_id}"
    if payload is None or not payload.strip():
        raise PayloadError(f"{where}: empty payload")
    if len(payload) > MAX_PAYLOAD:
        raise PayloadError(f"{where}: payload of {len(payload)} bytes is over {MAX_PAYLOAD}")
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise PayloadError(f"{where}: payload is not JSON: {payload[:80]!r}") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise PayloadError(f"{where}: payload must be a JSON object of strings")
    keys = frozenset(data)
    if keys not in _SHAPES[name]:
        shapes = " or ".join("{" + ", ".join(sorted(s)) + "}" for s in _SHAPES[name])
        raise PayloadError(f"{where}: payload keys {sorted(keys)} do not match {shapes}")
    app = data["app"]
    if app not in set(apps):
        raise PayloadError(f"{where}: unknown app {app!r} (not configured on this host)")
    try:
        if "artifact" in data:
            check_artifact_id(data["artifact"])
        if "release" in data:
            check_release(data["release"])
    except PayloadError as exc:
        raise PayloadError(f"{where}: {exc}") from None
    if "deploy" in data and not DEPLOY_ID_RE.match(data["deploy"]):
        raise PayloadError(f"{where}: invalid deploy id {data['deploy']!r}")
    return EventRequest(
        event_id=event_id,
        name=name,
        ltime=ltime,
        app=app,
        artifact=data.get("artifact"),
        deploy=data.get("deploy"),
        release=data.get("release"),
    )


class HandledEvents:
    """IDs of events already handled, oldest dropped past ``keep``; persisted atomically.

    A file that cannot be read or is not ``{"ids": [<string>, ...]}`` is logged and taken
    as empty: it only spares a restarted watcher re-reading events it handled, so losing it
    costs nothing (see ``add``), while refusing to start over it would stop the host.
    """

    def __init__(self, path: Path, keep: int) -> None:
        self.path = path
        self.keep = keep
        self._ids: OrderedDict[str, None] = OrderedDict()
        for event_id in self._load()[-keep:]:
            self._ids[event_id] = None

    def _load(self) -> list[str]:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return []
        except OSError as exc:
            problem = f"cannot read it: {exc.strerror or exc}"
        except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep
            problem = f"not JSON: {type(exc).__name__}: {exc}"
        else:
            ids = data.get("ids") if isinstance(data, dict) else None
            if isinstance(ids, list) and all(isinstance(i, str) for i in ids):
                return ids
            problem = 'not {"ids": [<event id>, ...]}'
        log.warning("handled_events_file_ignored", path=str(self.path), problem=problem)
        return []

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._ids

    def add(self, event_ids: Iterable[str]) -> bool:
        """Remember ids; True if any was new (then the file is rewritten)."""
        changed = False
        for event_id in event_ids:
            if event_id not in self._ids:
                self._ids[event_id] = None
                changed = True
        while len(self._ids) > self.keep:
            self._ids.popitem(last=False)
        if changed:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # No fsync: a crash that loses the newest ids loses nothing, since a starting
            # watcher takes every event its agent still buffers as history anyway.
            atomic_write_bytes(
                self.path,
                json.dumps({"version": 1, "ids": list(self._ids)}, separators=(",", ":")).encode(),
                durable=False,
            )
        return changed
