"""The worker's :class:`~sidusd.net.io.ServiceIO`: what needs root is asked of the supervisor.

* :class:`RpcClient`: requests on the rpc channel, asynchronous.  A reader on
  the socket resolves one future per request id; each request has its own
  timeout; a descriptor passed with an answer (``SCM_RIGHTS``) is closed when
  nobody wants it (no fd asked, an answer to a request that timed out or was
  cancelled, extra descriptors).  Nothing here blocks the event loop.
* :func:`worker_io`: ``open_file`` (the supervisor opens below its
  ``tftp.root`` and passes the descriptor), ``lease_journal``
  (:class:`RemoteLeaseJournal`: the supervisor appends and fsyncs, then
  answers) and ``listener`` (:class:`InheritedListeners`: the socket the
  supervisor bound for that service and address, inherited at exec).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import itertools
import json
import os
import socket
from pathlib import Path
from typing import Any

from ..net.files import NotServable
from ..net.io import ServiceIO
from ..net.listeners import bind_listener
from . import ipc
from .channel import fds_of

RPC_TIMEOUT_S = 10.0


class RpcClient:
    """Request/answer on the rpc channel; any number of requests in flight, one future each."""

    def __init__(self, sock: socket.socket, timeout_s: float = RPC_TIMEOUT_S):
        self.sock = sock
        self.sock.setblocking(False)
        self.timeout_s = timeout_s
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future, bool]] = {}
        self._send_lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._eof: OSError | None = None

    def _attach(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._send_lock = asyncio.Lock()
            loop.add_reader(self.sock.fileno(), self._on_readable)
        return loop

    def close(self) -> None:
        if self._loop is not None and self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
        self._fail_all(OSError(errno.EPIPE, "the request channel is closed"))
        self.sock.close()

    def _fail_all(self, exc: OSError) -> None:
        self._eof = exc
        for fut, _ in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()

    async def call(self, req: dict[str, Any], want_fd: bool = False) -> tuple[dict[str, Any], int | None]:
        """Send ``req``, return ``(answer, fd or None)``.  OSError (TimeoutError included) if none came."""
        loop = self._attach()
        if self._eof is not None:
            raise self._eof
        rid = next(self._ids)
        fut: asyncio.Future = loop.create_future()
        self._pending[rid] = (fut, want_fd)
        try:
            async with asyncio.timeout(self.timeout_s):
                assert self._send_lock is not None
                async with self._send_lock:          # one sock_sendall waits at a time
                    await loop.sock_sendall(self.sock, ipc.encode_worker({**req, "id": rid}))
                return await fut
        except TimeoutError:
            raise TimeoutError(errno.ETIMEDOUT, f"no answer in {self.timeout_s:g} s") from None
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                _, fd = fut.result()                 # answered, but the caller is gone
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            self._pending.pop(rid, None)

    def _on_readable(self) -> None:
        while True:
            try:
                data, anc, _flags, _ = self.sock.recvmsg(ipc.MAX_MSG, socket.CMSG_SPACE(4 * 4))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                data, anc = b"", []
                err: OSError | None = exc
            else:
                err = None
            fds = fds_of(anc)
            if not data:
                for fd in fds:
                    os.close(fd)
                assert self._loop is not None
                self._loop.remove_reader(self.sock.fileno())
                self._fail_all(err or OSError(errno.EPIPE, "the supervisor closed the request channel"))
                return
            try:
                reply = json.loads(data)
                rid = reply.get("id") if isinstance(reply, dict) else None
                entry = self._pending.get(rid) if isinstance(rid, int) else None
            except ValueError:
                entry = None
            if entry is None or entry[0].done():     # the answer to a request that timed out
                for fd in fds:
                    os.close(fd)
                continue
            fut, want_fd = entry
            passed = fds[0] if fds and want_fd else None
            for extra in fds:
                if extra != passed:
                    os.close(extra)
            fut.set_result((reply, passed))


class RemoteLeaseJournal:
    """The :class:`~sidusd.net.io.LeaseJournal` whose writes the supervisor makes durable."""

    def __init__(self, rpc: RpcClient, path: Any):
        self.rpc = rpc
        self.path = Path(path)
        self._lines = 0
        self.refused: list[tuple[int, str]] = []

    async def load(self, db: Any) -> tuple[int, int]:
        reply, fd = await self.rpc.call({"t": "lease.load"}, want_fd=True)
        if not reply.get("ok") or fd is None:
            if fd is not None:
                os.close(fd)
            raise OSError(errno.EIO, str(reply.get("error", "lease journal refused")))
        with open(fd, "rb", closefd=True) as f:
            data = f.read()
        lines = data.decode("utf-8", errors="replace").splitlines()
        refused: list[tuple[int, str]] = []
        bad = db.replay(lines, refused)
        self.refused = refused[:8]
        self._lines = len(lines)
        return sum(1 for l in lines if l.strip()) - bad, bad

    async def append(self, lease: Any) -> None:
        """Returns once the supervisor has the lease on disk (fsync); OSError if it has not."""
        reply, _ = await self.rpc.call({"t": "lease.append", "lease": json.loads(lease.to_json())})
        if not reply.get("ok"):
            raise OSError(errno.EIO, str(reply.get("error", "lease write refused")))
        self._lines += 1

    async def append_many(self, leases: Any, sync: bool = True) -> None:
        """One ``lease.append`` per 256 leases (``more``, ``sync``): the supervisor writes
        them with one write and one fsync (group commit).  OSError if refused."""
        leases = list(leases)
        for i in range(0, len(leases), 256):
            first, *more = (json.loads(l.to_json()) for l in leases[i:i + 256])
            reply, _ = await self.rpc.call({"t": "lease.append", "lease": first, "more": more, "sync": sync})
            if not reply.get("ok"):
                raise OSError(errno.EIO, str(reply.get("error", "lease write refused")))
            self._lines += 1 + len(more)

    def maybe_compact(self, db: Any, now: float) -> bool:
        return False                    # the supervisor compacts its journal itself

    @property
    def lines(self) -> int:
        return self._lines

    def close(self) -> None:
        pass


class InheritedListeners:
    """The listening sockets the supervisor bound, keyed by (service, address, port, device).

    :meth:`listener` is ``ServiceIO.listener``: it returns a duplicate of the
    inherited socket; an address the supervisor did not bind is bound here
    (an unprivileged port; a privileged one fails as it should).
    """

    def __init__(self, entries: list[dict[str, Any]]):
        self._by_key: dict[tuple[str, str, int, str], int] = {}
        for e in entries:
            self._by_key[(e["service"], str(ipaddress.IPv4Address(e["address"])), int(e["port"]),
                          e.get("device") or "")] = int(e["fd"])

    def fd_for(self, service: str, address: str, port: int, device: str | None = None) -> int | None:
        try:
            host = str(ipaddress.IPv4Address(address or "0.0.0.0"))
        except ValueError:
            return None
        return self._by_key.get((service, host, int(port), device or ""))

    def listener(self, service: str, address: str, port: int, device: str | None = None,
                 rcvbuf: int = 0) -> socket.socket:
        fd = self.fd_for(service, address, port, device)
        if fd is None:
            return bind_listener(service, address, port, device, rcvbuf)
        s = socket.socket(fileno=os.dup(fd))
        s.setblocking(False)
        return s


def worker_io(rpc: RpcClient, inherited: InheritedListeners) -> ServiceIO:
    """The worker's ServiceIO: files and leases through ``rpc``, the inherited listeners."""

    async def open_file(root: Path, parts: tuple[str, ...]) -> tuple[int, int]:
        """:func:`sidusd.net.files.open_confined`, done by the supervisor (``root`` is its tftp.root)."""
        try:
            reply, fd = await rpc.call({"t": "open", "parts": list(parts)}, want_fd=True)
        except (OSError, ValueError) as exc:
            raise NotServable(f"file server unavailable: {exc}") from None
        if reply.get("ok") and fd is not None:
            return fd, int(reply.get("size", 0))
        if fd is not None:
            os.close(fd)
        raise NotServable(str(reply.get("reason", "refused")), bool(reply.get("missing", False)))

    return ServiceIO(open_file=open_file, lease_journal=lambda path: RemoteLeaseJournal(rpc, path),
                     listener=inherited.listener)
