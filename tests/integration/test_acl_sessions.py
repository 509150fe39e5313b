"""With ACLs on, a host's token must tell another host's live session from a gone one.

The abort clause of DESIGN.md 6.4.3 and the check before a ready ack (6.4.5) take
``session/info/<id>?consistent`` answering nothing as proof that the session is gone
(Consul never revives one). Consul filters sessions the token may not read out of that
answer, so with a token that may read only its own node's sessions every other host's
session would look gone while it is alive.
"""

from __future__ import annotations

import time

from tests.integration.test_deploy_acl import client, create_token, render
from tests.support.cluster import ClusterSpec, ConsulCluster

CLUSTER = ClusterSpec(hosts=2, acl=True)


def test_a_watcher_token_sees_whether_another_hosts_session_lives(
    cluster: ConsulCluster,
) -> None:
    mine_agent, other_agent = cluster.hosts
    prefix = f"s{time.monotonic_ns()}"
    secret, _ = create_token(
        mine_agent,
        f"watcher-{prefix}",
        render("watcher", prefix, "web", node=mine_agent.name),
    )
    admin = client(other_agent, cluster.management_token or "")
    other = admin.session_create(f"watcher on {other_agent.name}", 30, checks=[])
    with client(mine_agent, secret) as mine:
        own = mine.session_create(f"watcher on {mine_agent.name}", 30, checks=[])
        assert mine.session_info(own, consistent=True) is not None
        info = mine.session_info(other, consistent=True)
        assert info is not None, (
            f"the watcher token of {mine_agent.name} reads {other_agent.name}'s live session "
            "as gone: the session clause would abort on a live host"
        )
        assert info["Node"] == other_agent.name
        admin.session_destroy(other)
        assert mine.session_info(other, consistent=True) is None
        mine.session_destroy(own)
    admin.close()
