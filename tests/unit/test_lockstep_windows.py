"""sidusd.net._lockstep (C): windowed runs (RFC 7440), a window of DATA per step, on loopback.

A run made with ``window=W`` takes a step on the ACK of the last block of the window in
flight and sends the next W blocks (fewer at the run's end), one datagram each, or with
``gso`` > 1 as GSO messages (UDP_SEGMENT) that the kernel cuts into the same datagrams.
The reference is ``LockstepRun.datagram`` (itself tested against the session's general
path in test_tftp_session.py); what the receiver gets must be exactly those datagrams.
"""

from __future__ import annotations

import os
import socket

import pytest
from test_lockstep_engine import ack, assert_silent, key_of, recv_all, udp, wait_readable

from sidusd.net import udpport
from sidusd.proto.tftp_session import LockstepRun

if not udpport.ACCEL_BUILT:
    pytest.skip("needs the C extension sidusd.net._lockstep, built by scripts/setup "
                "(gcc, libc6-dev, python3-dev)", allow_module_level=True)

from sidusd.net import _lockstep  # noqa: E402

SO_NO_CHECK = 11           # asm-generic/socket.h: no UDP checksum, so no GSO (EINVAL)


@pytest.fixture
def pair():
    """(server, client): the engine's socket and a blocking peer, both on loopback, closed after."""
    server, client = udp(), udp(blocking=True)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    yield server, client
    server.close()
    client.close()


def c_run(plan: LockstepRun, peer: object = None, window: int | None = None):
    """The C run of ``plan`` (its window, or ``window``)."""
    return _lockstep.Run(plan.ack, plan.data, plan.blksize, plan.count, peer,
                         window=plan.window if window is None else window)


def windowed(ack_abs: int, blksize: int, count: int, window: int, last: int | None = None,
             seed: int = 7) -> LockstepRun:
    n = (count - 1) * blksize + (blksize if last is None else last)
    data = bytes(((i * 29) ^ seed) & 0xFF for i in range(n))
    return LockstepRun(ack_abs, data, blksize, count, -1, window)


def pump(engine, server, runs, now: float, want_rx: int, gso: int, sending: bool = True):
    rest, unsent, rx, refused = [], [], 0, False
    for _ in range(200):
        res = engine.pump(server.fileno(), runs, now, 8, sending, 0, 0, -1, gso)
        assert (res.send_errors, res.rx_errno, res.dropped) == (0, 0, 0)
        rest += res.rest
        unsent += res.unsent
        rx += res.rx
        refused |= res.gso_refused
        if rx >= want_rx:
            break
        wait_readable(server)
    assert rx == want_rx
    return rest, unsent, refused


def step_ends(plan: LockstepRun) -> list[int]:
    """Each step's first block, as an index into the run (the ACK of the block before takes it)."""
    return list(range(0, plan.count, plan.window))


@pytest.mark.parametrize("gso", [1, 64])
@pytest.mark.parametrize("blksize,count,window,last", [
    (512, 10, 4, 100),          # 2 whole windows, then 2 blocks (the last short)
    (1468, 48, 16, 0),          # 3 windows of 16, the empty last block in the third
    (8972, 7, 8, 5),            # one step shorter than the window: the whole run
    (65464, 3, 1, 9),           # lockstep still: a step is a block
])
def test_each_ack_of_a_window_end_sends_the_next_window(pair, gso, blksize, count, window,
                                                        last) -> None:
    plan = windowed(40, blksize, count, window, last)
    server, client = pair
    run = c_run(plan, "P")
    runs, engine = {key_of(client): run}, _lockstep.Engine()
    assert run.window == window
    for i in step_ends(plan):
        client.sendto(ack(plan.ack + i), server.getsockname())
        rest, unsent, refused = pump(engine, server, runs, 10.0 + i, 1, gso)
        assert rest == [] and unsent == [] and not refused
        n = min(window, count - i)
        assert recv_all(client, n) == [plan.datagram(j) for j in range(i, i + n)], f"step at {i}"
        assert (run.used, run.ack, run.stopped) == (i + n, plan.ack + i + n, 0)
    assert_silent(client)
    client.sendto(ack(plan.ack + count), server.getsockname())      # spent: back to Python
    rest, _, _ = pump(engine, server, runs, 99.0, 1, gso)
    assert rest == [(ack(plan.ack + count), key_of(client), False)] and run.stopped


def test_a_mid_window_ack_is_not_a_step_and_stops_the_run(pair) -> None:
    plan = windowed(0, 512, 32, 8)
    server, client = pair
    run = c_run(plan)
    runs, engine = {key_of(client): run}, _lockstep.Engine()
    client.sendto(ack(0), server.getsockname())                     # takes step 0: blocks 1..8
    client.sendto(ack(5), server.getsockname())                     # a partial ACK: Python's
    client.sendto(ack(8), server.getsockname())                     # after it, nothing is a step
    rest, unsent, _ = pump(engine, server, runs, 1.0, 3, 64)
    assert unsent == [] and rest == [(ack(5), key_of(client), False), (ack(8), key_of(client), False)]
    assert recv_all(client, 8) == [plan.datagram(j) for j in range(8)]
    assert (run.used, run.stopped) == (8, 1)
    assert_silent(client)


@pytest.mark.parametrize("gso", [64, 1])
def test_unsent_windows_come_back_as_gso_groups_or_datagrams(pair, gso) -> None:
    """Not sending (an outbox waits): a step's DATA comes back as one group per GSO message,
    or one datagram per block without GSO; a group holds at most 64 blocks and 65507 bytes."""
    plan = windowed(65530, 8000, 10, 10, last=77)                   # 10 x 8004 bytes > 65507
    server, client = pair
    client.sendto(ack(65530), server.getsockname())
    _, unsent, refused = pump(_lockstep.Engine(), server, {key_of(client): c_run(plan, "A")}, 1.0,
                              1, gso, sending=False)
    d = [plan.datagram(j) for j in range(10)]
    want = [(tuple(d[:8]), "A"), (tuple(d[8:10]), "A")] if gso > 1 else [(x, "A") for x in d]
    assert unsent == want and not refused
    assert [x[2:4] for x in d[4:6]] == [b"\xff\xff", b"\x00\x00"]       # 16-bit wrap
    assert_silent(client)


def test_a_window_bigger_than_a_batch_is_not_taken_and_bad_windows_are_refused(pair) -> None:
    plan = windowed(0, 8, 40, 20)
    server, client = pair
    run = c_run(plan)
    client.sendto(ack(0), server.getsockname())
    rest, unsent, _ = pump(_lockstep.Engine(tx_capacity=16), server, {key_of(client): run}, 1.0, 1, 1)
    assert rest == [(ack(0), key_of(client), False)] and unsent == []
    assert (run.used, run.stopped) == (0, 1)
    assert_silent(client)
    for bad in ({"window": 0}, {"window": 1025}, {"window": 17}):
        with pytest.raises(ValueError):
            _lockstep.Run(0, b"x" * 65464 * 2, 65464, 2, None, **bad)   # 17 x 65464 > 1 MiB
    with pytest.raises(ValueError):
        _lockstep.Engine().pump(server.fileno(), {}, 0.0, 1, True, 0, 0, -1, 65)


def test_a_refused_gso_message_comes_back_whole_and_flags_the_result(pair) -> None:
    """A socket without UDP checksums (SO_NO_CHECK) makes the kernel refuse GSO (EINVAL): the
    step's DATA comes back as its group with ``gso_refused``; without GSO it is sent."""
    plan = windowed(3, 1468, 16, 16)
    server, client = pair
    server.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
    run = c_run(plan, "P", window=8)
    runs, engine = {key_of(client): run}, _lockstep.Engine()
    client.sendto(ack(3), server.getsockname())
    rest, unsent, refused = pump(engine, server, runs, 1.0, 1, 64)
    assert refused and rest == [] and unsent == [(tuple(plan.datagram(j) for j in range(8)), "P")]
    assert_silent(client)
    client.sendto(ack(11), server.getsockname())
    rest, unsent, refused = pump(engine, server, runs, 2.0, 1, 1)
    assert not refused and rest == [] and unsent == []
    assert recv_all(client, 8) == [plan.datagram(j) for j in range(8, 16)]


def test_a_windowed_file_run_reads_whole_windows_across_its_reads(pair, tmp_path) -> None:
    """windowsize 16 at 1468: a read holds 11 windows (258,368 bytes); 600 KB cross three
    reads, the last window short; every datagram is the in-memory reference's."""
    size = 600_000
    data = bytes(((i * 131) >> 3 ^ 5) & 0xFF for i in range(size))
    path = tmp_path / "f"
    path.write_bytes(data)
    count = size // 1468 + 1                                        # 409 blocks
    fd = os.open(path, os.O_RDONLY)
    try:
        plan = LockstepRun(16, data[16 * 1468:], 1468, count - 16, -1, 16)
        run = _lockstep.Run(16, b"", 1468, plan.count, None, 16, fd=fd, offset=16 * 1468,
                            size=size - 16 * 1468, window=16)
    finally:
        os.close(fd)                                                # the run keeps a duplicate
    server, client = pair
    runs, engine, got = {key_of(client): run}, _lockstep.Engine(), []
    for i in range(16, plan.count, 16):                             # the first step was the caller's
        client.sendto(ack(plan.ack + i), server.getsockname())
        pump(engine, server, runs, 1.0, 1, 64)
        got += recv_all(client, min(16, plan.count - i))
    assert got == [plan.datagram(j) for j in range(16, plan.count)]
    assert (run.used, run.stopped, run.read_errno, run.reads) == (plan.count, 0, 0, 3)
