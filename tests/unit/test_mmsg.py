"""sidusd.net.mmsg: recvmmsg/sendmmsg (the C module), on loopback sockets (high ports).

Every case runs twice: with the batched system calls and with the one-call-per-datagram
fallback (``AVAILABLE`` forced false), which must behave the same.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

import pytest

from sidusd.net import mmsg


@pytest.fixture(params=["batched", "fallback"])
def mode(request, monkeypatch):
    if request.param == "batched":
        if not mmsg.AVAILABLE:
            pytest.skip("the C module sidusd.net._lockstep is not built")
    else:
        monkeypatch.setattr(mmsg, "AVAILABLE", False)
    return request.param


def udp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s


def drain(rx: mmsg.Receiver, sock: socket.socket, want: int) -> list[tuple[bytes, bytes, bool]]:
    got: list[tuple[bytes, bytes, bool]] = []
    for _ in range(1000):
        got += rx.recv(sock)
        if len(got) >= want:
            break
    return got


def test_peer_key_round_trip():
    key = mmsg.peer_key(("10.1.2.3", 4011))
    assert key == bytes([0x0F, 0xAB, 10, 1, 2, 3])
    assert mmsg.peer_addr(key) == ("10.1.2.3", 4011)
    assert mmsg.Peer(key).addr == ("10.1.2.3", 4011)


def test_batch_reaches_each_peer_in_order(mode):
    a, b, c = udp(), udp(), udp()
    pb, pc = mmsg.Peer(mmsg.peer_key(b.getsockname())), mmsg.Peer(mmsg.peer_key(c.getsockname()))
    payloads = [os.urandom(n) for n in (4, 1472, 0, 516, 9, 1472, 1)]
    peers = [pb, pc, pb, pb, pc, pb, pc]
    tx = mmsg.Sender(capacity=3)                # several system calls for one batch
    assert tx.send(a, payloads, peers) == (len(payloads), 0)
    rx = mmsg.Receiver(capacity=4, bufsize=2048)
    got_b, got_c = drain(rx, b, 4), drain(rx, c, 3)
    me = mmsg.peer_key(a.getsockname())
    assert [p for p, _, _ in got_b] == [payloads[i] for i, q in enumerate(peers) if q is pb]
    assert [p for p, _, _ in got_c] == [payloads[i] for i, q in enumerate(peers) if q is pc]
    assert {k for _, k, _ in got_b + got_c} == {me}
    assert not any(t for _, _, t in got_b + got_c)
    assert rx.recv(b) == [] and rx.recv(c) == []
    for s in (a, b, c):
        s.close()


def test_more_waiting_than_capacity_comes_in_several_reads(mode):
    a, b = udp(), udp()
    pb = mmsg.Peer(mmsg.peer_key(b.getsockname()))
    payloads = [i.to_bytes(4, "big") for i in range(150)]
    assert mmsg.Sender().send(a, payloads, [pb] * 150) == (150, 0)
    rx = mmsg.Receiver(capacity=64)
    first = rx.recv(b)
    assert len(first) == 64
    rest = drain(rx, b, 86)
    assert [p for p, _, _ in first + rest] == payloads
    a.close()
    b.close()


def test_truncated_datagram_is_flagged(mode):
    a, b = udp(), udp()
    a.sendto(b"x" * 100, b.getsockname())
    a.sendto(b"ok", b.getsockname())
    got = drain(mmsg.Receiver(capacity=8, bufsize=16), b, 2)
    assert got[0][2] is True and got[0][0] == b"x" * 16
    assert got[1] == (b"ok", mmsg.peer_key(a.getsockname()), False)
    a.close()
    b.close()


def test_refused_datagram_is_reported_and_the_rest_can_follow(mode):
    a, b = udp(), udp()
    pb = mmsg.Peer(mmsg.peer_key(b.getsockname()))
    payloads = [b"one", b"x" * 70000, b"three"]           # the middle one is too big for UDP
    sent, err = mmsg.Sender().send(a, payloads, [pb] * 3)
    assert (sent, err) == (1, errno.EMSGSIZE)
    assert mmsg.Sender().send(a, payloads, [pb] * 3, start=2) == (1, 0)
    assert [p for p, _, _ in drain(mmsg.Receiver(), b, 2)] == [b"one", b"three"]
    a.close()
    b.close()


def test_batched_send_takes_only_bytes():
    """The batched path points the kernel at a bytes object's buffer: anything else is refused."""
    if not mmsg.AVAILABLE:
        pytest.skip("the C module sidusd.net._lockstep is not built")
    a, b = udp(), udp()
    pb = mmsg.Peer(mmsg.peer_key(b.getsockname()))
    with pytest.raises(TypeError):
        mmsg.Sender().send(a, [bytearray(b"abc")], [pb])   # type: ignore[list-item]
    assert mmsg.Receiver().recv(b) == []
    a.close()
    b.close()


def test_empty_socket_reads_nothing(mode):
    b = udp()
    assert mmsg.Receiver().recv(b) == []
    b.close()


def test_closed_socket_raises(mode):
    b = udp()
    rx = mmsg.Receiver()
    fd = b.detach()
    os.close(fd)
    b2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b2.close()
    with pytest.raises(OSError):
        rx.recv(b2)


def test_capacity_is_checked():
    with pytest.raises(ValueError):
        mmsg.Receiver(capacity=0)
    with pytest.raises(ValueError):
        mmsg.Sender(capacity=5000)


def test_gso_group_is_cut_into_datagrams(mode):
    """A tuple payload is one UDP_SEGMENT message (or, in the fallback, one datagram per part)."""
    a, b = udp(), udp()
    if mode == "batched" and not mmsg.gso_supported(a):
        pytest.skip("kernel without UDP_SEGMENT (Linux >= 4.18)")
    pb = mmsg.Peer(mmsg.peer_key(b.getsockname()))
    group = tuple(bytes([0, 3, 0, i]) + os.urandom(1468) for i in range(16)) + (b"\x00\x03\x00\x10end",)
    assert mmsg.Sender().send(a, [b"x", group, b"y"], [pb] * 3) == (3, 0)
    got = drain(mmsg.Receiver(), b, 19)
    assert [p for p, _, _ in got] == [b"x", *group, b"y"]
    a.close()
    b.close()


def test_many_groups_need_several_calls(mode):
    """More iovecs than one call holds: the batch is split, nothing lost, order kept."""
    a, b = udp(), udp()
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    if mode == "batched" and not mmsg.gso_supported(a):
        pytest.skip("kernel without UDP_SEGMENT (Linux >= 4.18)")
    pb = mmsg.Peer(mmsg.peer_key(b.getsockname()))
    groups = [tuple(bytes([g, k]) * 50 for k in range(10)) for g in range(12)]
    tx = mmsg.Sender(capacity=4, max_iov=25)
    assert tx.send(a, groups, [pb] * 12) == (12, 0)
    got = drain(mmsg.Receiver(capacity=128), b, 120)
    assert [p for p, _, _ in got] == [part for g in groups for part in g]
    a.close()
    b.close()


def test_mixed_plain_and_groups_across_calls_keep_order(mode):
    """Plain datagrams (the precomputed fast layout) before, between and after GSO groups,
    with a capacity that splits the batch at every kind of boundary."""
    a, b = udp(), udp()
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    if mode == "batched" and not mmsg.gso_supported(a):
        pytest.skip("kernel without UDP_SEGMENT (Linux >= 4.18)")
    pb = mmsg.Peer(mmsg.peer_key(b.getsockname()))
    g1 = tuple(bytes([1, k]) * 100 for k in range(5))
    g2 = tuple(bytes([2, k]) * 100 for k in range(3)) + (b"short",)
    batch = [b"p0", b"p1", g1, b"p2", b"p3", b"p4", g2, b"p5", b"p6"]
    for cap in (1, 2, 3, 4, 16):
        assert mmsg.Sender(capacity=cap).send(a, batch, [pb] * len(batch)) == (len(batch), 0)
        want = [x for p in batch for x in (p if type(p) is tuple else (p,))]
        got = drain(mmsg.Receiver(capacity=64), b, len(want))
        assert [p for p, _, _ in got] == want, cap
    a.close()
    b.close()


def test_a_sender_that_is_not_ipv4_is_dropped_and_counted(mode):
    """Only a sockaddr_in makes a peer key: anything else (an unnamed AF_UNIX peer) is dropped."""
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    here.setblocking(False)
    there.send(b"one")
    there.send(b"two")
    rx = mmsg.Receiver(capacity=8)
    got: list = []
    for _ in range(1000):
        got += rx.recv(here)
        if rx.dropped >= 2:
            break
    assert (got, rx.dropped) == ([], 2)
    assert rx.recv(here) == []
    here.close()
    there.close()


def test_a_peer_is_its_key(mode):
    a, b = udp(), udp()
    with pytest.raises(struct.error):
        mmsg.Peer(b"short")
    pb = mmsg.Peer(bytearray(mmsg.peer_key(b.getsockname())))   # type: ignore[arg-type]
    assert type(pb.key) is bytes and pb.addr == b.getsockname()
    assert mmsg.Sender().send(a, [b"hi"], [pb]) == (1, 0)
    assert drain(mmsg.Receiver(), b, 1) == [(b"hi", mmsg.peer_key(a.getsockname()), False)]
    a.close()
    b.close()


def test_batched_send_takes_peers_with_a_6_byte_key():
    if not mmsg.AVAILABLE:
        pytest.skip("the C module sidusd.net._lockstep is not built")
    a = udp()
    for bad in (object(), type("P", (), {"key": b"12345"})(), type("P", (), {"key": "123456"})()):
        with pytest.raises((TypeError, AttributeError)):
            mmsg.Sender().send(a, [b"x"], [bad])             # type: ignore[list-item]
    with pytest.raises(IndexError):
        mmsg.Sender().send(a, [b"x", b"y"], [mmsg.Peer(mmsg.peer_key(("127.0.0.1", 9)))])
    a.close()
