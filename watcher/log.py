"""structlog set-up, once per entry point: JSON lines for journald, a console format on a TTY.

structlog (and asyncio, which it imports) is loaded on the first log call, not with this
module: a watcherctl command that logs nothing should not pay ~20-40 ms of start-up for it.
A configuration asked for before that is applied then.
"""

from __future__ import annotations

import sys
import threading
import time
from types import ModuleType
from typing import Any

# The standard library's numeric levels (what structlog's filtering loggers compare), spelled
# out: importing `logging` for five constants costs a watcherctl command ~4 ms.
DEBUG, INFO, WARNING, ERROR, CRITICAL = 10, 20, 30, 40, 50
_LEVELS = {"debug": DEBUG, "info": INFO, "warning": WARNING, "error": ERROR}

# The configuration of the last configure_logging() made before structlog was loaded.
_pending: dict[str, Any] | None = None


def configure_logging(
    *, level: str = "info", json: bool | None = None, stream: Any = None, final: bool = False
) -> None:
    """Configure structlog for this process.

    ``json=None`` picks JSON unless ``stream`` is a TTY. Log events are snake_case names with
    key=value context; a bound ``log`` carries the context of the caller. ``final``: this
    process configures logging once for its life (the daemon), so each logger is bound on
    its first call and kept (~44 -> ~18 us a line here); a later configuration, or
    structlog's ``capture_logs``, would not reach a logger already used.
    """
    global _pending
    settings = {"level": level, "json": json, "stream": stream, "final": final}
    if "structlog" in sys.modules:
        _apply(sys.modules["structlog"], **settings)
        _pending = None
    else:
        _pending = settings


def _apply(
    structlog: ModuleType, *, level: str, json: bool | None, stream: Any, final: bool
) -> None:
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
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, INFO)),
        # One write a line (print writes the line and its newline apart: two system calls
        # a line where the stream is unbuffered, as PYTHONUNBUFFERED in the unit makes it).
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=final,
    )


def _structlog() -> ModuleType:
    """structlog, imported (and configured as asked so far) on first use."""
    global _pending
    import structlog

    if _pending is not None:
        settings, _pending = _pending, None
        _apply(structlog, **settings)
    return structlog


class _Logger:
    """A structlog logger bound to ``context``, made on its first use."""

    __slots__ = ("_context", "_logger")

    def __init__(self, context: dict[str, Any]) -> None:
        self._context = context
        self._logger: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._logger is None:
            if _below_pending_level(name):
                return _drop
            self._logger = _structlog().get_logger("watcher", **self._context)
        return getattr(self._logger, name)


# The level of each logging method a caller may name: the levels' own names and aliases.
_METHOD_LEVELS = {
    **_LEVELS,
    "msg": INFO,
    "warn": WARNING,
    "exception": ERROR,
    "critical": CRITICAL,
    "fatal": CRITICAL,
}


def _below_pending_level(method: str) -> bool:
    """Whether a call of ``method`` before structlog is loaded would be filtered out by
    the configuration waiting for it: watcherctl logs at "error", so its `info` lines
    (one per deploy it starts) must not import structlog and asyncio to be dropped."""
    if _pending is None or method not in _METHOD_LEVELS:
        return False
    return _METHOD_LEVELS[method] < _LEVELS.get(_pending["level"], INFO)


def _drop(*args: Any, **kwargs: Any) -> None:
    """A log call below the configured level."""


def get_logger(**context: Any) -> Any:
    """A structlog logger bound to ``context``."""
    return _Logger(context)


class Repeats:
    """Whether a message is news: not the one said last, or said over ``every`` seconds
    ago (None: said again only once another came between). A refused token or a stopped
    agent would otherwise fill the journal a line a second. Safe across threads."""

    def __init__(self, every: float | None = None) -> None:
        self.every = every
        self._last: tuple[object, float] | None = None
        self._lock = threading.Lock()

    def news(self, what: object) -> bool:
        """Whether ``what`` is to be said now; if so, it is the one said last from now on."""
        now = time.monotonic()
        with self._lock:
            last = self._last
            if (
                last is not None
                and last[0] == what
                and (self.every is None or now - last[1] < self.every)
            ):
                return False
            self._last = (what, now)
            return True

    def clear(self) -> bool:
        """Forget what was said (it stopped); whether anything was."""
        with self._lock:
            said, self._last = self._last is not None, None
            return said
