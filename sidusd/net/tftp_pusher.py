"""A TFTP pusher: a forked process that carries out the file transfers the worker hands it.

The worker's TFTP service decides everything (:mod:`sidusd.net.tftp_pushers`);
here a :class:`~sidusd.net.tftp_server.TftpService` with no listening socket
serves each :class:`~sidusd.net.tftp_push_ipc.Begin` it is sent
(``TftpService.adopt``): the same session, transfer socket, C engine,
timers and ``tftp.transfer`` log lines as in the worker.  What the worker's
observer must hear (counters, the ``tftp`` timeline entry of a transfer that
ended, what is in flight) is sent back as Reports: at once when a transfer
ends, else every ``REPORT_S`` (``CONFIRM_S`` while a transfer is unconfirmed:
the worker's admission may evict only unconfirmed ones).

It stops when told (:class:`~sidusd.net.tftp_push_ipc.Stop`: the transfers in
flight get the grace), when its channel closes (the worker is gone: no
grace), or with the worker (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import socket
from typing import Any

from ..errors import RemoteProtocolError
from ..observability import LogLimiter
from . import tftp_accel
from . import tftp_push_ipc as wire
from .files import NotServable, ReadAheadSource
from .io import ServiceIO
from .tftp_transfer import Transfer, confirmed

REPORT_S = 0.25
CONFIRM_S = 0.02
_ENDED = ("tftp.transfers.done", "tftp.transfers.failed", "tftp.transfers.probe",
          "tftp.transfers.evicted")


class _Observer:
    """The observer a pusher's service counts into: kept until the next Report."""

    def __init__(self, on_entry: Any):
        self.counts: collections.Counter[str] = collections.Counter()
        self.entries: list[wire.Entry] = []
        self._on_entry = on_entry

    def count(self, name: str, n: int = 1) -> None:
        if n:
            self.counts[name] += n
            if name.startswith(_ENDED):     # a transfer ended: the worker hears of it now
                self._on_entry()

    def timeline(self, mac: str | None, event: str, **fields: Any) -> None:
        if mac and event == "tftp":
            self.entries.append(wire.Entry(mac=mac, file=str(fields["file"])[:512],
                                           bytes=int(fields["bytes"]),
                                           duration_s=max(0.0, float(fields["duration_s"])),
                                           outcome=fields["outcome"]))
            self._on_entry()

    def mac_for_ip(self, ip: str) -> None:
        return None


async def _no_open(root: Any, parts: Any) -> tuple[int, int]:
    raise NotServable("a pusher opens no file")


def _no_listener(*args: Any, **kwargs: Any) -> socket.socket:
    raise OSError("a pusher binds no listening socket")


# A pusher opens nothing and binds no listener: the worker passes it what it serves.
_NO_IO = ServiceIO(open_file=_no_open, lease_journal=lambda path: None,   # type: ignore[arg-type,return-value]
                   listener=_no_listener)


class _Runtime:
    def __init__(self, config: Any, observer: _Observer):
        self.config, self.observer = config, observer


class Pusher:
    def __init__(self, sock: socket.socket, config: Any):
        from .tftp_server import TftpService
        self.sock = sock
        self.obs = _Observer(self._soon)
        self.svc = TftpService(_Runtime(config, self.obs), io=_NO_IO)     # type: ignore[arg-type]
        self.svc.log = self.svc.log.bind(pusher=os.getpid())   # its tftp.transfer lines say so
        self.svc.rlog = LogLimiter(self.svc.log)
        self.mine: dict[int, Transfer] = {}
        self.reported: set[int] = set()        # confirmed, and the worker was told
        self.done = asyncio.Event()
        self._flush_queued = False
        self._stopping = False

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.svc.serve_without_listener(loop)
        self.sock.setblocking(True)
        self.sock.settimeout(5.0)           # sends: the worker reads them at once
        loop.add_reader(self.sock.fileno(), self._on_command)
        ticker = loop.create_task(self._tick())
        await self.done.wait()
        loop.remove_reader(self.sock.fileno())
        ticker.cancel()
        try:
            self.flush()
        except OSError:
            pass
        self.sock.close()
        return 0

    def _soon(self) -> None:
        if not self._flush_queued:
            self._flush_queued = True
            asyncio.get_running_loop().call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_queued = False
        try:
            self.flush()
        except OSError:
            self._gone()

    async def _tick(self) -> None:
        while True:
            unconfirmed = any(tid not in self.reported for tid in self.mine)
            await asyncio.sleep(CONFIRM_S if unconfirmed else REPORT_S)
            try:
                self.flush()
            except OSError:
                self._gone()
                return

    def flush(self) -> None:
        """Send what the worker has not heard yet."""
        ended = [tid for tid, t in self.mine.items() if t.finished]
        for tid in ended:
            del self.mine[tid]
            self.reported.discard(tid)
        progress = []
        for tid, t in self.mine.items():
            ok = confirmed(t)
            if ok:
                self.reported.add(tid)
            progress.append(wire.Progress(id=tid, bytes=tftp_accel.bytes_acked(t), confirmed=ok))
        counts, entries = dict(self.obs.counts), self.obs.entries
        self.obs.counts.clear()
        self.obs.entries = []
        for r in wire.reports(progress, ended, entries, counts):
            self.sock.send(wire.encode(r))

    def _on_command(self) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, wire.MAX_MSG + 1, 4, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds = b"", []
        if not data:
            self._gone()
            return
        try:
            msg = wire.decode_command(data)
        except RemoteProtocolError as exc:
            self.svc.rlog.error("tftp.pusher_bad_command", reason=exc.code, detail=str(exc)[:200])
            msg = None
        if isinstance(msg, wire.Begin) and len(fds) == 1:
            self._begin(msg, fds.pop())
        elif isinstance(msg, wire.Evict):
            t = self.mine.pop(msg.id, None)
            self.reported.discard(msg.id)
            if t is not None and not t.finished:
                self.svc._evict(t, self.svc.loop.time())
        elif isinstance(msg, wire.Stop) and not self._stopping:
            self._stopping = True
            self.svc.loop.create_task(self._stop(msg.grace_s))
        for fd in fds:                      # one that came with no Begin: not ours to keep
            _close(fd)

    def _begin(self, m: wire.Begin, fd: int) -> None:
        source = ReadAheadSource(fd, m.size)
        t = self.svc.adopt((m.ip, m.port), m.local, m.file, source, m.mac,
                           blksize=m.blksize, windowsize=m.windowsize, timeout_s=m.timeout_s,
                           retries=m.retries, oack=m.oack, max_silence_s=m.max_silence_s)
        if t is None:                       # no transfer socket: the client retransmits its RRQ
            self.mine[m.id] = _Ended()      # type: ignore[assignment]
            self._soon()
            return
        self.mine[m.id] = t
        if t.finished:
            self._soon()

    async def _stop(self, grace_s: float) -> None:
        await self.svc.stop(grace_s)
        self.done.set()

    def _gone(self) -> None:
        """The worker is gone: end everything now."""
        if not self._stopping:
            self._stopping = True
            self.svc.loop.create_task(self._stop(0.0))


class _Ended:
    """A Begin that could not begin: reported as ended at the next flush."""
    finished = True


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def main(sock: socket.socket, config: Any) -> int:
    """The pusher's life (called in the forked child; its exit code)."""
    from ..privsep import creds
    try:
        creds.set_parent_death_signal(signal.SIGKILL)
    except OSError:
        pass
    return asyncio.run(Pusher(sock, config).run())
