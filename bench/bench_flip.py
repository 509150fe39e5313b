"""Zero-downtime flips: nginx serves a file through `current` while `current` flips.

nginx (Debian's package, started here on a free loopback port with a config of its own)
serves ``<app>/current/index.html``. A client makes ``requests`` keep-alive GETs while
another process flips `current` between two complete releases as fast as it can. Each
request must answer 200 with the whole file of one of the two releases; anything else
(404 while `current` is missing, a body from neither) is a failed request.

Ours: ``ReleaseEngine.flip`` (a fresh symlink renamed over `current`). Baseline, in the same
run: unlink `current`, then symlink it again (what ``ln -sfn`` does).
"""

from __future__ import annotations

import http.client
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from bench.harness import Figure, Results, RoundFailed
from tests.support.nginx import Nginx, NginxFailed
from tests.support.s3server import free_port

FLIPPER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    method, root, a, b, ready, stop = sys.argv[1:7]
    app_dir = Path(root) / "web"
    if method == "ours":
        from watcher.log import configure_logging
        configure_logging(level="warning", stream=sys.stderr)
        from watcher.config import AppConfig
        from watcher.releases import ReleaseEngine
        engine = ReleaseEngine(AppConfig(name="web", root=root, keep_releases=10))
        flip = engine.flip
    else:
        current = app_dir / "current"
        def flip(release):
            try:
                os.unlink(current)
            except FileNotFoundError:
                pass
            os.symlink(f"releases/{release}", current)
    Path(ready).touch()
    flips = 0
    releases = (a, b)
    while not os.path.exists(stop):
        flip(releases[flips % 2])
        flips += 1
    print(flips)
    """
)


def serving(work: Path, root: Path) -> Nginx:
    """nginx serving ``root`` on a free port; no caches."""
    return Nginx(
        work,
        free_port(),
        server=f"root {root};\nlocation / {{ }}",
        http="open_file_cache off;\nkeepalive_requests 1000000;",
    )


def hammer(port: int, path: str, valid: set[bytes], total: int, threads: int) -> tuple[int, int]:
    """``total`` keep-alive GETs over ``threads`` connections; (requests made, failures)."""
    counts = [0] * threads
    failures = [0] * threads
    per = total // threads

    def run(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for _ in range(per):
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                body = resp.read()
                ok = resp.status == 200 and body in valid
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            counts[i] += 1
            if not ok:
                failures[i] += 1
        conn.close()

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return sum(counts), sum(failures)


def make_app(root: Path) -> tuple[str, str, set[bytes]]:
    """Two complete releases of app "web" under ``root``, staged by the release engine."""
    import hashlib
    import io
    import tarfile

    from watcher.config import AppConfig
    from watcher.records import ArtifactRecord
    from watcher.releases import ReleaseEngine

    engine = ReleaseEngine(AppConfig(name="web", root=str(root), keep_releases=10))
    engine.layout.ensure()
    names: list[str] = []
    bodies: set[bytes] = set()
    for version in ("a", "b"):
        body = (f"<h1>release {version}</h1>\n" * 200).encode()
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            info = tarfile.TarInfo("index.html")
            info.size = len(body)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(body))
        tarball = root / f"{version}.tar.gz"
        tarball.write_bytes(buf.getvalue())
        record = ArtifactRecord(
            id=f"flip-{version}",
            url=f"s3://bench/flip-{version}.tar.gz",
            sha256=hashlib.sha256(buf.getvalue()).hexdigest(),
            size=len(buf.getvalue()),
        )
        release = f"20260101T00000{len(names)}Z-flip-{version}"
        engine.stage_from_file(tarball, record, release, "bench")
        names.append(release)
        bodies.add(body)
    engine.flip(names[0])
    return names[0], names[1], bodies


def flip_section(
    results: Results, *, work: Path, requests: int, min_flips: int, threads: int = 4
) -> None:
    ours = results.add(
        Figure(
            f"zero-downtime: failed requests of {requests} during flips",
            "",
            baseline_name="unlink+symlink",
            target="0 for ours",
        )
    )
    flips_fig = results.add(
        Figure(
            "zero-downtime: flips during the requests",
            "",
            compare=False,
            note="each method flips as fast as it can; ours fsyncs `previous` and the dir",
        )
    )
    root = work / "flip-root"
    root.mkdir(parents=True)
    a, b, bodies = make_app(root)
    for d in (work, root, *root.rglob("*")):
        if d.is_dir():
            d.chmod(0o755)
    nginx = serving(work, root / "web")
    try:
        nginx.start()
    except NginxFailed as exc:
        raise RoundFailed(str(exc)) from None
    try:
        for method in ("ours", "unlink+symlink"):
            ready, stop = work / f"ready-{method}", work / f"stop-{method}"
            flipper = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    FLIPPER,
                    "ours" if method == "ours" else "naive",
                    str(root),
                    a,
                    b,
                    str(ready),
                    str(stop),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            deadline = time.monotonic() + 30
            while not ready.exists() and time.monotonic() < deadline and flipper.poll() is None:
                time.sleep(0.01)
            made, failed = hammer(nginx.port, "/current/index.html", bodies, requests, threads)
            stop.touch()
            out, _ = flipper.communicate(timeout=60)
            if flipper.returncode != 0:
                raise RoundFailed(f"the {method} flipper exited {flipper.returncode}")
            flips = int(out.strip() or 0)
            if flips < min_flips:
                raise RoundFailed(
                    f"{method}: only {flips} flips during the requests, fewer than {min_flips}"
                )
            if made < requests - threads:
                raise RoundFailed(f"{method}: {made} requests made, not {requests}")
            if method == "ours":
                ours.ours.append(failed)
                flips_fig.ours.append(flips)
            else:
                ours.baseline.append(failed)
                flips_fig.baseline.append(flips)
                flips_fig.baseline_name = "unlink+symlink"
    finally:
        nginx.stop()
        shutil.rmtree(root, ignore_errors=True)
