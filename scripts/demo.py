"""`make demo`: a 3-host fleet on this machine, deployed, upgraded and rolled back.

Starts a local Consul cluster (one server, three client agents on 127.0.10.x), an S3
server (moto), one `watcher run` per host with its own root, and a tiny web server per
host serving that host's `current`, and `watcher web` (the deploy API and page) on
127.0.0.1:8710 (or a free port when that one is taken). Then publishes v1 and deploys it, publishes v2 and
deploys it, and rolls back, printing `watcherctl status --fleet` and the served pages
after each step. It leaves everything running until Ctrl-C (or exits at once with
--no-keep).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.cluster import (  # noqa: E402
    ClusterError,
    ClusterSpec,
    ConsulCluster,
    start_cluster,
)
from tests.support.fleet import Fleet, wait_for  # noqa: E402
from tests.support.s3server import S3Server, s3_client  # noqa: E402
from tests.support.web import WebServer  # noqa: E402
from watcher.config import S3Settings  # noqa: E402
from watcher.releases import LinuxProcReader  # noqa: E402

LOOPBACK = os.environ.get("DEMO_LOOPBACK", "127.0.10")
WEB_PORT = 8080
UI_PORT = 8710  # watcher web, on loopback
HEALTH_HOOK = REPO / "hooks" / "examples" / "http-health-check"


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"\n==> {text}",
          flush=True)


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def unreadable_processes() -> list[str]:
    """Names of the processes whose /proc entries even root cannot read here (on a
    Firecracker VM, pid 1: its init): each would block every prune (README, "Prune")."""
    if os.geteuid() != 0:
        return []  # then most processes are: the daemon must run as root to prune anyway
    reader, names = LinuxProcReader(), set()
    for pid in reader.pids():
        try:
            reader.cwd(pid)  # what prune reads of each process
            reader.fd_targets(pid)
            reader.mapped_paths(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue
        except OSError:
            try:
                names.add(reader.comm(pid))
            except OSError:
                continue
    return sorted(names)


def serve_current(ip: str, current: Path) -> ThreadingHTTPServer:
    """A web server on ip:8080 serving whatever `current` points at, per request."""
    handler = partial(QuietHandler, directory=str(current))
    server = ThreadingHTTPServer((ip, WEB_PORT), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def port_in_use(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def write_app(src: Path, version: str) -> None:
    """The sample app's source tree for one version."""
    if src.exists():
        shutil.rmtree(src)
    (src / ".watcher").mkdir(parents=True)
    (src / "tests").mkdir()
    (src / "index.html").write_text(
        f"<!doctype html><title>demo</title><h1>hello from {version}</h1>\n")
    (src / "health").write_text("ok\n")
    (src / "tests" / "test_app.txt").write_text("tests stay out of the artifact\n")
    (src / ".watcher" / "manifest.yaml").write_text(
        "include: ['**']\nexclude: ['tests/**']\n")


def pages(fleet: Fleet) -> str:
    lines = []
    for w in fleet.watchers:
        url = f"http://{w.agent.ip}:{WEB_PORT}/"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                body = resp.read().decode().strip().splitlines()[-1]
        except OSError as exc:
            body = f"(no answer: {exc})"
        lines.append(f"  {w.name}  {url}  {body}")
    return "\n".join(lines)


def ctl(fleet: Fleet, *args: str) -> str:
    w = fleet.watchers[0]
    result = w.ctl(*args, as_json=False, check=False)
    out = (result.stdout + result.stderr).rstrip()
    if result.returncode != 0:
        raise SystemExit(f"watcherctl {' '.join(args)} failed ({result.returncode}):\n{out}")
    return out


def publish(fleet: Fleet, src: Path, version: str) -> str:
    write_app(src, version)
    commit = hashlib.sha256(version.encode()).hexdigest()[:40]
    out = ctl(fleet, "publish", "web", str(src), "--branch", "main", "--commit", commit,
              "--build-number", version.lstrip("v"))
    print(out)
    return f"main-{commit[:8]}"


def show(fleet: Fleet) -> None:
    print(ctl(fleet, "status", "--fleet"))
    print("served pages:")
    print(pages(fleet))


def watcherctl_command() -> str:
    """This installation's watcherctl as the hints name it: its absolute path, so that a
    hint pasted in any directory works (the virtualenv's bin/ is not on PATH)."""
    return str(Path(sys.executable).parent / "watcherctl")


def follow_ups(fleet: Fleet, v2: str, src: Path) -> list[str]:
    """The commands printed for the user to try; tests/integration/test_demo.py runs each
    exactly as printed."""
    ctl = f"{watcherctl_command()} -c {fleet.watchers[0].config_path}"
    commit = hashlib.sha256(b"your build").hexdigest()[:40]
    # The demo's S3 server takes any credentials, but boto3 wants some to sign with.
    aws = "env AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo AWS_DEFAULT_REGION=us-east-1"
    return [
        f"{ctl} status",
        f"{ctl} status --fleet",
        f"{ctl} builds web",
        f"{ctl} deploy web {v2}",
        f"{ctl} history web",
        f"{aws} {ctl} publish web {src} --branch main --commit {commit}",
        f"curl http://{fleet.watchers[0].agent.ip}:{WEB_PORT}/",
    ]


def main() -> int:
    global _stopping
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-keep", action="store_true",
                        help="stop everything after the scripted part")
    args = parser.parse_args()
    consul_bin = os.environ.get("CONSUL_BIN") or subprocess.run(
        [str(REPO / "scripts" / "install-consul")], check=True, capture_output=True,
        text=True).stdout.strip().splitlines()[-1]
    workdir = Path(tempfile.mkdtemp(prefix="watcher-demo-"))
    started = time.monotonic()
    cluster: ConsulCluster | None = None
    s3: S3Server | None = None
    fleet: Fleet | None = None
    servers: list[ThreadingHTTPServer] = []
    ui: WebServer | None = None
    os.environ.update({"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
    try:
        say(f"starting Consul (1 server + 3 hosts on {LOOPBACK}.x) and an S3 server")
        try:
            cluster = start_cluster(ClusterSpec(hosts=3), workdir / "consul", consul_bin,
                                    LOOPBACK)
        except ClusterError as exc:
            if "already in use" not in str(exc):
                raise
            print(f"demo: {str(exc).split(' (')[0]}: another demo (or test run) uses "
                  f"{LOOPBACK}.x; stop it, or pick another base: "
                  "DEMO_LOOPBACK=127.0.30 make demo", file=sys.stderr)
            return 1
        s3 = S3Server(workdir / "moto.log")
        s3.start()
        s3_client(s3.endpoint_url).create_bucket(Bucket="demo-artifacts")
        settings = S3Settings(bucket="demo-artifacts", prefix="artifacts",
                              region="us-east-1", endpoint_url=s3.endpoint_url)
        validate = [str(HEALTH_HOOK)]
        app_extra: dict[str, object] = {"keep_releases": 3}
        if shielded := unreadable_processes():
            app_extra["prune_ignore"] = shielded
            print(f"  this machine's {', '.join(shielded)} cannot be read even by root: "
                  "the demo's config names it in prune_ignore (README, \"Prune\")")
        fleet = Fleet(cluster, settings, workdir / "hosts", kv_prefix="watcher",
                      app_extra=app_extra)
        for w in fleet.watchers:
            hook = validate + [f"HEALTH_URL=http://{w.agent.ip}:{WEB_PORT}/health",
                               "HEALTH_TIMEOUT=10"]
            fleet.write_config(w, {"hooks": {"validate": [hook]}})
            servers.append(serve_current(w.agent.ip, w.app_dir / "current"))
        say("starting 3 watchers (one per host)")
        fleet.start()
        print(f"  configs: {', '.join(str(w.config_path) for w in fleet.watchers)}")
        say("starting watcher web (deploy API and page) on loopback")
        ui = WebServer(fleet.watchers[0].config_path, workdir / "web.log")
        if not port_in_use(UI_PORT):
            ui.port, ui.url = UI_PORT, f"http://127.0.0.1:{UI_PORT}"
        try:
            ui.start()
        except AssertionError:
            if ui.port != UI_PORT or "already in use" not in ui.log():
                raise
            # Taken between the look and the bind (another demo starting): a free port.
            ui = WebServer(fleet.watchers[0].config_path, workdir / "web.log")
            ui.start()
        with urllib.request.urlopen(ui.url + "/apps/web", timeout=10) as resp:  # noqa: S310
            print(f"  watcher web: {ui.url}/  (page answered {resp.status}; ACLs are off in the "
                  "demo, so writes need no token on this loopback bind)")

        src = workdir / "app-src"
        say("publishing v1 (watcherctl publish: tarball -> S3, record -> KV, build-finished)")
        v1 = publish(fleet, src, "v1")
        prefetched = [w.app_dir / "prefetched" for w in fleet.watchers]
        wait_for(lambda: all(p.is_dir() and any(p.iterdir()) for p in prefetched), 30,
                 "v1 prefetched everywhere", fleet)
        say(f"deploying v1 ({v1}) to the fleet")
        print(ctl(fleet, "deploy", "web", v1))
        show(fleet)

        say("publishing v2")
        v2 = publish(fleet, src, "v2")
        say(f"deploying v2 ({v2})")
        print(ctl(fleet, "deploy", "web", v2))
        show(fleet)

        say("rolling the fleet back to the previous release")
        print(ctl(fleet, "rollback", "web"))
        show(fleet)
        say("history")
        print(ctl(fleet, "history", "web"))
        took = time.monotonic() - started
        say(f"scripted part done in {took:.0f}s")
        if args.no_keep:
            return 0
        hints = "\n".join(f"  {hint}" for hint in follow_ups(fleet, v2, src))
        print(f"""
Everything is still running. Try:
{hints}
Watcher logs: {workdir}/hosts/<host>/watcher.log
The deploy page: {ui.url}/  (API description: {ui.url}/openapi.json)
The commands watcherctl itself suggests say `watcherctl`; to paste them as printed:
  export PATH={shlex.quote(str(Path(watcherctl_command()).parent))}:"$PATH"
Press Ctrl-C to stop everything.""", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        _stopping = True  # first: no call (where a signal is handled) before it
        return 0 if _stop_asked else 130  # SIGTERM: the stop a script asks for, not an error
    finally:
        _stopping = True
        _stop_interrupting()
        print("\nstopping ...", flush=True)
        if ui is not None:
            ui.stop()
        for server in servers:
            server.shutdown()
        if fleet is not None:
            fleet.stop()
        if s3 is not None:
            s3.stop()
        if cluster is not None:
            cluster.stop()
        kill_leftovers(workdir)
        shutil.rmtree(workdir, ignore_errors=True)


def kill_leftovers(workdir: Path) -> None:
    """SIGKILL what still runs with the work directory in its command line: a stop that
    came while a process was being started (inside Popen, before its handle was kept)
    leaves one that no stop() knows of. The directory is a fresh mkdtemp: nothing else
    names it."""
    mark = os.fsencode(str(workdir))
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if mark in f.read():
                    os.kill(int(entry), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue  # gone meanwhile, or not ours to read


_stop_asked = False  # by SIGTERM or SIGHUP: exit 0 (Ctrl-C's SIGINT: 130)
_stopping = False  # the stop has begun: no more raises
_stop_signalled = False  # a stop signal came: its raise may be dropped, then repeated


def _interrupt(signum: int, frame: object) -> None:
    """The first SIGTERM, SIGHUP or SIGINT raises KeyboardInterrupt, and raises it again
    every half second until the stop has begun (``_stopping``): a raise that lands in a
    ``__del__``, a weakref callback or an at-fork callback (logging's runs in every Popen)
    is printed as "Exception ignored" and lost, and the demo ran on with later signals
    ignored. Later signals are ignored: the next would cut the stop short."""
    global _stop_asked, _stop_signalled
    if _stopping:
        return
    _stop_signalled = True
    _stop_asked = _stop_asked or signum != signal.SIGINT
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, _interrupt_again)
    signal.setitimer(signal.ITIMER_REAL, 0.5, 0.5)
    raise KeyboardInterrupt


def _interrupt_again(signum: int, frame: object) -> None:
    # Not while a KeyboardInterrupt is being handled (an `except` or `finally` on its way
    # up, a cluster's own clean-up among them): that raise was not lost.
    if not _stopping and sys.exc_info()[0] is not KeyboardInterrupt:
        raise KeyboardInterrupt


def _stop_interrupting() -> None:
    """Called once ``_stopping`` is set: no signal may cut the stop short (`make` passes a
    SIGTERM on to this process, which a `kill` of the process group sent it already, and
    every process below runs in a session of its own and would be left running)."""
    signal.setitimer(signal.ITIMER_REAL, 0)
    for sig in (*STOP_SIGNALS, signal.SIGALRM):
        signal.signal(sig, signal.SIG_IGN)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def install_stop_signals() -> None:
    # SIGHUP: the terminal it ran in closed. SIGINT: started in the background by a
    # non-interactive shell (`make demo &` in a script), Python inherits SIGINT ignored and
    # `kill -INT` would do nothing.
    for sig in STOP_SIGNALS:
        signal.signal(sig, _interrupt)
    sys.unraisablehook = _unraisable


_default_unraisablehook = sys.unraisablehook


def _unraisable(unraisable: Any) -> None:
    """Python prints a raise it drops ("Exception ignored in ...", a traceback); a stop's
    own is repeated (``_interrupt``): not shown, it would read as a crash."""
    if unraisable.exc_type is KeyboardInterrupt and _stop_signalled:
        return
    _default_unraisablehook(unraisable)


if __name__ == "__main__":
    install_stop_signals()
    try:
        code = main()
    except KeyboardInterrupt:  # before main's own stop (or raised again after it)
        _stopping = True
        _stop_interrupting()
        code = 0 if _stop_asked else 130
    sys.exit(code)
