"""The TFTP edge: sockets and timers around :mod:`sidusd.proto.tftp_session`.

* One listening socket on ``tftp.address:tftp.port`` read with ``recvmsg`` and
  ``IP_PKTINFO``: the local address a request arrived on becomes the server IP
  of rendered configs and the address of the transfer's own socket; the
  interface index gives the MTU that caps ``blksize`` (MTU - 32).
* Each transfer has its own socket bound to ``(local address, 0)`` (its TID,
  RFC 1350 section 4), not connected, so that a datagram from a wrong TID can be
  answered with ERROR 5 while the transfer goes on.
* Transfer sockets are watched by one epoll set of their own, itself one
  reader of the event loop: a loop turn hands over every ready transfer at
  once (one ``epoll_wait``), each gets one datagram read (level-triggered: the
  rest comes next turn), and an ACK (4 bytes) is read without building an
  object.  What the session wants sent goes straight to ``sendto``; only what
  the kernel refuses is queued.
* One timer for all transfers: a heap of deadlines (at most one live entry per
  transfer) and one ``loop.call_at`` re-armed to the earliest.
* Bounded: ``max_transfers`` in all, ``max_transfers_per_client`` per client IP
  (refused with an ERROR and counted), at most ``_BATCH`` requests read from
  the listening socket and one datagram per transfer per loop turn, the listening socket's receive buffer sized for
  ``intake_queue`` requests, outgoing datagrams queued per transfer only up to
  one window (the kernel buffer drains them through ``add_writer``).
* A transfer keeps its descriptor (or rendered bytes) and its negotiated
  parameters: a config reload never changes a transfer in flight.

Counters (``tftp.``): rx, malformed, unexpected, duplicate_rrq, wrong_tid,
refused.<write|mode|busy|per_client|name|not_found|access|render|socket|stopping|
netascii_size|read>,
transfers.started/done/failed/probe, retransmits, bytes, send_errors, send_blocked
(the kernel send buffer was full; the rest waits for add_writer), internal_errors.
Every transfer ends with one ``tftp.transfer`` log event.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import heapq
import itertools
import select
import socket
import struct
from typing import Any

from ..boot import content
from ..errors import RemoteProtocolError, StartupError
from ..observability import get_logger
from ..proto import tftp
from ..proto.tftp_session import BytesSource, ReadSession
from .files import FileSource, NotServable, open_confined

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)        # Linux value
_PKTINFO = struct.Struct("=i4s4s")                    # struct in_pktinfo
_CMSG_LEN = socket.CMSG_SPACE(_PKTINFO.size)
_BATCH = 64                 # requests read from the listening socket per loop turn
_RECV_MAX = 2048            # requests are <= 512 bytes (RFC 2347); ACKs 4
_MAX_REQUEST = 1024         # a bigger "request" is refused as malformed
NETASCII_MAX = 16 << 20     # netascii is converted in memory: bounded
_MTU_TTL_S = 30.0
_TIMER_SLACK_S = 1e-3
_READY_MAX = 1024           # transfer sockets handled per loop turn
_OP_ACK = 4


class _FileSource(FileSource):
    """A file read with ``os.pread``; a window's blocks are read with one call."""

    __slots__ = ()
    contiguous = True


class _Transfer:
    __slots__ = ("sock", "fd", "peer", "local", "file", "session", "source", "mac",
                 "outbox", "writing", "deadline", "heap_at", "finished")

    def __init__(self, sock: socket.socket, peer: tuple[str, int], local: str, file: str,
                 session: ReadSession, source: Any, mac: str | None):
        self.sock, self.fd, self.peer, self.local = sock, sock.fileno(), peer, local
        self.file, self.session, self.source, self.mac = file, session, source, mac
        self.outbox: collections.deque[bytes] = collections.deque()
        self.writing = False
        self.deadline: float | None = None
        self.heap_at: float | None = None
        self.finished = False


class TftpService:
    """TFTP read server (RFC 1350, 2347, 2348, 2349, 7440) driven by ``runtime``."""

    def __init__(self, runtime: Any):
        self.runtime = runtime
        self.log = get_logger("tftp")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._bound: tuple[str, int] | None = None
        self._transfers: dict[tuple[str, int], _Transfer] = {}
        self._per_client: collections.Counter[str] = collections.Counter()
        self._heap: list[tuple[float, int, _Transfer]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._mtu: dict[int, tuple[float, int]] = {}
        self._ep: Any = None                            # select.epoll of transfer sockets
        self._by_fd: dict[int, _Transfer] = {}
        self._stopping = False
        self._idle = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        """Bind the listening socket; raises :class:`StartupError` if it cannot."""
        self._loop = asyncio.get_running_loop()
        cfg = self.runtime.config.tftp
        addr = (str(cfg.address), int(cfg.port))
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, max(65536, cfg.intake_queue * 512))
            sock.setblocking(False)
            sock.bind(addr)
        except OSError as exc:
            sock.close()
            raise StartupError(f"tftp: cannot listen on {addr[0]}:{addr[1]}: {exc.strerror}") from None
        self._sock = sock
        self._bound = sock.getsockname()
        self._ep = select.epoll()
        self._loop.add_reader(self._ep.fileno(), self._on_transfers_ready)
        self._loop.add_reader(sock.fileno(), self._on_request_readable)
        self.log.info("tftp.listening", address=self._bound[0], port=self._bound[1], root=str(cfg.root))

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting; let transfers in flight finish for up to ``grace_s``, then end them."""
        self._stopping = True
        if self._sock is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._transfers and grace_s > 0:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), grace_s)
            except asyncio.TimeoutError:
                pass
        if self._loop is not None:
            now = self._loop.time()
            for t in list(self._transfers.values()):
                t.session.abort(now, "server shutting down")
                self._pump(t, now)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._ep is not None and not self._transfers:
            self._loop.remove_reader(self._ep.fileno())
            self._ep.close()
            self._ep = None

    def listeners(self) -> list[dict[str, Any]]:
        """Where this service listens (for ``sidusctl status``)."""
        if self._bound is None:
            return []
        return [{"proto": "udp", "service": "tftp", "address": self._bound[0], "port": self._bound[1]}]

    def active_transfers(self) -> int:
        """How many transfers are in flight."""
        return len(self._transfers)

    def transfers(self) -> list[dict[str, Any]]:
        """The transfers in flight, for status displays."""
        now = self._loop.time() if self._loop else 0.0
        return [{"file": t.file, "peer": f"{t.peer[0]}:{t.peer[1]}", "bytes": t.session.bytes_acked,
                 "size": t.source.size, "blksize": t.session.blksize,
                 "windowsize": t.session.windowsize,
                 "duration_s": t.session.summary(now).duration_s} for t in self._transfers.values()]

    # -- requests on the listening socket ----------------------------------------
    def _on_request_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        obs = self.runtime.observer
        for _ in range(_BATCH):
            try:
                data, anc, flags, peer = sock.recvmsg(_RECV_MAX, _CMSG_LEN)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                obs.count("tftp.rx_errors")
                self.log.warning("tftp.rx_error", error=exc.strerror)
                return
            obs.count("tftp.rx")
            local, ifindex = self._bound[0] if self._bound else "0.0.0.0", 0
            for level, kind, value in anc:
                if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(value) >= _PKTINFO.size:
                    ifindex, spec_dst, _dst = _PKTINFO.unpack_from(value)
                    local = socket.inet_ntoa(spec_dst)
            try:
                if flags & socket.MSG_TRUNC or len(data) > _MAX_REQUEST:
                    obs.count("tftp.malformed")
                    continue
                self._on_request(data, peer, local, ifindex)
            except Exception:  # a request must never stop the intake loop
                obs.count("tftp.internal_errors")
                self.log.exception("tftp.internal_error", peer=f"{peer[0]}:{peer[1]}")

    def _refuse(self, peer: tuple[str, int], local: str, code: int, message: str,
                reason: str, file: str | None = None) -> None:
        self.runtime.observer.count(f"tftp.refused.{reason}")
        self.log.info("tftp.refused", peer=f"{peer[0]}:{peer[1]}", file=file, reason=reason,
                      message=message)
        if self._sock is None:
            return
        pkt = tftp.error_packet(code, message[:200])
        try:
            if local and local != "0.0.0.0":
                info = _PKTINFO.pack(0, socket.inet_aton(local), b"\0\0\0\0")
                self._sock.sendmsg([pkt], [(socket.IPPROTO_IP, IP_PKTINFO, info)], 0, peer)
            else:
                self._sock.sendto(pkt, peer)
        except OSError:
            self.runtime.observer.count("tftp.send_errors")

    def _on_request(self, data: bytes, peer: tuple[str, int], local: str, ifindex: int) -> None:
        obs = self.runtime.observer
        try:
            pkt = tftp.decode(data)
        except RemoteProtocolError as exc:
            obs.count("tftp.malformed")
            self.log.debug("tftp.malformed", peer=f"{peer[0]}:{peer[1]}", error=str(exc))
            return
        if isinstance(pkt, tftp.WRQ):
            return self._refuse(peer, local, tftp.ERR_ACCESS, "write requests are not accepted",
                                "write", pkt.filename)
        if not isinstance(pkt, tftp.RRQ):
            obs.count("tftp.unexpected")
            return
        if peer in self._transfers:
            obs.count("tftp.duplicate_rrq")   # client resent its RRQ; the transfer answers
            return
        name = pkt.filename
        cfg = self.runtime.config.tftp
        mode = pkt.mode.lower()
        if mode not in tftp.MODES:
            return self._refuse(peer, local, tftp.ERR_ILLEGAL, f"unsupported mode {mode[:20]!r}",
                                "mode", name)
        if self._stopping:
            return self._refuse(peer, local, tftp.ERR_UNDEFINED, "server stopping", "stopping", name)
        if len(self._transfers) >= cfg.max_transfers:
            return self._refuse(peer, local, tftp.ERR_UNDEFINED, "server busy, retry later", "busy", name)
        if self._per_client[peer[0]] >= cfg.max_transfers_per_client:
            return self._refuse(peer, local, tftp.ERR_UNDEFINED, "too many transfers from this client",
                                "per_client", name)
        res = content.resolve(name)
        mac: str | None = None
        if isinstance(res, content.Refused):
            return self._refuse(peer, local, tftp.ERR_ACCESS, f"access violation: {res.reason}",
                                "name", name)
        if isinstance(res, content.Generated):
            mac = res.mac
            try:
                doc = self.runtime.render(res.kind, res.mac, local, peer[0])
            except Exception as exc:
                self.log.error("tftp.render_failed", file=name, kind=res.kind, mac=res.mac,
                               error=f"{type(exc).__name__}: {exc}")
                return self._refuse(peer, local, tftp.ERR_UNDEFINED, "internal error", "render", name)
            if doc is None:
                return self._refuse(peer, local, tftp.ERR_NOT_FOUND, "file not found", "not_found", name)
            source: Any = BytesSource(doc)
        else:
            try:
                fd, size = open_confined(cfg.root, res.parts)
            except NotServable as exc:
                if exc.missing:
                    return self._refuse(peer, local, tftp.ERR_NOT_FOUND, "file not found",
                                        "not_found", name)
                return self._refuse(peer, local, tftp.ERR_ACCESS, "access violation", "access", name)
            source = _FileSource(fd, size)
        if mode == "netascii":
            source = self._netascii(source, peer, local, name)
            if source is None:
                return
        self._begin(pkt, peer, local, ifindex, name, source, mac, cfg)

    def _netascii(self, source: Any, peer: tuple[str, int], local: str, name: str) -> Any:
        """RFC 1350 netascii: converted in memory (bounded), so tsize is the converted size."""
        try:
            if source.size > NETASCII_MAX:
                self._refuse(peer, local, tftp.ERR_UNDEFINED, "file too large for netascii, use octet",
                             "netascii_size", name)
                return None
            return BytesSource(tftp.netascii(source.read_block(0, source.size)))
        except OSError as exc:
            self.log.warning("tftp.read_error", file=name, error=exc.strerror)
            self._refuse(peer, local, tftp.ERR_UNDEFINED, "read error", "read", name)
            return None
        finally:
            if isinstance(source, FileSource):
                source.close()

    def _begin(self, pkt: tftp.RRQ, peer: tuple[str, int], local: str, ifindex: int, name: str,
               source: Any, mac: str | None, cfg: Any) -> None:
        assert self._loop is not None
        max_blk = min(int(cfg.max_blksize), self._mtu_for(ifindex) - 32)
        neg = tftp.negotiate(pkt.option_map, tftp.Limits(max_blk, int(cfg.max_windowsize), source.size))
        session = ReadSession(source, neg.blksize, neg.windowsize,
                              neg.timeout_s or float(cfg.timeout_s), int(cfg.retries), neg.oack)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((local if local != "0.0.0.0" else "", 0))
        except OSError as exc:
            sock.close()
            if isinstance(source, FileSource):
                source.close()
            self.log.error("tftp.socket_failed", error=exc.strerror)
            return self._refuse(peer, local, tftp.ERR_UNDEFINED, "server error", "socket", name)
        t = _Transfer(sock, peer, local, name, session, source, mac or self.runtime.observer.mac_for_ip(peer[0]))
        self._transfers[peer] = t
        self._per_client[peer[0]] += 1
        self.runtime.observer.count("tftp.transfers.started")
        self._by_fd[t.fd] = t
        self._ep.register(t.fd, select.EPOLLIN)
        now = self._loop.time()
        session.start(now)
        self._pump(t, now)

    def _mtu_for(self, ifindex: int) -> int:
        """MTU of the interface a request came in on (cached briefly); 1500 if unknown."""
        now = self._loop.time() if self._loop else 0.0
        hit = self._mtu.get(ifindex)
        if hit and hit[0] > now:
            return hit[1]
        mtu = 1500
        try:
            name = socket.if_indextoname(ifindex)
            with open(f"/sys/class/net/{name}/mtu") as f:
                mtu = int(f.read().strip())
        except (OSError, ValueError):
            pass
        if len(self._mtu) > 1024:
            self._mtu.clear()
        self._mtu[ifindex] = (now + _MTU_TTL_S, mtu)
        return mtu

    # -- transfer sockets ------------------------------------------------------
    def _on_transfers_ready(self) -> None:
        """Every transfer socket with a datagram waiting: one datagram each."""
        if self._ep is None:
            return
        try:
            ready = self._ep.poll(0, _READY_MAX)
        except InterruptedError:
            return
        now = self._loop.time()             # type: ignore[union-attr]
        by_fd = self._by_fd
        for fd, _events in ready:
            t = by_fd.get(fd)
            if t is not None:
                self._on_transfer_readable(t, now)

    def _on_transfer_readable(self, t: _Transfer, now: float) -> None:
        obs = self.runtime.observer
        if t.finished:
            return
        try:
            try:
                data, addr = t.sock.recvfrom(_RECV_MAX)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                obs.count("tftp.rx_errors")
                return
            obs.count("tftp.rx")
            if addr != t.peer:
                # RFC 1350 section 4: wrong TID -> ERROR 5 to that port, transfer untouched.
                obs.count("tftp.wrong_tid")
                try:
                    t.sock.sendto(tftp.error_packet(tftp.ERR_UNKNOWN_TID, "unknown transfer ID"), addr)
                except OSError:
                    obs.count("tftp.send_errors")
                return
            if len(data) == 4 and data[1] == _OP_ACK and data[0] == 0:
                t.session.receive_ack((data[2] << 8) | data[3], now)
            else:
                try:
                    pkt = tftp.decode(data)
                except RemoteProtocolError:
                    obs.count("tftp.malformed")
                    return
                t.session.receive(pkt, now)
            self._pump(t, now)
        except Exception:
            obs.count("tftp.internal_errors")
            self.log.exception("tftp.internal_error", file=t.file, peer=f"{t.peer[0]}:{t.peer[1]}")
            t.session.abort(now, "internal error")
            self._finish(t, now)

    def _pump(self, t: _Transfer, now: float) -> None:
        """Queue what the session wants sent, send it, re-arm its timer or finish it."""
        if t.finished:
            return
        try:
            out = t.session.datagrams_to_send(now)
        except OSError as exc:      # the file could not be read any more
            t.session.abort(now, "read error")
            out = t.session.datagrams_to_send(now)
            self.log.warning("tftp.read_error", file=t.file, error=exc.strerror)
        if out:
            self._send(t, out)
        if t.session.done:
            self._finish(t, now)
        else:
            self._schedule(t)

    def _send(self, t: _Transfer, out: list[bytes]) -> None:
        """Send ``out`` now; what the kernel does not take waits in the outbox (``_flush``)."""
        if not t.outbox:
            sendto, peer, i = t.sock.sendto, t.peer, 0
            try:
                for d in out:
                    sendto(d, peer)
                    i += 1
                return
            except OSError:
                out = out[i:]           # _flush retries it and handles the error
        t.outbox.extend(out)
        self._flush(t)

    def _flush(self, t: _Transfer) -> None:
        sock, box = t.sock, t.outbox
        while box:
            try:
                sock.sendto(box[0], t.peer)
            except (BlockingIOError, InterruptedError):
                self.runtime.observer.count("tftp.send_blocked")
                if not t.writing and not t.finished and self._loop is not None:
                    t.writing = True
                    self._loop.add_writer(t.fd, self._on_writable, t)
                return
            except OSError as exc:
                self.runtime.observer.count("tftp.send_errors")
                if exc.errno in (errno.EMSGSIZE, errno.ENETUNREACH, errno.EHOSTUNREACH):
                    box.popleft()       # dropped; the retransmission timer recovers or gives up
                    continue
                box.clear()
                return
            box.popleft()
        if t.writing and self._loop is not None:
            t.writing = False
            self._loop.remove_writer(t.fd)

    def _on_writable(self, t: _Transfer) -> None:
        if not t.finished:
            self._flush(t)

    # -- the one timer ---------------------------------------------------------
    def _schedule(self, t: _Transfer) -> None:
        d = t.session.next_timer()
        t.deadline = d
        if d is not None and (t.heap_at is None or d < t.heap_at):
            t.heap_at = d
            heapq.heappush(self._heap, (d, next(self._seq), t))
            self._arm()

    def _arm(self) -> None:
        assert self._loop is not None
        if not self._heap:
            return
        at = self._heap[0][0]
        if self._timer is not None and self._timer_at is not None and self._timer_at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        assert self._loop is not None
        self._timer = self._timer_at = None
        now = self._loop.time()
        while self._heap and self._heap[0][0] <= now + _TIMER_SLACK_S:
            at, _, t = heapq.heappop(self._heap)
            if at != t.heap_at:
                continue                        # superseded by an earlier entry
            t.heap_at = None
            if t.finished or t.deadline is None:
                continue
            if t.deadline > now + _TIMER_SLACK_S:   # moved later: one entry again
                t.heap_at = t.deadline
                heapq.heappush(self._heap, (t.deadline, next(self._seq), t))
                continue
            try:
                t.outbox.clear()                # a retransmission supersedes what is unsent
                t.session.handle_timer(max(now, t.deadline))
                self._pump(t, now)
            except Exception:
                self.runtime.observer.count("tftp.internal_errors")
                self.log.exception("tftp.internal_error", file=t.file)
                t.session.abort(now, "internal error")
                self._finish(t, now)
        self._arm()

    # -- the end -----------------------------------------------------------------
    def _finish(self, t: _Transfer, now: float) -> None:
        if t.finished:
            return
        if t.outbox:
            self._flush(t)              # e.g. our final ERROR; best effort
        t.finished = True
        assert self._loop is not None
        if self._by_fd.pop(t.fd, None) is not None and self._ep is not None:
            self._ep.unregister(t.fd)
        if t.writing:
            self._loop.remove_writer(t.fd)
        t.sock.close()
        if isinstance(t.source, FileSource):
            t.source.close()
        self._transfers.pop(t.peer, None)
        self._per_client[t.peer[0]] -= 1
        if self._per_client[t.peer[0]] <= 0:
            del self._per_client[t.peer[0]]
        s = t.session.summary(now)
        obs = self.runtime.observer
        result = {"ok": "done", "probe": "probe"}.get(s.outcome, "failed")
        obs.count(f"tftp.transfers.{result}")
        obs.count("tftp.retransmits", s.retransmits)
        obs.count("tftp.bytes", s.bytes)
        log = self.log.info if result != "failed" else self.log.warning
        log("tftp.transfer", file=t.file, peer=f"{t.peer[0]}:{t.peer[1]}", mac=t.mac, bytes=s.bytes,
            size=t.source.size, blksize=s.blksize, windowsize=s.windowsize, retransmits=s.retransmits,
            duration_s=s.duration_s, outcome=s.outcome, error=s.error)
        obs.timeline(t.mac, "tftp", file=t.file, bytes=s.bytes, duration_s=s.duration_s,
                     outcome=s.outcome)
        if not self._transfers:
            self._idle.set()
            if self._stopping and self._ep is not None:
                self._loop.remove_reader(self._ep.fileno())
                self._ep.close()
                self._ep = None
