"""Pieces of the TFTP edge that need no socket: the timer heap, the read-only transfer status."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sidusd.net import tftp_accel
from sidusd.net.timerheap import TimerHeap
from sidusd.proto.tftp_session import ReadSession


class FakeLoop:
    """call_at recorded, fired by hand (virtual time)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.armed: list[list] = []

    def time(self) -> float:
        return self.now

    def call_at(self, at, fn):
        entry = [at, fn, False]
        self.armed.append(entry)
        return SimpleNamespace(cancel=lambda: entry.__setitem__(2, True))

    def run_until(self, t: float) -> None:
        self.now = t
        for entry in sorted(self.armed, key=lambda e: e[0]):
            if not entry[2] and entry[0] <= t:
                entry[2] = True
                entry[1]()


def test_timer_heap_fires_each_item_once_at_its_latest_earlier_deadline():
    fired: list[tuple[float, str]] = []
    heap: TimerHeap

    def fire(now):
        for item in heap.due(now):
            fired.append((now, item.name))

    heap = TimerHeap(fire)
    heap.loop = loop = FakeLoop()
    a, b = SimpleNamespace(name="a", heap_at=None), SimpleNamespace(name="b", heap_at=None)
    heap.schedule(a, 5.0)
    heap.schedule(b, 3.0)
    heap.schedule(a, 2.0)                   # earlier: supersedes a's entry at 5
    assert [e[0] for e in loop.armed if not e[2]] == [2.0]      # one loop timer, the earliest
    loop.run_until(2.0)
    assert fired == [(2.0, "a")] and a.heap_at is None
    loop.run_until(3.0)
    assert fired == [(2.0, "a"), (3.0, "b")]
    loop.run_until(10.0)
    assert fired == [(2.0, "a"), (3.0, "b")]                    # a's stale entry at 5 never fires


def lockstep_transfer(blocks: int = 40, blksize: int = 512):
    data = bytes(range(256)) * (blocks * blksize // 256 + 1)
    src = SimpleNamespace(size=blocks * blksize - 100, contiguous=True,
                          read_block=lambda off, n: data[off:min(off + n, blocks * blksize - 100)])
    s = ReadSession(src, blksize, 1, 1.0, 3)
    s.start(0.0)
    s.datagrams_to_send(0.0)                # DATA 1 in flight
    plan = s.lockstep_run(64 * 1024)
    assert plan is not None
    t = SimpleNamespace(session=s, plan=plan, source=src,
                        run=SimpleNamespace(used=0, at=0.0))
    return t, s, plan


@pytest.mark.parametrize("used", [0, 1, 7, 39])
def test_status_counts_the_steps_c_took_without_touching_the_session(used):
    t, s, plan = lockstep_transfer()
    before = s.bytes_acked
    t.run.used, t.run.at = used, 1.0
    shown = tftp_accel.bytes_acked(t)
    assert s.bytes_acked == before and s.next_timer() == 1.0      # read only
    s.lockstep_advance(plan, used, 1.0)
    assert shown == s.bytes_acked                                   # what settling will record


@pytest.mark.parametrize(("used", "kept"), [(59, True), (58, False), (3, False)])
def test_a_run_that_ended_early_makes_the_next_one_small_again(used, kept):
    """Runs double while each is taken in full (tftp_accel.run_bytes); a run ended early
    (a loss, a duplicate ACK) sends the next back to the first size."""
    t, s, plan = lockstep_transfer(blocks=60)
    counted: list[tuple] = []
    run = SimpleNamespace(used=used, count=plan.count, at=1.0)
    t.run, t.key, t.run_size = run, b"k", len(plan.data)
    t.port = SimpleNamespace(runs={b"k": run})
    assert plan.count == 59                  # blocks 2..60 (block 1 in flight)
    tftp_accel.settle(t, lambda *a: counted.append(a))
    assert t.run is None and t.port.runs == {}
    assert t.run_size == (len(plan.data) if kept else 0)
    assert ("tftp.accel_steps", used) in counted
