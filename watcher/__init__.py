"""release-watcher: all-or-nothing release deploys across a fleet, coordinated through Consul."""

from __future__ import annotations

__version__ = "0.1.0"

#: The barrier protocol version this build speaks (deploy records carry ``min_protocol``).
PROTOCOL_VERSION = 2
