"""The datagrams of a readable TFTP transfer socket, handed to their transfers.

* A readable transfer socket is drained with ``recvmmsg`` (up to
  ``tftp_ports.RX_BATCH`` datagrams per call, at most ``RX_ROUNDS`` calls per
  loop turn); an ACK (4 bytes) is handed to ``ReadSession.ack_lockstep`` (or
  ``receive_ack``) without building an object; everything the sessions release
  during the turn is sent with one ``sendmmsg`` per batch (the port's
  ``flush``).
* On an accelerated port, ``SharedPort.pump`` lets C take the lockstep steps of
  the runs (:mod:`sidusd.net.tftp_accel`); what comes back is dispatched here,
  each transfer's run settled before it handles the datagram.
* A datagram counts for a transfer only from its exact peer (IP and port, in
  C and here).  One from a peer with no transfer there is a wrong TID (RFC
  1350 section 4): counted, answered with ERROR 5 at a bounded rate
  (:meth:`~sidusd.net.tftp_ports.PortRegistry.stranger`), nothing else
  touched; one from a peer whose transfer just ended (a late duplicate ACK) is
  dropped and counted ``late``.
* Every transfer from one local address shares one server port, which anyone
  learns from its own request: a blind attacker can spray ERRORs "from" a
  victim's IP across the port range, and one of them carries the victim's
  port.  While that IP is *suspect* (it sent datagrams that matched no
  transfer just before), an ERROR from it is ignored and counted
  ``error_suspect``: a real peer that stopped then times out (within
  ``tftp.max_silence_s``) instead.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import RemoteProtocolError
from ..proto import tftp
from . import loopidle, mmsg, tftp_accel
from .udpport import SharedPort

if TYPE_CHECKING:
    from .tftp_server import TftpService

RX_ROUNDS = 8               # recvmmsg calls per transfer socket per loop turn
ACCEL_ROUNDS = 1024         # ... on an accelerated port (C's rounds cost no Python)
# How long C may wait, in all per loop turn, for the ACKs of the steps it just took when the
# socket is empty (the event loop waits that long at most): a lockstep peer answering within
# it costs no trip through the event loop and Python.  With 32 rounds and 100 us, one client
# at blksize 1468 came back to Python every few blocks (bench.tftpbig, N = 1: 13-20 s of
# server CPU per GB); 5 ms delays the other sockets (port 69, DHCP, timers) by at most that.
ACCEL_WAIT_US = 5000
# ... and how long when nothing else is queued on the loop and its epoll descriptor ends the
# wait at the first other I/O (:mod:`sidusd.net.loopidle`; never past the loop's next timer):
# one lockstep client on a LAN (bench.tftpbig --link tun, N = 1) went back to Python only
# at a run's end instead of every 5 ms.
ACCEL_IDLE_WAIT_US = 50_000
# Of each such wait, C first polls without sleeping (yielding the CPU) for up to this long:
# on this 2-vCPU VM a sleeping server costs a cross-CPU wake-up per block, most of a 1468
# block's turnaround (N = 1: ~25 MB/s for every server, sidusd ~70 with the spin).
ACCEL_SPIN_US = 30
# ... but only while the port carries at most this many lockstep runs.  With more, some peer's
# ACK is nearly always on its way: a sleeping wait is short anyway, and the spin only burns
# CPU the peers, a relay or the NIC's softirq need (bench.tftpbig --link tun, 1468, N = 32:
# 0.81-0.86x dnsmasq's CPU per GB without the spin, 1.20-1.26x with it, the same MB/s).
ACCEL_SPIN_MAX_RUNS = 8
_OP_ACK = 4


def spin_for(runs: int) -> int:
    """The spin of a pump call on a port that carries ``runs`` lockstep runs (microseconds)."""
    return ACCEL_SPIN_US if runs <= ACCEL_SPIN_MAX_RUNS else 0


def on_port_readable(svc: TftpService, port: SharedPort) -> None:
    """Drain a transfer socket in batches; send what the sessions release, batched too."""
    if port.closed:
        return
    obs = svc.runtime.observer
    now = svc.loop.time()
    rx = calls = 0
    try:
        if port.accel:
            # C takes the lockstep steps of the runs (no Python per ACK); the rest is ours
            wait_us, wake_fd = loopidle.idle_budget(svc.loop, now, ACCEL_IDLE_WAIT_US, ACCEL_WAIT_US)
            rest, rx, calls, err = port.pump(now, ACCEL_ROUNDS, wait_us, spin_for(len(port.runs)), wake_fd)
            if err:
                obs.count("tftp.rx_errors")
                svc.rlog.warning("tftp.rx_error", error=os.strerror(err))
            if rest:
                dispatch(svc, port, rest, now)
                port.flush()
            return
        for _ in range(RX_ROUNDS):
            try:
                batch = port.recv()
            except OSError as exc:
                obs.count("tftp.rx_errors")
                svc.rlog.warning("tftp.rx_error", error=exc.strerror)
                break
            if not batch:
                break
            rx += len(batch)
            calls += 1
            dispatch(svc, port, batch, now)
            if port.closed:
                break
            port.flush()
            # no break on a short batch: ACKs that arrived while this one was served are
            # read now, not after a trip through the event loop (measured: ~10 % less user
            # CPU per GB in a 32-client lockstep storm; an empty read costs one system call)
    finally:
        if rx:
            obs.count("tftp.rx", rx)
            obs.count("tftp.rx_batches", calls)


def dispatch(svc: TftpService, port: SharedPort, batch: list[tuple[bytes, bytes, bool]],
             now: float) -> None:
    """Hand each datagram to its transfer; what they release joins the port's batch."""
    obs = svc.runtime.observer
    count = obs.count
    transfers = port.owners
    payloads, peers = port.pending()
    accel = port.accel
    schedule = svc.timers.schedule
    for data, key, trunc in batch:
        t = transfers.get(key)
        if t is None:
            stranger(svc, port, data, key)
            continue
        try:
            if t.run is not None:
                tftp_accel.settle(t, count)     # the session hears of the steps C took first
            if len(data) == 4 and data[1] == _OP_ACK and data[0] == 0:
                block = (data[2] << 8) | data[3]
                if accel and tftp_accel.step_into_run(t, block, now):
                    if t.heap_at is None:   # a new run began with this ACK (one read for it all)
                        schedule(t, t.session.next_timer())
                    continue
                try:
                    out = t.session.ack_lockstep(block, now)
                except OSError as exc:      # the file could not be read any more
                    svc._read_error(t, exc, now)
                    continue
                if out is not None:         # lockstep: the next DATA, nothing else to do
                    payloads.append(out)
                    peers.append(t.dest)
                    if t.heap_at is None:
                        schedule(t, t.session.next_timer())
                    continue
                t.session.receive_ack(block, now)
            else:
                if trunc:
                    count("tftp.malformed")
                    continue
                try:
                    pkt = tftp.decode(data)
                except RemoteProtocolError:
                    count("tftp.malformed")
                    continue
                if type(pkt) is tftp.ERROR and svc.ports.suspect(key, now):
                    count("tftp.error_suspect")     # maybe the spray's lucky guess: not an end
                    continue
                t.session.receive(pkt, now)
            svc._pump(t, now)
        except Exception:
            svc._internal_error(t, now)


def stranger(svc: TftpService, port: SharedPort, data: bytes, key: bytes) -> None:
    """A datagram from a peer with no transfer on this socket."""
    obs = svc.runtime.observer
    now = svc.loop.time()
    if svc.ports.is_late(port.local, key, now):
        obs.count("tftp.late")          # e.g. a duplicated last ACK: no ERROR to a finished peer
        return
    # RFC 1350 section 4: wrong TID -> ERROR 5 to that port, no transfer touched (answered
    # at a bounded rate: the source may be forged, the answer going to a victim).
    obs.count("tftp.wrong_tid")
    if not svc.ports.stranger(key, now):
        obs.count("tftp.wrong_tid_unanswered")
        return
    port.send_now(tftp.error_packet(tftp.ERR_UNKNOWN_TID, "unknown transfer ID"), mmsg.peer_addr(key))
