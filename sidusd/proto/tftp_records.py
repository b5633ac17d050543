"""The values a TFTP read transfer exchanges with its edge (pure).

What a :class:`~sidusd.proto.tftp_session.ReadSession` reads from
(:class:`Source`, :class:`BytesSource` for a rendered document), the lockstep
steps it decides in advance for an edge that carries them out itself
(:class:`LockstepRun`), and the one record it ends with
(:class:`TransferSummary`).  RFC 1350 section 6 for the DATA blocks.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

from . import tftp

_pack_hdr = struct.Struct("!HH").pack       # opcode, 16-bit block: tftp.data_header without the call
_OP_DATA = tftp.OP_DATA


class Source(Protocol):
    """What a transfer reads from: ``size`` bytes, read by offset."""

    size: int

    def read_block(self, offset: int, size: int) -> bytes: ...


# A source whose class sets ``contiguous = True`` promises that one read of n
# blocks equals the n block reads joined: a window is then read at once.


class BytesSource:
    """A rendered document (or netascii-converted text) held in memory."""

    __slots__ = ("data", "size")
    contiguous = True

    def __init__(self, data: bytes):
        self.data = bytes(data)
        self.size = len(self.data)

    def read_block(self, offset: int, size: int) -> bytes:
        return self.data[offset:offset + size]


@dataclass(frozen=True)
class TransferSummary:
    """The one record a transfer ends with (logged as ``tftp.transfer``).

    ``outcome``: ``ok``, ``probe`` (peer aborted after the OACK), ``peer-error``,
    ``timeout``, ``illegal`` (peer sent a packet a reader never sends), ``stopped``
    (the server ended it), ``evicted`` (ended unconfirmed to make room for
    another request), or ``running``.
    """

    bytes: int
    blocks: int
    retransmits: int
    blksize: int
    windowsize: int
    duration_s: float
    outcome: str
    error: str | None


@dataclass(frozen=True, slots=True)
class LockstepRun:
    """Lockstep steps decided in advance, for an edge that carries them out itself.

    The run's blocks go ``window`` at a time (1: lockstep): when the peer ACKs
    block ``ack + i`` (16 bits on the wire) for ``i`` a multiple of ``window``
    below ``count``, send :meth:`datagram` ``(i)`` up to ``(i + window - 1)``
    (no further than ``count - 1``); datagram ``j`` is DATA block ``ack + j + 1``
    whose payload is ``data[j * blksize:(j + 1) * blksize]`` (the last may be
    shorter, or empty).  Any other datagram from the peer ends the run.  The
    edge then reports how many blocks its steps sent with
    :meth:`ReadSession.lockstep_advance`, which leaves the session exactly as
    those ACKs would have (in lockstep: that many :meth:`ReadSession.ack_lockstep` calls).

    A run whose ``size`` exceeds ``len(data)`` holds only its first payloads:
    the others are the source's bytes from offset ``(ack + i) * blksize`` (for
    an edge that reads the file itself, e.g. the C engine's file runs).
    """

    ack: int        # absolute number of the block in flight: its ACK triggers step 0
    data: bytes     # the payloads of blocks ack + 1 .. ack + count, joined (or the first ones)
    blksize: int
    count: int      # blocks
    size: int = -1  # the payloads' bytes in all (-1: len(data), all of them)
    window: int = 1  # blocks per step: the ACK of a step's last block takes the next step

    @property
    def total(self) -> int:
        """The bytes of all the run's payloads."""
        return len(self.data) if self.size < 0 else self.size

    def datagram(self, i: int) -> bytes:
        """DATA block ``ack + i + 1``, the run's ``i``-th (the reference for any other executor)."""
        if not 0 <= i < self.count:
            raise IndexError(f"block {i} outside 0..{self.count - 1}")
        bs = self.blksize
        if min((i + 1) * bs, self.total) > len(self.data):
            raise IndexError(f"block {i}'s payload is not in this run's data (read it from the source)")
        return _pack_hdr(_OP_DATA, (self.ack + i + 1) & 0xFFFF) + self.data[i * bs:(i + 1) * bs]
