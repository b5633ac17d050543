"""Many UDP datagrams per system call: ``recvmmsg(2)`` and ``sendmmsg(2)`` through ctypes.

Python's socket module has neither; one call per datagram costs a system call
and a trip through the interpreter each.  A TFTP server that serves every
transfer of a local address from one socket can read all pending ACKs with
one ``recvmmsg`` and send all the DATA they release with one ``sendmmsg``.

* :class:`Receiver` owns preallocated buffers for ``capacity`` datagrams of up
  to ``bufsize`` bytes.  :meth:`Receiver.recv` returns ``(payload, peer_key,
  truncated)`` tuples, where ``peer_key`` is the 6 bytes of the peer's
  ``sockaddr_in`` that identify it (port then address, network order).
* :class:`Sender` sends a list of payloads, each to the ``sockaddr_in`` at a
  given address (see :class:`Peer`), without copying them; a payload that is
  a tuple of parts is one UDP GSO message (``UDP_SEGMENT``): the kernel cuts
  it into datagrams, which costs one trip through the stack instead of one
  per datagram.
* :class:`Peer` is one peer's ``sockaddr_in`` in memory that does not move.

IPv4 only (the TFTP server is IPv4).  Where libc has no ``recvmmsg``/``sendmmsg``
(``AVAILABLE`` false) the same classes fall back to one ``recvfrom``/``sendto``
per datagram, so callers have one code path.  Every call is non-blocking
(``MSG_DONTWAIT``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import sys

MSG_DONTWAIT = int(getattr(socket, "MSG_DONTWAIT", 0x40))
MSG_TRUNC = int(getattr(socket, "MSG_TRUNC", 0x20))
_MAX_VLEN = 1024                       # UIO_MAXIOV: the kernel's cap per call


class _iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.c_void_p), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _msghdr), ("msg_len", ctypes.c_uint)]


_MM = ctypes.sizeof(_mmsghdr)
_IOV = ctypes.sizeof(_iovec)
_OFF_NAME = _msghdr.msg_name.offset
_OFF_FLAGS = _msghdr.msg_flags.offset
_OFF_LEN = _mmsghdr.msg_len.offset
_FLAGS_LEN = struct.Struct("=i4xI")    # msg_flags, padding, msg_len (mmsghdr from msg_flags on)
assert _OFF_LEN == _OFF_FLAGS + 8
_IOV_PACK = struct.Struct("PN")        # iov_base, iov_len
_SOCKADDR = struct.Struct("=H6s8x")    # sin_family (host order), port + address, zero
# msghdr from msg_name to msg_controllen: name, namelen, iov, iovlen, control, controllen
_HDR_PACK = struct.Struct("PI4xPNPN")
assert _HDR_PACK.size == _msghdr.msg_flags.offset
SOL_UDP = 17
UDP_SEGMENT = 103                      # linux/udp.h: GSO segment size, a cmsg or a socket option
GSO_MAX_SEGMENTS = 64                  # UDP_MAX_SEGMENTS (older kernels)
GSO_MAX_BYTES = 65507                  # the most UDP payload in one IPv4 message
_CMSG_LEN = socket.CMSG_LEN(2)
_CMSG_SPACE = socket.CMSG_SPACE(2)
_CMSG_HDR = struct.Struct("Nii")       # cmsg_len, cmsg_level, cmsg_type
_CMSG_DATA = _CMSG_HDR.size
_SEG = struct.Struct("=H")


def _load():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        recv, send = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None, None
    recv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    recv.restype = ctypes.c_int
    send.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    send.restype = ctypes.c_int
    return recv, send


_recvmmsg, _sendmmsg = _load()
AVAILABLE = _recvmmsg is not None and sys.platform.startswith("linux")


def _bytes_offset() -> int | None:
    """Where a ``bytes`` object's data starts relative to ``id()`` (CPython), checked."""
    probe = b"sidus-probe-0123456789"
    off = sys.getsizeof(b"") - 1
    real = ctypes.cast(ctypes.c_char_p(probe), ctypes.c_void_p).value
    return off if real == id(probe) + off else None


_BYTES_OFF = _bytes_offset()


def _address_of(payload: bytes) -> int:
    if _BYTES_OFF is not None:
        return id(payload) + _BYTES_OFF
    return ctypes.cast(ctypes.c_char_p(payload), ctypes.c_void_p).value  # type: ignore[return-value]


def peer_key(addr: tuple[str, int]) -> bytes:
    """The 6-byte key of an IPv4 ``(host, port)``: port then address, network order."""
    return struct.pack("!H4s", addr[1], socket.inet_aton(addr[0]))


def peer_addr(key: bytes) -> tuple[str, int]:
    """The ``(host, port)`` of a 6-byte key (inverse of :func:`peer_key`)."""
    port, ip = struct.unpack("!H4s", key)
    return socket.inet_ntoa(ip), port


class Peer:
    """A peer's ``sockaddr_in`` at a fixed address, for :meth:`Sender.send`."""

    __slots__ = ("key", "addr", "_buf", "ptr")

    def __init__(self, key: bytes):
        self.key = key
        self.addr = peer_addr(key)
        self._buf = ctypes.create_string_buffer(_SOCKADDR.pack(socket.AF_INET, key), 16)
        self.ptr = ctypes.addressof(self._buf)


class Receiver:
    """Reads up to ``capacity`` datagrams per call from a non-blocking UDP socket."""

    def __init__(self, capacity: int = 64, bufsize: int = 2048):
        if not 1 <= capacity <= _MAX_VLEN or bufsize < 16:
            raise ValueError("capacity 1..1024, bufsize >= 16")
        self.capacity, self.bufsize = capacity, bufsize
        self._msgs = (_mmsghdr * capacity)()
        self._iovs = (_iovec * capacity)()
        self._data = ctypes.create_string_buffer(capacity * bufsize)
        self._names = ctypes.create_string_buffer(capacity * 16)
        self._mv_msgs = memoryview(self._msgs).cast("B")
        self._mv_data = memoryview(self._data).cast("B")
        self._mv_names = memoryview(self._names).cast("B")
        base_d, base_n = ctypes.addressof(self._data), ctypes.addressof(self._names)
        for i in range(capacity):
            self._iovs[i].iov_base = base_d + i * bufsize
            self._iovs[i].iov_len = bufsize
            h = self._msgs[i].msg_hdr
            h.msg_name = base_n + i * 16
            h.msg_namelen = 16
            h.msg_iov = ctypes.addressof(self._iovs[i])
            h.msg_iovlen = 1
        # per datagram: where its flags+length, its payload, and its peer key (port + address) are
        self._offsets = [(i * _MM + _OFF_FLAGS, i * bufsize, i * 16 + 2, i * 16 + 8)
                         for i in range(capacity)]

    def recv(self, sock: socket.socket) -> list[tuple[bytes, bytes, bool]]:
        """The datagrams waiting (at most ``capacity``): ``[(payload, peer_key, truncated)]``.

        Empty when nothing is waiting.  Raises ``OSError`` for other errors.
        """
        if not AVAILABLE:
            return self._recv_fallback(sock)
        n = _recvmmsg(sock.fileno(), self._msgs, self.capacity, MSG_DONTWAIT, None)
        if n < 0:
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                return []
            raise OSError(err, os.strerror(err))
        out = []
        mvm, mvd, bs = self._mv_msgs, self._mv_data, self.bufsize
        names = self._mv_names[:n * 16].tobytes()      # one copy; keys are then plain slices
        unpack, append = _FLAGS_LEN.unpack_from, out.append
        for fl, off, ka, kb in self._offsets[:n]:
            flags, ln = unpack(mvm, fl)
            if ln <= bs and not flags & MSG_TRUNC:
                append((mvd[off:off + ln].tobytes(), names[ka:kb], False))
            else:
                append((mvd[off:off + bs].tobytes(), names[ka:kb], True))
        return out

    def _recv_fallback(self, sock: socket.socket) -> list[tuple[bytes, bytes, bool]]:
        out = []
        for _ in range(self.capacity):
            try:
                data, _anc, flags, addr = sock.recvmsg(self.bufsize, 0, MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
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
        if not 1 <= capacity <= _MAX_VLEN or max_iov < capacity:
            raise ValueError("capacity 1..1024, max_iov >= capacity")
        self.capacity, self.max_iov = capacity, max_iov
        self._msgs = (_mmsghdr * capacity)()
        self._iovs = (_iovec * max_iov)()
        self._ctrl = ctypes.create_string_buffer(capacity * _CMSG_SPACE)
        self._mv_msgs = memoryview(self._msgs).cast("B")
        self._mv_iovs = memoryview(self._iovs).cast("B")
        self._mv_ctrl = memoryview(self._ctrl).cast("B")
        self._iov_base = ctypes.addressof(self._iovs)
        self._ctrl_base = ctypes.addressof(self._ctrl)
        for i in range(capacity):
            _CMSG_HDR.pack_into(self._mv_ctrl, i * _CMSG_SPACE, _CMSG_LEN, SOL_UDP, UDP_SEGMENT)
        # message i: its header, its iovec when every message before it is one datagram
        self._offsets = [(i * _MM, i * _IOV, self._iov_base + i * _IOV) for i in range(capacity)]

    def send(self, sock: socket.socket, payloads: list, peers: list[Peer],
             start: int = 0) -> tuple[int, int]:
        """Send ``payloads[start:]``, the i-th to ``peers[i]``; return ``(sent, errno)``.

        Stops at the first message the kernel refuses: ``errno`` says why
        (``EAGAIN``: the send buffer is full), 0 if all were sent.  The caller
        decides what to do with the refused message and the rest.
        """
        total = len(payloads)
        i = start
        if not AVAILABLE:
            return self._send_fallback(sock, payloads, peers, start)
        fd, cap, max_iov = sock.fileno(), self.capacity, self.max_iov
        pack_iov, pack_hdr, pack_seg = _IOV_PACK.pack_into, _HDR_PACK.pack_into, _SEG.pack_into
        mvm, mvi, mvc, addr_of = self._mv_msgs, self._mv_iovs, self._mv_ctrl, _address_of
        iov_base, ctrl_base = self._iov_base, self._ctrl_base
        offs, boff = self._offsets, _BYTES_OFF
        while i < total:
            k = 0
            if boff is not None:
                # the common batch: plain datagrams, message k uses iovec k (precomputed offsets)
                end = i + cap if i + cap < total else total
                for p, peer in zip(payloads[i:end], peers[i:end]):
                    if type(p) is not bytes:
                        break
                    mo, io, ia = offs[k]
                    pack_iov(mvi, io, id(p) + boff, len(p))
                    pack_hdr(mvm, mo, peer.ptr, 16, ia, 1, 0, 0)
                    k += 1
            v = k
            while k < cap and i + k < total:
                p = payloads[i + k]
                if type(p) is bytes:
                    if v >= max_iov:
                        break
                    pack_iov(mvi, v * _IOV, addr_of(p), len(p))
                    pack_hdr(mvm, k * _MM, peers[i + k].ptr, 16, iov_base + v * _IOV, 1, 0, 0)
                    v += 1
                elif type(p) is tuple:
                    n = len(p)
                    if v + n > max_iov:
                        if k:
                            break
                        raise ValueError(f"a GSO group of {n} parts needs more than {max_iov} iovecs")
                    first = v
                    for part in p:
                        if type(part) is not bytes:
                            raise TypeError(f"payload must be bytes, not {type(part).__name__}")
                        pack_iov(mvi, v * _IOV, addr_of(part), len(part))
                        v += 1
                    pack_seg(mvc, k * _CMSG_SPACE + _CMSG_DATA, len(p[0]))
                    pack_hdr(mvm, k * _MM, peers[i + k].ptr, 16, iov_base + first * _IOV, n,
                             ctrl_base + k * _CMSG_SPACE, _CMSG_SPACE)
                else:                          # the address arithmetic is for bytes only
                    raise TypeError(f"payload must be bytes, not {type(p).__name__}")
                k += 1
            n = _sendmmsg(fd, self._msgs, k, MSG_DONTWAIT)
            if n < 0:
                return i - start, ctypes.get_errno() or errno.EIO
            i += n
        return i - start, 0

    @staticmethod
    def _send_fallback(sock: socket.socket, payloads: list, peers: list[Peer],
                       start: int) -> tuple[int, int]:
        i = start
        while i < len(payloads):
            p = payloads[i]
            try:
                if type(p) is tuple:           # no GSO here: one datagram per part
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
