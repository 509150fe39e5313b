"""When a host trims its own acks (``watcher.agent.TrimClock``): the first deploy end after a
start, then every ``TRIM_EVERY`` seconds or ``TRIM_AFTER_PARTS`` parts, and again at the next
end after a trim that filled its txn. What a trim deletes is tested against Consul
(``tests/integration/test_barrier_store.py``)."""

from __future__ import annotations

from watcher.agent import TRIM_AFTER_PARTS, TRIM_EVERY, TrimClock
from watcher.consul_api import MAX_TXN_OPS


def test_the_first_end_after_a_start_trims() -> None:
    clock = TrimClock()
    assert clock.part_done(now=5.0)
    assert not clock.part_done(now=6.0)


def test_then_after_trim_every_seconds() -> None:
    clock = TrimClock()
    assert clock.part_done(now=0.0)
    assert not clock.part_done(now=TRIM_EVERY)  # not yet: strictly more than the interval
    assert clock.part_done(now=TRIM_EVERY + 0.5)
    assert not clock.part_done(now=TRIM_EVERY + 1.0)


def test_or_after_so_many_parts_whichever_comes_first() -> None:
    clock = TrimClock()
    assert clock.part_done(now=0.0)
    due = [clock.part_done(now=1.0 + i) for i in range(2 * TRIM_AFTER_PARTS)]
    # the 32nd part since the last trim trims, and counting starts again from there
    assert [i + 1 for i, d in enumerate(due) if d] == [TRIM_AFTER_PARTS, 2 * TRIM_AFTER_PARTS]


def test_a_full_txn_trims_again_at_the_next_end() -> None:
    clock = TrimClock()
    assert clock.part_done(now=0.0)
    clock.trimmed(MAX_TXN_OPS)
    assert clock.part_done(now=1.0)
    clock.trimmed(MAX_TXN_OPS - 1)  # room was left: all there was is gone
    assert not clock.part_done(now=2.0)
    assert not clock.part_done(now=3.0)
