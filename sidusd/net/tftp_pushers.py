"""TFTP pushers: file transfers carried out by other processes, so more than one CPU moves bytes.

One asyncio worker moves every byte on one CPU.  Where the clients' and the
server's work share the machine (many lockstep clients on 2 CPUs: atftpd's
threads used both, sidusd's one process did not; docs/performance.md), that
CPU is the limit.  So the network worker forks *pushers*
(:mod:`sidusd.net.tftp_pusher`, ``tftp.pushers``, read at start) before its
event loop starts: the same unprivileged user, no capabilities, no listening
socket and no channel to the supervisor.

* Everything that decides stays in the worker: a request is read, admitted,
  its name decided (the per-MAC secret guard included), the file opened and
  the options negotiated as before (:mod:`sidusd.net.tftp_intake`).  Only
  then may a transfer of a file of at least ``PUSH_MIN_BYTES`` go to a
  pusher: :func:`choose` picks the least loaded process, this one on a tie
  (no hop at N = 1).  The pusher gets the negotiated parameters and the
  file's descriptor (``SCM_RIGHTS``), serves the transfer from its own
  transfer socket with the unchanged session, C engine and timers, and
  reports (:mod:`sidusd.net.tftp_push_ipc`).
* The worker keeps a :class:`Pushed` in its place: it holds the admission
  slots (``max_transfers``, per client, eviction of unconfirmed ones), answers
  a duplicate RRQ, shows in ``sidusctl watch``, and is forgotten when the
  pusher reports the end.  The pusher's counters and ``tftp`` timeline entries
  reach the worker's observer at that moment, so a boot's stages are timed as
  before.
* A pusher that dies (its channel closes) takes its transfers with it: they
  are counted failed (``tftp.pusher_lost`` once per pusher), and new
  transfers go to the others or stay here.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import RemoteProtocolError
from ..observability import LogLimiter
from . import tftp_push_ipc as wire

PUSH_MIN_BYTES = 256 * 1024     # smaller files (pxelinux.0, configs) stay here: a hop costs more
MAX_PUSHERS = 16
CHANNEL_BUFFER = 1 << 20
STOP_EXTRA_S = 2.0              # after the grace, how long a pusher has to report and exit


def auto_count(cpus: int) -> int:
    """``tftp.pushers: auto``: one pusher per CPU beside this process's, at most 4."""
    return max(0, min(cpus - 1, 4))


def start(config: Any, log: Any, child_main: Callable[[socket.socket, Any], int],
          close: Sequence[socket.socket] = (), close_fds: Sequence[int] = ()) -> Pool | None:
    """Fork the pushers of ``config`` (``tftp.pushers``) before the event loop starts, each
    running ``child_main(channel, config)`` (``net.tftp_pusher.main``); None if there are none.
    A fork that fails is logged; the caller then serves alone."""
    n = config.tftp.pushers
    if n == "auto":
        n = auto_count(len(os.sched_getaffinity(0)))
    if not config.tftp.enabled or int(n) <= 0:
        return None
    try:
        children = spawn(int(n), lambda sock: child_main(sock, config), close, close_fds)
    except OSError as exc:
        log.error("worker.pushers_not_started", error=str(exc))
        return None
    log.info("worker.pushers", pids=[c.pid for c in children])
    return Pool(children)


def choose(local_load: int, loads: Sequence[int | None]) -> int | None:
    """Which pusher takes a new file transfer (its index), or None: this process serves it.

    ``local_load``: the file transfers served here; ``loads``: each pusher's (None: lost).
    The least loaded wins, this process on a tie."""
    best, best_load = None, local_load
    for i, load in enumerate(loads):
        if load is not None and load < best_load:
            best, best_load = i, load
    return best


class Pushed:
    """A transfer a pusher carries out, as the worker's TFTP service keeps it."""

    __slots__ = ("child", "id", "peer", "local", "file", "mac", "size", "begun_at", "finished",
                 "bytes", "confirmed", "blksize", "windowsize", "duration_s")

    def __init__(self, child: Child, tid: int, peer: tuple[str, int], local: str, file: str,
                 mac: str | None, size: int, blksize: int, windowsize: int, begun_at: float):
        self.child, self.id, self.peer, self.local = child, tid, peer, local
        self.file, self.mac, self.size = file, mac, size
        self.blksize, self.windowsize = blksize, windowsize
        self.begun_at = begun_at
        self.finished = False
        self.bytes = 0
        self.confirmed = False
        self.duration_s = 0.0

    def status(self, now: float) -> dict[str, Any]:
        """One line of ``TftpService.transfers()``."""
        return {"file": self.file, "peer": f"{self.peer[0]}:{self.peer[1]}", "bytes": self.bytes,
                "size": self.size, "blksize": self.blksize, "windowsize": self.windowsize,
                "duration_s": max(0.0, now - self.begun_at)}


class Child:
    """One pusher process as the worker sees it."""

    def __init__(self, index: int, pid: int, sock: socket.socket):
        self.index, self.pid, self.sock = index, pid, sock
        self.transfers: dict[int, Pushed] = {}
        self.lost = False


def spawn(count: int, child_main: Callable[[socket.socket], int],
          close: Sequence[socket.socket] = (), close_fds: Sequence[int] = ()) -> list[Child]:
    """Fork ``count`` pushers (before any event loop or thread exists in this process).

    Each child closes ``close`` and ``close_fds`` (what it must not hold: the
    supervisor's channels, the listening sockets) and the other children's
    channels, ignores SIGINT/SIGTERM/SIGHUP (the worker stops it, or its death
    does: ``PR_SET_PDEATHSIG``), runs ``child_main(its channel)`` and exits with
    its code.  OSError if a fork fails (the ones made are killed)."""
    children: list[Child] = []
    try:
        for i in range(count):
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            for s in (mine, theirs):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CHANNEL_BUFFER)
            pid = os.fork()
            if pid == 0:                    # the pusher
                code = 70
                try:
                    mine.close()
                    for s in close:
                        s.close()
                    for c in children:
                        c.sock.close()
                    for fd in close_fds:
                        try:
                            os.close(fd)
                        except OSError:
                            pass
                    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                        signal.signal(sig, signal.SIG_IGN)
                    code = child_main(theirs)
                finally:
                    os._exit(code)
            theirs.close()
            children.append(Child(i, pid, mine))
    except OSError:
        for c in children:
            _kill(c.pid)
        raise
    return children


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


class Pool:
    """The worker's pushers: offer a transfer, hear their reports, stop them."""

    def __init__(self, children: list[Child]):
        self.children = children
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._obs: Any = None
        self._log: Any = None
        self._rlog: Any = None
        self._on_end: Callable[[Pushed], None] = lambda p: None
        self.stopping = False
        self._deadline = 0.0

    def attach(self, loop: asyncio.AbstractEventLoop, obs: Any, log: Any,
               on_end: Callable[[Pushed], None]) -> None:
        """Start hearing the pushers (the TFTP service's start)."""
        self._loop, self._obs, self._log, self._on_end = loop, obs, log, on_end
        self._rlog = LogLimiter(log)
        for c in self.children:
            if not c.lost:
                c.sock.setblocking(False)
                loop.add_reader(c.sock.fileno(), self._on_readable, c)

    def alive(self) -> int:
        return sum(1 for c in self.children if not c.lost)

    def offer(self, local_load: int, peer: tuple[str, int], local: str, file: str, mac: str | None,
              fd: int, size: int, params: dict[str, Any], now: float) -> Pushed | None:
        """Hand the transfer to a pusher (the descriptor is passed, not closed here), or None:
        serve it here.  ``params``: the session's blksize, windowsize, timeout_s, retries,
        max_silence_s and oack."""
        if size < PUSH_MIN_BYTES or self._loop is None:
            return None
        i = choose(local_load, [None if c.lost else len(c.transfers) for c in self.children])
        if i is None:
            return None
        c = self.children[i]
        tid = next(self._ids)
        msg = wire.Begin(id=tid, ip=peer[0], port=peer[1], local=local, file=file, mac=mac,
                         size=size, **params)
        data = wire.encode(msg)
        try:
            wire.decode_command(data)       # what the pusher would refuse is served here
        except RemoteProtocolError:
            return None
        try:
            socket.send_fds(c.sock, [data], [fd])
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ENOBUFS):
                self._lost(c, f"send: {exc.strerror}")
            return None
        p = Pushed(c, tid, peer, local, file, mac, size, params["blksize"], params["windowsize"], now)
        c.transfers[tid] = p
        return p

    def evict(self, p: Pushed) -> None:
        """The pusher ends it silently; the worker forgets it now."""
        self._forget(p)
        try:
            p.child.sock.send(wire.encode(wire.Evict(id=p.id)))
        except OSError:
            pass

    def statuses(self, now: float) -> list[dict[str, Any]]:
        return [p.status(now) for c in self.children for p in c.transfers.values()]

    def in_flight(self) -> int:
        return sum(len(c.transfers) for c in self.children)

    def _forget(self, p: Pushed) -> None:
        if p.child.transfers.pop(p.id, None) is p:
            p.finished = True

    def _on_readable(self, c: Child) -> None:
        for _ in range(64):
            try:
                data = c.sock.recv(wire.MAX_MSG + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._lost(c, exc.strerror or str(exc))
                return
            if not data:
                self._lost(c, "its channel closed")
                return
            try:
                report = wire.decode_report(data)
            except RemoteProtocolError as exc:
                self._obs.count(f"tftp.pusher_refused.{exc.code}")
                self._rlog.warning("tftp.pusher_message_refused", pusher=c.pid, reason=exc.code,
                                  detail=str(exc)[:200])
                continue
            self._apply(c, report)

    def _apply(self, c: Child, r: wire.Report) -> None:
        obs = self._obs
        for name, n in r.counts.items():
            obs.count(name, n)
        for e in r.timeline:
            obs.timeline(e.mac, "tftp", file=e.file, bytes=e.bytes, duration_s=e.duration_s,
                         outcome=e.outcome)
        for item in r.progress:
            p = c.transfers.get(item.id)
            if p is not None:
                p.bytes = min(item.bytes, p.size)
                p.confirmed = p.confirmed or item.confirmed
        for tid in r.ended:
            p = c.transfers.get(tid)
            if p is not None:
                self._forget(p)
                self._on_end(p)

    def _lost(self, c: Child, why: str) -> None:
        if c.lost:
            return
        c.lost = True
        if self._loop is not None:
            self._loop.remove_reader(c.sock.fileno())
        c.sock.close()
        _reap(c.pid, 0.5 if self.stopping else 0.0)
        obs = self._obs
        if self.stopping and not c.transfers:
            return                              # it stopped as told
        if obs is not None:
            obs.count("tftp.pusher_lost")
        if self._log is not None:
            self._log.error("tftp.pusher_lost", pusher=c.pid, reason=why, transfers=len(c.transfers))
        for p in list(c.transfers.values()):
            self._forget(p)
            if obs is not None:
                obs.count("tftp.transfers.failed")
            self._on_end(p)

    def tell_stop(self, grace_s: float) -> None:
        """Tell every pusher to stop: its transfers get ``grace_s`` to finish (the service's
        stop; :meth:`finish` waits for them)."""
        self.stopping = True
        self._deadline = time.monotonic() + max(0.0, grace_s) + STOP_EXTRA_S
        for c in self.children:
            if not c.lost:
                try:
                    c.sock.send(wire.encode(wire.Stop(grace_s=max(0.0, grace_s))))
                except OSError as exc:
                    self._lost(c, f"send: {exc.strerror}")

    async def finish(self) -> None:
        """Wait for the pushers' last reports and exits; kill what is left at the deadline."""
        if not self.stopping:
            self.tell_stop(0.0)
        while any(not c.lost for c in self.children) and time.monotonic() < self._deadline:
            await asyncio.sleep(0.02)       # their last reports arrive; then their channels close
        for c in self.children:
            if not c.lost:
                _kill(c.pid)
                self._lost(c, "did not stop in time")


def _reap(pid: int, timeout_s: float) -> None:
    """Collect a pusher that exited (or is about to, within ``timeout_s``); else SIGKILL it."""
    deadline = time.monotonic() + timeout_s
    try:
        while os.waitpid(pid, os.WNOHANG)[0] == 0:
            if time.monotonic() >= deadline:
                _kill(pid)
                return
            time.sleep(0.005)
    except ChildProcessError:
        pass
