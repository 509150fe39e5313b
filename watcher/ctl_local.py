"""`watcherctl` commands acting on this host only (placeholder until they land)."""

from __future__ import annotations

import argparse
from typing import Any

from watcher.ctl import CtlContext
from watcher.errors import DeployRefused


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """No local commands yet."""


def rollback_local(ctx: CtlContext) -> int:
    raise DeployRefused("rollback --local is not available yet")
