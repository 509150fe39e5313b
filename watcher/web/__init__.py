"""`watcher web`: the deploy API and page over the same functions as `watcherctl` (issue 11).

Importing this package pulls in FastAPI; only the `watcher web` subcommand does.
"""
