"""Where the time of a deploy goes, from the hosts' own logs.

For each deploy every host committed, in milliseconds after the first host began its
prepare: when the *last* host began its prepare, staged the release, acked ready,
established the outcome and flipped (and the first host's establish and flip); then the
medians over the deploys.

    .venv/bin/python bench/run.py --only deploy --keep    # prints where it kept its work
    .venv/bin/python bench/timeline.py /tmp/bench-XXXX/deploy-N/hosts   # one per fleet size

It reads every ``watcher.log`` (the daemon's JSON lines) under the directory given, one
per host. A host's prepare began ``took_ms`` before its ``prepare_ready`` line, which also
ties the deploy to its release (``release_staged`` and ``release_flipped`` name only the
release). Every host runs on one machine in the bench, so their clocks agree. The first
deploy of a fleet is its warm-up and is left out (``--skip``), and so is a deploy for which
a host staged nothing (a rollback to a release it still has).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from watcher.records import parse_iso

STEPS = ("prepare", "staged", "ready", "established", "flipped")
COLUMNS = (
    "last prepare",
    "last staged",
    "last ready",
    "first established",
    "last established",
    "first flip",
    "last flip",
)


def host_marks(log: Path) -> dict[str, dict[str, float]]:
    """deploy id -> step -> epoch seconds, for one host's log (the first time of each)."""
    lines = []
    for raw in log.read_text(errors="replace").splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict) and isinstance(line.get("timestamp"), str):
            lines.append(line)
    # release_staged comes before the prepare_ready that names its deploy, release_flipped
    # after it (a rollback's release may have been another deploy's before)
    staged: dict[str, float] = {}
    deploy_of: dict[str, str] = {}
    marks: dict[str, dict[str, float]] = defaultdict(dict)
    for line in lines:
        event, at = line.get("event"), parse_iso(line["timestamp"]).timestamp()
        release, deploy = str(line.get("release", "")), str(line.get("deploy", ""))
        if event == "release_staged":
            staged[release] = at
        elif event == "prepare_ready" and deploy:
            mark = marks[deploy]
            mark.setdefault("prepare", at - float(line.get("took_ms", 0)) / 1000)
            mark.setdefault("ready", at)
            if release in staged:
                mark.setdefault("staged", staged.pop(release))
            deploy_of[release] = deploy
        elif event == "deploy_established" and deploy and line.get("outcome") == "commit":
            marks[deploy].setdefault("established", at)
        elif event == "release_flipped" and release in deploy_of:
            marks[deploy_of[release]].setdefault("flipped", at)
    return marks


def timeline(hosts_dir: Path, skip: int = 1) -> list[tuple[str, dict[str, float]]]:
    """Per deploy every host took from its prepare to its flip (in order, the first
    ``skip`` left out): the COLUMNS in ms after the first host's prepare."""
    per: dict[str, list[dict[str, float]]] = defaultdict(list)
    hosts = 0
    for log in sorted(hosts_dir.rglob("watcher.log")):
        hosts += 1
        for deploy, marks in host_marks(log).items():
            per[deploy].append(marks)
    rows = []
    for deploy in sorted(per, key=lambda d: min(m.get("prepare", 0) for m in per[d])):
        marks = per[deploy]
        if len(marks) < hosts or not all(all(s in m for s in STEPS) for m in marks):
            continue  # not every host got from its prepare to its flip: not a committed round
        t0 = min(m["prepare"] for m in marks)
        at = {step: sorted((m[step] - t0) * 1000 for m in marks) for step in STEPS}
        rows.append(
            (
                deploy,
                {
                    "last prepare": at["prepare"][-1],
                    "last staged": at["staged"][-1],
                    "last ready": at["ready"][-1],
                    "first established": at["established"][0],
                    "last established": at["established"][-1],
                    "first flip": at["flipped"][0],
                    "last flip": at["flipped"][-1],
                },
            )
        )
    return rows[skip:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hosts_dir", type=Path, help="a directory holding the hosts' logs")
    parser.add_argument(
        "--skip", type=int, default=1, help="committed deploys to leave out first (warm-up: 1)"
    )
    args = parser.parse_args()
    if not args.hosts_dir.is_dir():
        parser.error(f"{args.hosts_dir}: not a directory")
    if args.skip < 0:
        parser.error(f"--skip: a count of deploys, not {args.skip}")
    rows = timeline(args.hosts_dir, args.skip)
    if not rows:
        print(f"timeline: no deploy every host committed under {args.hosts_dir}", file=sys.stderr)
        return 1
    width = max(len(d) for d, _ in rows)
    print(f"{'deploy':{width}s}  " + "  ".join(f"{c:>17s}" for c in COLUMNS))
    for deploy, row in rows:
        print(f"{deploy:{width}s}  " + "  ".join(f"{row[c]:17.0f}" for c in COLUMNS))
    medians = {c: statistics.median(row[c] for _, row in rows) for c in COLUMNS}
    print(f"{'median':{width}s}  " + "  ".join(f"{medians[c]:17.0f}" for c in COLUMNS))
    print(f"(ms after the first host began its prepare; {len(rows)} deploys)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
