"""Reading the worker's datagrams in the supervisor: the worker is hostile here.

One datagram is one message (``SOCK_SEQPACKET``).  :func:`read_batch` takes up
to ``BATCH`` of them from one channel, closes any descriptor the worker tried
to pass (it has nothing to give), refuses what is truncated, empty or does not
decode (:class:`Refusals`: counted ``privsep.refused.<code>``, logged at most
once per ``REFUSED_LOG_INTERVAL_S`` with the number suppressed) and returns
the decoded messages.  ``code`` is the :class:`~sidusd.errors.RemoteProtocolError`
code the decoder raised (:mod:`sidusd.privsep.ipc`).
"""

from __future__ import annotations

import array
import os
import select
import socket
import time
from collections.abc import Callable
from typing import Any

from ..errors import RemoteProtocolError
from ..observability import LogLimiter
from . import ipc

BATCH = 64
REFUSED_LOG_INTERVAL_S = 10.0
REFUSAL_CODES = ("oversized", "empty", "bad_json", "unknown_type", "bad_field")


class Refusals:
    """Counts refused worker messages and logs them, rate limited (a :class:`LogLimiter`: one line
    per ``interval_s``, the next one with ``suppressed=N``)."""

    def __init__(self, obs: Any, log: Any, interval_s: float = REFUSED_LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.obs = obs
        self.rlog = LogLimiter(log, burst=1, per_s=1.0 / interval_s, clock=clock)

    def refuse(self, code: str, detail: str) -> None:
        self.obs.count(f"privsep.refused.{code}")
        self.rlog.warning("privsep.message_refused", reason=code, detail=detail[:200])


def refusal_code(exc: RemoteProtocolError) -> str:
    """The counter name of a decode refusal: the error's code (any other: ``bad_field``)."""
    return exc.code if exc.code in REFUSAL_CODES else "bad_field"


def fds_of(anc: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors passed with ``SCM_RIGHTS`` in ``anc`` (recvmsg's ancillary data)."""
    fds: list[int] = []
    for level, kind, blob in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(blob[:len(blob) - len(blob) % a.itemsize])
            fds.extend(a)
    return fds


class Closed(Exception):
    """The channel hung up (``error`` False) or failed (True)."""

    def __init__(self, error: bool):
        super().__init__("channel failed" if error else "channel hung up")
        self.error = error


def recv_one(sock: socket.socket) -> tuple[bytes, bool] | None:
    """One datagram ``(data, truncated)``, None if there is none now.  Raises :class:`Closed`."""
    try:
        data, anc, flags, _ = sock.recvmsg(ipc.MAX_MSG, socket.CMSG_SPACE(4 * 4))
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        raise Closed(True) from None
    for fd in fds_of(anc):               # the worker has nothing to give us
        os.close(fd)
    if not data and not flags & socket.MSG_TRUNC:
        p = select.poll()
        p.register(sock.fileno(), select.POLLIN)
        if any(ev & (select.POLLHUP | select.POLLERR) for _, ev in p.poll(0)):
            raise Closed(False)
    return data, bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC))


def read_batch(sock: socket.socket, decode: Callable[[bytes], Any], refusals: Refusals,
               obs: Any) -> list[Any]:
    """Up to ``BATCH`` decoded messages (refused ones counted).  Raises :class:`Closed`."""
    out: list[Any] = []
    for _ in range(BATCH):
        got = recv_one(sock)
        if got is None:
            break
        data, truncated = got
        obs.count("privsep.worker_msgs")
        if truncated or len(data) > ipc.MAX_MSG:
            refusals.refuse("oversized", f"more than {ipc.MAX_MSG} bytes")
            continue
        if not data:
            refusals.refuse("empty", "empty datagram")
            continue
        try:
            out.append(decode(data))
        except RemoteProtocolError as exc:
            refusals.refuse(refusal_code(exc), str(exc))
    return out
