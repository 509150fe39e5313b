"""The `watcherctl` console script: ``watcher.ctl.main`` without two costs of the
interpreter that a command run once does not need.

- **Collections while it loads.** A command imports ~300 modules before it does anything;
  each import allocates enough to trigger collections, and the older generations' passes
  walk everything loaded so far. The collector is off until the command has parsed its
  arguments (its modules are loaded by then), and what was loaded is frozen out of later
  passes (``gc.freeze``), as the daemon does after its start; a command that runs long
  (``web``, a ``deploy`` waiting for its outcome) then collects as usual.
- **Tearing the interpreter down.** At exit Python clears every module and frees every
  object one by one. The script flushes stdout and stderr and leaves with ``os._exit``:
  nothing a command leaves behind needs the interpreter's exit (its files are written
  atomically and closed where they are written, `publish`'s temporary files are removed
  in their ``with`` blocks, no command leaves a thread or logging handler running).

On the 2-core development VMs, `status --fleet` of 5 hosts as a whole process: 144-165
ms -> 110-124 ms (medians of three interleaved pairs of 15 runs). This module imports
nothing but the standard library's ``gc``, ``os`` and ``sys`` before it turns the
collector off.
"""

from __future__ import annotations

import gc
import os
import sys

EXIT_INTERRUPTED = 128 + 2  # watcher.ctl's, before it is loaded
EXIT_PIPE = 128 + 13


def run() -> None:
    gc.disable()
    try:
        from watcher.ctl import main  # after the collector is off

        code = main()
    except KeyboardInterrupt:  # Ctrl-C while Python loads watcherctl: quietly, like main()
        code = EXIT_INTERRUPTED
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # the reader went away after main() returned
        code = EXIT_PIPE
    os._exit(code)
