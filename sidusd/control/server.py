"""The control socket: a unix stream socket speaking :mod:`sidusd.control.messages`.

The socket file is bound by :func:`sidusd.control.unixsocket.bind_safely`
(mode 0600 from its first instant, never replacing what is not a stale socket)
and every peer's uid is checked with ``SO_PEERCRED``: only root (or the
daemon's own user) may talk to it.

Every connection is bounded: at most ``max_connections`` at once, a read timeout
per connection, request lines capped at ``MAX_REQUEST_BYTES``.  A bad line gets
an error response and the connection keeps serving; nothing a peer sends can
stop the server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ControlError, RemoteProtocolError, SidusError
from ..liveview import client_summary
from ..net.http_up import target_files
from ..observability import LogLimiter, get_logger
from . import messages as m
from .ops import InventoryOps, unanswered
from .remote import start_remote
from .unixsocket import bind_safely, peer_uid

MAX_CONNECTIONS = 16
READ_TIMEOUT_S = 60.0
WRITE_TIMEOUT_S = 10.0
_TOO_LONG = object()


class ControlServer:
    """Serve control requests for ``runtime`` and report on ``services``.

    ``services`` maps a name to an object with ``listeners() -> list[dict]``
    (and, for TFTP, ``active_transfers() -> int``).
    """

    def __init__(self, runtime: Any, services: dict[str, Any], *, socket_path: str | os.PathLike | None = None,
                 max_connections: int = MAX_CONNECTIONS, read_timeout_s: float = READ_TIMEOUT_S):
        self.runtime = runtime
        self.services = services
        self.path = Path(socket_path if socket_path is not None else runtime.config.control.socket_path)
        self.max_connections = max_connections
        self.read_timeout_s = read_timeout_s
        self._server: asyncio.AbstractServer | None = None
        self._ino: tuple[int, int] | None = None
        self._conns: set[asyncio.Task] = set()
        self.log = get_logger("control", socket=str(self.path))
        self.rlog = LogLimiter(self.log)      # lines per connection / request
        self.ops = InventoryOps(runtime, self.log, self._sync_worker)
        self.remote: Any = None         # the control.tcp listener (control/remote.py)

    # -- lifecycle -----------------------------------------------------------
    async def start(self) -> None:
        """Bind the socket (see module docstring) and start accepting."""
        self.remote = await start_remote(self)      # control.tcp (None: not configured)
        sock = bind_safely(self.path)
        st = os.lstat(self.path)
        self._ino = (st.st_dev, st.st_ino)
        self._server = await asyncio.start_unix_server(
            self._on_connection, sock=sock, limit=m.MAX_REQUEST_BYTES + 1)
        self.log.info("control.started", mode=oct(stat.S_IMODE(st.st_mode)))

    async def stop(self) -> None:
        """Stop accepting, close open connections and remove our socket file."""
        if self._server is None:
            return
        self.remote = self.remote and await self.remote.stop()
        self._server.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.log.info("control.stopped")

    # -- connections -------------------------------------------------------------
    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None         # a connection callback always runs in its own task
        obs = self.runtime.observer
        self._conns.add(task)          # tracked from the first await: stop() cancels every one
        try:
            uid = peer_uid(writer)
            if uid is not None and uid not in (0, os.geteuid()):
                obs.count("control.refused")
                self.rlog.warning("control.refused", reason="uid", uid=uid)
                await self._send(writer, m.encode_error("permission denied: the control socket is for root"))
                return
            if len(self._conns) > self.max_connections:
                obs.count("control.refused")
                self.rlog.warning("control.refused", reason="too_many_connections", limit=self.max_connections)
                await self._send(writer, m.encode_error(
                    f"too many control connections (limit {self.max_connections}), try again"))
                return
            async for line in self._lines(reader):
                await self._send(writer, await self._answer(line))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except TimeoutError:
            obs.count("control.timeouts")
            self.rlog.info("control.timeout", timeout_s=self.read_timeout_s)
        finally:
            self._conns.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError, asyncio.CancelledError):
                # stop() cancelled this connection while it closed: the
                # transport is closed already, nothing to wait for.
                pass

    async def _lines(self, reader: asyncio.StreamReader, timeout: float | None = None) -> AsyncIterator[bytes | object]:
        """Request lines; ``_TOO_LONG`` for each line over the cap (its bytes discarded)."""
        buf = bytearray()
        discarding = False
        while True:
            chunk = await asyncio.wait_for(reader.read(m.MAX_REQUEST_BYTES + 1), timeout or self.read_timeout_s)
            if not chunk:
                if buf.strip() and not discarding:
                    yield bytes(buf)
                return
            buf += chunk
            while True:
                i = buf.find(b"\n")
                if i < 0:
                    if len(buf) > m.MAX_REQUEST_BYTES:
                        if not discarding:
                            yield _TOO_LONG
                        discarding = True
                        buf.clear()
                    break
                line = bytes(buf[:i])
                del buf[:i + 1]
                if discarding:
                    discarding = False
                elif len(line) > m.MAX_REQUEST_BYTES:
                    yield _TOO_LONG
                elif line.strip():
                    yield line

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)

    async def _answer(self, line: bytes | object) -> bytes:
        """The response line for one request line.  Never raises for peer input."""
        obs = self.runtime.observer
        obs.count("control.requests")
        if line is _TOO_LONG:
            obs.count("control.malformed")
            self.rlog.warning("control.bad_request", error="line too long")
            return m.encode_error(f"request line too long (limit {m.MAX_REQUEST_BYTES} bytes)")
        try:
            req = m.decode_request(line)  # type: ignore[arg-type]
        except RemoteProtocolError as exc:
            obs.count("control.malformed")
            self.rlog.warning("control.bad_request", error=str(exc))
            return m.encode_error(str(exc))
        try:
            result = await self._dispatch(req)
        except (SidusError, OSError) as exc:
            obs.count("control.errors")
            self.rlog.info("control.request", op=req.op, ok=False, error=str(exc))
            return m.encode_error(str(exc))
        except Exception as exc:  # a bug must not stop the server: report it, keep serving
            obs.count("control.internal_errors")
            self.rlog.exception("control.internal_error", op=req.op)
            return m.encode_error(f"internal error in {req.op}: {type(exc).__name__}: {exc}")
        self.rlog.info("control.request", op=req.op, ok=True)
        return m.encode_ok(result)

    request_lines, answer_line, send = _lines, _answer, _send       # for the TCP listener (control/remote.py)

    # -- ops ----------------------------------------------------------------------
    async def _dispatch(self, req: m.Request) -> Any:
        handlers: dict[str, Callable[..., Awaitable[Any]]] = {
            m.OP_STATUS: self._status,
            m.OP_CLIENTS: self._clients,
            m.OP_HOSTS_LIST: self._hosts_list,
            m.OP_HOSTS_ADD: self._hosts_add,
            m.OP_HOSTS_REMOVE: self._hosts_remove,
            m.OP_RELOAD: self._reload,
            m.OP_HOSTS_DISK: self._hosts_disk,
            m.OP_HOSTS_RESET_DISK: self._hosts_reset_disk,
            m.OP_HOSTS_SHOW: self.ops.show,
            m.OP_HOSTS_SET: self.ops.set,
            m.OP_HOSTS_ADOPT: self.ops.adopt,
            m.OP_IMAGES_STATUS: self.ops.image_status,
            m.OP_HOSTS_IMPORT: self._hosts_import,
            m.OP_HOSTS_CLEAR_CONFLICT: self.ops.clear_conflict, m.OP_HOSTS_ROTATE_SECRET: self.ops.rotate_secret,
        }
        args = dict(req.args)
        if "mac" in args:
            args["mac"] = _normalize(args["mac"])
        return await handlers[req.op](**args)

    async def _sync_worker(self) -> None:
        """With privilege separation: wait for the worker's counters and clients first."""
        sync = getattr(self.runtime, "sync_worker", None)
        if sync is not None:
            await sync()

    async def _status(self) -> dict[str, Any]:
        await self._sync_worker()
        st = dict(self.runtime.status())
        listeners: dict[str, Any] = {}
        per_service: dict[str, int] = {}
        for name, svc in self.services.items():
            try:
                listeners[name] = list(svc.listeners())
                if hasattr(svc, "active_transfers"):
                    per_service[name] = int(svc.active_transfers())
            except Exception as exc:  # one broken service must not hide the others
                listeners[name] = [{"error": f"{type(exc).__name__}: {exc}"}]
        started = st.get("started_at")
        uptime = st.get("uptime_s")
        if uptime is None and isinstance(started, (int, float)):
            uptime = round(time.time() - started, 1)
        return {
            "version": __version__, "pid": st.get("pid", os.getpid()),
            "started_at": started, "uptime_s": uptime,
            "config_path": st.get("config_path"), "generation": st.get("generation"),
            "last_reload": st.get("last_reload"), "listeners": listeners,
            "active_transfers": sum(per_service.values()),
            "transfers_by_service": per_service, "counters": self.runtime.observer.snapshot(),
            "backend_status": st.get("backend_status", {}),
            "privsep": st.get("privsep", False), "processes": st.get("processes", []),
            "preflight": st.get("preflight", []), "broken_images": st.get("broken_images", {}),
            "transfers": _transfers(self.services),
        }

    async def _clients(self, mac: str | None = None) -> list[dict[str, Any]]:
        await self._sync_worker()
        records = list(self.runtime.observer.clients.values())
        records.reverse()                               # most recently seen first
        if mac is not None:
            want = _normalize(mac)
            records = [r for r in records if r.mac == want]
            if not records:
                raise ControlError(f"no machine with MAC {want} seen recently")
        now = time.time()
        # the boot state and stage of each (sidusctl watch: sidusd.liveview), additive to the records
        return [{**r.as_dict(), "unanswered": unanswered(list(r.timeline)),
                 "summary": client_summary(list(r.timeline), target_files(self.runtime, r.mac), now)}
                for r in records]

    async def _hosts_list(self) -> list[dict[str, Any]]:
        hosts = self.runtime.inventory.hosts
        return [host_dict(h) for _, h in sorted(hosts.items())]

    async def _hosts_add(self, mac: str, profile: str, hostname: str | None = None, image: str | None = None,
                         ip: str | None = None, append: str | None = None,
                         persistent: bool | None = None) -> dict[str, Any]:
        """Add the host, or replace the one with the same MAC (``previous`` is then returned).

        ``persistent``: the profile must have ``overlay: iscsi``; the host's disk
        and target are made now and described in ``disk``.
        """
        from ..boot.inventory import Host
        mac = _normalize(mac)
        # Host parses and checks its fields itself: the address as text, no append as "".
        host = Host(mac=mac, hostname=hostname, profile=profile, image=image,
                    ip=ip, append=append)  # type: ignore[arg-type]
        previous: list[Any] = []

        def add(inv: Any) -> Any:
            if persistent:
                p = inv.profiles.get(profile)
                if p is not None and p.overlay != "iscsi":
                    iscsi = sorted(n for n, q in inv.profiles.items() if q.overlay == "iscsi")
                    raise ControlError(f"--persistent needs a profile with overlay: iscsi; {profile!r} is "
                                       f"{p.overlay} (iscsi profiles: {', '.join(iscsi) or 'none'})")
            previous[:] = [inv.hosts.get(mac)]
            return inv.with_host(host)

        new = await self.ops.edit(add)
        old = previous[0] if previous else None
        self.log.info("control.host_saved", mac=mac, profile=profile, replaced=old is not None)
        out = {"host": host_dict(new.hosts[mac]), "previous": host_dict(old) if old is not None else None}
        if persistent:
            out["disk"] = await self._disk_info(mac)
        return out

    async def _hosts_import(self, hosts: list[dict[str, Any]], replace: bool | None = None) -> dict[str, Any]:
        """Add every host of the batch in one inventory change (all or nothing, docs/migration.md)."""
        from ..boot.hostbatch import apply_batch
        from ..boot.inventory import Host
        batch = [Host(**{k: v for k, v in h.items() if k != "source"}) for h in hosts]
        sources = [h.get("source") for h in hosts]
        before: list[Any] = []

        def add(inv: Any) -> Any:
            before[:] = [set(inv.hosts)]
            return apply_batch(inv, batch, sources, bool(replace))

        await self.ops.edit(add)
        replaced = sorted(h.mac for h in batch if h.mac in before[0])
        self.log.info("control.hosts_imported", count=len(batch), replaced=len(replaced))
        return {"imported": len(batch), "replaced": replaced,
                "added": sorted(h.mac for h in batch if h.mac not in before[0])}

    async def _hosts_remove(self, mac: str, delete_disk: bool | None = None) -> dict[str, Any]:
        """Remove the host; its iSCSI target goes with it, its disk only with ``delete_disk``."""
        mac = _normalize(mac)
        mgr = getattr(self.runtime, "iscsi", None)
        disk = mgr.disk(mac) if mgr is not None else None
        if delete_disk and disk is None:
            raise ControlError(f"host {mac} has no iSCSI disk to delete")

        def remove(inv: Any) -> Any:
            if mac not in inv.hosts:
                raise ControlError(f"no host {mac} in the inventory")
            return inv.without_host(mac)

        await self.ops.edit(remove)
        if mgr is not None and disk is not None and delete_disk:
            await mgr.remove_host(mac, disk.plan, delete_disk=True)
        self.log.info("control.host_removed", mac=mac, disk_deleted=bool(delete_disk))
        return {"removed": mac, "disk_deleted": bool(delete_disk)}

    async def _disk_info(self, mac: str) -> dict[str, Any]:
        mgr = getattr(self.runtime, "iscsi", None)
        if mgr is None:
            raise ControlError("no iSCSI backend: iscsi.backend is none (or failed: see sidusctl status)")
        if mgr.disk(mac) is None:
            raise ControlError(f"host {mac} has no iSCSI disk (its profile's overlay is not iscsi)")
        return await mgr.info(mac)

    async def _hosts_disk(self, mac: str, show_secret: bool | None = None) -> dict[str, Any]:
        """Size, use and login state of a host's disk; the CHAP secret only when asked."""
        mac = _normalize(mac)
        info = await self._disk_info(mac)
        if show_secret:
            info["secret"] = self.runtime.iscsi.disk(mac).secret
            self.log.warning("control.secret_shown", mac=mac)
        return info

    async def _hosts_reset_disk(self, mac: str) -> dict[str, Any]:
        """Wipe a host's disk (refused while it is logged in)."""
        mac = _normalize(mac)
        await self._disk_info(mac)
        info = await self.runtime.iscsi.reset(mac)
        self.log.warning("control.disk_reset", mac=mac)
        return info

    async def _reload(self) -> dict[str, Any]:
        res = await self.runtime.reload()
        if not res.ok:
            raise ControlError(f"reload refused, the previous configuration keeps serving: {res.error}")
        return {"ok": True, "generation": self.runtime.generation,
                "restart_needed": list(res.restart_needed)}


# -- helpers --------------------------------------------------------------------

def _normalize(mac: str) -> str:
    from ..boot.inventory import normalize_mac
    try:
        return normalize_mac(mac)
    except (ValueError, SidusError) as exc:
        raise ControlError(getattr(exc, "reason", None) or str(exc)) from None


def _transfers(services: dict[str, Any]) -> list[dict[str, Any]]:
    """The transfers in flight of the services that list them (``transfers()``), with their service."""
    out: list[dict[str, Any]] = []
    for name, svc in services.items():
        try:
            out += [{"service": name, **t} for t in svc.transfers()] if hasattr(svc, "transfers") else []
        except Exception:  # noqa: BLE001 (one broken service must not hide the others)
            continue
    return out


def host_dict(host: Any) -> dict[str, Any]:
    """A host of the inventory as a JSON-able dict (None fields kept, for tables)."""
    if dataclasses.is_dataclass(host) and not isinstance(host, type):
        d = dataclasses.asdict(host)
    else:
        d = dict(vars(host))
    return {k: (v if v is None or isinstance(v, (str, int, float, bool)) else str(v)) for k, v in d.items()}
