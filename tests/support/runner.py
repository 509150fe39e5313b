"""What a runner started from a shell (`make bench`, `make faults`) needs to stop cleanly."""

from __future__ import annotations

import signal
from types import FrameType

#: The signals that end a runner from outside: `timeout` and a CI job's cancel (SIGTERM), a
#: closed terminal (SIGHUP).
STOPPING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def stop_on_signals() -> None:
    """End this process on SIGTERM or SIGHUP as Ctrl-C does: with KeyboardInterrupt, so its
    ``finally`` blocks and atexit handlers stop the Consul agents, S3 server and watchers it
    started. By default those signals end it at once and leave them all running (a bench
    stopped by `timeout` left its watchers retrying a Consul that was gone an hour later).
    Further ones are ignored while it cleans up. Main thread only, as any signal handler."""

    def stop(signum: int, frame: FrameType | None) -> None:
        for sig in STOPPING_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    for sig in STOPPING_SIGNALS:
        signal.signal(sig, stop)
