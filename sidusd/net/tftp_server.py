"""The TFTP edge: sockets and timers around :mod:`sidusd.proto.tftp_session`.

* One listening socket on ``tftp.address:tftp.port`` read with ``recvmsg`` and
  ``IP_PKTINFO``: the local address a request arrived on becomes the server IP
  of rendered configs and the address its transfer is served from; the
  interface index gives the MTU that caps ``blksize`` (MTU - 32).
* **One transfer socket per local address** (:class:`~sidusd.net.udpport.SharedPort`,
  bound to ``(local address, 0)``), shared by every transfer from that
  address.  RFC 1350 section 4 identifies a transfer by both ends, so the
  peer's address and port tell transfers apart, as with dnsmasq's
  ``--tftp-single-port``.  A datagram from a peer with no transfer there is a
  wrong TID: ERROR 5 to it, nothing else touched; one from a peer whose
  transfer just ended (a late duplicate ACK) is dropped and counted ``late``.
  The socket is closed once it serves no transfer (the next one opens another).
* A readable transfer socket is drained with ``recvmmsg`` (up to ``_RX_BATCH``
  datagrams per call, at most ``_RX_ROUNDS`` calls per loop turn); an ACK
  (4 bytes) is handed to ``ReadSession.receive_ack`` without building an
  object; everything the sessions release during the turn is sent with one
  ``sendmmsg`` per ``_TX_BATCH`` messages (:mod:`sidusd.net.mmsg`); a window
  for one client is one UDP GSO message the kernel cuts into its DATA
  datagrams.  Only what the kernel refuses is queued (bounded outbox,
  ``add_writer``).
* With the C lockstep engine (``SharedPort.accel``, :mod:`sidusd.net._lockstep`),
  a transfer in lockstep gets a *run*: its session decides the next ~64 KiB of
  steps in advance (``ReadSession.lockstep_run``) and C takes them as the ACKs
  arrive, without returning to Python per ACK.  Whatever else arrives comes
  back in order; before its transfer handles it (or its timer fires, or it
  ends) the run is *settled*: the session hears how many steps were taken
  (``lockstep_advance``).  The ACK that ends a run begins the next one, with one
  read for all of it.
* Files are read through :class:`~sidusd.net.files.ReadAheadSource`: one
  ``pread`` per 64 KiB, not per block.
* One timer for all transfers: a heap of deadlines (at most one live entry per
  transfer) and one ``loop.call_at`` re-armed to the earliest.
* Bounded: ``max_transfers`` in all, ``max_transfers_per_client`` per client IP
  (refused with an ERROR and counted), at most ``_BATCH`` requests read from
  the listening socket per loop turn, the listening socket's receive buffer
  sized for ``intake_queue`` requests, at most ``_MAX_PORTS`` local addresses,
  the recently-ended table ``_RECENT_MAX`` entries for ``_RECENT_S`` seconds.
* A transfer keeps its descriptor (or rendered bytes) and its negotiated
  parameters: a config reload never changes a transfer in flight.

Counters (``tftp.``): rx, malformed, unexpected, duplicate_rrq, wrong_tid, late,
refused.<write|mode|busy|per_client|name|not_found|access|render|socket|stopping|
netascii_size|read>,
transfers.started/done/failed/probe, rx_batches (recvmmsg calls that returned datagrams:
rx / rx_batches is the batch size), retransmits, bytes, send_errors, send_blocked
(the kernel send buffer was full; the rest waits for add_writer), send_dropped
(the outbox was full), gso_off (the kernel refused a GSO message: datagrams
from then on), rx_errors, internal_errors, accel_steps (DATA sent by the C engine's runs).
Every transfer ends with one ``tftp.transfer`` log event.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import os
import socket
import struct
from typing import Any

from ..boot import content
from ..errors import RemoteProtocolError, StartupError
from ..observability import get_logger
from ..proto import tftp
from ..proto.tftp_session import BytesSource, LockstepRun, ReadSession
from . import mmsg, udpport
from .files import FileSource, NotServable, ReadAheadSource, open_confined
from .io import ServiceIO, local_io
from .udpport import SharedPort

_lockstep = udpport._lockstep

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)        # Linux value
_PKTINFO = struct.Struct("=i4s4s")                    # struct in_pktinfo
_CMSG_LEN = socket.CMSG_SPACE(_PKTINFO.size)
_BATCH = 64                 # requests read from the listening socket per loop turn
_RECV_MAX = 2048            # requests are <= 512 bytes (RFC 2347); ACKs 4
_MAX_REQUEST = 1024         # a bigger "request" is refused as malformed
NETASCII_MAX = 16 << 20     # netascii is converted in memory: bounded
_MTU_TTL_S = 30.0
_TIMER_SLACK_S = 1e-3
_RX_BATCH = 64              # datagrams per recvmmsg on a transfer socket
_RX_ROUNDS = 8              # recvmmsg calls per transfer socket per loop turn
_TX_BATCH = 256             # datagrams per sendmmsg
_MAX_PORTS = 64             # local addresses with a transfer socket
_RECENT_S = 10.0            # a peer whose transfer ended: its late datagrams are dropped
_RECENT_MAX = 4096
_OP_ACK = 4
_RUN_BYTES = 64 * 1024      # DATA per lockstep run handed to C (about the read-ahead: one pread)


class _Transfer:
    __slots__ = ("port", "peer", "key", "dest", "local", "file", "session", "source", "mac",
                 "heap_at", "finished", "run", "plan")

    def __init__(self, port: SharedPort, peer: tuple[str, int], local: str, file: str,
                 session: ReadSession, source: Any, mac: str | None):
        self.port, self.peer, self.local = port, peer, local
        self.key = mmsg.peer_key(peer)
        self.dest = mmsg.Peer(self.key)
        self.file, self.session, self.source, self.mac = file, session, source, mac
        self.heap_at: float | None = None
        self.finished = False
        self.run: Any = None            # its _lockstep.Run while C may take its steps
        self.plan: LockstepRun | None = None    # what that run carries out (the session's decision)


class TftpService:
    """TFTP read server (RFC 1350, 2347, 2348, 2349, 7440) driven by ``runtime``."""

    def __init__(self, runtime: Any, io: ServiceIO | None = None):
        self.runtime = runtime
        self.io = io if io is not None else local_io()
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
        self._ports: dict[str, SharedPort] = {}         # local address -> its transfer socket
        self._recent: collections.OrderedDict[tuple[str, bytes], float] = collections.OrderedDict()
        self._stopping = False
        self._idle = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        """Bind the listening socket; raises :class:`StartupError` if it cannot."""
        self._loop = asyncio.get_running_loop()
        cfg = self.runtime.config.tftp
        addr = (str(cfg.address), int(cfg.port))
        sock = self.io.listener("tftp", addr[0], addr[1], rcvbuf=cfg.intake_queue * 512)
        self._sock = sock
        self._bound = sock.getsockname()
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
                try:
                    self._settle(t)
                except Exception:
                    pass                        # the run is ended either way; the abort follows
                t.session.abort(now, "server shutting down")
                self._pump(t, now)
            self._flush_ports()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._transfers:
            self._close_ports()

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
        for t in self._transfers.values():
            try:
                self._sync(t)           # progress C made, without ending its run
            except ValueError:
                pass
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
            source = ReadAheadSource(fd, size)
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
        try:
            port = self._port_for(local)
        except OSError as exc:
            if isinstance(source, FileSource):
                source.close()
            self.log.error("tftp.socket_failed", error=exc.strerror or str(exc), local=local)
            return self._refuse(peer, local, tftp.ERR_UNDEFINED, "server error", "socket", name)
        t = _Transfer(port, peer, local, name, session, source, mac or self.runtime.observer.mac_for_ip(peer[0]))
        self._transfers[peer] = t
        self._recent.pop((port.local, t.key), None)
        port.owners[t.key] = t
        self._per_client[peer[0]] += 1
        self.runtime.observer.count("tftp.transfers.started")
        now = self._loop.time()
        session.start(now)
        self._pump(t, now)
        port.flush()

    def _port_for(self, local: str) -> SharedPort:
        """The transfer socket of ``local`` (made on first use); raises OSError."""
        port = self._ports.get(local)
        if port is None or port.closed:
            if len(self._ports) >= _MAX_PORTS:
                raise OSError(0, f"more than {_MAX_PORTS} local addresses")
            assert self._loop is not None
            port = SharedPort(self._loop, local, self.runtime.observer.count,
                              rx_capacity=_RX_BATCH, tx_capacity=_TX_BATCH,
                              accel=udpport.accel_enabled())
            port.start_reading(self._on_port_readable, port)
            self._ports[local] = port
            self.log.info("tftp.transfer_socket", local=local, port=port.address[1],
                          sndbuf=port.sndbuf, rcvbuf=port.rcvbuf, batched=mmsg.AVAILABLE,
                          accel=port.accel)
        return port

    def _release_if_idle(self, port: SharedPort) -> None:
        """Close a transfer socket that serves no transfer any more (after sending what is queued)."""
        if port.owners or port.closed:
            return
        port.flush()
        port.close()
        if self._ports.get(port.local) is port:
            del self._ports[port.local]
        for k in [k for k in self._recent if k[0] == port.local]:
            del self._recent[k]

    def _flush_ports(self) -> None:
        for port in self._ports.values():
            port.flush()

    def _close_ports(self) -> None:
        for port in self._ports.values():
            port.close()
        self._ports.clear()

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
    def _on_port_readable(self, port: SharedPort) -> None:
        """Drain a transfer socket in batches; send what the sessions release, batched too."""
        if port.closed:
            return
        obs = self.runtime.observer
        now = self._loop.time()             # type: ignore[union-attr]
        rx = calls = 0
        try:
            if port.accel:
                # C takes the lockstep steps of the runs (no Python per ACK); the rest is ours
                rest, rx, calls, err = port.pump(now, _RX_ROUNDS)
                if err:
                    obs.count("tftp.rx_errors")
                    self.log.warning("tftp.rx_error", error=os.strerror(err))
                if rest:
                    self._dispatch(port, rest, now)
                    port.flush()
                return
            for _ in range(_RX_ROUNDS):
                try:
                    batch = port.recv()
                except OSError as exc:
                    obs.count("tftp.rx_errors")
                    self.log.warning("tftp.rx_error", error=exc.strerror)
                    break
                if not batch:
                    break
                rx += len(batch)
                calls += 1
                self._dispatch(port, batch, now)
                if port.closed:
                    break
                port.flush()
                # no break on a short batch: ACKs that arrived while this one was served are
                # read now, not after a trip through the event loop (measured: ~10 % less user
                # CPU per GB in a 32-client lockstep storm; an empty read costs one system call)
        finally:
            if rx:
                obs.count("tftp.rx", rx)
                obs.count("tftp.rx_batches", calls)

    def _dispatch(self, port: SharedPort, batch: list[tuple[bytes, bytes, bool]], now: float) -> None:
        """Hand each datagram to its transfer; what they release joins the port's batch."""
        obs = self.runtime.observer
        transfers = port.owners
        payloads, peers = port.pending()
        accel = port.accel
        for data, key, trunc in batch:
            t = transfers.get(key)
            if t is None:
                self._stranger(port, data, key)
                continue
            try:
                if t.run is not None:
                    self._settle(t)         # the session hears of the steps C took first
                if len(data) == 4 and data[1] == _OP_ACK and data[0] == 0:
                    block = (data[2] << 8) | data[3]
                    if accel and self._step_into_run(t, block, now, payloads, peers):
                        continue            # a new run began with this ACK (one read for it all)
                    try:
                        out = t.session.ack_lockstep(block, now)
                    except OSError as exc:      # the file could not be read any more
                        self._read_error(t, exc, now)
                        continue
                    if out is not None:     # lockstep: the next DATA, nothing else to do
                        payloads.append(out)
                        peers.append(t.dest)
                        if t.heap_at is None:
                            self._schedule(t, t.session.next_timer())
                        continue
                    t.session.receive_ack(block, now)
                else:
                    if trunc:
                        obs.count("tftp.malformed")
                        continue
                    try:
                        pkt = tftp.decode(data)
                    except RemoteProtocolError:
                        obs.count("tftp.malformed")
                        continue
                    t.session.receive(pkt, now)
                self._pump(t, now)
            except Exception:
                self._internal_error(t, now)

    # -- lockstep runs (the C accelerator) ---------------------------------------
    def _plan(self, t: _Transfer, taken: int = 0) -> LockstepRun | None:
        """Give C the transfer's next lockstep steps, decided by its session (accel ports only).

        ``taken``: the first steps were taken here already (C starts after them).
        """
        try:
            plan = t.session.lockstep_run(_RUN_BYTES)
        except OSError:
            return None             # no run: the next ACK meets the read error on the Python path
        if plan is None:
            return None
        t.plan = plan
        t.run = _lockstep.Run(plan.ack, plan.data, plan.blksize, plan.count, t.dest, taken)
        t.port.runs[t.key] = t.run
        return plan

    def _step_into_run(self, t: _Transfer, block: int, now: float, payloads: list,
                       peers: list) -> bool:
        """The ACK of the block in flight (the one that ended C's last run): begin the next run
        with its first step, taken here.  One read serves the run, first block included."""
        session = t.session
        if not session.lockstep_awaits(block):
            return False
        plan = self._plan(t, taken=1)
        if plan is None:
            return False
        payloads.append(plan.datagram(0))
        peers.append(t.dest)
        session.lockstep_advance(plan, 1, now)
        if t.heap_at is None:
            self._schedule(t, session.next_timer())
        return True

    def _sync(self, t: _Transfer) -> None:
        """Tell the session how far C went with its run (the run goes on)."""
        run = t.run
        if run is not None and run.used:
            t.session.lockstep_advance(t.plan, run.used, run.at)

    def _settle(self, t: _Transfer) -> None:
        """Tell the session how far C went with its run, and end the run."""
        run = t.run
        if run is None:
            return
        try:
            self._sync(t)
        finally:
            self._drop_run(t)                   # ended even if the session refused the report
        if run.used:
            self.runtime.observer.count("tftp.accel_steps", run.used)

    def _drop_run(self, t: _Transfer) -> None:
        if t.run is not None:
            if t.port.runs.get(t.key) is t.run:
                del t.port.runs[t.key]
            t.run = None
        t.plan = None

    def _stranger(self, port: SharedPort, data: bytes, key: bytes) -> None:
        """A datagram from a peer with no transfer on this socket."""
        obs = self.runtime.observer
        recent = self._recent.get((port.local, key))
        if recent is not None and recent > self._loop.time():    # type: ignore[union-attr]
            obs.count("tftp.late")          # e.g. a duplicated last ACK: no ERROR to a finished peer
            return
        # RFC 1350 section 4: wrong TID -> ERROR 5 to that port, no transfer touched.
        obs.count("tftp.wrong_tid")
        port.send_now(tftp.error_packet(tftp.ERR_UNKNOWN_TID, "unknown transfer ID"), mmsg.peer_addr(key))

    def _internal_error(self, t: _Transfer, now: float) -> None:
        """A bug of ours in one transfer: log it, end that transfer (ERROR 0), go on."""
        self.runtime.observer.count("tftp.internal_errors")
        self.log.exception("tftp.internal_error", file=t.file, peer=f"{t.peer[0]}:{t.peer[1]}")
        self._drop_run(t)
        try:
            t.session.abort(now, "internal error")
            out = t.session.datagrams_to_send(now)
            if out:
                t.port.queue(out, t.dest)
        except Exception:
            pass
        self._finish(t, now)

    def _pump(self, t: _Transfer, now: float) -> None:
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
                self._schedule(t, d)
            if t.port.accel and t.run is None:
                self._plan(t)

    def _read_error(self, t: _Transfer, exc: OSError, now: float) -> None:
        """The file could not be read any more: end the transfer with an ERROR."""
        self.log.warning("tftp.read_error", file=t.file, error=exc.strerror)
        t.session.abort(now, "read error")
        self._pump(t, now)

    # -- the one timer ---------------------------------------------------------
    def _schedule(self, t: _Transfer, d: float) -> None:
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
            if t.finished:
                continue
            if t.run is not None:
                try:
                    self._settle(t)             # C's steps moved the deadline: the session knows
                except Exception:
                    self._internal_error(t, now)
                    continue
            deadline = t.session.next_timer()
            if deadline is None:
                continue
            if deadline > now + _TIMER_SLACK_S:     # moved later: one entry again
                t.heap_at = deadline
                heapq.heappush(self._heap, (deadline, next(self._seq), t))
                continue
            try:
                t.port.drop_queued(t.dest)      # a retransmission supersedes what is unsent
                t.session.handle_timer(max(now, deadline))
                self._pump(t, now)
            except Exception:
                self._internal_error(t, now)
        self._flush_ports()
        self._arm()

    # -- the end -----------------------------------------------------------------
    def _finish(self, t: _Transfer, now: float) -> None:
        if t.finished:
            return
        t.finished = True                # what it queued (e.g. our final ERROR) is still sent
        self._drop_run(t)
        assert self._loop is not None
        port = t.port
        if port.owners.get(t.key) is t:
            del port.owners[t.key]
            if not port.owners:
                self._loop.call_soon(self._release_if_idle, port)
        recent = self._recent
        recent[(port.local, t.key)] = now + _RECENT_S
        recent.move_to_end((port.local, t.key))
        while len(recent) > _RECENT_MAX or (recent and next(iter(recent.values())) <= now):
            recent.popitem(last=False)
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
            if self._stopping:
                self._flush_ports()
                self._close_ports()
