"""The root side of the split: the supervisor shell.

:func:`serve` replaces :func:`sidusd.daemon.serve` when ``security.privsep``
is true.  The supervisor never parses a packet: it binds the listeners
(:func:`sidusd.net.listeners.bind_listeners`), runs the control socket (0600)
and the storage backends, writes every state file, and runs one worker
(:mod:`.lifecycle`).  The worker's requests are answered by the
:class:`~.broker.Broker`; its reports (ctl channel: hello, ready, fatal,
events, stats) are read here.  Everything the worker sends is checked by
:func:`sidusd.privsep.ipc.decode_worker` / :func:`~sidusd.privsep.ipc.decode_rpc`,
refused ones dropped and counted (``privsep.refused.<code>``, :mod:`.channel`).

Counters (``privsep.``): worker_starts, worker_restarts, worker_msgs,
refused.<oversized|empty|bad_json|unknown_type|bad_field>, rpc.open,
rpc.lease_append, rpc.errors, sync_timeouts, events_dropped, worker_killed.
Log events: ``privsep.listening``, ``privsep.worker_started``,
``privsep.worker_exited``, ``privsep.worker_failed``,
``privsep.message_refused`` (rate limited), ``privsep.worker_privileged``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import sys
import time
from typing import Any

from .. import config as config_mod
from ..errors import SidusError, StartupError
from ..net.listeners import Listener, bind_listeners
from ..observability import LogLimiter, get_logger
from ..services import STOP_GRACE_S, serve_signals
from . import channel, creds, ipc, lifecycle
from .broker import Broker
from .lifecycle import WorkerProc
from .reports import apply_events

READY_TIMEOUT_S = 60.0
SYNC_TIMEOUT_S = 2.0
SEND_TIMEOUT_S = 10.0

__all__ = ["Listener", "Supervisor", "bind_listeners", "pinned_config", "serve"]


def pinned_config(bound: Any, new: Any) -> Any:
    """``new`` with every listener key (``config._listener_items``, the one table) as in ``bound``.

    A reload that changes a listener key (a port, an interface...) only says
    "restart needed"; a worker restarted after it must still serve the
    sockets the supervisor holds, as the one process did before.  A pool the
    new config dropped (mode pinned back to full) is kept from ``bound``.
    """
    changed = config_mod.restart_needed(bound, new)
    if not changed:
        return new
    sections: dict[str, dict[str, Any]] = {}
    for name in changed:
        section, key = name.split(".", 1)
        sections.setdefault(section, {})[key] = getattr(getattr(bound, section), key)
    if new.dhcp.pool is None and bound.dhcp.pool is not None:
        sections.setdefault("dhcp", {})["pool"] = bound.dhcp.pool
    return dataclasses.replace(new, **{sec: dataclasses.replace(getattr(new, sec), **vals)
                                       for sec, vals in sections.items()})


class _RemoteService:
    """What the control server asks a service, answered from the worker's last report."""

    def __init__(self, sup: Supervisor, name: str):
        self.sup, self.name = sup, name

    def listeners(self) -> list[dict[str, Any]]:
        return list(self.sup.worker_listeners.get(self.name, []))


class _RemoteTransferService(_RemoteService):
    def active_transfers(self) -> int:
        return int(self.sup.worker_transfers.get(self.name, 0))

    def transfers(self) -> list[dict[str, Any]]:
        """The transfers in flight of the worker's last report (``ipc.Active``; sidusctl watch)."""
        return [{k: v for k, v in t.items() if k != "service"} for t in self.sup.worker_active
                if t["service"] == self.name]


class Supervisor:
    def __init__(self, runtime: Any, listeners: list[Listener]):
        self.runtime = runtime
        self.obs = runtime.observer
        self.listeners = listeners
        self.bound_config = runtime.config          # the listener keys of ``listeners``
        self.user = creds.lookup_user(runtime.config.security.worker_user)
        self.log = get_logger("privsep")
        self.rlog = LogLimiter(self.log)      # lines per message of the (hostile) worker
        self.refusals = channel.Refusals(self.obs, self.log)
        self.broker = Broker(runtime, self.refusals, self.log)
        self.worker: WorkerProc | None = None
        self.worker_listeners: dict[str, list[dict[str, Any]]] = {}
        self.worker_transfers: dict[str, int] = {}
        self.worker_active: list[dict[str, Any]] = []
        self.restarts = 0
        self.last_exit: dict[str, Any] | None = None
        self._stopping = False
        self._syncs: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        names = {l.service for l in listeners}
        self.services: dict[str, Any] = {
            n: (_RemoteTransferService(self, n) if n in ("tftp", "http") else _RemoteService(self, n))
            for n in ("dhcp", "tftp", "http") if n in names}

    async def open_leases(self) -> None:
        await self.broker.open_leases()

    # -- the worker's life (sidusd.privsep.lifecycle) ------------------------------------
    async def spawn(self) -> WorkerProc:
        """Start a worker, hand it the sockets and the snapshot, wait for it to be ready."""
        loop = asyncio.get_running_loop()
        cfg = self.runtime.config
        w = await lifecycle.launch(self.listeners, self.user.name, _log_format(cfg.log.format), cfg.log.level)
        w.on_close.append(self._release_syncs)
        self.worker = w
        loop.add_reader(w.ctl.fileno(), self._on_ctl, w)
        loop.add_reader(w.rpc.fileno(), self.broker.on_readable, w)
        self.obs.count("privsep.worker_starts")
        self.log.info("privsep.worker_started", pid=w.proc.pid, user=self.user.name)
        try:
            await self._send(w, ("snapshot", self._snapshot(), self._disks()))
        except (TimeoutError, OSError):
            pass                             # the worker died at once: its status or "fatal" says why
        await lifecycle.wait_ready(w, READY_TIMEOUT_S)
        if not w.ready.done():
            self._on_ctl(w)                  # a "fatal" sent just before the exit
            why = w.fatal or (f"exited with status {w.proc.returncode}" if w.proc.returncode is not None
                              else f"not ready after {READY_TIMEOUT_S:.0f} s")
            await lifecycle.end(w)
            raise StartupError(f"network worker failed to start: {why}")
        return w

    def _release_syncs(self) -> None:
        for fut in self._syncs.values():
            if not fut.done():
                fut.set_result(None)
        self._syncs.clear()

    async def monitor(self) -> None:
        """Restart the worker whenever it dies (bounded backoff), until :meth:`stop`."""
        await lifecycle.watch(lambda: self.worker, self.spawn, lambda: self._stopping, self._exited, self.log)

    def _exited(self, w: WorkerProc, rc: int, lived: float, delay: float) -> None:
        self.restarts += 1
        self.last_exit = {"pid": w.proc.pid, "status": rc, "t": time.time(), "lived_s": round(lived, 1)}
        self.worker_transfers, self.worker_active = {}, []
        self.obs.count("privsep.worker_restarts")
        self.log.error("privsep.worker_exited", pid=w.proc.pid, status=rc, lived_s=round(lived, 1),
                       restart_in_s=delay, restarts=self.restarts)

    async def stop(self, grace_s: float) -> None:
        """Ask the worker to stop (transfers in flight get ``grace_s``), kill it if it does not."""
        self._stopping = True
        w = self.worker
        if w is None or w.proc.returncode is not None:
            if w is not None:
                w.close()
            return
        try:
            await asyncio.wait_for(self._send(w, ("stop", grace_s)), 2.0)
        except (TimeoutError, OSError):
            pass
        try:
            await asyncio.wait_for(w.proc.wait(), grace_s + 5.0)
        except TimeoutError:
            self.obs.count("privsep.worker_killed")
            self.log.error("privsep.worker_killed", pid=w.proc.pid, reason="did not stop in time")
        await lifecycle.end(w)

    def close_listeners(self) -> None:
        for l in self.listeners:
            l.sock.close()
        self.broker.close()

    # -- supervisor -> worker ------------------------------------------------------------
    def _snapshot(self) -> Any:
        """The current snapshot, with the listener keys of the sockets actually bound (:func:`pinned_config`)."""
        snap = self.runtime.snapshot
        if self.bound_config is None:
            return snap
        cfg = pinned_config(self.bound_config, snap.config)
        return snap if cfg is snap.config else dataclasses.replace(snap, config=cfg)

    def _disks(self) -> dict[str, dict[str, str]] | None:
        """What the worker needs to render a persistent host's config: its login, nothing else
        (plain values: the worker unpickles no storage class, and never learns backing paths)."""
        mgr = getattr(self.runtime, "iscsi", None)
        if mgr is None:
            return None
        return {mac: {"target_iqn": d.plan.target_iqn, "initiator_iqn": d.plan.initiator_iqn,
                      "user": d.plan.user, "secret": d.secret} for mac, d in mgr.disks.items()}

    async def _send(self, w: WorkerProc, obj: Any) -> None:
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
        except (TimeoutError, OSError) as exc:
            self.log.error("privsep.push_failed", error=str(exc) or type(exc).__name__)
            await lifecycle.end(w)
            return
        await self.sync()

    async def clear_claims(self, mac: str) -> None:
        """``sidusctl hosts clear-conflict``: the worker forgets who claimed ``mac`` too."""
        w = self.worker
        if w is not None and not w.closed:
            await self._send(w, ("clear_claims", mac))
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
        except (TimeoutError, OSError):
            self.obs.count("privsep.sync_timeouts")
        finally:
            self._syncs.pop(sid, None)

    # -- worker -> supervisor: reports (hostile) --------------------------------------------
    def _on_ctl(self, w: WorkerProc) -> None:
        if w.closed:
            return
        try:
            msgs = channel.read_batch(w.ctl, ipc.decode_worker, self.refusals, self.obs)
        except channel.Closed as exc:
            w.channel_closed(w.ctl, exc.error)
            return
        for msg in msgs:
            if w.closed:
                return
            try:
                self._handle(w, msg)
            except Exception as exc:  # a bug here must not stop the supervisor
                self.obs.count("privsep.internal_errors")
                self.rlog.exception("privsep.internal_error", t=msg.t, error=repr(exc))

    def _handle(self, w: WorkerProc, msg: ipc.WorkerMessage) -> None:
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
            apply_events(self.runtime, self.refusals, b)
        elif msg.t == "stats":
            self.worker_listeners = b["listeners"]
            self.worker_transfers = b["transfers"]
            self.worker_active = b.get("active", [])
            fut = self._syncs.get(b["id"])
            if fut is not None and not fut.done():
                fut.set_result(None)

    def _check_worker_privileges(self, w: WorkerProc) -> None:
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


def _caps(d: dict[str, Any]) -> dict[str, Any]:
    return {k: d.get(k) for k in ("user", "uid", "groups", "cap_eff", "cap_prm", "cap_bnd", "no_new_privs")}


def _log_format(fmt: str) -> str:
    if fmt == "auto":
        return "console" if sys.stderr.isatty() else "json"
    return fmt


# -- the daemon with privilege separation ---------------------------------------------------

async def serve(runtime: Any) -> int:
    """:func:`sidusd.daemon.serve` for ``security.privsep: true``."""
    from ..control.server import ControlServer
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
        await sup.open_leases()
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
    runtime.worker_clear_claims = sup.clear_claims
    await sup.push()                   # the iSCSI credentials apply_backends made
    monitor = loop.create_task(sup.monitor())

    ready = [l for ls in sup.worker_listeners.values() for l in ls]
    await serve_signals(runtime, stop, log, services=sup.services, listeners=ready,
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
