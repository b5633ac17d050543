"""The TFTP edge: sockets and timers around :mod:`sidusd.proto.tftp_session`.

:class:`TftpService` (RFC 1350, 2347, 2348, 2349, 7440) is put together from
one module per job:

* :mod:`~sidusd.net.tftp_intake`: the listening socket on
  ``tftp.address:tftp.port`` (``recvmsg`` + ``IP_PKTINFO``), admission
  (``max_transfers``, ``max_transfers_per_client``), what a name means
  (``runtime.provide``, one decision for TFTP and HTTP), the file opened with
  ``await io.open_file`` (:class:`~sidusd.net.io.ServiceIO`), refusals;
* :mod:`~sidusd.net.tftp_ports`: **one transfer socket per local address**
  (:class:`~sidusd.net.udpport.SharedPort`), shared by every transfer from that
  address (RFC 1350 section 4 identifies a transfer by both ends, as dnsmasq's
  ``--tftp-single-port``), the recently-ended peers, the MTU cache;
* :mod:`~sidusd.net.tftp_dispatch`: a readable transfer socket drained in
  ``recvmmsg`` batches, each datagram handed to its transfer, what the
  sessions release sent with ``sendmmsg`` (a window as one UDP GSO message);
* :mod:`~sidusd.net.tftp_accel`: lockstep runs carried out by the C engine;
* :mod:`~sidusd.net.timerheap`: one timer for all transfers;
* :mod:`~sidusd.net.tftp_transfer`: a transfer in flight and its summary.

This module keeps the service's lifecycle and public API and the life of a
transfer: begun, pumped (what its session wants sent, its timer), ended.
Files are read through :class:`~sidusd.net.files.ReadAheadSource` (one
``pread`` per 64 KiB).  A transfer keeps its descriptor (or rendered bytes) and
its negotiated parameters: a config reload never changes a transfer in flight.

Counters (``tftp.``): rx, malformed, unexpected, duplicate_rrq, wrong_tid, late,
refused.<write|mode|busy|per_client|flood|name|not_found|access|render|socket|stopping|read>,
transfers.started/done/failed/probe/evicted, evictions (unconfirmed transfers ended to admit
a request at the cap), wrong_tid_unanswered (strangers not answered: rate bound),
error_suspect (an ERROR ignored: its source IP sprays datagrams matching no transfer),
rx_batches (recvmmsg calls that returned datagrams:
rx / rx_batches is the batch size), retransmits, bytes, send_errors, send_blocked
(the kernel send buffer was full; the rest waits for add_writer), send_dropped
(the outbox was full), gso_off (the kernel refused a GSO message: datagrams
from then on), rx_errors, internal_errors, accel_steps (DATA blocks sent by the C engine's runs),
accel_runs (runs settled: the trips through Python between them).
Every transfer ends with one ``tftp.transfer`` log event.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from ..config import TftpConfig
from ..observability import LogLimiter, get_logger
from ..proto import tftp
from ..proto.tftp_session import ReadSession
from ..runtime_view import RuntimeView
from . import tftp_accel, tftp_dispatch
from .files import ReadAheadSource
from .io import ServiceIO, local_io
from .tftp_intake import IP_PKTINFO, Intake
from .tftp_ports import PortRegistry
from .tftp_pushers import PUSH_MIN_BYTES, Pushed
from .tftp_transfer import Transfer, status, summarize
from .timerheap import TimerHeap
from .udpport import SharedPort

__all__ = ["TftpService", "IP_PKTINFO"]


class TftpService:
    """TFTP read server (RFC 1350, 2347, 2348, 2349, 7440) driven by ``runtime``.

    ``io``: how files are opened (``await io.open_file(root, parts)``) and the
    listening socket bound; None: :func:`~sidusd.net.io.local_io`.
    """

    def __init__(self, runtime: RuntimeView, io: ServiceIO | None = None):
        self.runtime = runtime
        self.io = io if io is not None else local_io()
        self.log = get_logger("tftp")
        self.rlog = LogLimiter(self.log)      # every line a datagram can cause (issue 14 item 11)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._bound: tuple[str, int] | None = None
        self._transfers: dict[tuple[str, int], Transfer] = {}
        self._remote: dict[tuple[str, int], Pushed] = {}   # carried out by a pusher
        self.pushers = self.io.tftp_pushers     # tftp_pushers.Pool, or None: every byte here
        self._intake = Intake(self)
        self.ports = PortRegistry(self._count, self.log)
        self.timers = TimerHeap(self._on_timer)
        self._stopping = False
        self._idle = asyncio.Event()

    def _count(self, name: str, n: int = 1) -> None:
        self.runtime.observer.count(name, n)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "TftpService not started"
        return self._loop

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        """Bind the listening socket; raises :class:`StartupError` if it cannot."""
        self._loop = asyncio.get_running_loop()
        self.timers.loop = self._loop
        cfg = self.runtime.config.tftp
        addr = (str(cfg.address), int(cfg.port))
        sock = self.io.listener("tftp", addr[0], addr[1], rcvbuf=cfg.intake_queue * 512)
        self._sock = sock
        self._bound = sock.getsockname()
        self._loop.add_reader(sock.fileno(), self._on_request_readable)
        if self.pushers is not None:
            self.pushers.attach(self._loop, self.runtime.observer, self.log, self._pushed_ended)
        self.log.info("tftp.listening", address=self._bound[0], port=self._bound[1], root=str(cfg.root))

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting; let transfers in flight finish for up to ``grace_s``, then end them.

        A request admitted before the stop whose file is still being opened is a
        transfer in flight: it begins when the open completes (within the grace)."""
        self._stopping = True
        if self.pushers is not None:
            self.pushers.tell_stop(grace_s)
        if self._sock is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._sock.fileno())
            if not self._intake.pending:
                self._close_listener()
        if (self._transfers or self._remote or self._intake.pending) and grace_s > 0:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), grace_s)
            except TimeoutError:
                pass
        await self._intake.cancel_pending()
        self._close_listener()
        if self._loop is not None:
            now = self._loop.time()
            for t in list(self._transfers.values()):
                try:
                    tftp_accel.settle(t, self.runtime.observer.count)
                except Exception:
                    pass                        # the run is ended either way; the abort follows
                t.session.abort(now, "server shutting down")
                self._pump(t, now)
            self.ports.flush_all()
        self.timers.cancel()
        if self.pushers is not None:
            await self.pushers.finish()       # their last reports end what they carried
        if not self._transfers:
            self.ports.close_all()

    def serve_without_listener(self, loop: asyncio.AbstractEventLoop) -> None:
        """A pusher's service (:mod:`sidusd.net.tftp_pusher`): transfers begun by :meth:`adopt` only."""
        self._loop = loop
        self.timers.loop = loop

    def _close_listener(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def listeners(self) -> list[dict[str, Any]]:
        """Where this service listens (for ``sidusctl status``)."""
        if self._bound is None:
            return []
        return [{"proto": "udp", "service": "tftp", "address": self._bound[0], "port": self._bound[1]}]

    def active_transfers(self) -> int:
        """How many transfers are in flight (those of the pushers included)."""
        return len(self._transfers) + len(self._remote)

    def serving(self, peer: tuple[str, int]) -> bool:
        """Is a transfer to ``peer`` in flight, here or in a pusher?"""
        return peer in self._transfers or peer in self._remote

    def transfers(self) -> list[dict[str, Any]]:
        """The transfers in flight, for status displays (reads only: nothing is settled or ended)."""
        now = self._loop.time() if self._loop else 0.0
        return ([status(t, now, tftp_accel.bytes_acked(t)) for t in self._transfers.values()]
                + [p.status(now) for p in self._remote.values()])

    def _on_request_readable(self) -> None:
        self._intake.on_readable()

    # -- a transfer's life -----------------------------------------------------------
    def _begin(self, pkt: tftp.RRQ, peer: tuple[str, int], local: str, ifindex: int, name: str,
               source: Any, mac: str | None, cfg: TftpConfig) -> bool:
        """Negotiate and start the transfer of an admitted request (here, or in a pusher);
        False if it could not begin."""
        try:
            max_blk = int(cfg.max_blksize)
            if not cfg.fragment:        # one datagram per block: the arrival interface's MTU
                max_blk = min(max_blk, self.ports.mtu_for(ifindex, self.loop.time()) - 32)
            neg = tftp.negotiate(pkt.option_map, tftp.Limits(max_blk, int(cfg.max_windowsize), source.size))
        except OSError as exc:
            self._socket_failed(exc, source, peer, local, name)
            return False
        except BaseException:
            _close(source)
            raise
        params: dict[str, Any] = {"blksize": neg.blksize, "windowsize": neg.windowsize,
                  "timeout_s": neg.timeout_s or float(cfg.timeout_s), "retries": int(cfg.retries),
                  "oack": neg.oack, "max_silence_s": float(cfg.max_silence_s)}
        mac = mac or self.runtime.observer.mac_for_ip(peer[0])
        if self.pushers is not None and type(source) is ReadAheadSource and self._push(
                peer, local, name, source, mac, params):
            return True
        return self.adopt(peer, local, name, source, mac, **params) is not None

    def _push(self, peer: tuple[str, int], local: str, name: str, source: ReadAheadSource,
              mac: str | None, params: dict[str, Any]) -> bool:
        """Hand a file's transfer to the least loaded pusher (tftp_pushers.choose), if it is not us."""
        assert self.pushers is not None
        if source.size < PUSH_MIN_BYTES:
            return False
        here = sum(1 for t in self._transfers.values() if t.source.size >= PUSH_MIN_BYTES)
        p = self.pushers.offer(here, peer, local, name, mac, source.fd, source.size, params,
                               self.loop.time())
        if p is None:
            return False
        _close(source)                  # the pusher holds its own copy of the descriptor
        self._remote[peer] = p
        self._intake.admission.begun(p)             # type: ignore[arg-type]
        return True

    def _pushed_ended(self, p: Pushed) -> None:
        """A pusher's transfer ended (its counters and timeline entry are in already)."""
        if self._remote.get(p.peer) is p:
            del self._remote[p.peer]
            self._intake.admission.ended(p)         # type: ignore[arg-type]
            self._intake.release(p.peer[0])
        self._maybe_idle()

    def adopt(self, peer: tuple[str, int], local: str, name: str, source: Any, mac: str | None, *,
              blksize: int, windowsize: int, timeout_s: float, retries: int,
              oack: tuple[tuple[str, str], ...], max_silence_s: float) -> Transfer | None:
        """Start serving a negotiated transfer from this process's transfer socket of ``local``;
        None (``source`` closed, the peer refused) if it could not begin."""
        loop = self.loop
        try:
            session = ReadSession(source, blksize, windowsize, timeout_s, retries, oack, max_silence_s)
            port = self.ports.port_for(loop, local, self._on_port_readable)
        except OSError as exc:
            self._socket_failed(exc, source, peer, local, name)
            return None
        except BaseException:
            _close(source)
            raise
        t = Transfer(port, peer, local, name, session, source, mac, loop.time())
        self._transfers[peer] = t
        self._intake.admission.begun(t)
        self.ports.begun(port.local, t.key)
        port.owners[t.key] = t
        self.runtime.observer.count("tftp.transfers.started")
        now = loop.time()
        session.start(now)
        self._pump(t, now)
        port.flush()
        return t

    def _socket_failed(self, exc: OSError, source: Any, peer: tuple[str, int], local: str,
                       name: str) -> None:
        _close(source)
        self.rlog.error("tftp.socket_failed", error=exc.strerror or str(exc), local=local)
        self._intake.refuse(peer, local, tftp.ERR_UNDEFINED, "server error", "socket", name)

    def _evict(self, t: Transfer | Pushed, now: float) -> None:
        """End an unconfirmed transfer to make room for a new request (nothing sent to it)."""
        if type(t) is Pushed:
            assert self.pushers is not None
            self.pushers.evict(t)       # the pusher counts it (tftp.transfers.evicted)
            self._pushed_ended(t)
            return
        assert type(t) is Transfer
        tftp_accel.drop_run(t)
        t.port.drop_queued(t.dest)
        t.session.evict(now)
        self._finish(t, now)

    def _on_port_readable(self, port: SharedPort) -> None:
        tftp_dispatch.on_port_readable(self, port)

    def _internal_error(self, t: Transfer, now: float) -> None:
        """A bug of ours in one transfer: log it, end that transfer (ERROR 0), go on."""
        self.runtime.observer.count("tftp.internal_errors")
        self.rlog.exception("tftp.internal_error", file=t.file, peer=f"{t.peer[0]}:{t.peer[1]}")
        tftp_accel.drop_run(t)
        try:
            t.session.abort(now, "internal error")
            out = t.session.datagrams_to_send(now)
            if out:
                t.port.queue(out, t.dest)
        except Exception:
            pass
        self._finish(t, now)

    def _pump(self, t: Transfer, now: float) -> None:
        """Queue what the session wants sent (sent by the port's flush), re-arm its timer or finish it."""
        if t.finished:
            return
        session = t.session
        try:
            out = session.datagrams_to_send(now)
        except OSError as exc:      # the file could not be read any more
            self._read_error(t, exc, now)
            return
        if out:
            port = t.port
            if len(out) == 1:       # lockstep: one DATA per ACK
                port.queue_one(out[0], t.dest)
            else:
                port.queue(out, t.dest)
        if session.done:
            self._finish(t, now)
        else:
            d = session.next_timer()
            if d is not None and (t.heap_at is None or d < t.heap_at):
                self.timers.schedule(t, d)
            if t.port.accel and t.run is None:
                tftp_accel.plan(t)

    def _read_error(self, t: Transfer, exc: OSError, now: float) -> None:
        """The file could not be read any more: end the transfer with an ERROR."""
        self.rlog.warning("tftp.read_error", file=t.file, error=exc.strerror)
        t.session.abort(now, "read error")
        self._pump(t, now)

    def _on_timer(self, now: float) -> None:
        """The deadlines that came: settle runs, retransmit or time out (the session decides)."""
        timers = self.timers
        for t in timers.due(now):
            if t.finished:
                continue
            if t.run is not None:
                try:
                    tftp_accel.settle(t, self.runtime.observer.count)   # C's steps moved the deadline
                except Exception:
                    self._internal_error(t, now)
                    continue
            deadline = t.session.next_timer()
            if deadline is None:
                continue
            if deadline > now + timers.slack_s:     # moved later: one entry again
                timers.push(t, deadline)
                continue
            try:
                t.port.drop_queued(t.dest)      # a retransmission supersedes what is unsent
                t.session.handle_timer(max(now, deadline))
                self._pump(t, now)
            except Exception:
                self._internal_error(t, now)
        self.ports.flush_all()

    def _finish(self, t: Transfer, now: float) -> None:
        if t.finished:
            return
        t.finished = True                # what it queued (e.g. our final ERROR) is still sent
        tftp_accel.drop_run(t)
        port = t.port
        if port.owners.get(t.key) is t:
            del port.owners[t.key]
            if not port.owners:
                self.loop.call_soon(self.ports.release_if_idle, port)
        self.ports.ended(port.local, t.key, now)
        _close(t.source)
        self._transfers.pop(t.peer, None)
        self._intake.admission.ended(t)
        self._intake.release(t.peer[0])
        summarize(t, now, self.runtime.observer, self.rlog)
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        """Nothing in flight any more: tell a waiting stop(); when stopping, close the sockets."""
        if self._transfers or self._remote or self._intake.pending:
            return
        self._idle.set()
        if self._stopping:
            self.ports.flush_all()
            self.ports.close_all()


def _close(source: Any) -> None:
    """Close a transfer's source if it holds a file (rendered bytes hold nothing)."""
    close = getattr(source, "close", None)
    if close is not None:
        close()
