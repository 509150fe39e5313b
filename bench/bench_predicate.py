"""What establishing the commit predicate costs one host (issue 9: one consistent read-only
txn up to ~120 hosts): the time and the Consul requests of ``DeployStore.establish`` for a
deploy whose N expected hosts all acked ready, against one real Consul agent.

Baseline in the same run: one plain (default-consistency) ``kv_get`` of a single key, the
cheapest read a host can make. Prints one table; the figures also go to
bench/results/predicate.json.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.cluster import ClusterSpec, loopback_from_env, start_cluster
from watcher.barrier import COMMIT, DeployStore, Joined
from watcher.consul_api import ConsulClient, TxnOp, request_counts
from watcher.records import READY, ArtifactRecord, NodeProgress

SIZES = (3, 20, 60, 120, 200)
ROUNDS = 25
RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    consul_bin = os.environ.get("CONSUL_BIN") or "consul"
    loopback = loopback_from_env("bench")
    work = Path(tempfile.mkdtemp(prefix="bench-predicate-"))
    cluster = start_cluster(ClusterSpec(hosts=1), work, consul_bin, loopback)
    rows = []
    try:
        consul = ConsulClient(cluster.hosts[0].consul_settings())
        for n in SIZES:
            store = DeployStore(consul, f"bp{n}x{time.monotonic_ns()}", "web")
            nodes = [f"host-{i:03d}" for i in range(n)]
            sessions = {node: f"00000000-0000-0000-0000-{i:012d}" for i, node in enumerate(nodes)}
            artifact = ArtifactRecord(
                id="main-15eb13af", url="s3://b/a/web/x.tar.gz", sha256="a" * 64, size=1
            )
            rec = store.new_record(
                deploy_id="d1",
                kind="deploy",
                artifact=artifact,
                release=None,
                requested_by="bench",
                expected=sessions,
                prepare_timeout=600,
                apply_timeout=600,
            )
            joined = Joined(rec, rec.digest(), 7)
            ops = []
            for node in nodes:  # every host acked ready (written directly: no sessions here)
                ack = NodeProgress(
                    node=node, deploy="d1", state=READY, digest=joined.digest, create_index=7
                )
                ops.append(TxnOp.set(store.keys.progress("d1", node), ack.to_json()))
                ops.append(TxnOp.set(store.keys.carried_request("d1", node), rec.canonical()))
            for start in range(0, len(ops), 16):  # requests of 200 hosts are ~15 KB each
                assert consul.txn(ops[start : start + 16]).ok
            consul.kv_put(store.keys.inflight, b"d1")
            times, base, reqs = [], [], []
            for _ in range(ROUNDS):
                before = sum(request_counts().values())
                t = time.perf_counter()
                verdict = store.establish(joined)
                times.append((time.perf_counter() - t) * 1000)
                reqs.append(sum(request_counts().values()) - before)
                if verdict.outcome != COMMIT:
                    print(f"FAILED: {n} hosts: the predicate said {verdict.outcome}")
                    return 1
                t = time.perf_counter()
                consul.kv_get(store.keys.inflight)
                base.append((time.perf_counter() - t) * 1000)
            rows.append(
                {
                    "hosts": n,
                    "establish_ms_p50": round(statistics.median(times), 2),
                    "requests": max(reqs),
                    "kv_get_ms_p50": round(statistics.median(base), 2),
                    "ratio": round(statistics.median(times) / statistics.median(base), 1),
                }
            )
        consul.close()
    finally:
        cluster.stop()
    print("predicate check (establish) per host, all acked ready, median of", ROUNDS)
    print(f"{'hosts':>6} {'establish ms':>13} {'requests':>9} {'kv_get ms':>10} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['hosts']:>6} {r['establish_ms_p50']:>13} {r['requests']:>9} "
            f"{r['kv_get_ms_p50']:>10} {r['ratio']:>6}"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "predicate.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
