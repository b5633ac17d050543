"""One UDP socket shared by many peers, read and written in batches.

:class:`SharedPort` is the transfer socket of the TFTP server for one local
address: every transfer from that address uses it, told apart by the peer's
address and port (RFC 1350 section 4 identifies a transfer by both ends).  It
owns the socket, a :class:`~sidusd.net.mmsg.Receiver` and a
:class:`~sidusd.net.mmsg.Sender`:

* :meth:`SharedPort.recv` returns up to ``capacity`` datagrams with one
  ``recvmmsg``;
* :meth:`SharedPort.queue` collects datagrams during a loop turn and
  :meth:`SharedPort.flush` sends them all with ``sendmmsg`` (in queue order,
  so each peer's datagrams stay in order);
* consecutive datagrams of the same size for one peer (a TFTP window: every
  DATA but the last has ``blksize + 4`` bytes) go as one UDP GSO message
  (``UDP_SEGMENT``) when the kernel supports it: the stack is crossed once per
  window, not once per block.  If the kernel refuses a GSO message (``EIO``:
  the route's device cannot checksum it; ``EINVAL``), GSO is switched off for
  this socket and the group is sent as single datagrams;
* what the kernel refuses with ``EAGAIN`` waits in a bounded outbox drained by
  the event loop's writer callback; a datagram refused for another reason
  (``EMSGSIZE``, ``ENETUNREACH``...) is dropped and counted, the retransmission
  timer of its transfer recovers or gives up.

* with ``accel`` (the optional C module :mod:`sidusd.net._lockstep`, built at
  install when a C compiler is there): :meth:`SharedPort.pump` reads the socket
  and carries out the lockstep runs in :attr:`SharedPort.runs` (steps the TFTP
  sessions decided in advance) without returning to Python per ACK; what is not
  a step comes back as :meth:`recv` would return it.
* a datagram whose sender is not an IPv4 address (it cannot be one on this
  socket; the check keeps the C code honest) is dropped and counted ``tftp.rx_dropped``.

The socket's buffers are sized for many transfers at once (``SO_SNDBUFFORCE``
when allowed, else ``SO_SNDBUF`` up to ``net.core.wmem_max``).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import os
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from . import mmsg

if TYPE_CHECKING:
    from ._lockstep import Run

_lockstep = mmsg._lockstep                  # C, optional (setup.py): None -> the Python path

ACCEL_BUILT = _lockstep is not None and mmsg.AVAILABLE


def accel_enabled() -> bool:
    """Whether transfer sockets use the C lockstep engine: built, and not switched off
    (``SIDUS_TFTP_ACCEL=0`` in sidusd's environment, docs/operations.md)."""
    return ACCEL_BUILT and os.environ.get("SIDUS_TFTP_ACCEL", "1") != "0"

SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_RETRYABLE = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ENOBUFS)
_GSO_ERRORS = (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT, errno.EMSGSIZE)


def _set_buffer(sock: socket.socket, force: int, plain: int, size: int) -> int:
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:                 # no CAP_NET_ADMIN: capped by net.core.[rw]mem_max
        try:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)
        except OSError:
            pass
    return sock.getsockopt(socket.SOL_SOCKET, plain)


class SharedPort:
    """A non-blocking UDP socket bound to ``(local, 0)`` serving many peers."""

    def __init__(self, loop: asyncio.AbstractEventLoop, local: str,
                 count: Callable[[str, int], None], *, rx_capacity: int = 64,
                 tx_capacity: int = 256, buffer_bytes: int = 8 << 20, outbox_max: int = 65536,
                 gso: bool = True, accel: bool = False):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((local if local != "0.0.0.0" else "", 0))
            self.sndbuf = _set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, buffer_bytes)
            self.rcvbuf = _set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, buffer_bytes)
        except OSError:
            sock.close()
            raise
        self.sock, self.fd, self.local = sock, sock.fileno(), local
        self.address = sock.getsockname()
        self._loop, self._count = loop, count
        self._rx = mmsg.Receiver(rx_capacity)
        self._rx_dropped = 0
        self._tx = mmsg.Sender(tx_capacity)
        self.gso = gso and mmsg.gso_supported(sock)
        self.rx_capacity = rx_capacity
        self._payloads: list[mmsg.Payload] = []
        self._peers: list[mmsg.Peer] = []
        self._outbox: collections.deque[tuple[mmsg.Payload, mmsg.Peer]] = collections.deque()
        self._outbox_max = outbox_max
        self._writing = False
        self.closed = False
        self._reading = False
        self.owners: dict[bytes, Any] = {}      # the caller's state per peer key
        # peer key -> _lockstep.Run: the steps pump() may take for that peer (accel only)
        self.runs: dict[bytes, Run[mmsg.Peer]] = {}
        self.accel = bool(accel and ACCEL_BUILT)
        self._engine = _lockstep.Engine(rx_capacity, 2048, tx_capacity) if self.accel else None

    def start_reading(self, callback: Callable[..., None], *args: Any) -> None:
        """Call ``callback(*args)`` whenever the socket is readable."""
        self._loop.add_reader(self.fd, callback, *args)
        self._reading = True

    # -- receiving -------------------------------------------------------------
    def recv(self) -> list[tuple[bytes, bytes, bool]]:
        """Waiting datagrams, ``[(payload, peer_key, truncated)]`` (empty: none).

        One from a sender that is not IPv4 is dropped and counted (``tftp.rx_dropped``).
        """
        batch = self._rx.recv(self.sock)
        dropped = self._rx.dropped
        if dropped != self._rx_dropped:
            self._count("tftp.rx_dropped", dropped - self._rx_dropped)
            self._rx_dropped = dropped
        return batch

    def pump(self, now: float, rounds: int,
             wait_us: int = 0, spin_us: int = 0,
             wake_fd: int = -1) -> tuple[list[tuple[bytes, bytes, bool]], int, int, int]:
        """Up to ``rounds`` reads; the lockstep steps of :attr:`runs` are taken and sent in C.

        Returns ``(rest, rx, calls, rx_errno)``: the datagrams that were not a
        step (as :meth:`recv` returns them, in order), how many were read, in
        how many ``recvmmsg`` calls, and a receive error (0: none).  DATA the
        kernel refuses for now waits in the outbox; behind a non-empty outbox
        nothing is sent directly (order).  ``wait_us``: C may wait that long (in all) for
        the ACKs of the steps it just took (``Engine.pump``); a readable ``wake_fd`` ends
        that wait.  Only with ``accel``.
        """
        assert self._engine is not None
        res = self._engine.pump(self.fd, self.runs, now, rounds, not self._outbox and not self.closed,
                                wait_us, spin_us, wake_fd, mmsg.GSO_MAX_SEGMENTS if self.gso else 1)
        if res.send_errors:
            self._count("tftp.send_errors", res.send_errors)
        if res.dropped:
            self._count("tftp.rx_dropped", res.dropped)
        unsent = res.unsent
        if res.gso_refused:                     # a window's GSO message: datagrams from now on
            self._gso_off()
            unsent = [(part, q) for p, q in unsent for part in (p if type(p) is tuple else (p,))]
        elif unsent and res.blocked:
            self._count("tftp.send_blocked", 1)
        if unsent:
            self._enqueue([p for p, _ in unsent], [q for _, q in unsent], 0)
        return res.rest, res.rx, res.calls, res.rx_errno

    # -- sending ---------------------------------------------------------------
    def pending(self) -> tuple[list[mmsg.Payload], list[mmsg.Peer]]:
        """The batch being built (payloads, peers), for a caller that appends in a tight loop.

        Valid until the next :meth:`flush` (which starts new lists); append to
        both, one peer per payload, bytes only (a lockstep DATA).
        """
        return self._payloads, self._peers

    def queue_one(self, payload: bytes, peer: mmsg.Peer) -> None:
        """Add one datagram for ``peer`` to the batch (the lockstep case)."""
        self._payloads.append(payload)
        self._peers.append(peer)

    def queue(self, payloads: list[bytes], peer: mmsg.Peer) -> None:
        """Add datagrams for ``peer`` to the batch :meth:`flush` sends."""
        if len(payloads) == 1 or not self.gso:
            self._payloads.extend(payloads)
            self._peers.extend([peer] * len(payloads))
            return
        out, n, i = self._payloads, len(payloads), 0
        while i < n:
            size = len(payloads[i])
            most = min(mmsg.GSO_MAX_SEGMENTS, mmsg.GSO_MAX_BYTES // max(size, 1))
            j = i + 1
            while j < n and j - i < most and len(payloads[j]) == size:
                j += 1
            if j < n and j - i < most and len(payloads[j]) < size:
                j += 1                              # the short last block ends a group
            out.append(payloads[i] if j - i == 1 else tuple(payloads[i:j]))
            self._peers.append(peer)
            i = j

    def send_now(self, payload: bytes, addr: tuple[str, int]) -> None:
        """One datagram outside the batch (ERROR 5 to a stranger); dropped if refused."""
        try:
            self.sock.sendto(payload, mmsg.MSG_DONTWAIT, addr)
        except OSError:
            self._count("tftp.send_errors", 1)

    def flush(self) -> None:
        """Send the batch; what the kernel refuses for now waits in the outbox."""
        payloads, peers = self._payloads, self._peers
        if not payloads or self.closed:
            return
        self._payloads, self._peers = [], []
        if self._outbox:                        # keep the order behind what waits
            self._enqueue(payloads, peers, 0)
            return
        start = 0
        while start < len(payloads):
            sent, err = self._tx.send(self.sock, payloads, peers, start)
            start += sent
            if not err:
                return
            if err in _RETRYABLE:
                self._count("tftp.send_blocked", 1)
                self._enqueue(payloads, peers, start)
                return
            if self._gso_refused(payloads, peers, start, err):
                continue
            self._count("tftp.send_errors", 1)  # this datagram is dropped; timers recover
            start += 1

    def _gso_refused(self, payloads: list[mmsg.Payload], peers: list[mmsg.Peer], at: int, err: int) -> bool:
        """A GSO message refused: GSO off for this socket, its parts put back as datagrams."""
        group = payloads[at]
        if type(group) is not tuple or err not in _GSO_ERRORS:
            return False
        self._gso_off()
        payloads[at:at + 1] = list(group)
        peers[at:at + 1] = [peers[at]] * len(group)
        return True

    def _gso_off(self) -> None:
        """The kernel refused a GSO message: datagrams only, for good (counted once)."""
        if self.gso:
            self.gso = False
            self._count("tftp.gso_off", 1)

    def _enqueue(self, payloads: Sequence[mmsg.Payload], peers: Sequence[mmsg.Peer], start: int) -> None:
        box = self._outbox
        for i in range(start, len(payloads)):
            if len(box) >= self._outbox_max:
                self._count("tftp.send_dropped", len(payloads) - i)
                break
            box.append((payloads[i], peers[i]))
        if box and not self._writing:
            self._writing = True
            self._loop.add_writer(self.fd, self._on_writable)

    def _on_writable(self) -> None:
        box = self._outbox
        while box and not self.closed:
            chunk = [box[i] for i in range(min(len(box), self._tx.capacity))]
            sent, err = self._tx.send(self.sock, [p for p, _ in chunk], [q for _, q in chunk])
            for _ in range(sent):
                box.popleft()
            if err in _RETRYABLE:
                return                          # still full: called again when writable
            if err:
                group, peer = box.popleft()
                if type(group) is tuple and err in _GSO_ERRORS:
                    self._gso_off()
                    box.extendleft((part, peer) for part in reversed(group))
                else:
                    self._count("tftp.send_errors", 1)
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self.fd)

    def drop_queued(self, peer: mmsg.Peer) -> None:
        """Forget what still waits for ``peer`` (a retransmission supersedes it)."""
        if self._outbox:
            kept = [item for item in self._outbox if item[1] is not peer]
            self._outbox.clear()
            self._outbox.extend(kept)

    @property
    def waiting(self) -> int:
        """Datagrams in the outbox (the kernel buffer was full)."""
        return len(self._outbox)

    def close(self) -> None:
        """Stop watching the socket and close it (what waits is dropped)."""
        if self.closed:
            return
        self.closed = True
        if self._reading:
            self._loop.remove_reader(self.fd)
        if self._writing:
            self._loop.remove_writer(self.fd)
            self._writing = False
        self._outbox.clear()
        self.runs.clear()
        self.sock.close()
