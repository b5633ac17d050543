"""Lockstep runs: the steps a session decided in advance, carried out by the C engine.

With the C lockstep engine (``SharedPort.accel``, :mod:`sidusd.net._lockstep`),
a transfer in lockstep gets a *run*: its session decides the next
``RUN_BYTES`` of steps in advance (``ReadSession.lockstep_run``) and C takes
them as the ACKs arrive, without returning to Python per ACK.  Whatever else
arrives comes back in order; before its transfer handles it (or its timer
fires, or it ends) the run is *settled*: the session hears how many steps were
taken (``lockstep_advance``).  The ACK that ends a run begins the next one,
with one read for all of it (:func:`step_into_run`).  A file's run (a *file
run*) is not read here: C reads its payloads from the file as it goes, so a
whole kernel is one run.
"""

from __future__ import annotations

from collections.abc import Callable

from ..proto.tftp_session import LockstepRun
from . import udpport
from .files import FileSource
from .tftp_transfer import Transfer

_lockstep = udpport._lockstep

RUN_BYTES = 64 * 1024       # DATA of a transfer's first lockstep run handed to C, at least
RUN_BLOCKS = 32             # ... and at least this many blocks, for big blocks
RUN_MAX = 512 * 1024        # ... but at most this much (memory: one run per transfer)
FILE_RUN_BLOCKS = 65535     # a file run's blocks, at most (C reads 256 KiB at a time)
STEP_MAX_BYTES = 1024 * 1024  # a step's DATA (windowsize x blksize), at most, in C
STEP_MAX_BLOCKS = 64        # ... and its blocks (one GSO message): a bigger window stays in Python


def run_bytes(blksize: int, last: int = 0) -> int:
    """The DATA one run carries for a transfer of ``blksize`` whose last run carried ``last``
    bytes in full (0: none, or it ended early): first 64 KiB (44 blocks of 1468), up to 32
    blocks for bigger blocks; then twice the last, all capped at 512 KiB (8 blocks of 65464).

    A run's end costs a trip through Python (the ACK that ends it, a read, a new Run):
    with a fixed 64 KiB, blksize 65464 made that trip on every block (measured in
    bench.tftpbig: 0.47x tftpd-hpa, Python ~40 % of the worker's samples in perf).  A small
    file (pxelinux.0, a config) is read in one small run; a kernel or an initrd, after a
    few runs, in runs of 512 KiB (357 blocks of 1468).
    """
    first = max(RUN_BYTES, min(RUN_BLOCKS * blksize, RUN_MAX))
    return max(first, min(2 * last, RUN_MAX))


def plan(t: Transfer, taken: int = 0) -> LockstepRun | None:
    """Give C the transfer's next lockstep steps, decided by its session (accel ports only).

    ``taken``: the first blocks were sent here already (C starts after them; their
    payloads are read here).  A file's transfer gets a *file run*: up to FILE_RUN_BLOCKS
    blocks (whole windows) whose payloads C reads from the file itself as it goes (a whole
    kernel is one run, with no trip through Python per part read); any other source, a run
    of :func:`run_bytes` read here.  A step is a window (RFC 7440) of up to STEP_MAX_BLOCKS
    blocks and STEP_MAX_BYTES; a transfer with a bigger window keeps the Python path.
    """
    session, source = t.session, t.source
    w, bs = session.windowsize, session.blksize
    if w > STEP_MAX_BLOCKS or w * bs > STEP_MAX_BYTES:
        return None
    fd = source.fd if isinstance(source, FileSource) else -1
    try:
        if fd >= 0:
            run = session.lockstep_run(FILE_RUN_BLOCKS // w * w * bs, head=taken)
        else:
            run = session.lockstep_run(run_bytes(bs, t.run_size))
    except OSError:
        return None             # no run: the next ACK meets the read error on the Python path
    if run is None:
        return None
    if fd >= 0:
        t.plan, t.run_size = run, 0
        t.run = _lockstep.Run(run.ack, b"", run.blksize, run.count, t.dest, taken,
                              fd=fd, offset=run.ack * run.blksize, size=run.total, window=w)
    else:
        t.plan, t.run_size = run, len(run.data)
        t.run = _lockstep.Run(run.ack, run.data, run.blksize, run.count, t.dest, taken, window=w)
    t.port.runs[t.key] = t.run
    return run


def step_into_run(t: Transfer, block: int, now: float) -> bool:
    """The ACK that ends the window in flight (the one that ended C's last run): begin the
    next run with its first step (a window of blocks), taken here.  One read serves the run,
    first step included; its DATA join the port's batch."""
    session = t.session
    if not session.lockstep_awaits(block):
        return False
    n = session.step_blocks
    run = plan(t, taken=n)
    if run is None:
        return False
    t.port.queue([run.datagram(i) for i in range(n)], t.dest)    # a window: GSO groups
    session.lockstep_advance(run, n, now)
    return True


def sync(t: Transfer) -> None:
    """Tell the session how far C went with its run (the run goes on)."""
    run, p = t.run, t.plan
    if run is not None and p is not None and run.used:
        t.session.lockstep_advance(p, run.used, run.at)


def settle(t: Transfer, count: Callable[..., None]) -> None:
    """Tell the session how far C went with its run, and end the run."""
    run = t.run
    if run is None:
        return
    if run.used < run.count:
        t.run_size = 0                # it ended early (a loss, a duplicate): small runs again
    try:
        sync(t)
    finally:
        drop_run(t)                   # ended even if the session refused the report
    if run.used:
        count("tftp.accel_steps", run.used)    # blocks (a step sends a window of them)
        count("tftp.accel_runs")            # the trips through Python between runs


def drop_run(t: Transfer) -> None:
    """End the transfer's run (C takes no more of its steps)."""
    if t.run is not None:
        if t.port.runs.get(t.key) is t.run:
            del t.port.runs[t.key]
        t.run = None
    t.plan = None


def bytes_acked(t: Transfer) -> int:
    """The bytes the peer acknowledged, the steps C took included (reads only: the session
    hears of them when the run is settled)."""
    session, run, p = t.session, t.run, t.plan
    done = session.bytes_acked
    if run is not None and p is not None and run.used:
        # after ``used`` blocks the last step's are in flight: all before them acked
        acked = p.ack + run.used - ((run.used - 1) % p.window + 1)
        done = max(done, min(t.source.size, acked * p.blksize))
    return done

