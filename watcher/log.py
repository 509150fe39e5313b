"""structlog set-up, once per entry point: JSON lines for journald, a console format on a TTY."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(*, level: str = "info", json: bool | None = None, stream: Any = None) -> None:
    """Configure structlog for this process.

    ``json=None`` picks JSON unless ``stream`` is a TTY. Log events are snake_case names with
    key=value context; a bound ``log`` carries the context of the caller.
    """
    out = stream if stream is not None else sys.stdout
    if json is None:
        json = not (hasattr(out, "isatty") and out.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json:
        processors += [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ]
    else:
        processors += [structlog.dev.ConsoleRenderer(colors=False)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


def get_logger(**context: Any) -> Any:
    """A structlog logger bound to ``context``."""
    return structlog.get_logger("watcher", **context)
