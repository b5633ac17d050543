"""The lease journal on disk (the I/O side of :mod:`sidusd.boot.leases`).

Durability rule (RFC 2131 §4.3.2 asks the server to remember its bindings):
a lease line is appended and ``fsync``-ed *before* the DHCPACK that grants it
is sent, so ``kill -9`` right after an ACK loses nothing.  On start the journal
is replayed line by line; a torn last line (crash in the middle of a write) is
counted, skipped and terminated so the next line is not glued to it.  When the
journal has ``compact_after`` lines it is rewritten from the live leases:
temp file in the same directory, fsync, rename over the journal, fsync of the
directory (an atomic replace: the journal is always either old or new).

The fsync runs on the event loop thread on purpose: the ACK must wait for it
anyway, and doing it inline keeps decisions strictly ordered (no two REQUESTs
can race for one address).
"""

from __future__ import annotations

import os
from pathlib import Path

from sidusd.boot.leases import Lease, LeaseDB

COMPACT_AFTER = 10_000          # journal lines before a rewrite
FILE_MODE = 0o640
DIR_MODE = 0o750


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class LeaseStore:
    """Append-only JSON-lines journal of leases with atomic compaction."""

    def __init__(self, path: Path | str, compact_after: int = COMPACT_AFTER):
        self.path = Path(path)
        self.compact_after = max(1, compact_after)
        self._fd: int | None = None
        self._lines = 0

    # -- start ---------------------------------------------------------------
    def load(self, db: LeaseDB) -> tuple[int, int]:
        """Replay the journal into ``db`` and open it for appending.

        Returns ``(lines applied, lines refused)``.  Creates the directory
        (0750) and the file (0640) if missing.  Raises OSError if it cannot.
        """
        self.path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        lines = data.decode("utf-8", errors="replace").splitlines()
        bad = db.replay(lines)
        good = sum(1 for l in lines if l.strip()) - bad
        self._open()
        if data and not data.endswith(b"\n"):
            _write_all(self._fd, b"\n")          # terminate a torn last line
            os.fsync(self._fd)
        self._lines = len(lines)
        return good, bad

    def _open(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                           FILE_MODE)

    # -- running -------------------------------------------------------------
    def append(self, lease: Lease) -> None:
        """Write one lease line and fsync it.  Raises OSError (disk full...)."""
        if self._fd is None:
            self._open()
        _write_all(self._fd, (lease.to_json() + "\n").encode())
        os.fsync(self._fd)
        self._lines += 1

    def maybe_compact(self, db: LeaseDB, now: float) -> bool:
        """Compact when the journal has grown to ``compact_after`` lines."""
        if self._lines < self.compact_after:
            return False
        self.compact(db, now)
        return True

    def compact(self, db: LeaseDB, now: float) -> None:
        """Rewrite the journal from ``db`` atomically (temp + fsync + rename + fsync dir)."""
        lines = db.journal_lines(now)
        data = "".join(l + "\n" for l in lines).encode()
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.path.parent)
        self._open()
        self._lines = len(lines)

    @property
    def lines(self) -> int:
        """Lines in the journal now (for status)."""
        return self._lines

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
