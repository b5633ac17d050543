"""The supervisor's answers to the worker's requests (the rpc channel): files and leases.

The worker asks; the broker does what needs root or the state files and
always answers, in the order asked (one request at a time: the lease journal
stays strictly ordered):

* ``open``: a file below ``tftp.root``, opened with the same confinement as
  the one process does (:func:`sidusd.net.files.open_confined`); the
  descriptor goes back with ``SCM_RIGHTS``;
* ``lease.load``: the journal, as a read-only descriptor;
* ``lease.append``: checked against the pool, written and fsync'd, applied to
  the supervisor's copy of the table (for compaction), then answered: the
  worker's DHCPACK leaves only after that answer.

Counters: ``privsep.rpc.open``, ``privsep.rpc.lease_append``, ``privsep.rpc.errors``,
``privsep.internal_errors``.
"""

from __future__ import annotations

import array
import asyncio
import json
import os
import socket
import time
from ipaddress import IPv4Address
from typing import Any

from ..errors import StartupError
from ..observability import LogLimiter
from ..runtime_view import RuntimeView
from . import channel, ipc


class Broker:
    """Serves the rpc channel of the current worker (``attach`` on every spawn)."""

    def __init__(self, runtime: RuntimeView, refusals: channel.Refusals, log: Any):
        self.runtime = runtime
        self.obs = runtime.observer
        self.refusals = refusals
        self.log = log
        self.rlog = LogLimiter(log)           # lines per request of the (hostile) worker
        self._store: Any = None
        self._db: Any = None
        self._pool: Any = None

    # -- the lease journal (full DHCP) ------------------------------------------
    async def open_leases(self) -> None:
        cfg = self.runtime.config.dhcp
        if cfg.mode != "full" or cfg.pool is None:
            return
        from ..boot.leases import LeaseDB
        from ..net.leasestore import LeaseStore
        db = LeaseDB.for_pool(cfg.pool)
        store = LeaseStore(cfg.pool.lease_file)
        try:
            good, bad = await store.load(db)
        except OSError as exc:
            raise StartupError(f"dhcp: lease file {cfg.pool.lease_file}: {exc.strerror}") from None
        self._store, self._db, self._pool = store, db, cfg.pool
        self.log.info("privsep.leases_loaded", file=str(cfg.pool.lease_file), lines=good, refused=bad)

    def _lease_db(self) -> Any:
        """The supervisor's copy of the lease table, rebuilt if a reload changed the pool (same journal)."""
        pool = self.runtime.config.dhcp.pool
        if self._db is None or pool is None:
            return self._db
        from ..boot.leases import LeaseDB
        from ..net.dhcp_records import replace_lease_file
        kept = replace_lease_file(pool, self._pool.lease_file)
        if kept != self._pool:
            db = LeaseDB.for_pool(kept)
            db.replay(self._db.journal_lines(time.time()))
            self._db, self._pool = db, kept
        return self._db

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    # -- the channel ---------------------------------------------------------------
    def on_readable(self, w: Any) -> None:
        """Read a batch of requests; they are answered one after the other, the reader
        paused meanwhile (the batch and the socket buffer bound what waits)."""
        loop = asyncio.get_running_loop()
        try:
            w.rpc_queue.extend(channel.read_batch(w.rpc, ipc.decode_rpc, self.refusals, self.obs))
        except channel.Closed as exc:
            w.channel_closed(w.rpc, exc.error)
            return
        if w.rpc_queue and w.rpc_busy is None:
            loop.remove_reader(w.rpc.fileno())
            w.rpc_busy = loop.create_task(self._answer_all(w))

    async def _answer_all(self, w: Any) -> None:
        try:
            while w.rpc_queue and not w.closed:
                await self.answer(w, w.rpc_queue.popleft())
        finally:
            w.rpc_queue.clear()
            w.rpc_busy = None
            if not w.closed:
                asyncio.get_running_loop().add_reader(w.rpc.fileno(), self.on_readable, w)

    async def answer(self, w: Any, req: ipc.RpcRequest) -> None:
        """Serve one request and always answer it (an internal error is an answer too)."""
        fd = None
        try:
            reply, fd = await self.serve(req)
        except Exception as exc:  # a bug here must not stop the supervisor
            self.obs.count("privsep.internal_errors")
            self.rlog.exception("privsep.internal_error", t=req.t, error=repr(exc))
            reply = {"ok": False, "error": "internal error"}
        try:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd is not None else []
            w.rpc.sendmsg([json.dumps({"id": req.id, **reply}).encode()], anc)
        except OSError as exc:
            self.obs.count("privsep.rpc.errors")
            self.rlog.warning("privsep.rpc_reply_failed", t=req.t, error=str(exc))
        finally:
            if fd is not None:
                os.close(fd)

    async def serve(self, req: ipc.RpcRequest) -> tuple[dict[str, Any], int | None]:
        """``(reply, descriptor to pass or None)`` for one checked request."""
        if req.t == "open":
            from ..net.files import NotServable, open_confined
            self.obs.count("privsep.rpc.open")
            try:
                fd, size = open_confined(self.runtime.config.tftp.root, req.body["parts"])
            except NotServable as exc:
                return {"ok": False, "reason": exc.reason, "missing": exc.missing}, None
            return {"ok": True, "size": size}, fd
        if self._store is None:
            self.obs.count("privsep.rpc.errors")
            return {"ok": False, "error": "no lease journal (dhcp.mode is not full)"}, None
        if req.t == "lease.load":
            try:
                fd = os.open(self._store.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                return {"ok": False, "error": f"{self._store.path}: {exc.strerror}"}, None
            return {"ok": True}, fd
        return await self._append(req.body), None

    async def _append(self, b: dict[str, Any]) -> dict[str, Any]:
        """lease.append: checked against the pool, written (with ``more``: one write, one
        fsync unless ``sync`` is false), then answered."""
        from ..boot.leases import Lease
        db = self._lease_db()
        leases = []
        for d in (b, *b.get("more", ())):
            lease = Lease(ip=IPv4Address(d["ip"]), mac=d["mac"], state=d["state"], expires=d["expires"])
            if d["ip"] is None or lease.ip not in db.network:
                self.refusals.refuse("bad_field", f"lease {d['ip']} outside the pool")
                return {"ok": False, "error": "address outside the pool"}
            leases.append(lease)
        self.obs.count("privsep.rpc.lease_append", len(leases))
        try:
            await self._store.append_many(leases, sync=b.get("sync", True))
        except OSError as exc:
            self.rlog.error("privsep.lease_write_failed", mac=leases[0].mac, ip=str(leases[0].ip),
                           leases=len(leases), error=str(exc))
            return {"ok": False, "error": f"lease journal: {exc.strerror or exc}"}
        for lease in leases:
            db.apply(lease)
        try:
            self._store.maybe_compact(db, time.time())
        except OSError as exc:
            self.rlog.error("dhcp.lease_compact_failed", error=str(exc))
        return {"ok": True}
