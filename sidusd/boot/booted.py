"""Which image generation each machine was served (pure; docs/images.md, "Booted generations").

sidusd cannot see whether a machine still runs.  What it sees is the moment
it renders a machine's boot config (``pxelinux.cfg/01-<mac>`` or the iPXE
script): that document names the image root -- one generation directory --
that the machine is about to mount over NFS.  :class:`BootedTable` keeps, per
MAC, the last root it was served, and the rule of "still running" is:

* a record stays until that MAC is served **another root** (it rebooted into
  another generation: the old one is no longer its root), or
* until ``ttl_s`` passed since it was last served (``booted.ttl_s``; 0 = never);
* at most ``max_hosts`` records: beyond, the least recently served is dropped --
  first among machines the inventory does not list (``known`` False: their MAC
  is only a name in a TFTP/HTTP request, anyone can make up thousands); a new
  unknown MAC never pushes out an inventory host's record.

``last_s`` is refreshed at most every ``refresh_s`` so that a machine that
reboots often into the same generation does not rewrite the file each time.

The table is encoded as one JSON document (version 1) that the store
(sidusd/image/booted_store.py) writes atomically; :func:`decode` refuses
anything malformed with :class:`BootedFileError` (never a partial table): the
file's shape is declared once (:class:`_File`) and checked by msgspec.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from sidusd.errors import SidusError

VERSION = 1
DEFAULT_MAX_HOSTS = 10_000
DEFAULT_REFRESH_S = 3600.0
MAX_FIELD = 4096


class BootedFileError(SidusError):
    """The booted-records file is not a valid version-1 table."""


@dataclass(frozen=True)
class BootRecord:
    """Machine ``mac`` was served image ``image`` whose root is ``root``."""
    mac: str
    image: str
    root: str
    hostname: str | None
    first_s: float          # first served this root (Unix time)
    last_s: float           # last served (refreshed every refresh_s at most)
    known: bool = True      # the inventory lists this MAC

    def as_dict(self) -> dict[str, object]:
        return {"mac": self.mac, "image": self.image, "root": self.root, "hostname": self.hostname,
                "first_s": round(self.first_s, 3), "last_s": round(self.last_s, 3), "known": self.known}


def _expired(rec: BootRecord, now: float, ttl_s: float) -> bool:
    return ttl_s > 0 and now - rec.last_s > ttl_s


class BootedTable:
    """MAC -> :class:`BootRecord`; bounded to ``max_hosts`` records."""

    def __init__(self, records: Iterable[BootRecord] = (), max_hosts: int = DEFAULT_MAX_HOSTS,
                 refresh_s: float = DEFAULT_REFRESH_S):
        if max_hosts < 1:
            raise ValueError("max_hosts must be at least 1")
        self.max_hosts = max_hosts
        self.refresh_s = refresh_s
        self._by_mac: dict[str, BootRecord] = {}
        for r in sorted(records, key=lambda r: r.last_s):
            self._by_mac[r.mac] = r
        while len(self._by_mac) > max_hosts:
            self._evict_oldest(True)

    def __len__(self) -> int:
        return len(self._by_mac)

    def get(self, mac: str) -> BootRecord | None:
        return self._by_mac.get(mac)

    def snapshot(self) -> list[BootRecord]:
        """The records, unsorted (O(n) pointer copy: the records are immutable)."""
        return list(self._by_mac.values())

    def records(self) -> list[BootRecord]:
        return sorted(self._by_mac.values(), key=lambda r: r.mac)

    def _evict_oldest(self, may_evict_known: bool) -> bool:
        """Drop the least recently served unknown machine, else (if allowed) known one."""
        pool = [r for r in self._by_mac.values() if not r.known]
        if not pool and may_evict_known:
            pool = list(self._by_mac.values())
        if not pool:
            return False
        oldest = min(pool, key=lambda r: (r.last_s, r.mac))
        del self._by_mac[oldest.mac]
        return True

    def note(self, mac: str, image: str, root: str, hostname: str | None, now: float,
             known: bool = True) -> bool:
        """Record that ``mac`` (``known``: listed in the inventory) was served ``image`` (root
        ``root``) at ``now``.

        Returns True when the table changed in a way worth persisting: a new
        MAC, another root/image/hostname, or ``last_s`` older than ``refresh_s``.
        False also when the table is full of inventory hosts and ``mac`` is unknown.
        """
        old = self._by_mac.get(mac)
        if old is not None and (old.root, old.image, old.hostname, old.known) == (root, image, hostname, known):
            if now - old.last_s < self.refresh_s:
                return False
            self._by_mac[mac] = BootRecord(mac, image, root, hostname, old.first_s, now, known)
            return True
        first = old.first_s if old is not None and old.root == root else now
        if old is None and len(self._by_mac) >= self.max_hosts and not self._evict_oldest(known):
            return False
        self._by_mac[mac] = BootRecord(mac, image, root, hostname, first, now, known)
        return True

    def prune(self, now: float, ttl_s: float) -> int:
        """Drop records not served for more than ``ttl_s`` (0: keep forever); how many."""
        gone = [m for m, r in self._by_mac.items() if _expired(r, now, ttl_s)]
        for m in gone:
            del self._by_mac[m]
        return len(gone)

    def live(self, now: float, ttl_s: float) -> list[BootRecord]:
        """Records that still count as running at ``now``."""
        return [r for r in self.records() if not _expired(r, now, ttl_s)]

    def encode(self) -> bytes:
        return encode_records(self.records())


def encode_records(records: Iterable[BootRecord]) -> bytes:
    """The file's bytes for ``records`` (the store encodes a snapshot off the event loop)."""
    doc = {"version": VERSION, "records": [r.as_dict() for r in sorted(records, key=lambda r: r.mac)]}
    return (json.dumps(doc, indent=0, sort_keys=True) + "\n").encode()


FileText = Annotated[str, Meta(min_length=1, max_length=MAX_FIELD, pattern=r"^[^\x00\n]*\Z")]


class _FileRecord(Struct, frozen=True):
    """One record as the file holds it (:meth:`BootRecord.as_dict`); unknown fields are ignored."""
    mac: FileText
    image: FileText
    root: FileText
    first_s: float
    last_s: float
    hostname: FileText | None = None
    known: bool = True


class _File(Struct, frozen=True):
    version: Literal[1]
    records: list[_FileRecord]


def decode(data: bytes, max_hosts: int = DEFAULT_MAX_HOSTS,
           refresh_s: float = DEFAULT_REFRESH_S) -> BootedTable:
    """Parse the file written by :meth:`BootedTable.encode`.  Raises :class:`BootedFileError`."""
    try:
        doc = msgspec.json.decode(data, type=_File, strict=True)
    except msgspec.ValidationError as e:
        raise BootedFileError(f"expected {{\"version\": {VERSION}, \"records\": [...]}}: {e}") from None
    except msgspec.DecodeError as e:
        raise BootedFileError(f"not JSON: {e}") from None
    recs = [BootRecord(mac=r.mac, image=r.image, root=r.root, hostname=r.hostname, first_s=r.first_s,
                       last_s=r.last_s, known=r.known) for r in doc.records]
    return BootedTable(recs, max_hosts=max_hosts, refresh_s=refresh_s)


def users_by_root(records: Iterable[BootRecord]) -> dict[str, list[BootRecord]]:
    """Root directory -> the records of the machines that booted it (for ``gc`` and ``list``)."""
    out: dict[str, list[BootRecord]] = {}
    for r in records:
        out.setdefault(r.root, []).append(r)
    return out
