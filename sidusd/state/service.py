"""The shared state's edge: start-up read, the LISTEN/NOTIFY watcher, the event flusher.

* :meth:`StateService.open` (blocking, before the loop): read PostgreSQL (creating the
  tables if missing); when it cannot be reached, the local copy; neither: StartupError.
* :meth:`StateService.inventory_source` is the runtime's inventory source: the config as
  read plus the snapshot's images, and the snapshot's inventory (a SIGHUP reload keeps it).
* the watcher (one connection, ``LISTEN sidus_state``): on a notification, or every
  ``state.poll_s``, reads a new snapshot; a valid one is written to the local copy and
  swapped in through :meth:`Runtime.reload`; a refused one leaves the old one serving.
* :meth:`StateService.edit_inventory` is the runtime's ``inventory_writer``: ``sidusctl hosts ...``
  on this server written to PostgreSQL in one transaction (all or nothing, the inventory file's
  checks and messages), served here at once and on every other rack server by the NOTIFY.
* the flusher: the observer's client events into :class:`~sidusd.state.queue.EventQueue`,
  written in batches; while the database is down they wait (the oldest dropped, counted).

The packet path never waits on any of this: it reads the runtime's snapshot only.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sidusd import config as config_mod
from sidusd.boot import inventory as inv_mod
from sidusd.errors import ConfigError, ControlError, StartupError
from sidusd.observability import RepeatBackoff, get_logger

from . import localcopy, pg
from . import snapshot as snap_mod
from .queue import EventQueue

RETRY_FIRST_S = 0.2
RETRY_MAX_S = 5.0
STOP_FLUSH_S = 2.0
WRITE_TIMEOUT_S = 30.0        # an admin's write: connect, wait for another writer, plan, commit


def local_copy_path(config: config_mod.Config) -> Path:
    return config.state.local_copy or config.state_dir / "state-snapshot.json"


def build(base: config_mod.Config, snap: snap_mod.StateSnapshot) -> tuple[config_mod.Config, inv_mod.Inventory]:
    """(``base`` plus the snapshot's images, the snapshot's inventory), checked together."""
    cfg = config_mod.merge_images_file(base, snap_mod.images_text(snap), "the shared state") if snap.images else base
    inv = snap_mod.to_inventory(snap, "state")
    inv_mod.check_against(inv, cfg)
    return cfg, inv


class StateService:
    """The shared state of one rack server (``state.backend: postgresql``)."""

    def __init__(self, config: config_mod.Config, clock: Callable[[], float] = time.time):
        s = config.state
        assert s.dsn is not None
        self.settings, self.dsn, self.clock = s, s.dsn, clock
        self.path = local_copy_path(config)
        self.server = s.server_name or socket.gethostname()
        self.queue = EventQueue(s.queue_max, s.batch_max, s.flush_interval_s)
        self.current: snap_mod.StateSnapshot | None = None
        self.source = "none"                 # where the current snapshot came from
        self.connected = False
        self._base = config
        self._runtime: Any = None
        self._tasks: list[asyncio.Task] = []
        self._wake = asyncio.Event()
        self._adopting = asyncio.Lock()
        self._stopping = False
        self._refused = -1                   # the revision last refused
        self._built: tuple[snap_mod.StateSnapshot, config_mod.Config, Any] | None = None
        self._reported = {"queued": 0, "sent": 0, "dropped": 0}
        self.log = get_logger("state")
        self._pg = pg.psycopg()              # StartupError naming the package when missing

    # -- start -------------------------------------------------------------------------
    def open(self) -> None:
        """The first snapshot: PostgreSQL, else the local copy, else StartupError."""
        try:
            with pg.connect(self.dsn, self.settings.connect_timeout_s) as conn:
                pg.migrate(conn)
                snap = pg.load(conn)
            build(self._base, snap)
        except (self._pg.Error, OSError) as e:
            local = localcopy.read(self.path)
            if local is None:
                raise StartupError(f"state: PostgreSQL cannot be reached ({_first_line(e)}) and there is no "
                                   f"local copy at {self.path} yet: start once with the database up") from None
            build(self._base, local)
            self.current, self.source = local, "local_copy"
            self.log.warning("state.local_copy_used", path=str(self.path), revision=local.revision,
                             error=_first_line(e))
            return
        self.current, self.source, self.connected = snap, "postgresql", True
        localcopy.write(self.path, snap)
        self.log.info("state.loaded", revision=snap.revision, hosts=len(snap.hosts))

    def inventory_source(self, cfg: config_mod.Config) -> tuple[config_mod.Config, inv_mod.Inventory]:
        """The runtime's inventory source (``Runtime(inventory_source=...)``)."""
        assert self.current is not None
        self._base = cfg
        return self._build(cfg, self.current)

    def _build(self, cfg: config_mod.Config, snap: snap_mod.StateSnapshot) -> tuple[config_mod.Config, Any]:
        """:func:`build`, once per (config, snapshot): the watcher checks, the reload reuses it."""
        if self._built is not None and self._built[0] is snap and self._built[1] == cfg:
            return self._built[2]
        out = build(cfg, snap)
        self._built = (snap, cfg, out)
        return out

    # -- an admin's change: every rack server gets it -----------------------------------------
    async def edit_inventory(self, fn: Callable[[inv_mod.Inventory], inv_mod.Inventory]) -> inv_mod.Inventory:
        """``sidusctl hosts ...`` (``Runtime.inventory_writer``): ``fn`` applied to the database's hosts
        and written in one transaction (:func:`pg.awrite_hosts`), checked first as the inventory file
        and as every rack server's watcher would check it (a refusal writes nothing, same messages);
        then served here at once, and on every other rack server by the NOTIFY."""
        out: list[inv_mod.Inventory] = []

        def plan(snap: snap_mod.StateSnapshot) -> pg.HostWrites:
            old, new = _edited(self._base, snap, fn)
            out[:] = [new]
            return ([inv_mod.host_doc(h) for m, h in new.hosts.items() if old.hosts.get(m) != h],
                    [m for m in old.hosts if m not in new.hosts])
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                conn = await pg.aconnect(self.dsn, self.settings.connect_timeout_s)
                async with conn:
                    snap = await pg.awrite_hosts(conn, plan)
        except (TimeoutError, self._pg.Error, OSError) as e:
            raise ControlError(f"the shared state (PostgreSQL) cannot be written: {_first_line(e)}; "
                               "nothing changed") from None
        self._runtime.observer.count("inventory.writes")
        self.log.info("state.hosts_written", revision=snap.revision, hosts=len(snap.hosts))
        await self._adopt(snap, newer_only=True)
        return out[0]

    # -- running -------------------------------------------------------------------------
    async def start(self, runtime: Any) -> None:
        self._runtime = runtime
        self._count()
        runtime.observer.listeners.append(self.note_client)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch(), name="state.watch"),
                       loop.create_task(self._flush_loop(), name="state.flush")]
        for t in self._tasks:
            t.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:   # a bug: said, not swallowed
            self._runtime.observer.count("state.db_errors")
            self.log.error("state.task_failed", task=task.get_name(), error=repr(task.exception()))

    async def stop(self) -> None:
        """Stop watching; give the queued events one bounded chance to go out."""
        if self._runtime is not None and self.note_client in self._runtime.observer.listeners:
            self._runtime.observer.listeners.remove(self.note_client)
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        # asyncio.timeout, not wait_for: 3.11's wait_for can lose a cancel that meets a result
        _, pending = await asyncio.wait(self._tasks, timeout=STOP_FLUSH_S)
        if pending:
            self.log.error("state.stop_stuck", tasks=[t.get_name() for t in pending])
        self._tasks = []
        if len(self.queue):
            try:
                async with asyncio.timeout(STOP_FLUSH_S):
                    await self._drain_once()
            except (TimeoutError, self._pg.Error, OSError):
                pass
            self._count()
        if len(self.queue):
            self.log.warning("state.events_unsent", queued=len(self.queue))

    def note_client(self, mac: str, kind: str, data: dict[str, Any]) -> None:
        """Observer listener: a client event, queued for the database (never waits)."""
        event = data.get("event", kind) if kind == "tl" else kind
        t = data.get("t")
        self.queue.push({"t": t if isinstance(t, (int, float)) else self.clock(), "server": self.server,
                         "kind": str(event), "mac": mac, "body": json.loads(json.dumps(data, default=str))})
        self._count()
        self._wake.set()

    def _count(self) -> None:
        if self._runtime is not None:        # `sidusctl status`: backend_status.state
            self._runtime.backend_status["state"] = self.status()
        obs = self._runtime.observer if self._runtime is not None else None
        for name, value in (("queued", self.queue.queued), ("sent", self.queue.sent),
                            ("dropped", self.queue.dropped)):
            if obs is not None and value != self._reported[name]:
                obs.count(f"state.events.{name}", value - self._reported[name])
            self._reported[name] = value

    async def _watch(self) -> None:
        backoff, delay = RepeatBackoff(first_s=10.0, max_s=300.0), RETRY_FIRST_S
        while True:
            try:
                conn = await pg.aconnect(self.dsn, self.settings.connect_timeout_s)
                async with conn:
                    await conn.execute(f"LISTEN {pg.CHANNEL}")
                    self._set_connected(True, backoff)
                    delay = RETRY_FIRST_S
                    await self._refresh(conn)
                    while True:
                        newest = -1
                        async for n in conn.notifies(timeout=self.settings.poll_s, stop_after=1):
                            newest = max(newest, int(n.payload) if n.payload.isdigit() else 0)
                        if newest < 0 or self.current is None or newest > self.current.revision:
                            await self._refresh(conn)
            except (TimeoutError, self._pg.Error, OSError) as e:
                self._set_connected(False, backoff)
                self._runtime.observer.count("state.db_errors")
                if backoff.failed(_first_line(e), self.clock()):
                    self.log.error("state.db_unreachable", error=_first_line(e), failures=backoff.streak,
                                   suppressed=backoff.take_suppressed(), serving=self.source)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    def _set_connected(self, up: bool, backoff: RepeatBackoff) -> None:
        if up and not self.connected:
            failures = backoff.recovered()
            self.log.info("state.db_connected", failures=failures)
        self.connected = up
        self._count()

    async def _refresh(self, conn: Any) -> None:
        async with asyncio.timeout(self.settings.connect_timeout_s):
            snap = await pg.aload(conn)
        await self._adopt(snap)

    async def _adopt(self, snap: snap_mod.StateSnapshot, newer_only: bool = False) -> None:
        """Serve ``snap`` unless refused or the one served (``newer_only``, a write: nor older; the
        watcher takes a lower revision too: a database restored from a dump)."""
        async with self._adopting:
            cur = self.current
            if cur is not None and self.source == "postgresql" and (
                    snap.revision == cur.revision or (newer_only and snap.revision < cur.revision)):
                return
            await self._swap(snap)

    async def _swap(self, snap: snap_mod.StateSnapshot) -> None:
        changes = snap_mod.diff(self.current, snap)
        try:
            self._build(self._base, snap)
        except ConfigError as e:
            if snap.revision != self._refused:      # said once per revision, not at every poll
                self._refused = snap.revision
                self._runtime.observer.count("state.snapshots.refused")
                self.log.error("state.snapshot_refused", revision=snap.revision, error=str(e))
            return
        self.current, self.source = snap, "postgresql"
        self._count()
        await asyncio.to_thread(localcopy.write, self.path, snap)
        if changes.empty:
            return
        result = await self._runtime.reload()
        self._runtime.observer.count("state.snapshots.applied" if result.ok else "state.snapshots.refused")
        self.log.info("state.applied", revision=snap.revision, ok=result.ok, error=result.error,
                      t=round(self.clock(), 4), **changes.summary())

    async def _flush_loop(self) -> None:
        delay = RETRY_FIRST_S
        conn: Any = None
        while not self._stopping:
            wait = self.queue.next_due(self.clock())
            if wait is None or wait > 0:
                self._wake.clear()
                try:
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                continue
            batch = self.queue.take(self.clock())
            try:
                if conn is None or conn.closed:
                    conn = await pg.aconnect(self.dsn, self.settings.connect_timeout_s)
                async with asyncio.timeout(self.settings.connect_timeout_s):
                    await pg.ainsert_events(conn, batch)
            except asyncio.CancelledError:          # stopping: the batch is sent again by stop()
                self.queue.failed(batch)            # (at least once: it may have been written)
                raise
            except (TimeoutError, self._pg.Error, OSError):
                self.queue.failed(batch)
                self._count()
                if conn is not None:
                    await _close(conn)
                conn = None
                await asyncio.sleep(delay)          # the watcher logs the outage
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            self.queue.done()
            self._count()
            delay = RETRY_FIRST_S

    async def _drain_once(self) -> None:
        conn = await pg.aconnect(self.dsn, self.settings.connect_timeout_s)
        async with conn:
            while len(self.queue):
                batch = self.queue.take(self.clock())
                try:
                    await pg.ainsert_events(conn, batch)
                except BaseException:
                    self.queue.failed(batch)
                    raise
                self.queue.done()

    def status(self) -> dict[str, Any]:
        return {"backend": "postgresql", "source": self.source, "connected": self.connected,
                "revision": self.current.revision if self.current else None,
                "queue": {"depth": len(self.queue), "bound": self.queue.bound, "queued": self.queue.queued,
                          "sent": self.queue.sent, "dropped": self.queue.dropped}}


def _edited(base: config_mod.Config, snap: snap_mod.StateSnapshot,
            fn: Callable[[inv_mod.Inventory], inv_mod.Inventory]) -> tuple[inv_mod.Inventory, inv_mod.Inventory]:
    """(the inventory of ``snap``, ``fn`` applied to it), checked as :meth:`Runtime.edit_inventory` checks
    the file's, and the snapshot it makes checked as each rack server's watcher will (:func:`build`)."""
    cfg, inv = build(base, snap)
    new = fn(inv)
    inv_mod.check_against(new, cfg)
    hosts = [inv_mod.host_doc(h) for h in new.hosts.values()]
    build(base, snap_mod.StateSnapshot(revision=snap.revision, profiles=snap.profiles, hosts=hosts,
                                       images=snap.images))
    return inv, new


async def _close(conn: Any) -> None:
    try:
        await conn.close()
    except Exception:
        pass


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
