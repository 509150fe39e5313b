"""Peak memory of a piece of code, measured with tracemalloc, for the memory-bound tests."""

from __future__ import annotations

import sys
import tracemalloc
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def least_peak(run: Callable[[], T], *, runs: int = 3) -> tuple[int, T]:
    """The least tracemalloc peak of ``runs`` calls of ``run`` (each must start afresh),
    and the last call's result. tracemalloc counts every thread's allocations, and in a
    full test run threads of earlier tests pushed one measure from 1.9 to 5.9 MB; so no
    switch to another thread while ``run`` holds the GIL, and the least of a few runs: a
    cost of the code under test is in every run."""
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    peaks: list[int] = []
    try:
        for _ in range(runs):
            tracemalloc.start()
            try:
                result = run()
                peaks.append(tracemalloc.get_traced_memory()[1])
            finally:
                tracemalloc.stop()
    finally:
        sys.setswitchinterval(switch)
    return min(peaks), result
