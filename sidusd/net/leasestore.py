"""The lease journal on disk (the I/O side of :mod:`sidusd.boot.leases`).

Durability rule (RFC 2131 §4.3.2 asks the server to remember its bindings):
a lease line is appended and ``fsync``-ed *before* the DHCPACK that grants it
is sent, so ``kill -9`` right after an ACK loses nothing.  On start the journal
is replayed line by line; a torn last line (crash in the middle of a write) is
counted, skipped and terminated so the next line is not glued to it.

Appends are all-or-nothing (issue 14 item 4): the store knows the offset
where its last whole record ends; a write cut short (ENOSPC after part of a
line) or a failed fsync truncates the file back to that offset before the
error is raised, so no torn line is left for the next record to be glued to.
If even that truncate fails, the next append truncates first and refuses
while it cannot.  :meth:`LeaseStore.append_many` writes the records of one
loop turn with one write and (``sync=True``) one fsync (group commit); the
refused lines of the last load are in ``refused`` (line number, reason).  When the
journal has ``compact_after`` lines, and at least twice the lines its last
rewrite had (so a pool with more live leases than ``compact_after`` is not
rewritten after every single write), it is rewritten from the live leases:
temp file in the same directory, fsync, rename over the journal, fsync of the
directory (an atomic replace: the journal is always either old or new).

:meth:`LeaseStore.load` and :meth:`LeaseStore.append` are coroutines (the
:class:`~sidusd.net.io.LeaseJournal` protocol, shared with the worker's remote
journal), but the local fsync runs on the event loop thread on purpose: the
ACK must wait for it anyway.  The DHCP service keeps decisions strictly
ordered itself (it reads no other request while a lease is being written), so
no two REQUESTs can race for one address.

A compaction killed before its rename leaves its temp file
(:func:`sidusd.fsutil.atomic_write` names it); :meth:`LeaseStore.load` removes
those of dead processes (:func:`sidusd.fsutil.remove_stale_temps`).
``SIDUSD_LEASE_COMPACT_AFTER`` (environment) overrides the compaction threshold, for tests that
kill the daemon during compactions.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from sidusd.boot.leases import Lease, LeaseDB
from sidusd.fsutil import atomic_write, remove_stale_temps, write_all

COMPACT_AFTER = 10_000          # journal lines before a rewrite
MAX_REFUSED_KEPT = 8            # refused lines of a load remembered (for the warning)
FILE_MODE = 0o640
DIR_MODE = 0o750


class LeaseStore:
    """Append-only JSON-lines journal of leases with atomic compaction."""

    def __init__(self, path: Path | str, compact_after: int | None = None, *,
                 write: Callable[[int, memoryview], int] = os.write,
                 fsync: Callable[[int], None] = os.fsync):
        """``write`` and ``fsync`` are ``os.write`` and ``os.fsync`` (a test passes failing ones)."""
        self.path = Path(path)
        self._write, self._fsync = write, fsync
        self._end = 0                   # where the last whole record ends
        self._torn = False              # a failed append could not be truncated away yet
        self.refused: list[tuple[int, str]] = []
        if compact_after is None:
            try:
                compact_after = int(os.environ.get("SIDUSD_LEASE_COMPACT_AFTER", COMPACT_AFTER))
            except ValueError:
                compact_after = COMPACT_AFTER
        self.compact_after = max(1, compact_after)
        self._fd: int | None = None
        self._lines = 0
        self._compact_at = self.compact_after
        self.stale_temps_removed = 0

    # -- start ---------------------------------------------------------------
    async def load(self, db: LeaseDB) -> tuple[int, int]:
        """Replay the journal into ``db`` and open it for appending.

        Returns ``(lines applied, lines refused)``.  Creates the directory
        (0750) and the file (0640) if missing.  Raises OSError if it cannot.
        """
        self.path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        self.stale_temps_removed = remove_stale_temps(self.path)
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        lines = data.decode("utf-8", errors="replace").splitlines()
        refused: list[tuple[int, str]] = []
        bad = db.replay(lines, refused)
        self.refused = refused[:MAX_REFUSED_KEPT]
        good = sum(1 for l in lines if l.strip()) - bad
        fd = self._open()
        if data and not data.endswith(b"\n"):
            write_all(fd, b"\n")               # terminate a torn last line
            os.fsync(fd)
        self._end = os.fstat(fd).st_size
        self._lines = len(lines)
        self._compact_at = max(self.compact_after, 2 * len(db))
        return good, bad

    def _open(self) -> int:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                                FILE_MODE)
        self._end, self._torn = os.fstat(fd).st_size, False
        return fd

    # -- running -------------------------------------------------------------
    async def append(self, lease: Lease) -> None:
        """Write one lease line and fsync it.  Raises OSError (disk full...)."""
        await self.append_many((lease,))

    async def append_many(self, leases: Sequence[Lease], sync: bool = True) -> None:
        """Write ``leases`` (one write) and, if ``sync``, fsync them; all or nothing.

        Raises OSError (disk full...) with the journal as it was before the call.
        """
        fd = self._fd if self._fd is not None else self._open()
        if self._torn:
            self._truncate(fd)           # raises while the torn tail cannot go
        data = "".join(l.to_json() + "\n" for l in leases).encode()
        try:
            view = memoryview(data)
            while view:
                view = view[self._write(fd, view):]
            if sync:
                self._fsync(fd)
        except OSError:
            try:
                self._truncate(fd)
            except OSError:
                pass                     # _torn stays set: the next append retries first
            raise
        self._end += len(data)
        self._lines += len(leases)

    def _truncate(self, fd: int) -> None:
        """Cut the journal back to its last whole record.  Not fsync'd here: the next
        append's fsync carries the new size (and a torn tail that a crash brings back
        is terminated and refused alone by :meth:`load`)."""
        self._torn = True
        os.ftruncate(fd, self._end)
        self._torn = False

    def maybe_compact(self, db: LeaseDB, now: float) -> bool:
        """Compact when the journal has ``compact_after`` lines and twice what the last
        rewrite left (amortized O(1) per write whatever the number of leases)."""
        if self._lines < self._compact_at:
            return False
        self.compact(db, now)
        return True

    def compact(self, db: LeaseDB, now: float) -> None:
        """Rewrite the journal from ``db`` atomically (temp + fsync + rename + fsync dir)."""
        lines = db.journal_lines(now)
        data = "".join(l + "\n" for l in lines).encode()
        atomic_write(self.path, data, FILE_MODE)
        self._open()
        self._lines = len(lines)
        self._compact_at = max(self.compact_after, 2 * len(lines))

    @property
    def lines(self) -> int:
        """Lines in the journal now (for status)."""
        return self._lines

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
