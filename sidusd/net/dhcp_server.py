"""The DHCP edge: UDP 67 and 4011 on each configured interface (RFC 2131 §4.1, PXE 2.1 §2.2).

Per interface, two sockets on ``0.0.0.0:<port>`` and ``0.0.0.0:<pxe_port>``
bound to the device (``SO_BINDTODEVICE``), so the interface a request came in
on is known without IP_PKTINFO and broadcast replies leave by that interface.
The server address (siaddr, option 54) is the interface's IPv4 address, read
with ``SIOCGIFADDR`` for every answered request, so an address change is seen.

Each datagram: decode (malformed: counted ``dhcp.malformed``, dropped), build a
:class:`~sidusd.boot.policy.BootRequest`, :func:`~sidusd.boot.policy.decide`
against the config and inventory read *now* from the runtime (they are swapped
whole on reload), then do what the decision says.  In full mode a lease to
journal (ACK, RELEASE, DECLINE) is applied at once (the next decision sees it)
and queued; one loop turn's queue is written to ``io.lease_journal`` with one
fsync (group commit) while the readers are paused, and only then do its ACKs
leave (a failed write rolls the turn back: no ACK).  A turn of only RELEASEs
and DECLINEs is not fsync'd (no answer waits; the next ACK's fsync carries it).
DECLINEs are limited per MAC and interface (:mod:`sidusd.boot.ratelimit`).
Nothing a peer sends can raise out of the reader.

Counters: ``dhcp.rx``, ``dhcp.malformed``, ``dhcp.offers``, ``dhcp.acks``,
``dhcp.naks``, ``dhcp.release``, ``dhcp.decline``, ``dhcp.drop.<code>``, ``dhcp.send_errors``,
``dhcp.lease_write_errors``, ``dhcp.lease_syncs``, ``dhcp.lease_unsynced_groups``, ``dhcp.errors``.
Log events: ``dhcp.listening``, ``dhcp.reply``, ``dhcp.lease`` (rate limited),
``dhcp.drop`` (debug), ``dhcp.malformed`` (rate limited); every line a packet can cause is
rate-limited (``LogLimiter``, or ``RepeatBackoff`` with ``suppressed=``), ``dhcp.lease_write_failed``
(rate limited), ``dhcp.leases.loaded`` (a warning if lines were refused), ``dhcp.error``, ``dhcp.stopped``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Coroutine
from typing import Any

from sidusd.boot import claims, policy
from sidusd.boot.inventory import BootTarget, Inventory
from sidusd.boot.leases import NO_RESERVATIONS, Lease, LeaseDB, Reservations
from sidusd.boot.ratelimit import DeclineLimiter
from sidusd.config import PoolConfig
from sidusd.errors import RemoteProtocolError, SidusError, StartupError
from sidusd.net.dhcp_records import Listener, Pending, replace_lease_file
from sidusd.net.io import LeaseJournal, ServiceIO, local_io
from sidusd.net.listeners import check_interface, interface_ipv4
from sidusd.net.unanswered import UNANSWERED, UnansweredLog
from sidusd.observability import LogLimiter, RepeatBackoff, get_logger
from sidusd.proto import dhcp
from sidusd.runtime_view import RuntimeView

RECV_SIZE = 4096                # larger than any DHCP message a client may send (RFC 2131 §2)
BATCH = 64                      # datagrams read per wake-up before yielding to the loop
MALFORMED_LOG_INTERVAL_S = 10.0
LEASE_LOG_FIRST_S, LEASE_LOG_MAX_S = 1.0, 10.0      # dhcp.lease: then at most one line per 10 s


class DhcpService:
    """proxyDHCP / full DHCP on the interfaces of ``runtime.config.dhcp``."""

    def __init__(self, runtime: RuntimeView, io: ServiceIO | None = None):
        self.runtime = runtime
        self.io = io if io is not None else local_io()
        self.log = get_logger("dhcp")
        self.rlog = LogLimiter(self.log)          # every line a packet can cause (issue 14 item 11)
        self._listeners: list[Listener] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._db: LeaseDB | None = None
        self._pool: PoolConfig | None = None
        self._store: LeaseJournal | None = None
        self._res_for: Inventory | None = None
        self._res = Reservations({}, {})
        self._malformed = RepeatBackoff(MALFORMED_LOG_INTERVAL_S, MALFORMED_LOG_INTERVAL_S)
        self._unanswered = UnansweredLog()        # machines that got no answer (sidusctl clients)
        self._file_warned = False
        self._lease_log = RepeatBackoff(LEASE_LOG_FIRST_S, LEASE_LOG_MAX_S)
        self._write_log = RepeatBackoff(MALFORMED_LOG_INTERVAL_S, MALFORMED_LOG_INTERVAL_S)
        self._declines = DeclineLimiter()
        self._writing: asyncio.Task | None = None     # a lease group being journaled: readers paused
        self._group: list[Pending] = []              # lease changes of this loop turn, applied, not on disk
        self._flush_at: asyncio.Handle | None = None

    # -- life cycle -----------------------------------------------------------
    async def start(self) -> None:
        """Open the lease journal (full mode) and bind every socket.  StartupError if not."""
        cfg = self.runtime.config.dhcp
        if cfg.mode == "off":
            return
        self._loop = asyncio.get_running_loop()
        if cfg.mode == "full":
            assert cfg.pool is not None         # config.read refuses full mode without a pool
            await self._open_leases(cfg.pool)
        try:
            for iface in cfg.interfaces:
                address = check_interface(iface)
                for via, port in ((policy.VIA_DHCP, cfg.port), (policy.VIA_PXE, cfg.pxe_port)):
                    sock = self.io.listener("dhcp", "0.0.0.0", port, iface)
                    lst = Listener(iface, via, port, sock, address)
                    self._listeners.append(lst)
                    self._loop.add_reader(sock.fileno(), self._on_readable, lst)
                    self.log.info("dhcp.listening", interface=iface, port=port, address=address,
                                  mode=cfg.mode)
        except BaseException:
            await self.stop()
            raise

    async def _open_leases(self, pool: PoolConfig) -> None:
        db = LeaseDB.for_pool(pool)
        store = self.io.lease_journal(pool.lease_file)
        try:
            good, bad = await store.load(db)
        except OSError as exc:
            raise StartupError(f"dhcp: lease file {pool.lease_file}: {exc.strerror}") from None
        self._db, self._store, self._pool = db, store, pool
        # a refused record may be a lease someone holds: a warning, with what was refused
        fields = dict(file=str(pool.lease_file), lines=good, refused=bad, leases=len(db),
                      first_refused=[f"line {n}: {why}" for n, why in getattr(store, "refused", [])])
        if bad:
            self.log.warning("dhcp.leases.loaded", **fields)
        else:
            self.log.info("dhcp.leases.loaded", **fields)

    async def stop(self) -> None:
        """Close every socket and the lease journal (after the lease being written, if any)."""
        listeners, self._listeners = self._listeners, []
        for lst in listeners:
            if self._loop is not None:
                self._loop.remove_reader(lst.sock.fileno())
        if self._writing is not None:
            await asyncio.wait({self._writing})
        self._flush()                            # the turn's lease changes, if any
        if self._writing is not None:
            await asyncio.wait({self._writing})
        for lst in listeners:
            lst.sock.close()
        if listeners:
            self.log.info("dhcp.stopped")
        if self._store is not None:
            self._store.close()
            self._store = None

    def listeners(self) -> list[dict]:
        """What is bound, for status: one dict per socket."""
        return [{"service": "dhcp", "proto": "udp", "port": l.port, "interface": l.iface,
                 "address": l.address} for l in self._listeners]

    def leases(self) -> list[dict]:
        """The lease table (full mode), for status and ``sidusctl``."""
        if self._db is None:
            return []
        return [{"ip": str(l.ip), "mac": l.mac, "state": l.state, "expires": l.expires}
                for l in self._db.leases()]

    # -- receiving --------------------------------------------------------------
    def _on_readable(self, lst: Listener) -> None:
        for _ in range(BATCH):
            if self._writing is not None:
                return                           # paused: read on once the lease is on disk
            try:
                data, addr = lst.sock.recvfrom(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.runtime.observer.count("dhcp.recv_errors")
                self.rlog.warning("dhcp.recv_error", interface=lst.iface, error=str(exc))
                return
            self.datagram_received(lst, data, addr)

    def datagram_received(self, lst: Listener, data: bytes, addr: tuple[str, int]) -> None:
        """Handle one datagram; never raises."""
        obs = self.runtime.observer
        obs.count("dhcp.rx")
        try:
            pkt = dhcp.decode(data)
        except RemoteProtocolError as exc:
            obs.count("dhcp.malformed")
            self._log_malformed(lst, addr, exc)
            return
        try:
            self._serve(lst, pkt, addr)
        except Exception as exc:  # a bug must not stop the reader
            self._error(lst, pkt, exc)

    def _error(self, lst: Listener, pkt: dhcp.DhcpPacket, exc: Exception) -> None:
        """Count and log a bug met serving ``pkt`` (called in the ``except`` block)."""
        self.runtime.observer.count("dhcp.errors")
        self.rlog.exception("dhcp.error", mac=pkt.mac, xid=pkt.xid, port=lst.port, error=repr(exc))

    def _hold(self, lst: Listener, pkt: dhcp.DhcpPacket, write: Coroutine[Any, Any, None]) -> None:
        """Run ``write`` (journal, then answer) with every reader paused: requests wait in the kernel."""
        loop = self._loop
        assert loop is not None
        paused = list(self._listeners)
        for l in paused:
            loop.remove_reader(l.sock.fileno())

        async def run() -> None:
            try:
                await write
            except Exception as exc:  # a bug must not stop the service
                self._error(lst, pkt, exc)
            finally:
                self._writing = None
                for l in paused:
                    if l in self._listeners:     # not stopped meanwhile
                        loop.add_reader(l.sock.fileno(), self._on_readable, l)

        self._writing = loop.create_task(run())

    def _log_malformed(self, lst: Listener, addr: tuple[str, int], exc: Exception) -> None:
        if not self._malformed.failed("", time.monotonic()):
            return
        self.log.warning("dhcp.malformed", peer=f"{addr[0]}:{addr[1]}", port=lst.port,
                         interface=lst.iface, error=str(exc), suppressed=self._malformed.take_suppressed())

    # -- deciding and acting -------------------------------------------------------
    def _reservations(self, inventory: Inventory) -> Reservations:
        if inventory is not self._res_for:
            hosts = getattr(inventory, "hosts", {}) or {}
            self._res = Reservations.from_pairs(
                (mac, getattr(h, "ip", None)) for mac, h in hosts.items())
            self._res_for = inventory
        return self._res

    def _lease_db(self, pool: PoolConfig | None) -> LeaseDB | None:
        """The DB for the current pool; rebuilt (same journal) if a reload changed the range."""
        if self._db is None or self._pool is None or pool is None:   # _db and _pool are set together
            return self._db
        kept = replace_lease_file(pool, self._pool.lease_file)   # the open journal stays
        if pool.lease_file != self._pool.lease_file and not self._file_warned:
            self._file_warned = True
            self.log.warning("dhcp.lease_file_changed", old=str(self._pool.lease_file),
                             new=str(pool.lease_file), note="restart sidusd to use the new file")
        if kept != self._pool and not self._db.in_transaction:    # not with a group pending
            db = LeaseDB.for_pool(kept)
            db.replay(self._db.journal_lines(time.time()))
            self._db, self._pool = db, kept
            self.log.info("dhcp.pool_changed", network=str(kept.network), leases=len(db))
        return self._db

    def _serve(self, lst: Listener, pkt: dhcp.DhcpPacket, addr: tuple[str, int]) -> None:
        """Decide; act at once, or queue the lease to journal with this turn's (then act)."""
        rt = self.runtime
        snap = getattr(rt, "snapshot", None)
        config = snap.config if snap is not None else rt.config
        inventory = snap.inventory if snap is not None else rt.inventory
        try:
            server_ip = interface_ipv4(lst.iface)
        except OSError:
            self._drop(lst, pkt, policy.Drop("no_address", f"{lst.iface} has no IPv4 address now"))
            return
        lst.address = str(server_ip)
        req = policy.BootRequest.from_packet(pkt, lst.via, server_ip, addr)

        def lookup(mac: str) -> BootTarget | None:
            try:
                return inventory.resolve(mac, config)
            except SidusError:
                return None

        now = time.time()
        db = self._lease_db(config.dhcp.pool) if config.dhcp.mode == "full" else None
        res = self._reservations(inventory) if db is not None else NO_RESERVATIONS
        decision = policy.decide(req, config, lookup, leases=db, reservations=res, now=now)
        if isinstance(decision, policy.Drop):
            if decision.code in UNANSWERED:
                self._note_unanswered(req, decision, now)
            self._drop(lst, pkt, decision)
            return
        lease = decision.lease
        if lease is not None and self._db is not None and lease.state != "offered" and self._store is not None:
            if isinstance(decision, policy.LeaseChange) and decision.event == "decline" \
                    and not self._declines.allow(req.mac, lst.iface, time.monotonic()):
                self._drop(lst, pkt, policy.Drop("decline_rate", "too many DECLINEs (per MAC or interface)"))
                return
            self._queue(Pending(lst, pkt, req, decision, now))
            return
        self._act(lst, pkt, req, decision, now)

    def _queue(self, p: Pending) -> None:
        """Apply ``p``'s lease now (the next decision sees it); journaled with the turn's (_flush)."""
        assert self._db is not None and self._loop is not None and p.decision.lease is not None
        self._db.begin()
        self._db.apply(p.decision.lease)
        self._group.append(p)
        if self._flush_at is None:
            self._flush_at = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Journal the turn's group (readers paused meanwhile), then act on it."""
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        group, self._group = self._group, []
        if group:
            self._hold(group[0].lst, group[0].pkt, self._commit(group))

    async def _commit(self, group: list[Pending]) -> None:
        """One write (and one fsync if an ACK waits) for ``group``; no ACK for a lease not on disk."""
        assert self._store is not None and self._db is not None   # see _serve
        obs = self.runtime.observer
        sync = any(isinstance(p.decision, policy.Reply) for p in group)
        try:
            await self._store.append_many([p.decision.lease for p in group], sync=sync)
        except BaseException as exc:          # a failed write (or a bug, or cancel): nothing stays
            self._db.rollback()
            if not isinstance(exc, OSError):
                raise
            obs.count("dhcp.lease_write_errors", len(group))
            if self._write_log.failed("", time.monotonic()):
                self.log.error("dhcp.lease_write_failed", leases=len(group), mac=group[0].req.mac,
                               error=str(exc), file=str(self._store.path),
                               suppressed=self._write_log.take_suppressed())
            return
        self._db.commit()
        obs.count("dhcp.lease_syncs" if sync else "dhcp.lease_unsynced_groups")
        for p in group:
            self._act(p.lst, p.pkt, p.req, p.decision, p.now, applied=True)
        try:
            self._store.maybe_compact(self._db, group[-1].now)
        except OSError as exc:
            self.rlog.error("dhcp.lease_compact_failed", error=str(exc))

    def _act(self, lst: Listener, pkt: dhcp.DhcpPacket, req: policy.BootRequest,
             decision: policy.Reply | policy.LeaseChange, now: float, applied: bool = False) -> None:
        """Do what ``decision`` says (its lease already applied if ``applied``: a journaled group)."""
        if isinstance(decision, policy.LeaseChange):
            if applied or self._apply(decision.lease):
                obs = self.runtime.observer
                obs.count(f"dhcp.{decision.event}")
                obs.timeline(req.mac, f"dhcp.{decision.event}", ip=str(decision.lease.ip))
                # "change", not "event": structlog's first argument is the event (issue 14 item 3)
                if self._lease_log.failed("", time.monotonic()):
                    self.log.info("dhcp.lease", mac=req.mac, xid=pkt.xid, change=decision.event,
                                  ip=str(decision.lease.ip), suppressed=self._lease_log.take_suppressed())
        else:
            self._reply(lst, req, decision, applied)

    def _apply(self, lease: Lease) -> bool:
        """Apply an offer (memory only).  False without a lease table."""
        if self._db is None:
            return False
        self._db.apply(lease)
        return True

    def _reply(self, lst: Listener, req: policy.BootRequest, reply: policy.Reply, applied: bool) -> None:
        obs = self.runtime.observer
        if reply.lease is not None and not applied and not self._apply(reply.lease):
            return
        try:
            data = dhcp.encode(reply.packet)
            lst.sock.sendto(data, reply.dest)
        except OSError as exc:
            obs.count("dhcp.send_errors")
            self.rlog.warning("dhcp.send_failed", mac=req.mac, dest=f"{reply.dest[0]}:{reply.dest[1]}",
                              error=str(exc))
            return
        self._unanswered.answered(req.mac)
        obs.count({"offer": "dhcp.offers", "ack": "dhcp.acks", "nak": "dhcp.naks"}[reply.kind])
        p = reply.packet
        ip = p.yiaddr if p.yiaddr != policy.ZERO else req.packet.ciaddr
        if p.yiaddr == policy.ZERO and ip != policy.ZERO and self._db is not None and not claims.pxe_claim(
                str(ip), self._db.by_mac(req.mac), time.time()):    # full mode: the lease table decides
            obs.claim_attempt(req.mac, str(ip))
            ip = policy.ZERO
        # The firmware type only means something for PXE clients (a booted kernel's
        # DHCP client sends no option 93 and must not overwrite it with "bios").
        obs.client_seen(req.mac, str(ip) if ip != policy.ZERO else None,
                        req.arch_name if req.pxe else None)
        obs.timeline(req.mac, f"dhcp.{reply.kind}", file=reply.boot_file, server=str(req.server_ip),
                     port=lst.port, ip=str(p.yiaddr) if p.yiaddr != policy.ZERO else None)
        self.rlog.info("dhcp.reply", key=req.mac, mac=req.mac, xid=p.xid, port=lst.port,
                       file=reply.boot_file, kind=reply.kind, arch=req.arch_name if req.pxe else None,
                       ip=str(p.yiaddr), dest=f"{reply.dest[0]}:{reply.dest[1]}", interface=lst.iface)

    def _note_unanswered(self, req: policy.BootRequest, drop: policy.Drop, now: float) -> None:
        """A booting machine got no answer: for ``sidusctl clients`` and the log (info, rate-limited)."""
        suppressed = self._unanswered.note(req.mac, drop.code, now)
        if suppressed is None:
            return
        obs = self.runtime.observer
        arch = req.arch_name if req.pxe else None
        obs.client_seen(req.mac, None, arch)
        obs.timeline(req.mac, "dhcp.unanswered", code=drop.code, reason=drop.detail)
        self.log.info("dhcp.unanswered", mac=req.mac, arch=arch, code=drop.code, reason=drop.detail,
                      suppressed=suppressed)

    def _drop(self, lst: Listener, pkt: dhcp.DhcpPacket, drop: policy.Drop) -> None:
        obs = self.runtime.observer
        obs.count(f"dhcp.drop.{drop.code}")
        if drop.seen_ip is not None:
            obs.client_seen(pkt.mac, str(drop.seen_ip))
            server = pkt.option(dhcp.OPT_SERVER_ID)
            obs.timeline(pkt.mac, "dhcp.site_request", ip=str(drop.seen_ip),
                         server=str(ipaddress.IPv4Address(server)) if server else None)
        self.rlog.debug("dhcp.drop", mac=pkt.mac, xid=pkt.xid, port=lst.port, code=drop.code,
                       detail=drop.detail)
