"""What every long-lived process the tests, the demo and the bench start shares."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["die_with_parent", "reaped"]

_PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Looked up here, in the parent: a dlopen() in the child of a process with threads (between
# fork and exec) could wait for ever on a loader lock another thread held at the fork.
_PRCTL = _prctl()


def die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """``preexec_fn``: have the kernel SIGKILL the child when the process that started it
    dies, however it dies (a SIGKILLed `make demo` or pytest leaves no watcher, agent or S3
    server behind). The children run in their own sessions, so a signal to the parent's
    process group does not reach them; this does. The kernel sends it when the *thread*
    that forked the child exits: start them from a thread that outlives them."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


@contextlib.contextmanager
def reaped(proc: subprocess.Popen[Any]) -> Iterator[subprocess.Popen[Any]]:
    """``proc`` for a test's ``with`` block: killed and reaped when the block leaves it
    running (an assertion or a timeout inside), left as it is when it has exited."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
