"""The network worker's process: spawned with its sockets, watched, restarted with a backoff.

:func:`launch` starts ``python -m sidusd.privsep.worker`` with the two
socketpairs (:mod:`sidusd.privsep.ipc`) and the inherited listening sockets;
:func:`restart_delay` is the bounded backoff (a worker that lived
``STABLE_S`` resets it); :func:`watch` waits for the worker to die and
restarts it until told to stop; :func:`end` kills and reaps one.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import StartupError

BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)   # restart delays after consecutive failures
STABLE_S = 60.0              # a worker that lived this long resets the backoff
_WORKER_ENV = ("SIDUS_TFTP_ACCEL",)   # passed to the worker when set (docs/operations.md)


@dataclass
class WorkerProc:
    """One worker process and its two channels (closed once, with :meth:`close`)."""

    proc: asyncio.subprocess.Process
    ctl: socket.socket
    rpc: socket.socket
    started: float
    ready: asyncio.Future
    hello_pid: int | None = None
    fatal: str | None = None
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    closed: bool = False
    rpc_queue: collections.deque = field(default_factory=collections.deque)   # requests read, not answered
    rpc_busy: asyncio.Task | None = None
    on_close: list[Callable[[], None]] = field(default_factory=list)

    def channel_closed(self, sock: socket.socket, error: bool) -> None:
        """A channel hung up (stop reading it; the exit follows) or failed (close both)."""
        if error:
            self.close()
            return
        try:
            asyncio.get_running_loop().remove_reader(sock.fileno())
        except (ValueError, OSError):
            pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        loop = asyncio.get_running_loop()
        for s in (self.ctl, self.rpc):
            try:
                loop.remove_reader(s.fileno())
            except (ValueError, OSError):
                pass
            s.close()
        for fn in self.on_close:
            fn()


async def launch(listeners: list[Any], user: str, log_format: str, log_level: str) -> WorkerProc:
    """Start a worker process with its channels and the listening sockets (not yet ready)."""
    loop = asyncio.get_running_loop()
    ctl_p, ctl_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    rpc_p, rpc_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (ctl_p, rpc_p):
        s.setblocking(False)
    import sidusd
    code_dir = str(Path(sidusd.__file__).resolve().parents[1])
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "PYTHONPATH": code_dir, "PYTHONDONTWRITEBYTECODE": "1"}
    for name in _WORKER_ENV:                 # operator switches the worker honours
        if name in os.environ:
            env[name] = os.environ[name]
    argv = [sys.executable, "-m", "sidusd.privsep.worker",
            "--ctl-fd", str(ctl_w.fileno()), "--rpc-fd", str(rpc_w.fileno()),
            "--listeners", json.dumps([l.describe() for l in listeners]),
            "--user", user, "--log-format", log_format, "--log-level", log_level]
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, pass_fds=[ctl_w.fileno(), rpc_w.fileno()] + [l.sock.fileno() for l in listeners],
            stdin=asyncio.subprocess.DEVNULL, cwd="/", env=env)
    except BaseException:
        ctl_p.close()
        rpc_p.close()
        raise
    finally:
        ctl_w.close()
        rpc_w.close()
    return WorkerProc(proc, ctl_p, rpc_p, time.monotonic(), loop.create_future())


async def wait_ready(w: WorkerProc, timeout_s: float) -> None:
    """Until the worker said ``ready``, exited, or ``timeout_s`` passed (``w.ready`` tells which)."""
    exited = asyncio.get_running_loop().create_task(w.proc.wait())
    try:
        await asyncio.wait({w.ready, exited}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not exited.done():
            exited.cancel()


async def end(w: WorkerProc) -> None:
    """Kill (if alive) and reap the worker, close its channels."""
    if w.proc.returncode is None:
        try:
            w.proc.kill()
        except ProcessLookupError:
            pass
        await w.proc.wait()
    w.close()


def restart_delay(failures: int) -> float:
    """Seconds before the next start after ``failures`` consecutive failures."""
    return BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]


async def watch(current: Callable[[], WorkerProc | None], spawn: Callable[[], Awaitable[Any]],
                stopping: Callable[[], bool], on_exit: Callable[[WorkerProc, int, float, float], None],
                log: Any) -> None:
    """Restart the worker whenever it dies (bounded backoff), until ``stopping()``."""
    failures = 0
    while not stopping():
        w = current()
        if w is None:
            return
        rc = await w.proc.wait()
        w.close()
        if stopping():
            return
        lived = time.monotonic() - w.started
        failures = 0 if lived >= STABLE_S else failures + 1
        delay = restart_delay(failures)
        on_exit(w, rc, lived, delay)
        await asyncio.sleep(delay)
        while not stopping():
            try:
                await spawn()
                break
            except (StartupError, OSError) as exc:
                failures += 1
                delay = restart_delay(failures)
                log.error("privsep.worker_failed", error=str(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
