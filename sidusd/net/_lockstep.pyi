"""Types of the optional C module sidusd.net._lockstep (_lockstep.c, _engine.c, _batchio.c).

Lockstep TFTP steps decided by the Python session, carried out with recvmmsg/sendmmsg
(Run, Engine, PumpResult); and the batched datagram I/O of sidusd.net.mmsg (Receiver,
Sender).  A peer key is the 6 bytes ``!H4s`` (port, IPv4 address) of mmsg.peer_key.
The C code checks exact types: the lists and the dict below must be a list and a dict.
"""

from typing import Generic, Protocol, TypeVar, final

_P = TypeVar("_P")                                 # the caller's object for a run's peer


class _Keyed(Protocol):
    @property
    def key(self) -> bytes: ...                    # a 6-byte peer key


_K = TypeVar("_K", bound=_Keyed)
_Payload = TypeVar("_Payload", bound=bytes | tuple[bytes, ...])


@final
class Run(Generic[_P]):
    """Run(ack, data, blksize, count, peer, used=0, *, fd=-1, offset=0, size=-1, window=1): the
    steps of ``count`` blocks decided in advance, ``window`` blocks a step (``used``: the first
    blocks were sent by the caller); with ``fd`` (a *file run*) and empty ``data``, the payloads
    are the file's ``size`` bytes from ``offset`` (block 0's), read by the run itself with pread
    (it keeps a duplicate of ``fd``)."""

    def __new__(cls, ack: int, data: bytes, blksize: int, count: int, peer: _P, used: int = 0, *,
                fd: int = -1, offset: int = 0, size: int = -1, window: int = 1) -> Run[_P]: ...
    @property
    def size(self) -> int: ...                     # the payloads' bytes in all
    @property
    def reads(self) -> int: ...                    # a file run: the reads it made
    @property
    def read_errno(self) -> int: ...               # ... the errno of the one that stopped it, or 0
    @property
    def data(self) -> bytes: ...                   # the run's payloads, joined
    @property
    def peer(self) -> _P: ...                      # the caller's object for the peer
    @property
    def blksize(self) -> int: ...                  # bytes per block
    @property
    def count(self) -> int: ...                    # blocks in the run
    @property
    def used(self) -> int: ...                     # blocks sent (by its steps)
    @property
    def window(self) -> int: ...                   # blocks a step sends (1: lockstep)
    @property
    def at(self) -> float: ...                     # the time of the last step taken
    @property
    def stopped(self) -> int: ...                  # 1: another datagram came from the peer (or a read failed)
    @property
    def ack(self) -> int: ...                      # the 16-bit block whose ACK takes the next step


@final
class PumpResult(Generic[_P]):
    """What Engine.pump did; the first seven fields unpack like a tuple (a struct sequence)."""

    @property
    def rest(self) -> list[tuple[bytes, bytes, bool]]: ...   # (payload, key, truncated), in order
    @property
    def unsent(self) -> list[tuple[bytes | tuple[bytes, ...], _P]]: ...  # (DATA or a GSO group, run.peer) not sent
    @property
    def rx(self) -> int: ...                                 # datagrams read
    @property
    def calls(self) -> int: ...                              # recvmmsg calls that returned some
    @property
    def send_errors(self) -> int: ...                        # DATA dropped on an error but EAGAIN
    @property
    def blocked(self) -> int: ...                            # the send buffer was full
    @property
    def rx_errno(self) -> int: ...                           # a receive error but EAGAIN, or 0
    @property
    def dropped(self) -> int: ...                            # senders not IPv4 (by name only)
    @property
    def gso_refused(self) -> bool: ...                       # a GSO message refused (by name only)


@final
class Engine:
    """Engine(capacity=64, bufsize=2048, tx_capacity=256): recvmmsg/sendmmsg buffers."""

    @property
    def waits(self) -> int:
        """Waits for an ACK so far (``wait_us``)."""
    @property
    def spun(self) -> int:
        """... of which polled without sleeping first (``spin_us``; after 32 waits in a row
        readable only beyond 4x the spin, one in 8)."""
    @property
    def woken(self) -> int:
        """... of which ``wake_fd`` ended (the event loop had other work)."""
    @property
    def recv_calls(self) -> int:
        """recvmmsg calls made, those that found nothing included."""
    def __new__(cls, capacity: int = 64, bufsize: int = 2048, tx_capacity: int = 256) -> Engine: ...
    def pump(self, fd: int, runs: dict[bytes, Run[_P]], now: float, rounds: int, sending: bool,
             wait_us: int = 0, spin_us: int = 0, wake_fd: int = -1, gso: int = 1, /) -> PumpResult[_P]:
        """Up to ``rounds`` recvmmsg calls on ``fd``; the exact ACK a run waits for takes its step
        (``wait_us``: how long, in all, C may wait for the ACKs of the steps it just took;
        a readable ``wake_fd`` ends that wait and every later one of the call; ``gso`` > 1: a
        step's blocks go as GSO messages of up to ``gso`` segments)."""


@final
class Receiver:
    """Receiver(capacity=64, bufsize=2048): recvmmsg buffers for ``capacity`` datagrams."""

    def __new__(cls, capacity: int = 64, bufsize: int = 2048) -> Receiver: ...
    @property
    def dropped(self) -> int: ...                  # datagrams whose sender was not IPv4
    def recv(self, fd: int, /) -> list[tuple[bytes, bytes, bool]]:
        """The datagrams waiting (at most capacity): ``[(payload, peer_key, truncated)]``."""


@final
class Sender:
    """Sender(capacity=256, max_iov=4096): sendmmsg buffers, ``capacity`` messages per call."""

    def __new__(cls, capacity: int = 256, max_iov: int = 4096) -> Sender: ...
    def send(self, fd: int, payloads: list[_Payload], peers: list[_K], start: int = 0, /) -> tuple[int, int]:
        """``payloads[start:]`` in sendmmsg calls -> ``(sent, errno)`` (0: all sent); a tuple of
        bytes is one UDP GSO message."""
