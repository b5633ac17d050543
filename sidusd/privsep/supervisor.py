"""The root side of the split: sockets, state, and the worker's life.

:func:`serve` replaces :func:`sidusd.daemon.serve` when ``security.privsep``
is true.  The supervisor never parses a packet: it binds the listeners, runs
the control socket (0600) and the storage backends, writes every state file,
and answers the worker's messages -- all of them checked by
:func:`sidusd.privsep.ipc.decode_worker` / :func:`~sidusd.privsep.ipc.decode_rpc`,
refused ones dropped and counted (``privsep.refused.<reason>``).

Counters (``privsep.``): worker_starts, worker_restarts, worker_msgs,
refused.<oversized|empty|bad_json|unknown_type|bad_field>, rpc.open,
rpc.lease_append, rpc.errors, sync_timeouts, events_dropped, worker_killed.
Log events: ``privsep.listening``, ``privsep.worker_started``,
``privsep.worker_exited``, ``privsep.worker_failed``,
``privsep.message_refused`` (rate limited), ``privsep.worker_privileged``.
"""

from __future__ import annotations

import array
import asyncio
import dataclasses
import errno
import itertools
import json
import os
import select
import socket
import sys
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from .. import config as config_mod
from ..errors import RemoteProtocolError, SidusError, StartupError
from ..observability import get_logger
from . import creds, ipc

BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)   # restart delays after consecutive failures
STABLE_S = 60.0              # a worker that lived this long resets the backoff
READY_TIMEOUT_S = 60.0
SYNC_TIMEOUT_S = 2.0
SEND_TIMEOUT_S = 10.0
REFUSED_LOG_INTERVAL_S = 10.0
BATCH = 64
MAX_COUNTER_NAMES = 4096     # distinct counters the worker may create (memory bound)
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
_WORKER_ENV = ("SIDUS_TFTP_ACCEL",)   # passed to the worker when set (docs/operations.md)


@dataclass
class Listener:
    service: str
    kind: str                   # udp | tcp
    address: str
    port: int
    device: str | None
    sock: socket.socket

    def describe(self) -> dict[str, Any]:
        return {"fd": self.sock.fileno(), "kind": self.kind, "address": self.address, "port": self.port,
                "device": self.device or ""}


def bind_listeners(config: Any) -> list[Listener]:
    """Every socket the config's services listen on, bound now (root).  StartupError as the services say it."""
    out: list[Listener] = []
    try:
        if config.dhcp.mode != "off":
            from ..net.dhcp_server import interface_ipv4, open_socket
            d = config.dhcp
            for iface in d.interfaces:
                try:
                    interface_ipv4(iface)
                except OSError as exc:
                    why = {errno.ENODEV: "no such interface",
                           errno.EADDRNOTAVAIL: "it has no IPv4 address"}.get(exc.errno, exc.strerror)
                    raise StartupError(f"dhcp: interface {iface}: {why}") from None
                for port in (d.port, d.pxe_port):
                    try:
                        s = open_socket(iface, port)
                    except OSError as exc:
                        raise StartupError(f"dhcp: cannot listen on {iface} udp/{port}: {exc.strerror}") from None
                    out.append(Listener("dhcp", "udp", "0.0.0.0", port, iface, s))
        if config.tftp.enabled:
            t = config.tftp
            addr = (str(t.address), int(t.port))
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_PKTINFO", 8), 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, max(65536, t.intake_queue * 512))
                s.setblocking(False)
                s.bind(addr)
            except OSError as exc:
                s.close()
                raise StartupError(f"tftp: cannot listen on {addr[0]}:{addr[1]}: {exc.strerror}") from None
            out.append(Listener("tftp", "udp", addr[0], addr[1], None, s))
        if config.http.enabled:
            h = config.http
            addr = (str(h.address), int(h.port))
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(addr)
                s.listen(1024)
                s.setblocking(False)
            except OSError as exc:
                s.close()
                raise StartupError(f"http: cannot listen on {addr[0]}:{addr[1]}: {exc.strerror}") from None
            out.append(Listener("http", "tcp", addr[0], addr[1], None, s))
    except BaseException:
        for l in out:
            l.sock.close()
        raise
    return out


class _RemoteService:
    """What the control server asks a service, answered from the worker's last report."""

    def __init__(self, sup: "Supervisor", name: str):
        self.sup, self.name = sup, name

    def listeners(self) -> list[dict[str, Any]]:
        return list(self.sup.worker_listeners.get(self.name, []))


class _RemoteTransferService(_RemoteService):
    def active_transfers(self) -> int:
        return int(self.sup.worker_transfers.get(self.name, 0))


@dataclass
class _Worker:
    proc: asyncio.subprocess.Process
    ctl: socket.socket
    rpc: socket.socket
    started: float
    ready: asyncio.Future
    hello_pid: int | None = None
    fatal: str | None = None
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    closed: bool = False


class Supervisor:
    def __init__(self, runtime: Any, listeners: list[Listener]):
        self.runtime = runtime
        self.obs = runtime.observer
        self.listeners = listeners
        self.bound_config = runtime.config          # the listener keys of ``listeners``
        self.user = creds.lookup_user(runtime.config.security.worker_user)
        self.log = get_logger("privsep")
        self.worker: _Worker | None = None
        self.worker_listeners: dict[str, list[dict[str, Any]]] = {}
        self.worker_transfers: dict[str, int] = {}
        self.restarts = 0
        self.last_exit: dict[str, Any] | None = None
        self._stopping = False
        self._syncs: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._refused_logged_at = float("-inf")
        self._refused_quiet = 0
        self._tasks: set[asyncio.Task] = set()
        self._lease_store: Any = None
        self._lease_db: Any = None
        self._lease_pool: Any = None
        names = {l.service for l in listeners}
        self.services: dict[str, Any] = {
            n: (_RemoteTransferService(self, n) if n in ("tftp", "http") else _RemoteService(self, n))
            for n in ("dhcp", "tftp", "http") if n in names}

    # -- leases (full DHCP) ----------------------------------------------------------
    def open_leases(self) -> None:
        cfg = self.runtime.config.dhcp
        if cfg.mode != "full" or cfg.pool is None:
            return
        from ..boot.leases import LeaseDB
        from ..net.leasestore import LeaseStore
        db = LeaseDB.for_pool(cfg.pool)
        store = LeaseStore(cfg.pool.lease_file)
        try:
            good, bad = store.load(db)
        except OSError as exc:
            raise StartupError(f"dhcp: lease file {cfg.pool.lease_file}: {exc.strerror}") from None
        self._lease_store, self._lease_db, self._lease_pool = store, db, cfg.pool
        self.log.info("privsep.leases_loaded", file=str(cfg.pool.lease_file), lines=good, refused=bad)

    def _current_lease_db(self) -> Any:
        """The supervisor's copy of the lease table, rebuilt if a reload changed the pool (same journal)."""
        pool = self.runtime.config.dhcp.pool
        if self._lease_db is None or pool is None:
            return self._lease_db
        from ..boot.leases import LeaseDB
        from ..net.dhcp_server import replace_lease_file
        kept = replace_lease_file(pool, self._lease_pool.lease_file)
        if kept != self._lease_pool:
            db = LeaseDB.for_pool(kept)
            db.replay(self._lease_db.journal_lines(time.time()))
            self._lease_db, self._lease_pool = db, kept
        return self._lease_db

    # -- the worker's life -----------------------------------------------------------
    async def spawn(self) -> _Worker:
        """Start a worker, hand it the sockets and the snapshot, wait for it to be ready."""
        loop = asyncio.get_running_loop()
        ctl_p, ctl_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        rpc_p, rpc_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (ctl_p, rpc_p):
            s.setblocking(False)
        cfg = self.runtime.config
        import sidusd
        code_dir = str(Path(sidusd.__file__).resolve().parents[1])
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               "PYTHONPATH": code_dir, "PYTHONDONTWRITEBYTECODE": "1"}
        for name in _WORKER_ENV:                 # operator switches the worker honours
            if name in os.environ:
                env[name] = os.environ[name]
        argv = [sys.executable, "-m", "sidusd.privsep.worker",
                "--ctl-fd", str(ctl_w.fileno()), "--rpc-fd", str(rpc_w.fileno()),
                "--listeners", json.dumps([l.describe() for l in self.listeners]),
                "--user", self.user.name, "--log-format", _log_format(cfg.log.format),
                "--log-level", cfg.log.level]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, pass_fds=[ctl_w.fileno(), rpc_w.fileno()] + [l.sock.fileno() for l in self.listeners],
                stdin=asyncio.subprocess.DEVNULL, cwd="/", env=env)
        finally:
            ctl_w.close()
            rpc_w.close()
        w = _Worker(proc, ctl_p, rpc_p, time.monotonic(), loop.create_future())
        self.worker = w
        loop.add_reader(ctl_p.fileno(), self._on_ctl, w)
        loop.add_reader(rpc_p.fileno(), self._on_rpc, w)
        self.obs.count("privsep.worker_starts")
        self.log.info("privsep.worker_started", pid=proc.pid, user=self.user.name)
        try:
            await self._send(w, ("snapshot", self._snapshot(), self._disks()))
        except (asyncio.TimeoutError, OSError):
            pass                             # the worker died at once: its status or "fatal" says why
        exited = loop.create_task(proc.wait())
        try:
            done, _ = await asyncio.wait({w.ready, exited}, timeout=READY_TIMEOUT_S,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not exited.done():
                exited.cancel()
        if not w.ready.done():
            self._on_ctl(w)                  # a "fatal" sent just before the exit
            why = w.fatal or (f"exited with status {proc.returncode}" if proc.returncode is not None
                              else f"not ready after {READY_TIMEOUT_S:.0f} s")
            await self._kill(w)
            raise StartupError(f"network worker failed to start: {why}")
        return w

    async def _kill(self, w: _Worker) -> None:
        if w.proc.returncode is None:
            try:
                w.proc.kill()
            except ProcessLookupError:
                pass
            await w.proc.wait()
        self._close(w)

    def _close(self, w: _Worker) -> None:
        if w.closed:
            return
        w.closed = True
        loop = asyncio.get_running_loop()
        for s in (w.ctl, w.rpc):
            try:
                loop.remove_reader(s.fileno())
            except (ValueError, OSError):
                pass
            s.close()
        for fut in self._syncs.values():
            if not fut.done():
                fut.set_result(None)
        self._syncs.clear()

    async def monitor(self) -> None:
        """Restart the worker whenever it dies (bounded backoff), until :meth:`stop`."""
        failures = 0
        while not self._stopping:
            w = self.worker
            if w is None:
                return
            rc = await w.proc.wait()
            self._close(w)
            if self._stopping:
                return
            lived = time.monotonic() - w.started
            failures = 0 if lived >= STABLE_S else failures + 1
            delay = BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
            self.restarts += 1
            self.last_exit = {"pid": w.proc.pid, "status": rc, "t": time.time(), "lived_s": round(lived, 1)}
            self.worker_transfers = {}
            self.obs.count("privsep.worker_restarts")
            self.log.error("privsep.worker_exited", pid=w.proc.pid, status=rc, lived_s=round(lived, 1),
                           restart_in_s=delay, restarts=self.restarts)
            await asyncio.sleep(delay)
            while not self._stopping:
                try:
                    await self.spawn()
                    break
                except (StartupError, OSError) as exc:
                    failures += 1
                    delay = BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
                    self.log.error("privsep.worker_failed", error=str(exc), retry_in_s=delay)
                    await asyncio.sleep(delay)

    async def stop(self, grace_s: float) -> None:
        """Ask the worker to stop (transfers in flight get ``grace_s``), kill it if it does not."""
        self._stopping = True
        w = self.worker
        if w is None or w.proc.returncode is not None:
            if w is not None:
                self._close(w)
            return
        try:
            await asyncio.wait_for(self._send(w, ("stop", grace_s)), 2.0)
        except (asyncio.TimeoutError, OSError):
            pass
        try:
            await asyncio.wait_for(w.proc.wait(), grace_s + 5.0)
        except asyncio.TimeoutError:
            self.obs.count("privsep.worker_killed")
            self.log.error("privsep.worker_killed", pid=w.proc.pid, reason="did not stop in time")
        await self._kill(w)

    def close_listeners(self) -> None:
        for l in self.listeners:
            l.sock.close()
        if self._lease_store is not None:
            self._lease_store.close()

    # -- supervisor -> worker ------------------------------------------------------------
    def _snapshot(self) -> Any:
        """The current snapshot, with the listener keys of the sockets actually bound.

        A reload that changes a listener key (a port, an interface...) only
        says "restart needed"; a worker restarted after it must still serve
        the sockets the supervisor holds, as the one process did before.
        """
        snap = self.runtime.snapshot
        bound = self.bound_config
        if bound is None or not config_mod.restart_needed(bound, snap.config):
            return snap
        c = snap.config
        cfg = dataclasses.replace(
            c,
            dhcp=dataclasses.replace(c.dhcp, mode=bound.dhcp.mode, interfaces=bound.dhcp.interfaces,
                                     port=bound.dhcp.port, pxe_port=bound.dhcp.pxe_port,
                                     client_port=bound.dhcp.client_port,
                                     pool=c.dhcp.pool if c.dhcp.pool is not None else bound.dhcp.pool),
            tftp=dataclasses.replace(c.tftp, enabled=bound.tftp.enabled, address=bound.tftp.address,
                                     port=bound.tftp.port, intake_queue=bound.tftp.intake_queue),
            http=dataclasses.replace(c.http, enabled=bound.http.enabled, address=bound.http.address,
                                     port=bound.http.port))
        return dataclasses.replace(snap, config=cfg)

    def _disks(self) -> dict[str, dict[str, str]] | None:
        """What the worker needs to render a persistent host's config: its login, nothing else
        (plain values: the worker unpickles no storage class, and never learns backing paths)."""
        mgr = getattr(self.runtime, "iscsi", None)
        if mgr is None:
            return None
        return {mac: {"target_iqn": d.plan.target_iqn, "initiator_iqn": d.plan.initiator_iqn,
                      "user": d.plan.user, "secret": d.secret} for mac, d in mgr.disks.items()}

    async def _send(self, w: _Worker, obj: Any) -> None:
        loop = asyncio.get_running_loop()
        async with w.send_lock:
            if w.closed:
                return
            for dgram in ipc.encode_parent(obj):
                await asyncio.wait_for(loop.sock_sendall(w.ctl, dgram), SEND_TIMEOUT_S)

    async def push(self) -> None:
        """Send the current snapshot (and iSCSI credentials) and wait until the worker uses it.

        The wait is a ``sync`` behind the snapshot on the same ordered channel:
        once it is answered, every request the worker reads is served with
        the new snapshot (``sidusctl hosts add`` then a fetch sees the host).
        A worker that does not take it in time is killed (and restarted with
        the current snapshot).
        """
        w = self.worker
        if w is None or w.closed:
            return
        try:
            await self._send(w, ("snapshot", self._snapshot(), self._disks()))
        except (asyncio.TimeoutError, OSError) as exc:
            self.log.error("privsep.push_failed", error=str(exc) or type(exc).__name__)
            await self._kill(w)
            return
        await self.sync()

    async def sync(self) -> None:
        """Wait until the worker has sent everything it counted so far (for status / clients)."""
        w = self.worker
        if w is None or w.closed or not w.ready.done():
            return
        sid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._syncs[sid] = fut
        try:
            await asyncio.wait_for(self._send(w, ("sync", sid)), SYNC_TIMEOUT_S)
            await asyncio.wait_for(fut, SYNC_TIMEOUT_S)
        except (asyncio.TimeoutError, OSError):
            self.obs.count("privsep.sync_timeouts")
        finally:
            self._syncs.pop(sid, None)

    # -- worker -> supervisor (hostile) ---------------------------------------------------
    def _recv(self, sock: socket.socket, w: _Worker) -> tuple[bytes, list[int], bool] | None:
        """One datagram: (data, fds, truncated), or None when there is none / the channel is closed."""
        try:
            data, anc, flags, _ = sock.recvmsg(ipc.MAX_MSG, socket.CMSG_SPACE(4 * 4))
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            self._close(w)
            return None
        fds = []
        for level, kind, blob in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(blob[:len(blob) - len(blob) % a.itemsize])
                fds.extend(a)
        for fd in fds:                    # the worker has nothing to give us
            os.close(fd)
        if not data and not flags & socket.MSG_TRUNC:
            p = select.poll()
            p.register(sock.fileno(), select.POLLIN)
            hup = any(ev & (select.POLLHUP | select.POLLERR) for _, ev in p.poll(0))
            if hup:
                loop = asyncio.get_running_loop()
                try:
                    loop.remove_reader(sock.fileno())
                except (ValueError, OSError):
                    pass
                return None
        return data, fds, bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC))

    def _refuse(self, reason: str, detail: str) -> None:
        self.obs.count(f"privsep.refused.{reason}")
        now = time.monotonic()
        if now - self._refused_logged_at < REFUSED_LOG_INTERVAL_S:
            self._refused_quiet += 1
            return
        self.log.warning("privsep.message_refused", reason=reason, detail=detail[:200],
                         suppressed=self._refused_quiet)
        self._refused_logged_at, self._refused_quiet = now, 0

    def _classify(self, data: bytes, truncated: bool) -> Any:
        """The checked message, or None (refused and counted)."""
        self.obs.count("privsep.worker_msgs")
        if truncated or len(data) > ipc.MAX_MSG:
            self._refuse("oversized", f"more than {ipc.MAX_MSG} bytes")
            return None
        if not data:
            self._refuse("empty", "empty datagram")
            return None
        return data

    def _drain(self, w: _Worker, sock: socket.socket, decode: Any, serve: Any) -> None:
        """Up to ``BATCH`` datagrams from one of the worker's channels: each checked, decoded
        (refused ones counted), then served; a bug in serving one is logged, not fatal."""
        for _ in range(BATCH):
            if w.closed:
                return
            got = self._recv(sock, w)
            if got is None:
                return
            data = self._classify(got[0], got[2])
            if data is None:
                continue
            try:
                msg = decode(data)
            except RemoteProtocolError as exc:
                self._refuse(_reason(exc), str(exc))
                continue
            try:
                serve(w, msg)
            except Exception as exc:  # a bug here must not stop the supervisor
                self.obs.count("privsep.internal_errors")
                self.log.exception("privsep.internal_error", t=msg.t, error=repr(exc))

    def _on_ctl(self, w: _Worker) -> None:
        self._drain(w, w.ctl, ipc.decode_worker, self._handle)

    def _handle(self, w: _Worker, msg: ipc.WorkerMessage) -> None:
        b = msg.body
        if msg.t == "hello":
            w.hello_pid = b["pid"]
            self._check_worker_privileges(w)
        elif msg.t == "fatal":
            w.fatal = b["error"]
        elif msg.t == "ready":
            self.worker_listeners = b["listeners"]
            if not w.ready.done():
                w.ready.set_result(True)
        elif msg.t == "events":
            self._apply_events(b)
        elif msg.t == "stats":
            self.worker_listeners = b["listeners"]
            self.worker_transfers = b["transfers"]
            fut = self._syncs.get(b["id"])
            if fut is not None and not fut.done():
                fut.set_result(None)

    def _check_worker_privileges(self, w: _Worker) -> None:
        """Trust /proc, not the worker: a worker with uid 0 or any capability is killed."""
        d = creds.describe(w.proc.pid)
        bad = (not d.get("alive") or d.get("uid") in (0, None)
               or any(int(d.get(k) or "0", 16) for k in ("cap_eff", "cap_prm", "cap_amb")))
        if bad and d.get("alive"):
            self.log.error("privsep.worker_privileged", pid=w.proc.pid, status=d)
            w.fatal = "the worker kept privileges"
            try:
                w.proc.kill()
            except ProcessLookupError:
                pass

    def _apply_events(self, b: dict[str, Any]) -> None:
        obs = self.obs
        for name, n in b["counters"].items():
            if name not in obs.counters and len(obs.counters) >= MAX_COUNTER_NAMES:
                self._refuse("bad_field", f"counter {name}: more than {MAX_COUNTER_NAMES} counter names")
                continue
            obs.count(name, n)
        if b["dropped"]:
            obs.count("privsep.events_dropped", b["dropped"])
        cfg = self.runtime.config
        for e in b["events"]:
            if e[0] == "seen":
                obs.client_seen(e[1], e[2], e[3])
            elif e[0] == "tl":
                rec = obs.client(e[1])
                rec.timeline.append({"t": round(e[2], 3), "event": e[3], **e[4]})
            elif e[0] == "booted":
                img = cfg.images.get(e[2])
                if img is None:
                    obs.count("privsep.refused.bad_field")
                    continue
                # known: the MAC is an inventory host (an unknown one never evicts a known one)
                known = e[1] in self.runtime.inventory.hosts
                target = _BootedTarget(e[2], img.root, e[3], e[1] if known else None)
                self.runtime.booted.note(cfg, e[1], target)

    def _on_rpc(self, w: _Worker) -> None:
        self._drain(w, w.rpc, ipc.decode_rpc, self._answer_rpc)

    def _answer_rpc(self, w: _Worker, req: ipc.RpcRequest) -> None:
        """Serve one request and always answer it (an internal error is an answer too)."""
        fd = None
        try:
            reply, fd = self._serve_rpc(req)
        except Exception as exc:  # a bug here must not stop the supervisor
            self.obs.count("privsep.internal_errors")
            self.log.exception("privsep.internal_error", t=req.t, error=repr(exc))
            reply = {"ok": False, "error": "internal error"}
        try:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd is not None else []
            w.rpc.sendmsg([json.dumps({"id": req.id, **reply}).encode()], anc)
        except OSError as exc:
            self.obs.count("privsep.rpc.errors")
            self.log.warning("privsep.rpc_reply_failed", t=req.t, error=str(exc))
        finally:
            if fd is not None:
                os.close(fd)

    def _serve_rpc(self, req: ipc.RpcRequest) -> tuple[dict[str, Any], int | None]:
        if req.t == "open":
            from ..net.files import NotServable, open_confined
            self.obs.count("privsep.rpc.open")
            try:
                fd, size = open_confined(self.runtime.config.tftp.root, req.body["parts"])
            except NotServable as exc:
                return {"ok": False, "reason": exc.reason, "missing": exc.missing}, None
            return {"ok": True, "size": size}, fd
        if self._lease_store is None:
            self.obs.count("privsep.rpc.errors")
            return {"ok": False, "error": "no lease journal (dhcp.mode is not full)"}, None
        if req.t == "lease.load":
            try:
                fd = os.open(self._lease_store.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                return {"ok": False, "error": f"{self._lease_store.path}: {exc.strerror}"}, None
            return {"ok": True}, fd
        # lease.append: checked against the pool, written, fsync'd, then answered
        from ..boot.leases import Lease
        b = req.body
        db = self._current_lease_db()
        lease = Lease(ip=IPv4Address(b["ip"]), mac=b["mac"], state=b["state"], expires=b["expires"])
        if b["ip"] is None or lease.ip not in db.network:
            self._refuse("bad_field", f"lease {b['ip']} outside the pool")
            return {"ok": False, "error": "address outside the pool"}, None
        self.obs.count("privsep.rpc.lease_append")
        try:
            self._lease_store.append(lease)
        except OSError as exc:
            self.log.error("privsep.lease_write_failed", mac=lease.mac, ip=str(lease.ip), error=str(exc))
            return {"ok": False, "error": f"lease journal: {exc.strerror or exc}"}, None
        db.apply(lease)
        try:
            self._lease_store.maybe_compact(db, time.time())
        except OSError as exc:
            self.log.error("dhcp.lease_compact_failed", error=str(exc))
        return {"ok": True}, None

    # -- status ------------------------------------------------------------------------
    def processes(self) -> list[dict[str, Any]]:
        me = {"role": "supervisor", "pid": os.getpid(), **_caps(creds.describe())}
        w = self.worker
        wk: dict[str, Any] = {"role": "worker", "restarts": self.restarts, "last_exit": self.last_exit}
        if w is None or w.proc.returncode is not None:
            wk.update(state="down", pid=w.proc.pid if w else None)
        else:
            wk.update(state="running" if w.ready.done() else "starting", pid=w.proc.pid,
                      uptime_s=round(time.monotonic() - w.started, 1), **_caps(creds.describe(w.proc.pid)))
        return [me, wk]


@dataclass(frozen=True)
class _BootedTarget:
    image: str
    image_root: Path
    hostname: str | None
    mac: str | None = None          # set when the MAC is in the inventory (BootTarget.mac)


def _caps(d: dict[str, Any]) -> dict[str, Any]:
    return {k: d.get(k) for k in ("user", "uid", "groups", "cap_eff", "cap_prm", "cap_bnd", "no_new_privs")}


def _reason(exc: Exception) -> str:
    text = str(exc)
    if text.startswith("not strict JSON") or text.startswith("not a JSON object"):
        return "bad_json"
    if text.startswith("unknown message type") or text.startswith("unknown request type"):
        return "unknown_type"
    if text.startswith("message of"):
        return "oversized"
    return "bad_field"


def _log_format(fmt: str) -> str:
    if fmt == "auto":
        return "console" if sys.stderr.isatty() else "json"
    return fmt


# -- the daemon with privilege separation ---------------------------------------------------

async def serve(runtime: Any) -> int:
    """:func:`sidusd.daemon.serve` for ``security.privsep: true``."""
    from ..control.server import ControlServer
    from ..daemon import STOP_GRACE_S, serve_signals
    log = get_logger("daemon")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    try:
        listeners = bind_listeners(runtime.config)
    except (SidusError, OSError) as exc:
        log.error("startup.failed", error=str(exc))
        return 1
    for l in listeners:
        log.info("privsep.listening", service=l.service, proto=l.kind, address=l.address, port=l.port,
                 interface=l.device)
    control = None
    sup: Supervisor | None = None
    try:
        sup = Supervisor(runtime, listeners)
        sup.open_leases()
        runtime.sync_worker = sup.sync
        runtime.process_info = sup.processes
        control = ControlServer(runtime, sup.services)
        await control.start()
        await sup.spawn()
    except (SidusError, OSError) as exc:
        log.error("startup.failed", error=str(exc))
        if control is not None:
            await control.stop()
        if sup is not None:
            await sup.stop(0)
        for l in listeners:
            l.sock.close()
        return 1

    await runtime.apply_backends()
    runtime.on_change.append(sup.push)
    await sup.push()                   # the iSCSI credentials apply_backends made
    monitor = loop.create_task(sup.monitor())

    ready = [l for ls in sup.worker_listeners.values() for l in ls]
    await serve_signals(runtime, stop, log, listeners=ready,
                        worker_pid=sup.worker.proc.pid if sup.worker else None, worker_user=sup.user.name)
    await sup.stop(STOP_GRACE_S)
    monitor.cancel()
    try:
        await monitor
    except (asyncio.CancelledError, Exception):
        pass
    await control.stop()
    sup.close_listeners()
    await runtime.stop_watchers()
    log.info("daemon.stopped")
    return 0
