"""The boot history on disk: the machines of ``sidusctl clients`` and their timelines survive a restart.

A JSON-lines journal at ``history.file`` (default ``<state_dir>/history.jsonl``,
mode 0640), written by the process that holds the state (the supervisor with
privilege separation, else the one process).  Crash-safe as the lease journal
(:mod:`sidusd.net.leasestore`):

* lines are appended with ``O_APPEND`` and fsync'd in batches, at most
  ``FLUSH_S`` after the event (a crash loses at most that much history, never
  the older lines; boot events are not worth an fsync each);
* at load a torn last line (a crash mid-write) is dropped and terminated, and
  any line that is not one of ours is skipped and counted: the history is
  advisory, a bad line never stops the daemon;
* the journal is rewritten from the live records (``fsutil.atomic_write``:
  old file or new, never a mix) at start and whenever it has ``compact_after``
  lines and twice what the last rewrite left, so it stays bounded by the
  observer's own bounds (``MAX_CLIENTS`` machines x ``MAX_TIMELINE`` entries).

Lines: ``{"k": "c", "mac", "ip", "arch", "first_seen", "last_seen", "timeline": [...]}``
(a whole record, written by a rewrite), ``{"k": "s", "mac", "ip", "arch", "t"}``
(seen) and ``{"k": "e", "mac", "e": {entry}}`` (a timeline entry).
Bounded in memory too: at most ``MAX_BUFFERED`` lines wait for a flush (more
are dropped and counted); a machine's "seen" is written only when it is new or
its address or firmware changed.
Counters: ``history.lines_bad``, ``history.lines_torn``, ``history.lines_dropped``,
``history.write_errors``, ``history.compactions``.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
from pathlib import Path
from typing import Any

from .fsutil import atomic_write, remove_stale_temps, write_all
from .observability import MAX_TIMELINE, ClientRecord, Observer, get_logger

FLUSH_S = 1.0
COMPACT_AFTER = 20_000
FILE_MODE = 0o640
MAX_LINE = 64 * 1024
MAX_BUFFERED = 20_000        # lines waiting for the next flush (a flood beyond it is dropped, counted)


def history_path(config: Any) -> Path | None:
    """Where the journal lives (``history.file``, default ``<state_dir>/history.jsonl``), None: off."""
    h = getattr(config, "history", None)
    if h is not None and not h.enabled:
        return None
    if h is not None and h.file is not None:
        return Path(h.file)
    return Path(config.state_dir) / "history.jsonl"


def _mac_ok(mac: Any) -> bool:
    return isinstance(mac, str) and len(mac) == 17 and mac.count(":") == 5


def replay(lines: list[str]) -> tuple[list[ClientRecord], int]:
    """The records a journal's lines describe (oldest first) and how many lines were refused."""
    recs: collections.OrderedDict[str, ClientRecord] = collections.OrderedDict()
    bad = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            kind, mac = d["k"], d["mac"]
            if not _mac_ok(mac):
                raise ValueError(mac)
            if kind == "c":
                rec = ClientRecord(mac=mac, ip=d.get("ip"), arch=d.get("arch"),
                                   first_seen=float(d["first_seen"]), last_seen=float(d["last_seen"]))
                rec.timeline.extend(e for e in d["timeline"] if isinstance(e, dict))
                recs[mac] = rec
            elif kind in ("s", "e"):
                rec = recs.get(mac) or ClientRecord(mac=mac)
                recs[mac] = rec
                if kind == "s":
                    t = float(d["t"])
                    rec.ip, rec.arch = d.get("ip") or rec.ip, d.get("arch") or rec.arch
                else:
                    e = d["e"]
                    if not isinstance(e, dict) or not isinstance(e.get("event"), str):
                        raise ValueError("entry")
                    t = float(e["t"])
                    rec.timeline.append(e)
                rec.first_seen = t if not rec.first_seen else min(rec.first_seen, t)
                rec.last_seen = max(rec.last_seen, t)
            else:
                raise ValueError(kind)
            recs.move_to_end(mac)
        except (ValueError, KeyError, TypeError):
            bad += 1
    return list(recs.values()), bad


def record_line(rec: ClientRecord) -> str:
    return json.dumps({"k": "c", "mac": rec.mac, "ip": rec.ip, "arch": rec.arch, "first_seen": rec.first_seen,
                       "last_seen": rec.last_seen, "timeline": list(rec.timeline)[-MAX_TIMELINE:]},
                      separators=(",", ":"), default=str)


class HistoryJournal:
    """Loads the journal into an observer, then records what the observer hears (its listener)."""

    def __init__(self, path: Path, observer: Observer, compact_after: int = COMPACT_AFTER,
                 max_buffered: int = MAX_BUFFERED):
        self.path = Path(path)
        self.max_buffered = max_buffered
        self.obs = observer
        self.compact_after = max(1, compact_after)
        self.log = get_logger("history")
        self._fd: int | None = None
        self._buf: list[bytes] = []
        self._lines = 0
        self._compact_at = self.compact_after
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()

    def load(self) -> int:
        """Read the journal into the observer (behind what it saw already), rewrite it, start
        recording.  Returns the number of machines read back.  Raises OSError (the caller logs)."""
        self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        remove_stale_temps(self.path)
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        lines = data.decode("utf-8", errors="replace").split("\n")
        if data and not data.endswith(b"\n"):
            lines = lines[:-1]                 # torn last line: a crash in the middle of a write
            self.obs.count("history.lines_torn")
        recs, bad = replay(lines)
        if bad:
            self.obs.count("history.lines_bad", bad)
        self.obs.restore(recs)
        self.compact()
        self.obs.listeners.append(self.on_event)
        self.log.info("history.loaded", path=str(self.path), machines=len(recs), bad_lines=bad)
        return len(recs)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._flusher())

    # -- recording ---------------------------------------------------------------
    def on_event(self, mac: str, kind: str, data: dict[str, Any]) -> None:
        if kind == "seen":
            d = {"k": "s", "mac": mac, **data}
        else:
            d = {"k": "e", "mac": mac, "e": data}
        line = json.dumps(d, separators=(",", ":"), default=str).encode() + b"\n"
        if len(line) > MAX_LINE or len(self._buf) >= self.max_buffered:
            self.obs.count("history.lines_dropped")
        else:
            self._buf.append(line)
            if len(self._buf) == 1:
                self._wake.set()

    async def _flusher(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(FLUSH_S)
            self.flush()

    def flush(self) -> None:
        """Write and fsync what is buffered; compact when due.  Errors are counted and logged."""
        if not self._buf:
            return
        data, self._buf = b"".join(self._buf), []
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
            write_all(self._fd, data)
            os.fsync(self._fd)
            self._lines += data.count(b"\n")
            if self._lines >= self._compact_at:
                self.compact()
        except OSError as exc:
            self.obs.count("history.write_errors")
            self.log.error("history.write_failed", path=str(self.path), error=str(exc))

    def compact(self) -> None:
        """Rewrite the journal from the observer's records (atomic; bounded by the observer)."""
        lines = [record_line(r) for r in self.obs.clients.values()]
        atomic_write(self.path, "".join(l + "\n" for l in lines).encode(), FILE_MODE)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        self._lines = len(lines)
        self._compact_at = max(self.compact_after, 2 * len(lines))
        self.obs.count("history.compactions")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        if self.on_event in self.obs.listeners:
            self.obs.listeners.remove(self.on_event)
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
