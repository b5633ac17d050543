"""The TFTP transfer sockets: one per local address, the recently-ended peers, the MTU cache.

* One :class:`~sidusd.net.udpport.SharedPort` per local address (bound to
  ``(local address, 0)``), shared by every transfer served from that address;
  closed once it serves no transfer (the next transfer opens another); at most
  ``MAX_PORTS`` local addresses.
* The recently-ended table: a peer whose transfer ended less than ``RECENT_S``
  ago is *late* (a duplicated last ACK), not a stranger; at most
  ``RECENT_MAX`` entries.
* The MTU of the interface a request came in on (it caps ``blksize``), read
  from ``/sys/class/net/<name>/mtu`` and cached ``MTU_TTL_S``.
"""

from __future__ import annotations

import asyncio
import collections
import socket
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


class PortRegistry:
    """The transfer sockets by local address, and what is remembered about their peers."""

    def __init__(self, count: Callable[..., None], log: Any):
        self.count = count
        self.log = log
        self.ports: dict[str, SharedPort] = {}          # local address -> its transfer socket
        self.recent: collections.OrderedDict[tuple[str, bytes], float] = collections.OrderedDict()
        self._mtu: dict[int, tuple[float, int]] = {}

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

    # -- MTU -----------------------------------------------------------------------
    def mtu_for(self, ifindex: int, now: float) -> int:
        """MTU of the interface a request came in on (cached briefly); 1500 if unknown."""
        hit = self._mtu.get(ifindex)
        if hit and hit[0] > now:
            return hit[1]
        mtu = 1500
        try:
            name = socket.if_indextoname(ifindex)
            with open(f"/sys/class/net/{name}/mtu") as f:
                mtu = int(f.read().strip())
        except (OSError, ValueError):
            pass
        if len(self._mtu) > 1024:
            self._mtu.clear()
        self._mtu[ifindex] = (now + MTU_TTL_S, mtu)
        return mtu
