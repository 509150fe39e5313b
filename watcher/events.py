"""Consul user events: strict payload validation and the bounded set of handled event IDs."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from watcher.errors import PayloadError
from watcher.records import DEPLOY_ID_RE, KeyTwice, check_artifact_id, check_release, no_key_twice

EVENT_NAMES = ("build-finished", "deploy", "rollback")
# Under Consul's own 300-byte user event limit; the largest valid payload is 235 bytes.
MAX_PAYLOAD = 256


# name -> (required keys, allowed key sets)
_SHAPES: dict[str, tuple[frozenset[str], ...]] = {
    "build-finished": (frozenset({"app", "artifact"}),),
    "deploy": (frozenset({"app", "artifact"}), frozenset({"app", "deploy"})),
    "rollback": (frozenset({"app"}), frozenset({"app", "release"}), frozenset({"app", "deploy"})),
}


_DECODER = json.JSONDecoder(object_pairs_hook=no_key_twice)


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
        # RFC 8259 8.1: json.loads would also take UTF-16/32; a UTF-8 BOM is tolerated
        text = payload.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise PayloadError(f"{where}: payload is not UTF-8: {payload[:80]!r}") from None
    try:
        data = _DECODER.decode(text)
    except KeyTwice as exc:
        # {"artifact": "a", "artifact": "b"} would deploy b: what one reader sees as a and
        # another as b is refused, as the web API refuses it.
        raise PayloadError(f"{where}: payload gives {exc.key!r} twice") from None
    except ValueError:
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
    """IDs of events already handled, oldest dropped past ``keep``; in memory only.

    A starting watcher takes every event its agent still buffers as history
    (``EventWatcher``), so ids kept across a restart spare nothing. Earlier versions
    wrote them all to ``events.json`` in the state directory after every event (~40 KB
    with 1024 ids; ~0.5 ms of CPU a time here with a few dozen); the daemon removes that
    file at start.
    """

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._ids

    def add(self, event_ids: Iterable[str]) -> bool:
        """Remember ids; True if any was new."""
        changed = False
        for event_id in event_ids:
            if event_id not in self._ids:
                self._ids[event_id] = None
                changed = True
        while len(self._ids) > self.keep:
            self._ids.popitem(last=False)
        return changed
