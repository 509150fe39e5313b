"""Staging throughput: a large artifact from the S3 server, ours against curl.

The artifact (a tar.gz, mostly incompressible content, ``size_mb`` MB) is uploaded to the
moto S3 server. Ours, the daemon's own code: ``ArtifactCache.fetch`` (download + sha256
verify, to a file) then ``ReleaseEngine.stage_from_file`` (extract, make durable, rename
into place). Baselines, in the same run, of the same object over a presigned URL:
``curl | sha256sum`` (download + hash) and ``curl | tar -xz`` (download + extract, no hash,
no fsync). Throughput is artifact bytes per second of wall time.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

from bench.harness import Figure, Results, RoundFailed
from tests.support.s3server import s3_client
from watcher.artifacts import ArtifactCache
from watcher.config import AppConfig, S3Settings
from watcher.records import ArtifactRecord
from watcher.releases import ReleaseEngine
from watcher.s3 import S3Store


def build_artifact(path: Path, size_mb: int, seed: int = 12) -> None:
    """A tar.gz of about ``size_mb`` MB: 4 MB members, 7 of 8 random, 1 of 8 text."""
    rng = random.Random(seed)
    member = 4 * 1024 * 1024
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        i = 0
        while raw.tell() < size_mb * 1024 * 1024:
            if i % 8 == 7:
                line = f"line {i} of a text file that compresses well\n".encode()
                data = (line * (member // len(line) + 1))[:member]
            else:
                data = rng.randbytes(member)
            info = tarfile.TarInfo(f"assets/dir{i % 16:02d}/blob{i:04d}.bin")
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
            i += 1


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def stage_section(
    results: Results, *, s3: S3Settings, work: Path, size_mb: int, rounds: int
) -> None:
    verify = results.add(
        Figure(
            f"staging {size_mb} MB: download + verify",
            "MB/s",
            baseline_name="curl | sha256sum",
            target=">= 0.9x",
        )
    )
    full = results.add(
        Figure(
            f"staging {size_mb} MB: download + verify + extract",
            "MB/s",
            baseline_name="curl | tar -xz",
            target=">= 0.9x",
        )
    )
    tarball = work / "big.tar.gz"
    build_artifact(tarball, size_mb)
    size = tarball.stat().st_size
    digest = sha256_file(tarball)
    key = f"{s3.prefix}/web/big-{digest[:8]}.tar.gz"
    client = s3_client(str(s3.endpoint_url))
    client.upload_file(str(tarball), s3.bucket, key)
    url = client.generate_presigned_url(
        "get_object", Params={"Bucket": s3.bucket, "Key": key}, ExpiresIn=3600
    )
    record = ArtifactRecord(
        id=f"big-{digest[:8]}", url=f"s3://{s3.bucket}/{key}", sha256=digest, size=size
    )
    tarball.unlink()
    mb = size / 1e6

    def curl_pipe(consumer: str, dest: Path) -> float:
        dest.mkdir(parents=True)
        started = time.perf_counter()
        proc = subprocess.run(
            ["bash", "-o", "pipefail", "-c", f'curl -sfS "$0" | {consumer}', url],
            cwd=dest,
            capture_output=True,
            text=True,
        )
        took = time.perf_counter() - started
        if proc.returncode != 0:
            raise RoundFailed(f"curl | {consumer} exited {proc.returncode}: {proc.stderr[-200:]}")
        if consumer.startswith("sha256sum") and proc.stdout.split()[0] != digest:
            raise RoundFailed("curl | sha256sum: the digest is not the artifact's")
        return took

    for r in range(rounds):
        base = work / f"round{r}"
        t_hash = curl_pipe("sha256sum", base / "curl-hash")
        t_tar = curl_pipe("tar -xz", base / "curl-tar")
        shutil.rmtree(base / "curl-tar")

        app = AppConfig(name="web", root=str(base / "srv"), keep_releases=10)
        engine = ReleaseEngine(app)
        engine.layout.ensure()
        cache = ArtifactCache(app.app_dir, S3Store(s3), max_bytes=4 * size + 1, timeout=600)
        started = time.perf_counter()
        path = cache.fetch(record)
        t_fetch = time.perf_counter() - started
        release = f"20260101T00000{r % 10}Z-{record.id}"
        engine.stage_from_file(path, record, release, "bench")
        t_all = time.perf_counter() - started
        if not engine.is_complete(release):
            raise RoundFailed(f"release {release} is not complete after staging")
        shutil.rmtree(base, ignore_errors=True)

        verify.ours.append(mb / t_fetch)
        verify.baseline.append(mb / t_hash)
        full.ours.append(mb / t_all)
        full.baseline.append(mb / t_tar)
