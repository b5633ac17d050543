"""Many UDP datagrams per system call: ``recvmmsg(2)`` and ``sendmmsg(2)``, in C.

Python's socket module has neither; one call per datagram costs a system call
and a trip through the interpreter each.  A TFTP server that serves every
transfer of a local address from one socket can read all pending ACKs with
one ``recvmmsg`` and send all the DATA they release with one ``sendmmsg``.

* :class:`Receiver` owns preallocated buffers for ``capacity`` datagrams of up
  to ``bufsize`` bytes.  :meth:`Receiver.recv` returns ``(payload, peer_key,
  truncated)`` tuples, where ``peer_key`` is the 6 bytes of the peer's
  ``sockaddr_in`` that identify it (port then address, network order).
* :class:`Sender` sends a list of payloads, each to a :class:`Peer`, without
  copying them; a payload that is a tuple of parts is one UDP GSO message
  (``UDP_SEGMENT``): the kernel cuts it into datagrams, which costs one trip
  through the stack instead of one per datagram.
* :class:`Peer` is one peer: its key and its ``(host, port)``.

The system calls are made by the optional C module :mod:`sidusd.net._lockstep`
(``_batchio.c``: it points the kernel at the ``bytes`` objects' own buffers,
holding a reference to each until the call returns).  Without it
(``AVAILABLE`` false: not built, or not Linux) the same classes read and send
one datagram per call with ``socket.recvmsg``/``sendto``, so callers have one
code path.  IPv4 only (the TFTP server is IPv4): a datagram from another
address family is dropped and counted (:attr:`Receiver.dropped`).  Every call
is non-blocking (``MSG_DONTWAIT``).
"""

from __future__ import annotations

import errno
import socket
import struct
import sys

try:
    from . import _lockstep  # C, optional (setup.py)
except ImportError:                         # pragma: no cover - depends on the install
    _lockstep = None                        # type: ignore[assignment]

MSG_DONTWAIT = int(getattr(socket, "MSG_DONTWAIT", 0x40))
MSG_TRUNC = int(getattr(socket, "MSG_TRUNC", 0x20))
_MAX_VLEN = 1024                       # UIO_MAXIOV: the kernel's cap per call
SOL_UDP = 17
UDP_SEGMENT = 103                      # linux/udp.h: GSO segment size, a cmsg or a socket option
GSO_MAX_SEGMENTS = 64                  # UDP_MAX_SEGMENTS (older kernels)
GSO_MAX_BYTES = 65507                  # the most UDP payload in one IPv4 message
_KEY = struct.Struct("!H4s")
Payload = bytes | tuple[bytes, ...]    # one datagram, or a GSO group (see Sender)

AVAILABLE = _lockstep is not None and sys.platform.startswith("linux")


def peer_key(addr: tuple[str, int]) -> bytes:
    """The 6-byte key of an IPv4 ``(host, port)``: port then address, network order."""
    return _KEY.pack(addr[1], socket.inet_aton(addr[0]))


def peer_addr(key: bytes) -> tuple[str, int]:
    """The ``(host, port)`` of a 6-byte key (inverse of :func:`peer_key`)."""
    port, ip = _KEY.unpack(key)
    return socket.inet_ntoa(ip), port


class Peer:
    """One peer of :meth:`Sender.send`: its 6-byte ``key`` (what C reads) and ``addr``."""

    __slots__ = ("key", "addr")

    def __init__(self, key: bytes):
        self.addr = peer_addr(key)          # checks the key
        self.key = bytes(key)


class Receiver:
    """Reads up to ``capacity`` datagrams per call from a non-blocking UDP socket."""

    def __init__(self, capacity: int = 64, bufsize: int = 2048):
        if not 1 <= capacity <= _MAX_VLEN or not 16 <= bufsize <= 65536:
            raise ValueError("capacity 1..1024, bufsize 16..65536")
        self.capacity, self.bufsize = capacity, bufsize
        self._c = _lockstep.Receiver(capacity, bufsize) if _lockstep is not None else None
        self._dropped = 0                   # the fallback's count

    @property
    def dropped(self) -> int:
        """Datagrams dropped because their sender was not an IPv4 address."""
        return self._dropped + (self._c.dropped if self._c is not None else 0)

    def recv(self, sock: socket.socket) -> list[tuple[bytes, bytes, bool]]:
        """The datagrams waiting (at most ``capacity``): ``[(payload, peer_key, truncated)]``.

        Empty when nothing is waiting.  Raises ``OSError`` for other errors.
        """
        if AVAILABLE and self._c is not None:
            return self._c.recv(sock.fileno())
        out = []
        for _ in range(self.capacity):
            try:
                data, _anc, flags, addr = sock.recvmsg(self.bufsize, 0, MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            if sock.family != socket.AF_INET:
                self._dropped += 1
                continue
            out.append((data, peer_key(addr), bool(flags & MSG_TRUNC)))
        return out


class Sender:
    """Sends many datagrams per call; ``capacity`` is the most messages per system call.

    A payload is ``bytes`` (one datagram) or a tuple of ``bytes`` (a *GSO
    group*: one message the kernel cuts into datagrams of ``len(parts[0])``
    bytes, ``UDP_SEGMENT``; every part but the last has that length, the last
    may be shorter).  A group is sent from its parts without joining them.
    """

    def __init__(self, capacity: int = 256, max_iov: int = 4096):
        if not 1 <= capacity <= _MAX_VLEN or not capacity <= max_iov <= 1 << 20:
            raise ValueError("capacity 1..1024, capacity <= max_iov <= 2**20")
        self.capacity, self.max_iov = capacity, max_iov
        self._c = _lockstep.Sender(capacity, max_iov) if _lockstep is not None else None

    def send(self, sock: socket.socket, payloads: list[Payload], peers: list[Peer],
             start: int = 0) -> tuple[int, int]:
        """Send ``payloads[start:]``, the i-th to ``peers[i]``; return ``(sent, errno)``.

        Stops at the first message the kernel refuses: ``errno`` says why
        (``EAGAIN``: the send buffer is full), 0 if all were sent.  The caller
        decides what to do with the refused message and the rest.
        """
        if AVAILABLE and self._c is not None:
            return self._c.send(sock.fileno(), payloads, peers, start)
        i = start
        while i < len(payloads):
            p = payloads[i]
            try:
                if isinstance(p, tuple):       # no GSO here: one datagram per part
                    for part in p:
                        sock.sendto(part, MSG_DONTWAIT, peers[i].addr)
                else:
                    sock.sendto(p, MSG_DONTWAIT, peers[i].addr)
            except OSError as exc:
                return i - start, exc.errno or errno.EIO
            i += 1
        return i - start, 0


def gso_supported(sock: socket.socket) -> bool:
    """Whether the kernel takes ``UDP_SEGMENT`` on ``sock`` (Linux >= 4.18) and batching is on."""
    if not AVAILABLE:
        return False
    try:
        sock.setsockopt(SOL_UDP, UDP_SEGMENT, 0)
    except OSError:
        return False
    return True
