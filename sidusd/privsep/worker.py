"""The network worker: ``python -m sidusd.privsep.worker`` (started by the supervisor only).

Order of a start:

1. import every module the services need (as root: the code may live where
   the worker user cannot read);
2. :func:`sidusd.privsep.creds.drop_privileges` to ``security.worker_user``
   (bounding set emptied, no capability, no supplementary group,
   ``PR_SET_NO_NEW_PRIVS``), checked in ``/proc/self/status``; any doubt: exit 3;
3. read the first snapshot from the supervisor, then run the unchanged
   :class:`~sidusd.net.dhcp_server.DhcpService`, :class:`~sidusd.net.tftp_server.TftpService`
   and :class:`~sidusd.net.http_server.HttpService` on a :class:`WorkerRuntime`.

What the services would do with privileges is routed to the supervisor:

* ``bind()`` of an address the supervisor bound (UDP 67/4011 per interface,
  UDP 69, the HTTP listener) adopts the inherited descriptor
  (:class:`AdoptingSocket`: ``dup2`` over the new socket, options replayed);
* opening a file below ``tftp.root`` (``open_confined``) is an ``open`` request:
  the supervisor opens it with the same confinement and passes the descriptor,
  so the worker needs no read access to any directory;
* the lease journal (full DHCP) is :class:`RemoteLeaseStore`: a lease is sent
  to the supervisor, which appends and fsyncs it and only then answers; the
  DHCPACK waits for that answer (as it waited for the fsync before);
* counters, clients seen, timeline entries and booted records are forwarded
  in batches (:class:`ForwardingObserver`), at the latest every ``FLUSH_S``
  and before every ``stats`` answer (``sidusctl status`` asks for one first).

Exit codes: 0 stopped, 1 a service could not start (the reason went to the
supervisor as ``fatal``), 3 privileges could not be dropped.
"""

from __future__ import annotations

import argparse
import array
import collections
import errno
import ipaddress
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import creds, ipc

FLUSH_S = 0.5                 # forwarded events wait at most this long
MAX_PENDING_EVENTS = 20_000   # events kept while the supervisor is slow (oldest dropped, counted)
RPC_TIMEOUT_S = 10.0
STOP_GRACE_S = 10.0

_REAL_SOCKET = socket.socket
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)


# -- inherited listening sockets -----------------------------------------------------

class Inherited:
    """The listening sockets the supervisor bound, keyed by (type, address, port, device)."""

    def __init__(self, entries: list[dict[str, Any]]):
        self._by_key: dict[tuple, int] = {}
        for e in entries:
            kind = socket.SOCK_DGRAM if e["kind"] == "udp" else socket.SOCK_STREAM
            self._by_key[(kind, str(ipaddress.IPv4Address(e["address"])), int(e["port"]),
                          e.get("device") or "")] = int(e["fd"])

    def fd_for(self, kind: int, address: Any, device: str) -> int | None:
        if not isinstance(address, tuple) or len(address) != 2:
            return None
        try:
            host = str(ipaddress.IPv4Address(address[0] or "0.0.0.0"))
        except ValueError:
            return None
        return self._by_key.get((kind, host, int(address[1]), device))


INHERITED = Inherited([])


class AdoptingSocket(_REAL_SOCKET):
    """``socket.socket`` in the worker: a bind to an address the supervisor bound adopts its socket.

    The options set before ``bind`` are replayed on the adopted socket (the
    supervisor set the same ones; a device binding is already there), the
    blocking mode is kept.  Any other bind is a normal bind (transfer
    sockets on port 0), and a privileged one fails as it should.
    """

    __slots__ = ("_sidus_opts",)

    def setsockopt(self, level: int, optname: int, value: Any, *rest: Any) -> None:  # type: ignore[override]
        try:
            super().setsockopt(level, optname, value, *rest)
        except PermissionError:
            if (level, optname) != (socket.SOL_SOCKET, SO_BINDTODEVICE):
                raise
        try:
            opts = self._sidus_opts
        except AttributeError:
            opts = self._sidus_opts = []
        opts.append((level, optname, value, rest))

    def bind(self, address: Any) -> None:  # type: ignore[override]
        opts = getattr(self, "_sidus_opts", [])
        device = ""
        for level, optname, value, _ in opts:
            if (level, optname) == (socket.SOL_SOCKET, SO_BINDTODEVICE):
                device = (value.decode() if isinstance(value, bytes) else str(value)).rstrip("\0")
        fd = INHERITED.fd_for(self.type, address, device) if self.family == socket.AF_INET else None
        if fd is None:
            return super().bind(address)
        timeout = self.gettimeout()
        os.dup2(fd, self.fileno(), inheritable=False)
        self.settimeout(timeout)
        for level, optname, value, rest in opts:
            if (level, optname) == (socket.SOL_SOCKET, SO_BINDTODEVICE):
                continue
            try:
                super().setsockopt(level, optname, value, *rest)
            except OSError:
                pass                      # the supervisor set it already


# -- requests to the supervisor ---------------------------------------------------------

class RpcClient:
    """Blocking request/answer on the rpc channel (one at a time; a thread may call too)."""

    def __init__(self, sock: socket.socket, timeout_s: float = RPC_TIMEOUT_S):
        self.sock = sock
        self.sock.settimeout(timeout_s)
        self._lock = threading.Lock()
        self._id = 0

    def call(self, req: dict[str, Any], want_fd: bool = False) -> tuple[dict[str, Any], int | None]:
        with self._lock:
            self._id += 1
            rid = self._id
            self.sock.send(ipc.encode_worker({**req, "id": rid}))
            while True:
                data, anc, _flags, _ = self.sock.recvmsg(ipc.MAX_MSG, socket.CMSG_SPACE(4 * 4))
                fds = _fds_of(anc)
                if not data:
                    for fd in fds:
                        os.close(fd)
                    raise OSError(errno.EPIPE, "the supervisor closed the request channel")
                reply = json.loads(data)
                if reply.get("id") != rid:            # the answer to a request that timed out
                    for fd in fds:
                        os.close(fd)
                    continue
                fd = None
                if fds:
                    fd = fds[0]
                    for extra in fds[1:]:
                        os.close(extra)
                    if not want_fd:
                        os.close(fd)
                        fd = None
                return reply, fd


def _fds_of(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[:len(data) - len(data) % a.itemsize])
            fds.extend(a)
    return fds


RPC: RpcClient | None = None


def remote_open_confined(root: Any, parts: tuple[str, ...]) -> tuple[int, int]:
    """:func:`sidusd.net.files.open_confined`, done by the supervisor (``root`` is its tftp.root)."""
    from ..net.files import NotServable
    assert RPC is not None
    try:
        reply, fd = RPC.call({"t": "open", "parts": list(parts)}, want_fd=True)
    except (OSError, ValueError) as exc:
        raise NotServable(f"file server unavailable: {exc}") from None
    if reply.get("ok") and fd is not None:
        return fd, int(reply.get("size", 0))
    if fd is not None:
        os.close(fd)
    raise NotServable(str(reply.get("reason", "refused")), bool(reply.get("missing", False)))


class RemoteLeaseStore:
    """:class:`sidusd.net.leasestore.LeaseStore` whose writes the supervisor makes durable."""

    def __init__(self, path: Any, compact_after: int = 0):
        self.path = Path(path)
        self._lines = 0

    def load(self, db: Any) -> tuple[int, int]:
        assert RPC is not None
        reply, fd = RPC.call({"t": "lease.load"}, want_fd=True)
        if not reply.get("ok") or fd is None:
            raise OSError(errno.EIO, str(reply.get("error", "lease journal refused")))
        with open(fd, "rb", closefd=True) as f:
            data = f.read()
        lines = data.decode("utf-8", errors="replace").splitlines()
        bad = db.replay(lines)
        self._lines = len(lines)
        return sum(1 for l in lines if l.strip()) - bad, bad

    def append(self, lease: Any) -> None:
        """Returns once the supervisor has the lease on disk (fsync); OSError if it has not."""
        assert RPC is not None
        reply, _ = RPC.call({"t": "lease.append", "lease": json.loads(lease.to_json())})
        if not reply.get("ok"):
            raise OSError(errno.EIO, str(reply.get("error", "lease write refused")))
        self._lines += 1

    def maybe_compact(self, db: Any, now: float) -> bool:
        return False                    # the supervisor compacts its journal itself

    def compact(self, db: Any, now: float) -> None:
        pass

    @property
    def lines(self) -> int:
        return self._lines

    def close(self) -> None:
        pass


# -- forwarding observer and runtime ------------------------------------------------------

def _make_observer_class() -> type:
    from ..observability import Observer

    class ForwardingObserver(Observer):
        """The worker's observer: works locally (``mac_for_ip``...) and queues what the supervisor shows."""

        def __init__(self) -> None:
            super().__init__()
            self.delta: collections.Counter[str] = collections.Counter()
            self.pending: collections.deque[list] = collections.deque(maxlen=MAX_PENDING_EVENTS)
            self.dropped = 0

        def count(self, name: str, n: int = 1) -> None:
            # the hot path (once per datagram): the totals live in the supervisor only
            self.delta[name] += n

        def queue(self, event: list) -> None:
            try:
                ipc.check_event(event)
            except ipc.RemoteProtocolError:
                self.count("privsep.events_unforwardable")
                return
            if len(self.pending) == self.pending.maxlen:
                self.dropped += 1
            self.pending.append(event)

        def client_seen(self, mac: str, ip: str | None = None, arch: str | None = None) -> Any:
            rec = super().client_seen(mac, ip, arch)
            self.queue(["seen", mac, ip if ip and ip != "0.0.0.0" else None, arch or None])
            return rec

        def timeline(self, mac: str | None, event: str, **fields: Any) -> None:
            if not mac:
                return
            super().timeline(mac, event, **fields)
            t = self.clients[mac].timeline[-1]["t"]
            self.queue(["tl", mac, t, event, {k: _plain(v) for k, v in fields.items()}])

        def take_messages(self) -> list[bytes]:
            """The pending counters and events as datagrams of at most ``MAX_MSG`` bytes."""
            out: list[bytes] = []
            counters = dict(self.delta)
            self.delta.clear()
            dropped, self.dropped = self.dropped, 0
            budget = ipc.MAX_MSG - 1024
            batch: list[list] = []
            size = len(json.dumps(counters)) + 64
            while self.pending:
                e = self.pending[0]
                n = len(ipc.encode_worker({"e": e})) + 1
                if batch and (size + n > budget or len(batch) >= ipc.MAX_EVENTS):
                    out.append(ipc.encode_worker({"t": "events", "counters": counters, "events": batch,
                                                  "dropped": dropped}))
                    counters, dropped, batch, size = {}, 0, [], 64
                batch.append(self.pending.popleft())
                size += n
            if batch or counters or dropped:
                # counters are capped per message too
                items = list(counters.items())
                first = dict(items[:ipc.MAX_COUNTERS])
                out.append(ipc.encode_worker({"t": "events", "counters": first, "events": batch,
                                              "dropped": dropped}))
                for i in range(ipc.MAX_COUNTERS, len(items), ipc.MAX_COUNTERS):
                    out.append(ipc.encode_worker({"t": "events", "counters": dict(items[i:i + ipc.MAX_COUNTERS]),
                                                  "events": [], "dropped": 0}))
            return out

    return ForwardingObserver


def _plain(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if v == v and abs(v) != float("inf") else None
    return str(v)


@dataclass(frozen=True)
class _Plan:
    target_iqn: str
    initiator_iqn: str
    user: str


@dataclass(frozen=True)
class _Disk:
    plan: _Plan
    secret: str


class _Disks:
    """What the worker knows of the iSCSI manager: each persistent host's login (for its config)."""

    def __init__(self, disks: dict[str, dict[str, str]]):
        self.disks = {mac: _Disk(_Plan(d["target_iqn"], d["initiator_iqn"], d["user"]), d["secret"])
                      for mac, d in disks.items()}

    def disk(self, mac: str) -> Any:
        return self.disks.get(mac)


class _ForwardBooted:
    """The worker's booted recorder: the supervisor writes the file (docs/images.md)."""

    def __init__(self, observer: Any):
        self.observer = observer

    def note(self, config: Any, mac: str | None, target: Any, now: float | None = None) -> None:
        if mac is None or target is None or getattr(config.booted, "file", None) is None:
            return
        self.observer.queue(["booted", mac, target.image, target.hostname])

    async def aclose(self) -> None:
        pass


def _make_runtime_class() -> type:
    from ..runtime import Runtime

    class WorkerRuntime(Runtime):
        """The attributes the services use (config, inventory, snapshot, observer, render,
        iscsi_login), fed by the supervisor's snapshots; nothing here writes a file."""

        def __init__(self, snapshot: Any, disks: dict[str, Any] | None, observer: Any):
            super().__init__(Path(snapshot.config.source), snapshot, observer=observer, iscsi_watch_s=0)
            self.booted = _ForwardBooted(observer)
            self.update(snapshot, disks)

        def update(self, snapshot: Any, disks: dict[str, Any] | None) -> None:
            self._snap = snapshot
            self.iscsi = _Disks(disks) if disks is not None else None

        async def reload(self) -> Any:            # pragma: no cover - the supervisor reloads
            raise RuntimeError("the worker does not reload: the supervisor pushes snapshots")

        async def edit_inventory(self, fn: Any) -> Any:   # pragma: no cover
            raise RuntimeError("the worker writes no state")

    return WorkerRuntime


# -- the worker's life ---------------------------------------------------------------------

class Worker:
    def __init__(self, ctl: socket.socket, runtime: Any, observer: Any, log: Any):
        self.ctl = ctl
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
        for name, svc in self.services.items():
            listeners[name] = [{k: _plain(v) for k, v in l.items()} for l in svc.listeners()]
            if hasattr(svc, "active_transfers"):
                transfers[name] = int(svc.active_transfers())
        return {"t": "stats", "id": sid, "listeners": listeners, "transfers": transfers}

    async def run(self) -> int:
        import asyncio

        from ..daemon import build_services
        from ..errors import SidusError
        loop = asyncio.get_running_loop()
        self.stop = asyncio.Event()
        self.services = build_services(self.runtime)
        started: list[Any] = []
        try:
            for svc in self.services.values():
                await svc.start()
                started.append(svc)
        except (SidusError, OSError) as exc:
            self.send({"t": "fatal", "error": str(exc)[:ipc.MAX_STR]})
            for svc in reversed(started):
                await _stop(svc, 0)
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
            await _stop(svc, self.grace_s)
        try:
            self.flush()
        except OSError:
            pass
        self.log.info("worker.stopped")
        return self.exit_code

    async def _ticker(self) -> None:
        import asyncio
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
        elif kind == "sync":
            self.flush()
            self.send(self.stats(int(msg[1])))
        elif kind == "stop":
            self.grace_s = float(msg[1])
            self.stop.set()


async def _stop(svc: Any, grace_s: float) -> None:
    try:
        if hasattr(svc, "active_transfers"):
            await svc.stop(grace_s=grace_s)
        else:
            await svc.stop()
    except Exception:       # stopping must reach every service
        pass


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
    import asyncio  # noqa: F401
    import email.utils  # noqa: F401
    import encodings.idna  # noqa: F401  (getaddrinfo of a str host)
    import hashlib  # noqa: F401
    import secrets  # noqa: F401
    import traceback  # noqa: F401
    from .. import daemon  # noqa: F401
    from ..net import dhcp_server, files, listeners, tftp_server  # noqa: F401  (listeners: local_io)
    try:
        from ..net import http_server
    except ImportError:                      # aiohttp missing: http.enabled then fails clearly
        http_server = None
    from ..observability import get_logger, setup_logging

    ctl = _REAL_SOCKET(fileno=args.ctl_fd)
    rpc_sock = _REAL_SOCKET(fileno=args.rpc_fd)
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

    # 3. the snapshot, the routes to the supervisor, the services
    _, snapshot, disks = _recv_first(ctl)
    global RPC, INHERITED
    RPC = RpcClient(rpc_sock)
    INHERITED = Inherited(json.loads(args.listeners))
    socket.socket = AdoptingSocket                       # type: ignore[misc]
    # until the worker passes its RPC-backed ServiceIO (h1): local_io() opens through files.open_confined
    files.open_confined = remote_open_confined           # type: ignore[assignment]
    dhcp_server.LeaseStore = RemoteLeaseStore             # type: ignore[assignment,misc]
    observer = _make_observer_class()()
    runtime = _make_runtime_class()(snapshot, disks, observer)
    ctl.settimeout(5.0)
    worker = Worker(ctl, runtime, observer, log)
    import asyncio as _asyncio
    return _asyncio.run(worker.run())


if __name__ == "__main__":
    sys.exit(main())
