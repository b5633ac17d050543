"""The records of the DHCP edge (sidusd/net/dhcp_server.py): a bound socket and a lease change
waiting for this loop turn's journal write (group commit), and the pool kept across a reload."""

from __future__ import annotations

import dataclasses
import socket
from dataclasses import dataclass
from typing import Any

from sidusd.boot import policy
from sidusd.proto import dhcp


@dataclass
class Pending:
    """A decision whose lease is applied but not yet journaled (group commit)."""
    lst: Listener
    pkt: dhcp.DhcpPacket
    req: policy.BootRequest
    decision: policy.Reply | policy.LeaseChange
    now: float


@dataclass
class Listener:
    iface: str
    via: str
    port: int
    sock: socket.socket
    address: str


def replace_lease_file(pool: Any, lease_file: Any) -> Any:
    """``pool`` with ``lease_file`` kept (the open journal does not move on reload)."""
    if dataclasses.is_dataclass(pool) and not isinstance(pool, type):
        return dataclasses.replace(pool, lease_file=lease_file)
    return pool
