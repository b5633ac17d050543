"""The TFTP transfer sockets: one per local address, the recently-ended peers, the MTU cache.

* One :class:`~sidusd.net.udpport.SharedPort` per local address (bound to
  ``(local address, 0)``), shared by every transfer served from that address;
  closed once it serves no transfer (the next transfer opens another); at most
  ``MAX_PORTS`` local addresses.
* The recently-ended table: a peer whose transfer ended less than ``RECENT_S``
  ago is *late* (a duplicated last ACK), not a stranger; at most
  ``RECENT_MAX`` entries.
* Strangers (RFC 1350 section 4: a datagram from a port with no transfer):
  answered with ERROR 5 at a bounded rate (``ANSWER_RATE`` per second in all,
  one per source IP per ``ANSWER_IP_S``), so a spray from a victim's address
  across the port range does not make us flood the victim; every one is
  counted.  A source IP that sent ``SUSPECT_MIN`` such datagrams in the last
  ``SUSPECT_S`` is *suspect*: an ERROR from it does not end a transfer (see
  :mod:`~sidusd.net.tftp_dispatch`).  At most ``STRANGERS_MAX`` IPs remembered.
* The MTU of the interface a request came in on (it caps ``blksize``), asked of
  the kernel (``SIOCGIFMTU``: the process's own network namespace, where
  ``/sys/class/net`` may be another namespace's) and cached ``MTU_TTL_S``.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import socket
import struct
from collections.abc import Callable
from typing import Any

from . import mmsg, udpport
from .udpport import SharedPort

MAX_PORTS = 64              # local addresses with a transfer socket
RECENT_S = 10.0             # a peer whose transfer ended: its late datagrams are dropped
RECENT_MAX = 4096
MTU_TTL_S = 30.0
RX_BATCH = 64               # datagrams per recvmmsg on a transfer socket
TX_BATCH = 256              # datagrams per sendmmsg
ANSWER_RATE = 20.0          # ERROR 5 answers to strangers per second, in all (and burst)
ANSWER_IP_S = 1.0           # at most one answer per source IP this often
SUSPECT_S = 30.0            # a source IP with strangers is remembered this long
SUSPECT_MIN = 2             # strangers from one IP that make it suspect
STRANGERS_MAX = 4096


_SIOCGIFMTU = 0x8921
_IFREQ = struct.Struct("16si20x")       # struct ifreq: the name, then ifr_mtu (40 bytes)


def interface_mtu(ifindex: int) -> int:
    """The MTU of interface ``ifindex`` in this process's network namespace (SIOCGIFMTU).

    Not ``/sys/class/net/<name>/mtu``: sysfs shows the namespace it was mounted in, so a
    process in a namespace made with ``unshare --net`` read the host's interfaces there
    (a veth of MTU 9000 not found: blksize capped at 1468; measured in bench.tftpbig).
    """
    name = socket.if_indextoname(ifindex).encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        out = fcntl.ioctl(s.fileno(), _SIOCGIFMTU, _IFREQ.pack(name, 0))
    return int(_IFREQ.unpack(out)[1])


class PortRegistry:
    """The transfer sockets by local address, and what is remembered about their peers."""

    def __init__(self, count: Callable[..., None], log: Any):
        self.count = count
        self.log = log
        self.ports: dict[str, SharedPort] = {}          # local address -> its transfer socket
        self.recent: collections.OrderedDict[tuple[str, bytes], float] = collections.OrderedDict()
        self._mtu: dict[int, tuple[float, int]] = {}
        # source IP (4 bytes) -> [remembered until, strangers seen, next answer allowed at]
        self.strangers: collections.OrderedDict[bytes, list[float]] = collections.OrderedDict()
        self._tokens, self._tokens_at = ANSWER_RATE, 0.0

    def port_for(self, loop: asyncio.AbstractEventLoop, local: str,
                 on_readable: Callable[[SharedPort], None]) -> SharedPort:
        """The transfer socket of ``local`` (made on first use); raises OSError."""
        port = self.ports.get(local)
        if port is None or port.closed:
            if len(self.ports) >= MAX_PORTS:
                raise OSError(0, f"more than {MAX_PORTS} local addresses")
            port = SharedPort(loop, local, self.count, rx_capacity=RX_BATCH, tx_capacity=TX_BATCH,
                              accel=udpport.accel_enabled())
            port.start_reading(on_readable, port)
            self.ports[local] = port
            self.log.info("tftp.transfer_socket", local=local, port=port.address[1],
                          sndbuf=port.sndbuf, rcvbuf=port.rcvbuf, batched=mmsg.AVAILABLE,
                          accel=port.accel)
        return port

    def release_if_idle(self, port: SharedPort) -> None:
        """Close a transfer socket that serves no transfer any more (after sending what is queued)."""
        if port.owners or port.closed:
            return
        port.flush()
        port.close()
        if self.ports.get(port.local) is port:
            del self.ports[port.local]
        for k in [k for k in self.recent if k[0] == port.local]:
            del self.recent[k]

    def flush_all(self) -> None:
        for port in self.ports.values():
            port.flush()

    def close_all(self) -> None:
        for port in self.ports.values():
            port.close()
        self.ports.clear()

    # -- peers whose transfer ended ----------------------------------------------
    def begun(self, local: str, key: bytes) -> None:
        """A transfer began with this peer: it is not late any more."""
        self.recent.pop((local, key), None)

    def ended(self, local: str, key: bytes, now: float) -> None:
        """A transfer with this peer ended at ``now`` (oldest entries expire)."""
        recent = self.recent
        recent[(local, key)] = now + RECENT_S
        recent.move_to_end((local, key))
        while len(recent) > RECENT_MAX or (recent and next(iter(recent.values())) <= now):
            recent.popitem(last=False)

    def is_late(self, local: str, key: bytes, now: float) -> bool:
        """Did this peer's transfer end less than ``RECENT_S`` ago?"""
        until = self.recent.get((local, key))
        return until is not None and until > now

    # -- strangers ----------------------------------------------------------------
    def stranger(self, key: bytes, now: float) -> bool:
        """A datagram from ``key`` (6-byte peer) matched no transfer: remember it; answer it?"""
        ip = key[2:6]
        seen = self.strangers
        rec = seen.get(ip)
        if rec is None or rec[0] <= now:
            rec = seen[ip] = [0.0, 0.0, now]
        rec[0] = now + SUSPECT_S
        rec[1] += 1
        seen.move_to_end(ip)
        while len(seen) > STRANGERS_MAX or next(iter(seen.values()))[0] <= now:
            seen.popitem(last=False)
        self._tokens = min(ANSWER_RATE, self._tokens + (now - self._tokens_at) * ANSWER_RATE)
        self._tokens_at = now
        if rec[2] > now or self._tokens < 1.0:
            return False
        rec[2] = now + ANSWER_IP_S
        self._tokens -= 1.0
        return True

    def suspect(self, key: bytes, now: float) -> bool:
        """Did the IP of ``key`` send ``SUSPECT_MIN`` datagrams matching no transfer lately?"""
        rec = self.strangers.get(key[2:6])
        return rec is not None and rec[0] > now and rec[1] >= SUSPECT_MIN

    # -- MTU -----------------------------------------------------------------------
    def mtu_for(self, ifindex: int, now: float) -> int:
        """MTU of the interface a request came in on (cached briefly); 1500 if unknown."""
        hit = self._mtu.get(ifindex)
        if hit and hit[0] > now:
            return hit[1]
        try:
            mtu = interface_mtu(ifindex)
        except (OSError, ValueError):
            mtu = 1500
        if len(self._mtu) > 1024:
            self._mtu.clear()
        self._mtu[ifindex] = (now + MTU_TTL_S, mtu)
        return mtu
