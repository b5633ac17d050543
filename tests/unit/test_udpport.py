"""sidusd.net.udpport.SharedPort: batches out in order, refused datagrams dropped and counted,
EAGAIN parks the rest in the outbox until the socket is writable (loopback, high ports)."""

from __future__ import annotations

import asyncio
import collections
import errno
import socket

import pytest

from sidusd.net import mmsg
from sidusd.net.udpport import SharedPort


def udp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(5)
    return s


class Counts(collections.Counter):
    def count(self, name: str, n: int = 1) -> None:
        self[name] += n


def run_until(loop: asyncio.AbstractEventLoop, done, timeout_s: float = 5.0) -> None:
    """Turn the loop (its callbacks run) until ``done()``, failing after ``timeout_s``."""
    async def turn() -> None:
        deadline = loop.time() + timeout_s
        while not done():
            assert loop.time() < deadline, "the loop did not get there in time"
            await asyncio.sleep(0)
    loop.run_until_complete(turn())


@pytest.fixture
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def test_flush_sends_the_batch_in_order_and_reads_come_back(loop):
    counts = Counts()
    port = SharedPort(loop, "127.0.0.1", counts.count)
    peer_sock = udp()
    peer = mmsg.Peer(mmsg.peer_key(peer_sock.getsockname()))
    port.queue([b"a", b"b"], peer)
    port.queue([b"c"], peer)
    port.flush()
    assert [peer_sock.recvfrom(100) for _ in range(3)] == [(x, port.address) for x in (b"a", b"b", b"c")]
    peer_sock.sendto(b"\x00\x04\x00\x01", port.address)
    got = []
    for _ in range(1000):
        got += port.recv()
        if got:
            break
    assert got == [(b"\x00\x04\x00\x01", mmsg.peer_key(peer_sock.getsockname()), False)]
    assert not counts
    port.close()
    assert port.closed
    peer_sock.close()


@pytest.mark.parametrize("gso", [True, False])
def test_refused_datagram_is_dropped_and_the_rest_goes(loop, gso):
    counts = Counts()
    port = SharedPort(loop, "127.0.0.1", counts.count, gso=gso)
    peer_sock = udp()
    peer = mmsg.Peer(mmsg.peer_key(peer_sock.getsockname()))
    port.queue([b"one", b"x" * 70000, b"three"], peer)     # the middle one: EMSGSIZE
    port.flush()
    assert [peer_sock.recvfrom(100)[0] for _ in range(2)] == [b"one", b"three"]
    assert counts == {"tftp.send_errors": 1}
    port.close()
    peer_sock.close()


class FullOnce(mmsg.Sender):
    """A sender whose kernel buffer is full for the first ``full`` calls (EAGAIN)."""

    def __init__(self, full: int):
        super().__init__()
        self.full = full

    def send(self, sock, payloads, peers, start=0):
        if self.full:
            self.full -= 1
            return 1, errno.EAGAIN if len(payloads) - start > 1 else 0
        return super().send(sock, payloads, peers, start)


def test_eagain_parks_the_rest_until_writable_in_order(loop):
    counts = Counts()
    port = SharedPort(loop, "127.0.0.1", counts.count, gso=False)
    port._tx = FullOnce(1)
    peer_sock = udp()
    peer = mmsg.Peer(mmsg.peer_key(peer_sock.getsockname()))
    port.queue([b"1", b"2", b"3"], peer)
    port.flush()                          # "1" counted as sent by the fake, "2", "3" wait
    assert port.waiting == 2 and counts == {"tftp.send_blocked": 1}
    port.queue([b"4"], peer)
    port.flush()                          # behind what waits, never before it
    assert port.waiting == 3
    run_until(loop, lambda: port.waiting == 0)       # the writer callback drains it
    assert port.waiting == 0
    assert [peer_sock.recvfrom(100)[0] for _ in range(3)] == [b"2", b"3", b"4"]
    port.close()
    peer_sock.close()


def test_drop_queued_forgets_one_peer_only(loop):
    counts = Counts()
    port = SharedPort(loop, "127.0.0.1", counts.count, gso=False)
    port._tx = FullOnce(1)
    s1, s2 = udp(), udp()
    p1, p2 = mmsg.Peer(mmsg.peer_key(s1.getsockname())), mmsg.Peer(mmsg.peer_key(s2.getsockname()))
    port.queue([b"x"], p1)
    port.queue([b"old1", b"old2"], p1)
    port.queue([b"keep"], p2)
    port.flush()
    assert port.waiting == 3
    port.drop_queued(p1)
    assert port.waiting == 1
    run_until(loop, lambda: port.waiting == 0)
    assert s2.recvfrom(100)[0] == b"keep"
    s1.settimeout(0.2)
    with pytest.raises(TimeoutError):
        s1.recvfrom(100)
    port.close()
    s1.close()
    s2.close()


def test_outbox_is_bounded(loop):
    counts = Counts()
    port = SharedPort(loop, "127.0.0.1", counts.count, outbox_max=5, gso=False)
    port._tx = FullOnce(1)
    peer = mmsg.Peer(mmsg.peer_key(("127.0.0.1", 9)))
    port.queue([b"p"] * 20, peer)
    port.flush()
    assert port.waiting == 5 and counts["tftp.send_dropped"] == 14
    port.close()
    assert port.waiting == 0


def window(n: int, size: int, last: int) -> list[bytes]:
    return [bytes([0, 3, i >> 8, i & 255]) + bytes([i & 255]) * (size - 4) for i in range(n)] + \
        [b"\x00\x03\xff\xff" + b"L" * (last - 4)]


def test_a_window_goes_as_one_gso_message_and_arrives_as_datagrams(loop):
    counts = Counts()
    port = SharedPort(loop, "127.0.0.1", counts.count)
    if not port.gso:
        port.close()
        pytest.skip("kernel without UDP_SEGMENT (Linux >= 4.18)")
    peer_sock = udp()
    peer = mmsg.Peer(mmsg.peer_key(peer_sock.getsockname()))
    w = window(16, 1472, 100)
    port.queue([b"\x00\x06blksize\x001468\x00"], peer)       # a lone datagram
    port.queue(w, peer)
    port.queue(window(70, 1472, 1472), peer)                  # more than one GSO message holds
    assert [type(p) for p in port._payloads] == [bytes, tuple, tuple, tuple]
    assert [len(p) for p in port._payloads[1:]] == [17, 44, 27]
    port.flush()
    got = [peer_sock.recvfrom(2000)[0] for _ in range(1 + 17 + 71)]
    assert got == [b"\x00\x06blksize\x001468\x00"] + w + window(70, 1472, 1472)
    assert not counts
    port.close()
    peer_sock.close()


class GsoRefused(mmsg.Sender):
    """A kernel whose route cannot checksum a GSO message (EIO, e.g. a device without offload)."""

    def send(self, sock, payloads, peers, start=0):
        for i in range(start, len(payloads)):
            if type(payloads[i]) is tuple:
                sent, err = super().send(sock, payloads[start:i], peers[start:i])
                return sent, err or errno.EIO
        return super().send(sock, payloads, peers, start)


def test_gso_refused_falls_back_to_datagrams_for_good(loop):
    counts = Counts()
    port = SharedPort(loop, "127.0.0.1", counts.count)
    port.gso = True
    port._tx = GsoRefused()
    peer_sock = udp()
    peer = mmsg.Peer(mmsg.peer_key(peer_sock.getsockname()))
    w = window(5, 600, 30)
    port.queue([b"first"], peer)
    port.queue(w, peer)
    port.flush()
    assert [peer_sock.recvfrom(2000)[0] for _ in range(7)] == [b"first"] + w
    assert port.gso is False and counts == {"tftp.gso_off": 1}
    port.queue(w, peer)                                       # no group any more
    assert all(type(p) is bytes for p in port._payloads)
    port.flush()
    assert [peer_sock.recvfrom(2000)[0] for _ in range(6)] == w
    port.close()
    peer_sock.close()


def test_a_gso_window_refused_in_the_c_engine_goes_out_as_datagrams(loop):
    """The C engine sends a window's blocks as one GSO message; a socket without UDP checksums
    (SO_NO_CHECK: a real kernel refusal, EINVAL) makes pump switch GSO off for good and send
    the window as datagrams, in order, through the outbox (counted gso_off, not send_blocked)."""
    from sidusd.net import udpport
    if not udpport.ACCEL_BUILT:
        pytest.skip("needs the C extension sidusd.net._lockstep, built by scripts/setup "
                    "(gcc, libc6-dev, python3-dev)")
    from sidusd.net import _lockstep
    from sidusd.proto.tftp_session import LockstepRun
    counts = Counts()
    port = SharedPort(loop, "127.0.0.1", counts.count, accel=True)
    assert port.gso, "loopback takes UDP GSO (kernel >= 4.18)"
    port.sock.setsockopt(socket.SOL_SOCKET, 11, 1)            # SO_NO_CHECK
    peer_sock = udp()
    peer = mmsg.Peer(mmsg.peer_key(peer_sock.getsockname()))
    plan = LockstepRun(9, bytes(range(256)) * 40, 1024, 10, -1, 8)
    port.runs[peer.key] = _lockstep.Run(9, plan.data, 1024, 10, peer, window=8)
    peer_sock.sendto(b"\x00\x04\x00\x09", port.address)
    rx = 0
    for _ in range(1000):
        rx += port.pump(1.0, 4)[1]
        if rx:
            break
    assert port.gso is False and counts == {"tftp.gso_off": 1}
    run_until(loop, lambda: port.waiting == 0)
    assert [peer_sock.recvfrom(2000)[0] for _ in range(8)] == [plan.datagram(i) for i in range(8)]
    port.close()
    peer_sock.close()
