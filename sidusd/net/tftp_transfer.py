"""One TFTP transfer in flight (what the edge keeps around its session) and its summary.

A transfer keeps its descriptor (or rendered bytes) and its negotiated
parameters: a config reload never changes a transfer in flight.  Every
transfer ends with one ``tftp.transfer`` log event and one boot-timeline
entry (:func:`summarize`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..proto.tftp_session import LockstepRun, ReadSession
from . import mmsg
from .udpport import SharedPort

if TYPE_CHECKING:
    from ..runtime_view import ObserverView
    from ._lockstep import Run


class Transfer:
    """A session, the port and peer it is served on, its file and its place in the timer heap."""

    __slots__ = ("port", "peer", "key", "dest", "local", "file", "session", "source", "mac",
                 "heap_at", "finished", "run", "plan", "run_size", "begun_at")

    def __init__(self, port: SharedPort, peer: tuple[str, int], local: str, file: str,
                 session: ReadSession, source: Any, mac: str | None, begun_at: float = 0.0):
        self.port, self.peer, self.local = port, peer, local
        self.key = mmsg.peer_key(peer)
        self.dest = mmsg.Peer(self.key)
        self.file, self.session, self.source, self.mac = file, session, source, mac
        self.heap_at: float | None = None
        self.begun_at = begun_at        # loop time it began (admission's eviction grace)
        self.finished = False
        self.run: Run[mmsg.Peer] | None = None     # its C run while C may take its steps
        self.plan: LockstepRun | None = None    # what that run carries out (the session's decision)
        self.run_size = 0                       # the DATA bytes of its last run (tftp_accel)


def summarize(t: Transfer, now: float, obs: ObserverView, rlog: Any) -> None:
    """The transfer's end: counters, one ``tftp.transfer`` event, the boot-timeline entry."""
    s = t.session.summary(now)
    result = {"ok": "done", "probe": "probe", "evicted": "evicted"}.get(s.outcome, "failed")
    obs.count(f"tftp.transfers.{result}")
    if result == "evicted":
        return          # never confirmed (likely forged): counted; the intake logs them, rate-limited
    obs.count("tftp.retransmits", s.retransmits)
    obs.count("tftp.bytes", s.bytes)
    emit = rlog.info if result != "failed" else rlog.warning    # a LogLimiter, keyed by peer IP
    emit("tftp.transfer", key=t.peer[0], file=t.file, peer=f"{t.peer[0]}:{t.peer[1]}", mac=t.mac, bytes=s.bytes,
         size=t.source.size, blksize=s.blksize, windowsize=s.windowsize, retransmits=s.retransmits,
         duration_s=s.duration_s, outcome=s.outcome, error=s.error)
    obs.timeline(t.mac, "tftp", file=t.file, bytes=s.bytes, duration_s=s.duration_s,
                 outcome=s.outcome)


def confirmed(t: Any) -> bool:
    """Has the peer acknowledged anything (the C engine's steps included)?  For a transfer a
    pusher carries out (``tftp_pushers.Pushed``): as its pusher last reported."""
    if type(t) is not Transfer:
        return bool(t.confirmed)
    return t.session.confirmed or (t.run is not None and t.run.used > 0)


def status(t: Transfer, now: float, bytes_acked: int) -> dict[str, Any]:
    """One line of ``TftpService.transfers()``."""
    return {"file": t.file, "peer": f"{t.peer[0]}:{t.peer[1]}", "bytes": bytes_acked,
            "size": t.source.size, "blksize": t.session.blksize,
            "windowsize": t.session.windowsize, "duration_s": t.session.summary(now).duration_s}
