"""sidusd.net._lockstep (C): file runs, whose payloads C reads from the file itself.

The reference is the run made from the same bytes in memory (``LockstepRun.datagram``):
a file run must send exactly what it sends, across its 256 KiB reads, with a short or an
empty last block, with two steps of one peer in one batch, and stop before a step whose
read fails, handing that ACK back to Python.
"""

from __future__ import annotations

import os
import socket

import pytest
from test_lockstep_engine import ack, key_of, pump_all, recv_all, udp

from sidusd.net import udpport
from sidusd.net.files import ReadAheadSource
from sidusd.proto.tftp_session import LockstepRun, ReadSession

if not udpport.ACCEL_BUILT:
    pytest.skip("needs the C extension sidusd.net._lockstep, built by scripts/setup "
                "(gcc, libc6-dev, python3-dev)", allow_module_level=True)

from sidusd.net import _lockstep  # noqa: E402

READ = 256 * 1024          # RUN_READ_BYTES in _lockstep.h


def content(n: int, seed: int = 3) -> bytes:
    return bytes(((i * 131) >> 3 ^ seed) & 0xFF for i in range(n))


@pytest.fixture
def file_of(tmp_path):
    fds = []

    def make(data: bytes) -> int:
        p = tmp_path / f"f{len(fds)}"
        p.write_bytes(data)
        fds.append(os.open(p, os.O_RDONLY))
        return fds[-1]
    yield make
    for fd in fds:
        os.close(fd)


def lockstep_through(run, plan: LockstepRun, start: int = 0) -> None:
    """ACK each step of ``run`` in turn and check each DATA against the in-memory reference."""
    server, client = udp(), udp(blocking=True)
    runs, engine = {key_of(client): run}, _lockstep.Engine()
    for i in range(start, plan.count):
        client.sendto(ack(plan.ack + i), server.getsockname())
        rest, unsent, _ = pump_all(engine, server, runs, 1.0 + i, 1)
        assert rest == [] and unsent == []
        assert recv_all(client, 1) == [plan.datagram(i)], f"step {i}"
    assert (run.used, run.stopped, run.read_errno) == (plan.count, 0, 0)


@pytest.mark.parametrize("blksize,blocks,last", [
    (1468, 400, 1000),        # 587 KB: three reads of 178 blocks
    (65464, 9, 0),            # four blocks a read; the size a multiple of blksize: an empty last
    (8972, 3, 17),            # one read
    (512, 1, 0),              # an empty file: one step, an empty DATA
])
def test_a_file_run_sends_what_the_same_bytes_in_memory_send(file_of, blksize, blocks, last):
    ack0 = 3
    body = content((blocks - 1) * blksize + last)
    lead = content(ack0 * blksize, seed=9)                 # the blocks before the run, already sent
    fd = file_of(lead + body)
    plan = LockstepRun(ack0, body, blksize, blocks)
    run = _lockstep.Run(ack0, b"", blksize, blocks, None, fd=fd, offset=ack0 * blksize, size=len(body))
    lockstep_through(run, plan)
    per_read = max(1, READ // blksize)
    assert run.reads == (0 if len(body) == 0 else -(-len(body) // (per_read * blksize)))


def test_a_file_run_after_steps_taken_elsewhere_starts_reading_there(file_of):
    body = content(100 * 1468 + 5)
    plan = LockstepRun(65534, body, 1468, 101)             # and its block numbers roll over
    run = _lockstep.Run(65534, b"", 1468, 101, None, 2, fd=file_of(body), offset=0, size=len(body))
    lockstep_through(run, plan, start=2)
    assert run.reads == 1


def test_two_steps_of_one_peer_in_one_batch_across_a_read(file_of):
    """ACKs of blocks 4 and 5 arrive together (a peer acking ahead): step 4's DATA must leave
    before the read for step 5 overwrites the buffer it points into."""
    bs = 65464
    body = content(8 * bs)
    plan = LockstepRun(0, body, bs, 9)
    run = _lockstep.Run(0, b"", bs, 9, None, fd=file_of(body), offset=0, size=len(body))
    server, client = udp(), udp(blocking=True)
    runs, engine = {key_of(client): run}, _lockstep.Engine()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)       # room for 3 big DATA
    for i in range(3):
        client.sendto(ack(i), server.getsockname())
        pump_all(engine, server, runs, 1.0, 1)
        assert recv_all(client, 1) == [plan.datagram(i)]
    for i in (3, 4, 5):                                     # step 3 ends read 1, step 4 needs read 2
        client.sendto(ack(i), server.getsockname())
    rest, unsent, _ = pump_all(engine, server, runs, 2.0, 3)
    assert rest == [] and unsent == []
    assert recv_all(client, 3) == [plan.datagram(i) for i in (3, 4, 5)]
    assert (run.used, run.reads) == (6, 2)


def test_a_read_that_comes_short_stops_the_run_and_returns_the_ack(file_of, tmp_path):
    bs = 1468
    body = content(400 * bs)
    fd = file_of(body)
    plan = LockstepRun(0, body, bs, 401)
    run = _lockstep.Run(0, b"", bs, 401, None, fd=fd, offset=0, size=len(body))
    server, client = udp(), udp(blocking=True)
    runs, engine = {key_of(client): run}, _lockstep.Engine()
    per_read = READ // bs
    for i in range(per_read):                               # the first read's steps
        client.sendto(ack(i), server.getsockname())
        pump_all(engine, server, runs, 1.0, 1)
        assert recv_all(client, 1) == [plan.datagram(i)]
    os.truncate(tmp_path / "f0", per_read * bs + 10)        # the file shrank
    client.sendto(ack(per_read), server.getsockname())
    rest, unsent, _ = pump_all(engine, server, runs, 2.0, 1)
    assert rest == [(ack(per_read), key_of(client), False)] and unsent == []
    assert (run.used, run.stopped, run.read_errno, run.reads) == (per_read, 1, 5, 2)    # EIO


def test_a_file_run_keeps_its_own_descriptor(file_of):
    body = content(3000)
    fd = os.dup(file_of(body))
    run = _lockstep.Run(0, b"", 1468, 3, None, fd=fd, offset=0, size=len(body))
    os.close(fd)                        # the caller closes its descriptor before the run ends
    lockstep_through(run, LockstepRun(0, body, 1468, 3))


def test_file_run_arguments_are_refused():
    with pytest.raises(ValueError, match="file run"):
        _lockstep.Run(0, b"x", 512, 2, None, fd=0, offset=0, size=600)
    with pytest.raises(ValueError, match="file run"):
        _lockstep.Run(0, b"", 512, 2, None, fd=0, offset=-1, size=600)
    with pytest.raises(ValueError, match="count blocks"):
        _lockstep.Run(0, b"", 512, 2, None, fd=0, offset=0, size=1025)
    with pytest.raises(OSError):
        _lockstep.Run(0, b"", 512, 2, None, fd=987654, offset=0, size=600)       # not open


def test_a_session_run_with_head_reads_only_its_first_payloads(file_of):
    body = content(10 * 1468 + 7)
    s = ReadSession(ReadAheadSource(file_of(body), len(body)), blksize=1468)
    s.start(0.0)
    s.datagrams_to_send(0.0)                               # DATA 1: its ACK takes a run's step 0
    full = s.lockstep_run(1 << 30)
    head = s.lockstep_run(1 << 30, head=1)
    none = s.lockstep_run(1 << 30, head=0)
    rest = body[1468:]                                     # blocks 2..11 (the last: 7 bytes)
    assert (full.count, full.total) == (head.count, head.total) == (none.count, none.total) == (10, len(rest))
    assert full.data == rest and head.data == rest[:1468] and none.data == b""
    assert head.datagram(0) == full.datagram(0)
    with pytest.raises(IndexError, match="not in this run's data"):
        head.datagram(1)
    with pytest.raises(IndexError, match="not in this run's data"):
        none.datagram(0)
