"""Pure parts of "TFTP under hostile clients" (issue 14 items 6 and 8), in virtual time.

* a silent peer holds its transfer at most ``max_silence_s`` in all, whatever
  timeout it negotiated (RFC 2349 allows 255 s; 8x that with the backoff);
* netascii as a stream: :class:`NetasciiSource` equals the whole-file
  conversion for any block size and any read order, CR LF / CR NUL pairs
  straddling block boundaries included, and reads one block's worth at a time.
"""

from __future__ import annotations

import random

import pytest

from sidusd.proto import tftp
from sidusd.proto.tftp_netascii import NetasciiSource, converted_size, count_chunk
from sidusd.proto.tftp_session import BytesSource, ReadSession


def run_silent(session: ReadSession, t0: float) -> float:
    """Fire every timer of a peer that never answers; the time the session gave up."""
    now = t0
    for _ in range(1000):
        session.datagrams_to_send(now)
        if session.done:
            return now
        d = session.next_timer()
        assert d is not None
        now = d
        session.handle_timer(now)
    raise AssertionError("never gave up")


@pytest.mark.parametrize("oack", [(("timeout", "255"),), ()])
def test_a_peer_that_negotiated_timeout_255_holds_its_slot_max_silence_s(oack) -> None:
    s = ReadSession(BytesSource(b"x" * 5000), timeout_s=255.0, retries=5, oack=oack, max_silence_s=30.0)
    s.start(100.0)
    end = run_silent(s, 100.0)
    assert end <= 130.0 and s.summary().outcome == "timeout"          # not 255 * (1+2+4+8+8+8) s
    assert "no progress for 30 s" in (s.error or "")


def test_the_silence_bound_counts_from_the_last_progress() -> None:
    s = ReadSession(BytesSource(b"x" * 5000), timeout_s=255.0, retries=5,
                    oack=(("timeout", "255"),), max_silence_s=30.0)
    s.start(0.0)
    s.datagrams_to_send(0.0)
    assert not s.confirmed
    s.receive(tftp.ACK(0), 10.0)           # the peer is there: progress at t=10
    assert s.confirmed
    s.datagrams_to_send(10.0)
    assert s.next_timer() == 40.0
    assert run_silent(s, 10.0) == 40.0


def test_without_a_bound_the_backoff_holds_a_slot_for_hours() -> None:
    """What the bound replaces (RFC 1123 backoff on a 255 s timer): ~2 h of one slot."""
    s = ReadSession(BytesSource(b"x" * 5000), timeout_s=255.0, retries=5, oack=(("timeout", "255"),))
    s.start(0.0)
    assert run_silent(s, 0.0) == 255.0 * (1 + 2 + 4 + 8 + 8 + 8)


def test_a_lockstep_step_is_progress_too() -> None:
    s = ReadSession(BytesSource(b"y" * 5000), timeout_s=255.0, retries=5, max_silence_s=20.0)
    s.start(0.0)
    s.datagrams_to_send(0.0)
    assert s.ack_lockstep(1, 5.0) is not None and s.confirmed
    assert s.next_timer() == 25.0


def text(n: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    return bytes(rnd.choice(b"ab\r\n\n\r") for _ in range(n))


class Counting:
    """A raw source that records the largest read asked of it."""

    def __init__(self, data: bytes):
        self.data, self.size, self.largest = data, len(data), 0

    def read_block(self, offset: int, size: int) -> bytes:
        self.largest = max(self.largest, size)
        return self.data[offset:offset + size]


def netascii_source(raw: bytes) -> tuple[NetasciiSource, Counting]:
    src = Counting(raw)
    return NetasciiSource(src, converted_size(len(raw), count_chunk(raw))), src


@pytest.mark.parametrize("blksize", [8, 9, 512, 1468])
def test_netascii_stream_equals_the_whole_conversion_block_by_block(blksize) -> None:
    raw = text(20000, blksize)
    want = tftp.netascii(raw)
    src, counting = netascii_source(raw)
    assert src.size == len(want)
    got = b"".join(src.read_block(o, blksize) for o in range(0, src.size + 1, blksize))
    assert got == want
    assert counting.largest <= blksize + 1          # one block's worth, not the file


def test_netascii_pairs_straddling_a_block_boundary() -> None:
    raw = b"a" * 511 + b"\n" + b"b" * 510 + b"\r" + b"c"
    src, _ = netascii_source(raw)
    b1, b2, b3 = (src.read_block(o, 512) for o in (0, 512, 1024))
    assert b1 == b"a" * 511 + b"\r" and b2[:1] == b"\n"             # CR | LF across blocks 1 and 2
    assert b2.endswith(b"\r") and b3.startswith(b"\0")              # CR | NUL across blocks 2 and 3
    assert b1 + b2 + b3 + src.read_block(1536, 512) == tftp.netascii(raw)


def test_netascii_reads_in_any_order_go_back_and_jump() -> None:
    raw = text(30000, 7)
    want = tftp.netascii(raw)
    src, _ = netascii_source(raw)
    rnd = random.Random(3)
    for _ in range(400):
        o = rnd.randrange(0, len(want))
        n = rnd.choice([1, 2, 512, 1468, 4000])
        assert src.read_block(o, n) == want[o:o + n], (o, n)


def test_netascii_text_shorter_than_counted_is_a_read_error() -> None:
    raw = b"abc\n" * 300
    src = NetasciiSource(Counting(raw[:600]), converted_size(len(raw), count_chunk(raw)))
    src.read_block(0, 512)
    with pytest.raises(OSError):
        src.read_block(512, 512)
