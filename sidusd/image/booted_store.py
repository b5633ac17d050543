"""The booted-generations file: which root each machine was served, kept on disk.

sidusd calls :meth:`BootedRecorder.note` each time it renders a machine's boot
config (sidusd/runtime.py); the pure table (sidusd/boot/booted.py) decides
whether that changes anything, and only then is the file rewritten -- whole,
atomically and durably (:func:`sidusd.fsutil.atomic_write`: temp + fsync +
rename + fsync of the directory).  In the event loop the write runs in a
thread and writes are coalesced (at most one in flight; a burst of new
machines during a boot storm makes a few writes, not one per machine); outside
a loop (tests, tools) it is written at once.  :meth:`BootedRecorder.aclose`
writes what is pending on shutdown.

``sidus-image list`` / ``gc`` read the same file with :func:`read_table`
(never write it: sidusd owns it).

Log events: ``booted.recorded`` (info: a machine was served another root),
``booted.write_failed``, ``booted.load_failed`` (the bad file is renamed
``<file>.bad`` and kept for the operator); counters ``booted.records``,
``booted.write_errors``, ``booted.full`` (an unknown MAC not recorded: the table is full of
inventory hosts).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from sidusd.boot import booted
from sidusd.boot.inventory import normalize_mac
from sidusd.errors import InventoryError, SidusError
from sidusd.fsutil import FileWriteError, atomic_write, remove_stale_temps
from sidusd.observability import get_logger

MAX_FILE_BYTES = 16 << 20


def read_table(path: Path, max_hosts: int = booted.DEFAULT_MAX_HOSTS) -> booted.BootedTable:
    """The table in ``path`` (empty if the file does not exist).  Raises BootedFileError / OSError."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return booted.BootedTable(max_hosts=max_hosts)
    if len(data) > MAX_FILE_BYTES:
        raise booted.BootedFileError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        return booted.decode(data, max_hosts=max_hosts)
    except booted.BootedFileError as e:
        raise booted.BootedFileError(f"{path}: {e}") from None


class BootedStore:
    """One booted-records file and its table in memory."""

    def __init__(self, path: Path, max_hosts: int, ttl_s: float, observer: Any = None):
        self.path = Path(path)
        self.ttl_s = ttl_s
        self.observer = observer
        self.log = get_logger("booted", file=str(self.path))
        self._dirty = False
        self._task: asyncio.Task | None = None
        try:
            remove_stale_temps(self.path)
            self.table = read_table(self.path, max_hosts)
        except (booted.BootedFileError, OSError) as e:
            bad = self.path.with_name(self.path.name + ".bad")
            kept_as: str | None = str(bad)
            try:
                os.replace(self.path, bad)
            except OSError:
                kept_as = None
            self.log.error("booted.load_failed", error=str(e), kept_as=kept_as)
            self._count("booted.load_errors")
            self.table = booted.BootedTable(max_hosts=max_hosts)

    def _count(self, name: str) -> None:
        if self.observer is not None:
            self.observer.count(name)

    def note(self, mac: str, image: str, root: str, hostname: str | None, now: float,
             known: bool = True) -> bool:
        old = self.table.get(mac)
        if not self.table.note(mac, image, root, hostname, now, known):
            if old is None and self.table.get(mac) is None:
                self._count("booted.full")          # an unknown MAC and a table full of known hosts
            return False
        if old is None or old.root != root:
            self._count("booted.records")
            self.log.info("booted.recorded", mac=mac, image=image, root=root, hostname=hostname,
                          previous_root=old.root if old else None)
        self._dirty = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush(now)
            return True
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._flush_later())
        return True

    def _data(self, now: float) -> list:
        """A snapshot of the records (cheap, in the loop); encoded by :meth:`_write` (in a thread)."""
        self.table.prune(now, self.ttl_s)
        self._dirty = False
        return self.table.snapshot()

    def _write_file(self, records: list) -> OSError | None:
        """Encode and write (may run in a thread: touches no shared state); the error, if any."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, booted.encode_records(records), 0o640)  # state: root-only write, root group read
            return None
        except (FileWriteError, OSError) as e:
            return e

    def _failed(self, e: OSError) -> bool:
        self._dirty = True            # written again with the next change or on close
        self._count("booted.write_errors")
        self.log.error("booted.write_failed", error=str(e))
        return False

    def _write(self, records: list) -> bool:
        e = self._write_file(records)
        return True if e is None else self._failed(e)

    def flush(self, now: float | None = None) -> bool:
        """Write now if something changed (synchronous)."""
        if not self._dirty:
            return True
        return self._write(self._data(time.time() if now is None else now))

    async def _flush_later(self) -> None:
        while self._dirty:
            e = await asyncio.to_thread(self._write_file, self._data(time.time()))
            if e is not None:
                self._failed(e)
                return

    async def aclose(self) -> None:
        if self._task is not None:
            try:
                await self._task
            except Exception:             # logged by _write
                pass
            self._task = None
        self.flush()


class BootedRecorder:
    """The runtime's hook: follows ``config.booted`` across reloads (a new file = a new store)."""

    def __init__(self, observer: Any = None):
        self.observer = observer
        self.store: BootedStore | None = None

    def _store_for(self, config: Any) -> BootedStore | None:
        bc = config.booted
        if bc.file is None:
            return None
        st = self.store
        if st is None or st.path != bc.file:
            st = self.store = BootedStore(bc.file, bc.max_hosts, bc.ttl_s, self.observer)
        st.ttl_s = bc.ttl_s
        st.table.max_hosts = bc.max_hosts
        return st

    def note(self, config: Any, mac: str | None, target: Any, now: float | None = None) -> None:
        """Machine ``mac`` was just served ``target`` (a boot.inventory.BootTarget).  Never raises
        on I/O: a failure is logged and counted, the boot goes on."""
        if mac is None or target is None:
            return
        try:
            mac = normalize_mac(mac)
        except InventoryError:
            return
        try:
            st = self._store_for(config)
            if st is not None:
                st.note(mac, target.image, str(target.image_root), target.hostname,
                        time.time() if now is None else now, known=target.mac is not None)
        except (SidusError, OSError, ValueError) as e:      # a record must never cost a boot
            if self.observer is not None:
                self.observer.count("booted.write_errors")
            get_logger("booted").error("booted.write_failed", mac=mac, error=str(e))

    async def aclose(self) -> None:
        if self.store is not None:
            await self.store.aclose()
