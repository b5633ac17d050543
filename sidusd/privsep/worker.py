"""The network worker: ``python -m sidusd.privsep.worker`` (started by the supervisor only).

Order of a start:

1. import every module the services need (as root: the code may live where
   the worker user cannot read);
2. :func:`sidusd.privsep.creds.drop_privileges` to ``security.worker_user``
   (bounding set emptied, no capability, no supplementary group,
   ``PR_SET_NO_NEW_PRIVS``), checked in ``/proc/self/status``; any doubt: exit 3;
3. read the first snapshot from the supervisor, then run the unchanged
   :class:`~sidusd.net.dhcp_server.DhcpService`, :class:`~sidusd.net.tftp_server.TftpService`
   and :class:`~sidusd.net.http_server.HttpService` on a ``WorkerRuntime`` (:mod:`sidusd.privsep.forwarding`).

What the services would do with privileges is routed to the supervisor
through the :class:`~sidusd.net.io.ServiceIO` they are built with
(:func:`sidusd.privsep.rpc.worker_io`; nothing here patches a module):

* a listening socket (UDP 67/4011 per interface, UDP 69, the HTTP listener)
  is the inherited descriptor the supervisor bound for that service;
* opening a file below ``tftp.root`` is an ``open`` request: the supervisor
  opens it with the same confinement and passes the descriptor, so the worker
  needs no read access to any directory;
* the lease journal (full DHCP) is a :class:`~sidusd.privsep.rpc.RemoteLeaseJournal`:
  a lease is sent to the supervisor, which appends and fsyncs it and only
  then answers; the DHCPACK waits for that answer (as it waited for the fsync);
* the requests are asynchronous (:class:`~sidusd.privsep.rpc.RpcClient`): the
  event loop never waits for the supervisor;
* counters, clients seen, timeline entries and booted records are forwarded
  in batches (:mod:`sidusd.privsep.forwarding`), at the latest every ``FLUSH_S``
  and before every ``stats`` answer (``sidusctl status`` asks for one first).

Exit codes: 0 stopped, 1 a service could not start (the reason went to the
supervisor as ``fatal``), 3 privileges could not be dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import json
import os
import signal
import socket
import sys
from typing import Any

from . import creds, ipc
from .forwarding import plain_value

FLUSH_S = 0.5                 # forwarded events wait at most this long
STOP_GRACE_S = 10.0


# -- the worker's life ---------------------------------------------------------------------

class Worker:
    def __init__(self, ctl: socket.socket, runtime: Any, observer: Any, log: Any, io: Any):
        self.ctl = ctl
        self.io = io
        self.runtime = runtime
        self.obs = observer
        self.log = log
        self.services: dict[str, Any] = {}
        self.reasm = ipc.Reassembler()
        self.grace_s = STOP_GRACE_S
        self.exit_code = 0

    def send(self, msg: dict[str, Any]) -> None:
        self.ctl.send(ipc.encode_worker(msg))

    def flush(self) -> None:
        for data in self.obs.take_messages():
            self.ctl.send(data)

    def stats(self, sid: int) -> dict[str, Any]:
        listeners = {}
        transfers = {}
        active: list[dict[str, Any]] = []
        for name, svc in self.services.items():
            listeners[name] = [{k: plain_value(v) for k, v in l.items()} for l in svc.listeners()]
            if hasattr(svc, "active_transfers"):
                transfers[name] = int(svc.active_transfers())
            if hasattr(svc, "transfers"):          # the first MAX_ACTIVE in flight (sidusctl watch)
                active += [{"service": name, "file": str(t["file"])[:ipc.MAX_STR], "peer": str(t["peer"]),
                            "bytes": int(t["bytes"]), "size": t.get("size"),
                            "duration_s": max(0.0, float(t.get("duration_s") or 0.0))}
                           for t in svc.transfers()[:ipc.MAX_ACTIVE - len(active)]]
        return {"t": "stats", "id": sid, "listeners": listeners, "transfers": transfers, "active": active}

    async def run(self) -> int:
        from ..errors import SidusError
        from ..services import build_services, stop_service
        loop = asyncio.get_running_loop()
        self.stop = asyncio.Event()
        self.services = build_services(self.runtime, self.io)
        started: list[Any] = []
        try:
            for svc in self.services.values():
                await svc.start()
                started.append(svc)
        except (SidusError, OSError) as exc:
            self.send({"t": "fatal", "error": str(exc)[:ipc.MAX_STR]})
            for svc in reversed(started):
                await stop_service(svc, 0)
            return 1
        self.send({"t": "ready", "listeners": self.stats(0)["listeners"]})
        loop.add_reader(self.ctl.fileno(), self._on_ctl)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: None)     # the supervisor reloads
        ticker = loop.create_task(self._ticker())
        self.log.info("worker.ready", pid=os.getpid(), user=creds.describe()["user"])
        await self.stop.wait()
        loop.remove_reader(self.ctl.fileno())
        ticker.cancel()
        for svc in reversed(started):
            await stop_service(svc, self.grace_s)
        try:
            self.flush()
        except OSError:
            pass
        self.log.info("worker.stopped")
        return self.exit_code

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            try:
                self.flush()
            except OSError as exc:
                self.log.error("worker.flush_failed", error=str(exc))
                self.stop.set()
                return

    def _on_ctl(self) -> None:
        try:
            data = self.ctl.recv(ipc.CHUNK + 16, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:                            # the supervisor is gone
            self.grace_s = 0
            self.stop.set()
            return
        try:
            msg = self.reasm.feed(data)
        except Exception as exc:  # noqa: BLE001 - serving a stale snapshot silently is worse
            self.log.error("worker.bad_snapshot", error=repr(exc))
            self.exit_code = 1
            self.grace_s = 0
            self.stop.set()
            return
        if msg is None:
            return
        kind = msg[0]
        if kind == "snapshot":
            self.runtime.update(msg[1], msg[2])
        elif kind == "clear_claims":          # sidusctl hosts clear-conflict
            self.obs.clear_claims(str(msg[1]))
        elif kind == "sync":
            self.flush()
            self.send(self.stats(int(msg[1])))
        elif kind == "stop":
            self.grace_s = float(msg[1])
            self.stop.set()


class _LateImports:
    """Logs ``worker.late_import`` for a module first imported after the privilege drop.

    Such an import reads files as the worker user; where the interpreter's
    library is not readable by it (a Python under /root) it fails.  Nothing is
    changed: the normal finders run next.
    """

    def __init__(self, log: Any):
        self.log = log
        self.seen: set[str] = set()

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name not in self.seen:
            self.seen.add(name)
            self.log.warning("worker.late_import", module=name)
        return None


def _recv_first(ctl: socket.socket) -> Any:
    reasm = ipc.Reassembler()
    ctl.settimeout(60.0)
    while True:
        data = ctl.recv(ipc.CHUNK + 16)
        if not data:
            raise OSError(errno.EPIPE, "the supervisor closed the channel before the first snapshot")
        msg = reasm.feed(data)
        if msg is not None and msg[0] == "snapshot":
            return msg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sidusd-worker")
    p.add_argument("--ctl-fd", type=int, required=True)
    p.add_argument("--rpc-fd", type=int, required=True)
    p.add_argument("--listeners", default="[]")
    p.add_argument("--user", required=True)
    p.add_argument("--log-format", default="json")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)

    # 1. everything imported now, while the code is surely readable (the interpreter's own
    #    library may not be readable by the worker user: a later import would fail)
    import email.utils  # noqa: F401
    import encodings.idna  # noqa: F401  (getaddrinfo of a str host)
    import hashlib  # noqa: F401
    import secrets  # noqa: F401
    import traceback  # noqa: F401

    from .. import runtime as _runtime  # noqa: F401
    from .. import services as _services  # noqa: F401
    from ..net import dhcp_server, files, tftp_pusher, tftp_pushers, tftp_server  # noqa: F401
    try:
        from ..net import http_server  # noqa: F401
    except ImportError:                      # aiohttp missing: http.enabled then fails clearly
        pass
    from ..observability import get_logger, setup_logging
    from .forwarding import make_observer_class, make_runtime_class
    from .rpc import InheritedListeners, RpcClient, worker_io

    ctl = socket.socket(fileno=args.ctl_fd)
    rpc_sock = socket.socket(fileno=args.rpc_fd)
    setup_logging(args.log_format, args.log_level)
    log = get_logger("worker")

    # 2. privileges gone before a single network byte is read
    try:
        user = creds.lookup_user(args.user)
        creds.drop_privileges(user)
    except Exception as exc:  # noqa: BLE001 - any doubt: do not run
        log.error("worker.privileges_not_dropped", error=str(exc))
        try:
            ctl.send(ipc.encode_worker({"t": "fatal", "error": f"privilege drop failed: {exc}"[:ipc.MAX_STR]}))
        except OSError:
            pass
        return 3
    creds.set_parent_death_signal(signal.SIGKILL)
    sys.meta_path.insert(0, _LateImports(log))
    ctl.send(ipc.encode_worker({"t": "hello", "pid": os.getpid()}))

    # 3. the snapshot, the routes to the supervisor (passed in: ServiceIO), the services
    _, snapshot, disks = _recv_first(ctl)
    inherited = json.loads(args.listeners)
    pool = tftp_pushers.start(snapshot.config, log, tftp_pusher.main, close=[ctl, rpc_sock],
                              close_fds=[int(e["fd"]) for e in inherited])
    io = worker_io(RpcClient(rpc_sock), InheritedListeners(inherited))
    if pool is not None:
        io = dataclasses.replace(io, tftp_pushers=pool)
    observer = make_observer_class()()
    runtime = make_runtime_class()(snapshot, disks, observer)
    ctl.settimeout(5.0)
    return asyncio.run(Worker(ctl, runtime, observer, log, io).run())

if __name__ == "__main__":
    sys.exit(main())
