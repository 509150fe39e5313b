"""A stand-in for a running `watcher run`, as far as its instance lock goes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from watcher.fsutil import WATCHER_RUN_OWNER

_HOLDER = (
    "import fcntl, os, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX)\n"
    "os.ftruncate(fd, 0)\n"
    "os.write(fd, f'{os.getpid()} {sys.argv[2]}\\n'.encode())\n"
    "print('held', flush=True)\n"
    "while True: time.sleep(1)\n"
)


def hold_instance_lock(lock: Path, owner: str = WATCHER_RUN_OWNER) -> subprocess.Popen[bytes]:
    """A process that holds ``lock`` as a running `watcher run` does (flock, then its pid
    and ``owner`` in the file), once this returns; the caller kills it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(lock), owner], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"held\n"
    return proc
