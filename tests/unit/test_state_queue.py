"""The shared state's event queue (sidusd/state/queue.py): bounded, drop-oldest counted, batches."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidusd.state.queue import EventQueue


def test_full_queue_drops_the_oldest_and_counts_it():
    q = EventQueue(bound=3, batch_max=10, interval_s=1.0)
    assert [q.push(i) for i in range(5)] == [True, True, True, False, False]
    assert (len(q), q.queued, q.dropped) == (3, 5, 2)
    assert q.take(now=0.0) == [2, 3, 4]                 # the newest kept, oldest first


def test_batches_are_due_when_full_or_late():
    q = EventQueue(bound=100, batch_max=3, interval_s=1.0)
    assert not q.due(0.0) and q.next_due(0.0) is None   # nothing queued
    q.push("a")
    assert q.due(0.0)                                   # never flushed: at once
    assert q.take(0.0) == ["a"]
    q.done()
    q.push("b")
    assert not q.due(0.5) and q.next_due(0.5) == pytest.approx(0.5)
    assert q.due(1.0)
    q.push("c"), q.push("d")
    assert q.due(0.1)                                   # a full batch does not wait
    assert q.take(0.1) == ["b", "c", "d"]
    assert not q.due(5.0)                               # one batch in flight at a time
    q.done()
    assert q.sent == 4


def test_a_failed_batch_goes_back_in_front_in_order():
    q = EventQueue(bound=10, batch_max=2, interval_s=1.0)
    for i in range(4):
        q.push(i)
    batch = q.take(0.0)
    q.push(4)
    q.failed(batch)
    assert q.inflight == 0 and q.dropped == 0
    assert q.take(1.0) == [0, 1] and q.take(2.0) == [2, 3] and q.take(3.0) == [4]


def test_a_failed_batch_that_no_longer_fits_loses_its_oldest():
    q = EventQueue(bound=4, batch_max=2, interval_s=1.0)
    for i in range(4):
        q.push(i)
    batch = q.take(0.0)                                 # 0, 1 in flight; 2, 3 queued
    q.push(4)
    q.push(5)                                           # the queue is full again: 2, 3, 4, 5
    assert q.dropped == 0
    q.failed(batch)                                     # 0, 1 are the oldest: no room, dropped
    assert len(q) == 4 and q.dropped == 2
    assert q.take(1.0) == [2, 3] and q.take(2.0) == [4, 5]
    q.failed([4, 5])
    assert q.dropped == 2 and q.take(3.0) == [4, 5]      # room for them: nothing lost


def test_events_pushed_while_a_batch_is_in_flight_keep_the_newest():
    q = EventQueue(bound=3, batch_max=3, interval_s=1.0)
    for i in range(3):
        q.push(i)
    batch = q.take(0.0)
    for i in range(3, 7):
        q.push(i)                                       # 3 dropped (bound 3 queued)
    assert q.dropped == 1
    q.failed(batch)                                     # no room at all: the whole batch dropped
    assert q.dropped == 4 and q.take(1.0) == [4, 5, 6]


def test_bounds_are_checked():
    with pytest.raises(ValueError):
        EventQueue(bound=0, batch_max=1, interval_s=1.0)


@given(st.integers(1, 20), st.integers(1, 8),
       st.lists(st.sampled_from(["push", "take", "done", "failed"]), max_size=200))
def test_every_event_is_queued_in_flight_sent_or_counted_as_dropped(bound, batch_max, ops):
    q = EventQueue(bound, batch_max, interval_s=1.0)
    batch, n, now = [], 0, 0.0
    sent: list[int] = []
    for op in ops:
        now += 0.5
        if op == "push":
            q.push(n)
            n += 1
        elif op == "take" and not q.inflight and len(q):
            batch = q.take(now)
        elif op == "done" and q.inflight:
            sent += batch
            q.done()
        elif op == "failed" and q.inflight:
            q.failed(batch)
        assert len(q) <= bound
        assert q.queued == len(q) + q.inflight + q.sent + q.dropped
    assert sent == sorted(sent) and len(set(sent)) == len(sent)     # in order, never twice
