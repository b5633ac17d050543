"""ReadSession in virtual time: windows, loss, duplicates, rollover, timeouts, aborts."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidusd.proto import tftp
from sidusd.proto.tftp import ACK, DATA, ERROR, decode
from sidusd.proto.tftp_session import BytesSource, ReadSession


class CountingSource:
    """A large virtual file (content derived from the offset) that counts reads."""

    def __init__(self, size: int):
        self.size = size
        self.reads = 0

    def read_block(self, offset: int, size: int) -> bytes:
        self.reads += 1
        n = max(0, min(size, self.size - offset))
        return bytes((offset + i) & 0xFF for i in range(n)) if n < 64 else \
            (offset.to_bytes(8, "big") * (n // 8 + 1))[:n]


def data_packets(dgrams: list[bytes]) -> list[DATA]:
    out = [decode(d) for d in dgrams]
    assert all(isinstance(p, DATA) for p in out), out
    return out


def run_client(s: ReadSession, now: float = 0.0) -> bytes:
    """A well-behaved lockstep client (RFC 1350, windowsize RFC 7440): returns the file."""
    got = bytearray()
    expect = 1
    s.start(now)
    while not s.done:
        pkts = [decode(d) for d in s.datagrams_to_send(now)]
        assert pkts, "a live session always has something in flight"
        last_ok = None
        for p in pkts:
            if isinstance(p, tftp.OACK):
                s.receive(ACK(0), now)
                break
            assert p.block == expect & 0xFFFF
            got += p.data
            expect += 1
            last_ok = p
            if len(p.data) < s.blksize:
                break
        if last_ok is not None:
            s.receive(ACK(last_ok.block), now)
        now += 0.001
    assert s.outcome == "ok" and s.error is None
    return bytes(got)


@pytest.mark.parametrize("size, blksize, window", [
    (0, 512, 1), (1, 512, 1), (511, 512, 1), (512, 512, 1), (513, 512, 1),
    (100_000, 1468, 1), (100_000, 1468, 16), (1468 * 16, 1468, 16), (70_000, 8, 64), (5, 65464, 3),
])
def test_lockstep_transfer(size: int, blksize: int, window: int) -> None:
    data = random.Random(size).randbytes(size)
    s = ReadSession(BytesSource(data), blksize=blksize, windowsize=window, timeout_s=1, retries=3)
    assert run_client(s) == data
    summ = s.summary()
    assert (summ.bytes, summ.blocks, summ.retransmits) == (size, size // blksize + 1, 0)
    assert (summ.blksize, summ.windowsize, summ.outcome) == (blksize, window, "ok")


def test_last_block_is_empty_when_size_is_a_multiple() -> None:
    s = ReadSession(BytesSource(b"x" * 1024), blksize=512)
    s.start(0)
    assert [len(p.data) for p in data_packets(s.datagrams_to_send(0))] == [512]
    s.receive(ACK(1), 0)
    assert [len(p.data) for p in data_packets(s.datagrams_to_send(0))] == [512]
    s.receive(ACK(2), 0)
    last = data_packets(s.datagrams_to_send(0))
    assert [(p.block, p.data) for p in last] == [(3, b"")]
    s.receive(ACK(3), 0)
    assert s.done and s.outcome == "ok"


def test_oack_first_then_ack0() -> None:
    s = ReadSession(BytesSource(b"abc"), blksize=1432, oack=(("blksize", "1432"), ("tsize", "3")))
    s.start(10.0)
    assert s.datagrams_to_send(10.0) == [b"\x00\x06blksize\x001432\x00tsize\x003\x00"]
    assert s.next_timer() == 11.0
    s.receive(ACK(1), 10.1)                     # not ACK 0: ignored, nothing sent
    assert s.datagrams_to_send(10.1) == []
    s.receive(ACK(0), 10.2)
    assert s.datagrams_to_send(10.2) == [b"\x00\x03\x00\x01abc"]
    s.receive(ACK(1), 10.3)
    assert s.done and s.summary().duration_s == pytest.approx(0.3)


def test_probe_abort_after_oack_is_clean() -> None:
    """UEFI asks for tsize, then refuses the OACK with ERROR 8: a normal end."""
    s = ReadSession(BytesSource(b"x" * 5000), oack=(("tsize", "5000"),))
    s.start(0)
    s.datagrams_to_send(0)
    s.receive(ERROR(8, "tsize probe"), 0.01)
    assert s.done and s.outcome == "probe" and s.error is None
    assert s.datagrams_to_send(0.02) == [] and s.next_timer() is None


def test_duplicate_ack_never_sends() -> None:
    """Sorcerer's Apprentice (RFC 1123 4.2.3.1): a duplicated ACK must not trigger DATA."""
    src = CountingSource(512 * 10)
    s = ReadSession(src, blksize=512, timeout_s=1.0)
    s.start(0)
    data_packets(s.datagrams_to_send(0))
    s.receive(ACK(1), 0.1)
    assert [p.block for p in data_packets(s.datagrams_to_send(0.1))] == [2]
    for t in (0.2, 0.3, 0.4):
        s.receive(ACK(1), t)                    # duplicates
        assert s.datagrams_to_send(t) == []
    s.receive(ACK(0), 0.5)                      # stale
    s.receive(ACK(7), 0.5)                      # from the future: never sent
    assert s.datagrams_to_send(0.5) == []
    assert s.retransmits == 0 and s.ignored_acks == 5 and src.reads == 2


def test_timeout_retransmits_then_gives_up() -> None:
    s = ReadSession(BytesSource(b"y" * 2000), blksize=512, timeout_s=2.0, retries=3)
    s.start(0)
    first = s.datagrams_to_send(0)
    assert s.next_timer() == 2.0
    s.handle_timer(1.9)                         # early: nothing
    assert s.datagrams_to_send(1.9) == []
    now = 2.0
    for i in range(3):
        s.handle_timer(now)
        assert s.datagrams_to_send(now) == first
        assert s.next_timer() == now + 2.0
        now += 2.0
    s.handle_timer(now)
    assert s.done and s.outcome == "timeout" and "3 retries" in s.error
    assert s.datagrams_to_send(now) == [] and s.next_timer() is None
    assert s.summary().retransmits == 3 and s.summary().bytes == 0


def test_progress_resets_the_retry_budget() -> None:
    s = ReadSession(BytesSource(b"z" * 512 * 4), blksize=512, timeout_s=1.0, retries=1)
    s.start(0)
    s.datagrams_to_send(0)
    now = 0.0
    for block in range(1, 6):
        now += 1.0
        s.handle_timer(now)                     # one loss per block: within budget
        assert [p.block for p in data_packets(s.datagrams_to_send(now))] == [block]
        s.receive(ACK(block), now)
        s.datagrams_to_send(now)
    assert s.done and s.outcome == "ok" and s.retransmits == 5


def test_window_partial_ack_goes_back() -> None:
    """RFC 7440 section 4: ACK of block k inside the window -> the next window starts at k+1."""
    s = ReadSession(BytesSource(bytes(512 * 20)), blksize=512, windowsize=4)
    s.start(0)
    assert [p.block for p in data_packets(s.datagrams_to_send(0))] == [1, 2, 3, 4]
    s.receive(ACK(2), 0.1)                      # client lost block 3
    assert [p.block for p in data_packets(s.datagrams_to_send(0.1))] == [3, 4, 5, 6]
    assert s.retransmits == 2
    s.receive(ACK(6), 0.2)
    assert [p.block for p in data_packets(s.datagrams_to_send(0.2))] == [7, 8, 9, 10]
    s.receive(ACK(6), 0.3)                      # duplicate of the last ACK: nothing
    assert s.datagrams_to_send(0.3) == []
    s.handle_timer(s.next_timer())              # timeout: the whole window again
    assert [p.block for p in data_packets(s.datagrams_to_send(1.2))] == [7, 8, 9, 10]


def test_block_numbers_roll_over_to_zero() -> None:
    blocks = 65536 + 10                        # > 65535 blocks of 8 bytes
    src = CountingSource(blocks * 8 - 3)
    s = ReadSession(src, blksize=8, windowsize=64)
    digest, n = hashlib.sha256(), 0
    s.start(0)
    seen_zero = False
    while not s.done:
        pkts = data_packets(s.datagrams_to_send(0))
        for p in pkts:
            n += 1
            assert p.block == n & 0xFFFF
            seen_zero |= p.block == 0
            digest.update(p.data)
        s.receive(ACK(pkts[-1].block), 0)
    assert seen_zero and n == blocks and s.outcome == "ok"
    assert s.summary().bytes == src.size and s.summary().blocks == blocks
    want = hashlib.sha256(b"".join(src.read_block(o, 8) for o in range(0, src.size, 8)))
    assert digest.hexdigest() == want.hexdigest()


def test_stale_ack_across_rollover_is_ignored() -> None:
    s = ReadSession(CountingSource(8 * 70000), blksize=8, windowsize=1)
    s.start(0)
    for b in range(1, 65540):
        s.datagrams_to_send(0)
        s.receive(ACK(b & 0xFFFF), 0)
    # block 65540 (wire 4) goes out; old ACKs (65535, and 3 = block 65539) move nothing
    assert [p.block for p in data_packets(s.datagrams_to_send(0))] == [4]
    before = s.bytes_acked
    s.receive(ACK(65535), 0)
    s.receive(ACK(3), 0)
    assert s.bytes_acked == before == 65539 * 8 and s.datagrams_to_send(0) == []
    assert s.ignored_acks == 2
    s.receive(ACK(4), 0)
    assert s.bytes_acked == 65540 * 8


@pytest.mark.parametrize("pkt", [DATA(1, b"x"), tftp.RRQ("f"), tftp.WRQ("f"), tftp.OACK((("a", "b"),))])
def test_illegal_packet_gets_error_4(pkt) -> None:
    s = ReadSession(BytesSource(b"data"))
    s.start(0)
    s.datagrams_to_send(0)
    s.receive(pkt, 0.1)
    assert s.done and s.outcome == "illegal"
    (err,) = [decode(d) for d in s.datagrams_to_send(0.1)]
    assert isinstance(err, ERROR) and err.code == 4


def test_peer_error_mid_transfer_and_abort() -> None:
    s = ReadSession(BytesSource(bytes(2000)))
    s.start(0)
    s.datagrams_to_send(0)
    s.receive(ACK(1), 0)
    s.datagrams_to_send(0)
    s.receive(ERROR(3, "disk full"), 0.5)
    assert s.outcome == "peer-error" and "disk full" in s.error and s.summary().bytes == 512
    s2 = ReadSession(BytesSource(bytes(2000)))
    s2.start(0)
    s2.datagrams_to_send(0)
    s2.abort(1.0, "server shutting down")
    assert s2.done and s2.outcome == "stopped"
    assert decode(s2.datagrams_to_send(1.0)[0]) == ERROR(0, "server shutting down")


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 40_000), blksize=st.sampled_from([8, 512, 1432, 1468]),
       window=st.integers(1, 8), seed=st.integers(0, 2**32), loss=st.floats(0.0, 0.4))
def test_lossy_link_delivers_exact_bytes(size, blksize, window, seed, loss) -> None:
    """A client that drops packets at random, ACKs per RFC 7440, and may see duplicates."""
    rng = random.Random(seed)
    data = rng.randbytes(size)
    s = ReadSession(BytesSource(data), blksize=blksize, windowsize=window, timeout_s=1.0, retries=1000)
    got, expect, now = bytearray(), 1, 0.0
    s.start(now)
    for _ in range(200_000):
        if s.done:
            break
        dgrams = s.datagrams_to_send(now)
        ack = None
        for d in dgrams:
            if rng.random() < loss:
                continue                         # lost on the way
            p = decode(d)
            if isinstance(p, tftp.OACK):
                ack = 0
                continue
            if p.block == expect & 0xFFFF:
                got += p.data
                expect += 1
                ack = p.block
                if len(p.data) < blksize:
                    break
            elif p.block == (expect - 1) & 0xFFFF:
                ack = p.block                    # a resent block we have: ACK it again
        if ack is not None and rng.random() >= loss:
            s.receive(ACK(ack), now)
            if rng.random() < 0.2:
                s.receive(ACK(ack), now)         # duplicated ACK
        else:
            now = s.next_timer() or now          # nothing arrived: wait for the timer
            s.handle_timer(now)
    assert s.done and s.outcome == "ok"
    assert bytes(got) == data


def test_constructor_refuses_bad_parameters() -> None:
    for kw in ({"blksize": 7}, {"blksize": 65465}, {"windowsize": 0}, {"timeout_s": 0}, {"retries": -1}):
        with pytest.raises(ValueError):
            ReadSession(BytesSource(b""), **kw)
