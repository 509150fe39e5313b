"""`watcherctl gc`: list the hosts of an app that are gone, and forget them (DESIGN.md 4).

A host's record (``hosts/<node>``) outlives its watcher, so `deploy` can refuse while a
known host is down; a host retired for good would block every deploy. `gc APP` lists the
hosts with a record or acks but no live member key; `gc APP NODE...` deletes a host's
record and the acks of its that no reader checks any more: what the host would have
trimmed itself had it stayed (``DeployStore.trim_own_progress``). Every deleting txn
checks that the host did not come back and that no deploy started since the plan was read.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from watcher import ids
from watcher.barrier import DeployStore
from watcher.consul_api import MAX_TXN_OPS, ConsulClient, KVEntry, TxnOp
from watcher.ctl import EXIT_OK, CtlContext, committed_end, table
from watcher.errors import ConfigError, ConsulPermissionDenied, DeployRefused, PayloadError
from watcher.records import COMMIT, DEPLOY_ID_RE, NODE_RE, HostRecord

#: Why an ack is kept, in the order a deploy is classed (the first that applies).
KEPT_INFLIGHT = "in flight"
KEPT_CURRENT = "named by current"
KEPT_HISTORY = "in history"
KEPT_REASONS = (KEPT_INFLIGHT, KEPT_CURRENT, KEPT_HISTORY)
#: Guards in every deleting txn: the host record, the member key, `inflight`.
GUARD_OPS = 3
#: Where docs/acl.md says which token gc needs.
ACL_DOC = 'docs/acl.md, "Retiring a host"'
#: The key a permission error of Consul names (``... lacks permission 'key:write' on "k"``).
_DENIED_KEY = re.compile(r"""lacks permission '[^']*' on \\?"([^"\\]+)""")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "gc",
        parents=[common],
        help="list the hosts of an app that are gone; forget the ones named",
        description="Without NODE: list the hosts of APP with a host record or acks but no "
        "live member key (read-only). With NODE(s): forget each one: delete its host record "
        "and its acks of deploys no reader checks any more. Forgetting needs write on "
        f"hosts/ and progress/ ({ACL_DOC}).",
    )
    p.add_argument("app")
    # default=[]: without it, Python 3.11 names NODE among the required arguments.
    p.add_argument(
        "nodes", nargs="*", default=[], metavar="NODE", type=node_argument, help="hosts to forget"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="say what would be deleted and kept; delete nothing"
    )
    p.set_defaults(func=cmd_gc)


def node_argument(text: str) -> str:
    """An argparse ``type=``: a Consul node name as the records accept it (``NODE_RE``)."""
    if not NODE_RE.match(text):
        raise argparse.ArgumentTypeError(
            f"invalid node name {ids.shown(text)}: must be 1-128 of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return text


node_argument.__name__ = "node name"


class UnknownHost(ConfigError):
    """A node gc was asked to forget that the app does not know: the user's typo (exit 2)."""

    def __init__(self, message: str) -> None:
        super().__init__("command line", [message])

    def __str__(self) -> str:
        return self.problems[0]


@dataclass(frozen=True)
class Needed:
    """The deploys whose acks readers still check, by why (``KEPT_REASONS``)."""

    inflight: str | None
    current: frozenset[str]
    history: frozenset[str]

    def reason(self, deploy_id: str) -> str | None:
        if deploy_id == self.inflight:
            return KEPT_INFLIGHT
        if deploy_id in self.current:
            return KEPT_CURRENT
        if deploy_id in self.history:
            return KEPT_HISTORY
        return None


@dataclass
class NodePlan:
    """What forgetting one node deletes and keeps, and the indexes its txns check."""

    node: str
    host: HostRecord | None
    host_index: int  # the host record's ModifyIndex; 0: none
    member_index: int  # a member key held by no session (0: none at all)
    delete: list[str] = field(default_factory=list)  # keys, acks grouped by deploy
    deploys_deleted: list[str] = field(default_factory=list)
    kept: dict[str, list[str]] = field(default_factory=dict)  # reason -> deploy ids
    other_keys: list[str] = field(default_factory=list)  # under progress/<node>/, no ack

    @property
    def kept_count(self) -> int:
        return sum(len(v) for v in self.kept.values())

    def to_dict(self, store: DeployStore) -> dict[str, Any]:
        return {
            "node": self.node,
            "host_record": store.keys.host(self.node) if self.host_index else None,
            "last_seen": self.host.last_seen if self.host else None,
            "release": self.host.release if self.host else None,
            "delete": self.delete,
            "deploys_deleted": self.deploys_deleted,
            "kept": {r: self.kept[r] for r in KEPT_REASONS if r in self.kept},
            "other_keys": self.other_keys,
        }

    @property
    def delete_ack_keys(self) -> list[str]:
        return [k for k in self.delete if "/progress/" in k]


def cmd_gc(ctx: CtlContext) -> int:
    args = ctx.args
    ctx.app(args.app)
    store = DeployStore(
        ConsulClient(ctx.config.consul, on_retry=ctx.consul_retry_notice),
        ctx.config.kv_prefix,
        args.app,
    )
    if not args.nodes:
        return list_gone(ctx, store)
    return forget(ctx, store, list(dict.fromkeys(args.nodes)), dry_run=args.dry_run)


# --- reading --------------------------------------------------------------------------


def needed_deploys(store: DeployStore, inflight: str | None) -> Needed:
    """The deploys whose acks are still checked: the one in flight, those `current` and
    `current.previous` name (converge and every reader check `current` against them), and
    every deploy `history` lists (history and the page check each one's records against
    its acks). The rest is what hosts trim of their own (``trim_own_progress``)."""
    current, _ = store.current()
    named: set[str] = set()
    if current is not None:  # as DeployStore._protected reads it
        named.add(current.deploy)
        previous = current.previous or {}
        if isinstance(previous.get("deploy"), str):
            named.add(previous["deploy"])
    return Needed(inflight, frozenset(named), frozenset(store.history()))


def progress_nodes(store: DeployStore) -> set[str]:
    return {n for n in store.names_under(store.keys.progress_prefix) if NODE_RE.match(n)}


def host_record_nodes(store: DeployStore) -> set[str]:
    """Every node with a key under hosts/, readable or not (one that does not parse still
    names a host someone may want forgotten)."""
    prefix = store.keys.hosts_prefix
    names = (k[len(prefix) :] for k in store.consul.kv_keys(prefix, separator="/"))
    return {n for n in names if NODE_RE.match(n)}


def inflight_expected(store: DeployStore, inflight: str | None) -> list[str]:
    """The nodes the deploy in flight expects ([] when none is, or ``inflight`` holds no
    deploy id: the watchers clear it). A request that cannot be read is refused: nobody
    can tell whom it expects."""
    if not inflight or not DEPLOY_ID_RE.match(inflight):
        return []
    try:
        view = store.view(inflight)
    except PayloadError as exc:
        raise DeployRefused(
            f"app {store.app}: the deploy in flight, {inflight}, has a request that cannot "
            f"be read ({exc}); nobody can tell which hosts it expects. Wait for the "
            "watchers to clear it, or "
            f"`watcherctl abort {inflight} --app {store.app}`, then run gc again"
        ) from None
    return list(view.record.expected) if view is not None else []


def plan_node(
    store: DeployStore, node: str, needed: Needed, hosts: dict[str, HostRecord]
) -> NodePlan:
    """What forgetting ``node`` deletes and keeps, read consistently."""
    keys = store.keys
    read = store.consul.txn(
        [TxnOp.get_or_empty(keys.host(node)), TxnOp.get_or_empty(keys.member(node))],
        consistent=True,
    )
    host_entry, member_entry = _entry(read.entries, 0), _entry(read.entries, 1)
    plan = NodePlan(
        node=node,
        host=hosts.get(node),
        host_index=host_entry.modify_index if host_entry else 0,
        member_index=member_entry.modify_index if member_entry else 0,
    )
    if plan.host_index:
        plan.delete.append(keys.host(node))
    prefix = keys.node_progress_prefix(node)
    by_deploy: dict[str, list[str]] = {}
    for key in sorted(store.consul.kv_keys(prefix, separator=None)):
        rest = key[len(prefix) :]
        deploy_id, _, sub = rest.partition("/")
        if DEPLOY_ID_RE.match(deploy_id) and sub in ("", "request"):
            by_deploy.setdefault(deploy_id, []).append(key)
        else:
            plan.other_keys.append(key)
    for deploy_id, ack_keys in sorted(by_deploy.items()):
        reason = needed.reason(deploy_id)
        if reason is None:
            plan.deploys_deleted.append(deploy_id)
            plan.delete += ack_keys
        else:
            plan.kept.setdefault(reason, []).append(deploy_id)
    return plan


def _entry(entries: Sequence[KVEntry], index: int) -> KVEntry | None:
    """A ``get-or-empty`` result: None for a key that does not exist."""
    entry = entries[index] if index < len(entries) else None
    return entry if entry is not None and entry.modify_index else None


# --- gc APP: the list -----------------------------------------------------------------


def list_gone(ctx: CtlContext, store: DeployStore) -> int:
    """The hosts with a record or acks and no live member key, and how to forget them."""
    members = store.members()
    hosts = store.hosts()
    gone = sorted((host_record_nodes(store) | progress_nodes(store)) - set(members))
    inflight, _ = store.inflight()
    unreadable = ""
    try:
        expected = set(inflight_expected(store, inflight)) if gone else set()
    except DeployRefused as exc:  # gc of any of them is refused until it is cleared
        expected, unreadable = set(gone), str(exc)
    needed = needed_deploys(store, inflight)
    rows: list[dict[str, Any]] = []
    for node in gone:
        plan = plan_node(store, node, needed, hosts)
        acks = len(plan.deploys_deleted) + plan.kept_count
        rows.append(
            {
                "node": node,
                "host_record": bool(plan.host_index),
                "last_seen": plan.host.last_seen if plan.host else None,
                "release": plan.host.release if plan.host else None,
                "acks": acks,
                "acks_removable": len(plan.deploys_deleted),
                "expected_in_flight": inflight if node in expected else None,
            }
        )
    # Already forgotten, with only acks readers still check: nothing to do yet.
    waiting = [r["node"] for r in rows if not r["host_record"] and not r["acks_removable"]]
    forgettable = [
        r["node"] for r in rows if not r["expected_in_flight"] and r["node"] not in waiting
    ]
    command = ctx.command_line("gc", store.app, *forgettable) if forgettable else None
    data = {"app": store.app, "gone": rows, "forget": command, "problem": unreadable or None}

    def human(d: dict[str, Any]) -> str:
        if not rows:
            return (
                f"app {store.app}: no host is gone (every host with a record or acks holds "
                "a live member key)"
            )
        lines = [
            f"app {store.app}: {len(rows)} host(s) with a record or acks but no live member "
            "key (watcher stopped, or the host is gone):",
            table(
                [
                    [
                        r["node"],
                        r["last_seen"] or "- (forgotten)",
                        r["release"] or "-",
                        f"{r['acks']} ({r['acks_removable']} removable now)",
                    ]
                    for r in rows
                ],
                ["NODE", "RECORD UPDATED", "RELEASE", "ACKS"],
            ),
        ]
        if unreadable:
            lines.append(unreadable)
        else:
            lines += [
                f"{r['node']} is expected by deploy {r['expected_in_flight']} in flight: "
                "wait for its end or abort it before forgetting it"
                for r in rows
                if r["expected_in_flight"]
            ]
        if waiting:
            lines.append(
                f"{', '.join(waiting)}: forgotten; the acks kept are still checked by readers "
                "(history, current), and gc removes them once later deploys move them out"
            )
        if command:
            lines.append(
                f"If they are gone for good, forget them with `{command}` ({ACL_DOC}: it needs "
                "a management token); a host forgotten by mistake comes back when its "
                "watcher starts."
            )
        return "\n".join(lines)

    ctx.emit(data, human)
    return EXIT_OK


# --- gc APP NODE...: forget -----------------------------------------------------------


def forget(ctx: CtlContext, store: DeployStore, nodes: list[str], *, dry_run: bool) -> int:
    """Forget each of ``nodes``, after checking all of them: nothing is deleted when one is
    unknown (exit 2), alive or expected by the deploy in flight (exit 4)."""
    plans, inflight_index = plan_forget(store, nodes)
    data: dict[str, Any] = {
        "app": store.app,
        "dry_run": dry_run,
        "nodes": {p.node: p.to_dict(store) for p in plans},
    }
    if not dry_run:
        for plan in plans:
            done = delete_node(store, plan, inflight_index)
            data["nodes"][plan.node]["deleted"] = done.deleted
            if done.reason:
                data["stopped"] = {"node": plan.node, "reason": done.reason}
                if ctx.as_json:  # what was deleted before the stop, for a script
                    ctx.emit(data)
                raise DeployRefused(_stopped_message(store, plans, plan, done))
    ctx.emit(data, lambda d: _human_forget(ctx, store, plans, dry_run=dry_run))
    return EXIT_OK


def plan_forget(store: DeployStore, nodes: list[str]) -> tuple[list[NodePlan], int]:
    """The plans of ``nodes`` and the index of ``inflight`` they were read at (0: none);
    raises ``UnknownHost`` or ``DeployRefused`` (nothing is deleted then)."""
    hosts = store.hosts()
    known = host_record_nodes(store) | progress_nodes(store)
    members = store.members(consistent=True)
    unknown = [n for n in nodes if n not in known and n not in members]
    if unknown:
        listed = ", ".join(sorted(known | set(members))) or "none"
        raise UnknownHost(
            f"app {store.app}: no host record and no acks of {', '.join(unknown)} "
            f"(known hosts: {listed})"
        )
    alive = [n for n in nodes if n in members]
    if alive:
        holds = "holds a member key" if len(alive) == 1 else "hold member keys"
        raise DeployRefused(
            f"app {store.app}: {', '.join(alive)} {holds}: its watcher is running. Stop it "
            "first (and keep it stopped: a watcher that starts again writes its host record "
            "back); nothing was deleted"
        )
    inflight, inflight_index = store.inflight(consistent=True)
    expected = set(inflight_expected(store, inflight))
    waited = [n for n in nodes if n in expected]
    if waited and inflight and (committed := _committed(store, inflight)):
        # Too late for abort; the hosts end it, and only a running watcher can.
        raise DeployRefused(
            f"app {store.app}: the deploy in flight, {inflight}, expects {', '.join(waited)} "
            f"and is committed: no abort can end it. {committed_end(store.app, committed)}; "
            "then run gc again; nothing was deleted"
        )
    if waited:
        raise DeployRefused(
            f"app {store.app}: the deploy in flight, {inflight}, expects "
            f"{', '.join(waited)}; wait for its end or "
            f"`watcherctl abort {inflight} --app {store.app}`, then run gc again; "
            "nothing was deleted"
        )
    needed = needed_deploys(store, inflight)
    return [plan_node(store, n, needed, hosts) for n in nodes], inflight_index


def _committed(store: DeployStore, deploy_id: str) -> list[str]:
    """The expected hosts of ``deploy_id`` if the acks read commit it (a reader's view),
    else []."""
    try:
        view = store.view(deploy_id)
    except PayloadError:
        return []
    return list(view.record.expected) if view is not None and view.verdict() == COMMIT else []


@dataclass
class Deleted:
    """What ``delete_node`` deleted, and why it stopped ("" when it finished)."""

    deleted: list[str] = field(default_factory=list)
    reason: str = ""


def guard_ops(
    store: DeployStore, plan: NodePlan, inflight_index: int, *, first: bool
) -> list[dict[str, Any]]:
    """The checks of every deleting txn: its host record is the one read (the first txn
    deletes it by CAS; the later ones check it is not back), the node holds no member key
    (nor re-acquired a stale one), and no deploy started (``inflight`` as read). Consul
    asks write permission for a check-not-exists: the token needs write on the member key
    and ``inflight`` too, though gc never writes them (docs/acl.md)."""
    keys = store.keys
    member = TxnOp.unchanged(keys.member(plan.node), plan.member_index)
    flight = TxnOp.unchanged(keys.inflight, inflight_index)
    host = (
        TxnOp.delete_cas(keys.host(plan.node), plan.host_index)
        if first and plan.host_index
        else TxnOp.check_not_exists(keys.host(plan.node))
    )
    return [host, member, flight]


def delete_node(store: DeployStore, plan: NodePlan, inflight_index: int) -> Deleted:
    """Delete what ``plan`` says, in txns of at most ``MAX_TXN_OPS`` operations, the host
    record in the first; each one guarded (``guard_ops``). Stops at the first txn Consul
    rolls back, saying why."""
    done = Deleted()
    acks = [k for k in plan.delete if k != store.keys.host(plan.node)]
    per_txn = MAX_TXN_OPS - GUARD_OPS
    chunks = [acks[i : i + per_txn] for i in range(0, len(acks), per_txn)] or [[]]
    for number, chunk in enumerate(chunks):
        first = number == 0
        ops = guard_ops(store, plan, inflight_index, first=first)
        ops += [TxnOp.delete(k) for k in chunk]
        try:
            result = store.consul.txn(ops)
        except ConsulPermissionDenied as exc:
            raise ConsulPermissionDenied(_denied_message(store, plan, exc)) from None
        if not result.ok:
            done.reason = _why_stopped(store, plan, inflight_index, result.errors)
            return done
        if first and plan.host_index:
            done.deleted.append(store.keys.host(plan.node))
        done.deleted += chunk
    return done


def _why_stopped(
    store: DeployStore, plan: NodePlan, inflight_index: int, errors: Iterable[tuple[int, str]]
) -> str:
    """Why Consul rolled a guarded txn back, read again."""
    keys = store.keys
    member = store.consul.kv_get(keys.member(plan.node), consistent=True)
    if member is not None and member.session:
        return (
            f"{plan.node} came back: its watcher holds {keys.member(plan.node)} again; "
            "stop it first if the host is to be retired"
        )
    inflight, index = store.inflight(consistent=True)
    if index != inflight_index:
        started = f"deploy {inflight} started" if inflight else "`inflight` changed"
        return f"{started} meanwhile; run gc again once it has ended"
    host = store.consul.kv_get(keys.host(plan.node), consistent=True)
    if host is not None:
        return (
            f"{plan.node}'s host record was written meanwhile (its watcher is starting?); "
            "stop it first if the host is to be retired"
        )
    if member is not None:
        return f"{keys.member(plan.node)} changed meanwhile"
    detail = "; ".join(what for _, what in errors) or "a check failed"
    return f"Consul rolled the delete back ({detail})"


def _stopped_message(store: DeployStore, plans: list[NodePlan], at: NodePlan, done: Deleted) -> str:
    """The refusal when a guarded txn stopped ``at``'s deletes (exit 4)."""
    before = [p.node for p in plans[: plans.index(at)]]
    forgotten = f"; {', '.join(before)} forgotten before that" if before else ""
    partial = (
        f"; {len(done.deleted)} of its keys were already deleted (the rest stays)"
        if done.deleted
        else "; nothing of it was deleted"
    )
    return f"app {store.app}: gc of {at.node} stopped: {done.reason}{partial}{forgotten}"


def _denied_message(store: DeployStore, plan: NodePlan, exc: ConsulPermissionDenied) -> str:
    """Which key Consul refused, and which token gc needs (exit 3)."""
    match = _DENIED_KEY.search(str(exc))
    key = match[1] if match else store.keys.host(plan.node)
    base = store.keys.base
    return (
        f"app {store.app}: Consul refused gc of {plan.node} write permission on {key} "
        "(nothing of it was deleted). Forgetting a host deletes under "
        f"{base}/hosts/ and {base}/progress/, and checks that {base}/members/{plan.node} and "
        f"{base}/inflight do not exist (Consul asks write for that check): no operator or "
        f"host token may. Use a management token, or one with the policy of {ACL_DOC}, for "
        f"this command only (e.g. CONSUL_HTTP_TOKEN_FILE=admin.token). Consul said: {exc}"
    )


def _human_forget(
    ctx: CtlContext, store: DeployStore, plans: list[NodePlan], *, dry_run: bool
) -> str:
    lines = []
    for plan in plans:
        what = []
        if plan.host_index:
            what.append("its host record")
        if plan.deploys_deleted:
            what.append(
                f"{len(plan.delete_ack_keys)} ack key(s) of {len(plan.deploys_deleted)} old "
                f"deploy(s) ({_some(plan.deploys_deleted)})"
            )
        verb = "would forget" if dry_run else "forgot"
        deleted = (
            f"{'would delete' if dry_run else 'deleted'} {' and '.join(what)}"
            if what
            else "nothing to delete"
        )
        lines.append(f"{verb} {plan.node} (app {store.app}): {deleted}")
        if plan.kept_count:
            why = ", ".join(
                f"{len(plan.kept[r])} {r} ({_some(plan.kept[r])})"
                for r in KEPT_REASONS
                if r in plan.kept
            )
            lines.append(
                f"  {'would keep' if dry_run else 'kept'} the acks of {plan.kept_count} "
                f"deploy(s) readers still check against them: {why}"
            )
            again = ctx.command_line("gc", store.app, plan.node)
            lines.append(
                f"  they leave history with later deploys (what {plan.node} would have "
                f"trimmed itself): `{again}` then removes the rest"
            )
        if plan.other_keys:
            lines.append(
                f"  left alone: {len(plan.other_keys)} key(s) under "
                f"{store.keys.node_progress_prefix(plan.node)} that are no acks "
                f"({_some(plan.other_keys)})"
            )
    if not dry_run:
        lines.append(
            "A host forgotten by mistake comes back by itself when its watcher starts (it "
            "writes its host record and member key again and converges to the fleet's release; "
            "not to a release whose deploy one host alone acked, as in a fleet of two, which "
            "any host's token could have written: it raises an alarm instead, and the next "
            "deploy with it back brings it along)."
        )
    return "\n".join(lines)


def _some(items: Sequence[str], shown: int = 3) -> str:
    """The first few of ``items``, and how many more."""
    more = f", and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more
