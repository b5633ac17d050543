"""The opt-in "no IPv6 router here" answer on the boot interfaces (``dhcp.ipv6_no_router``).

One raw ICMPv6 socket per interface of ``dhcp.interfaces`` (bound by
:func:`sidusd.net.listeners.bind_listener` as service ``ra``: ``SO_BINDTODEVICE``,
an ICMPv6 filter passing only Router Solicitations and Advertisements, the
all-routers group ff02::2 joined, the hop limit of each packet asked for, 255 on
what leaves).  Each message read: decode (:mod:`sidusd.proto.ndp`; malformed:
counted ``ra.malformed``, dropped), decide (:class:`sidusd.boot.ra_policy.NoRouterResponder`,
one per interface), and on ``answer`` send the lifetime-0, prefix-less Router
Advertisement to the soliciting link-local address.  Why this ends a ~13 s wait
of iPXE: docs/quirks.md "iPXE waits for an IPv6 router".

Counters: ``ra.rx``, ``ra.malformed``, ``ra.answered``, ``ra.drop.<reason>``, ``ra.send_errors``.
Log events: ``ra.listening``, ``ra.answered`` and ``ra.router_heard`` (rate limited), ``ra.stopped``.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from sidusd.boot.ra_policy import ANSWER, NoRouterResponder
from sidusd.net.io import ServiceIO, local_io
from sidusd.observability import LogLimiter, get_logger
from sidusd.proto import ndp

RECV_SIZE = 2048
BATCH = 64
IPV6_HOPLIMIT = getattr(socket, "IPV6_HOPLIMIT", 52)


@dataclass
class _Port:
    iface: str
    ifindex: int
    sock: socket.socket
    responder: NoRouterResponder = field(default_factory=NoRouterResponder)


def hop_limit_of(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    """The IPv6 hop limit in a recvmsg's ancillary data (``IPV6_HOPLIMIT``), or None."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IPV6 and kind == IPV6_HOPLIMIT and len(data) >= 4:
            return int.from_bytes(data[:4], sys.byteorder)
    return None


class RaService:
    """Answers Router Solicitations on ``runtime.config.dhcp.interfaces`` with "no router"."""

    def __init__(self, runtime: Any, io: ServiceIO | None = None, clock: Any = time.monotonic):
        self.runtime = runtime
        self.io = io if io is not None else local_io()
        self.clock = clock
        self.log = get_logger("ra")
        self.rlog = LogLimiter(self.log)
        self._ports: list[_Port] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._answer = ndp.encode_no_router_ra()

    async def start(self) -> None:
        cfg = self.runtime.config.dhcp
        if cfg.mode == "off" or not cfg.ipv6_no_router:
            return
        self._loop = asyncio.get_running_loop()
        try:
            for iface in cfg.interfaces:
                sock = self.io.listener("ra", "0.0.0.0", 0, iface)
                port = _Port(iface, socket.if_nametoindex(iface), sock)
                self._ports.append(port)
                self._loop.add_reader(sock.fileno(), self._on_readable, port)
                self.log.info("ra.listening", interface=iface)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        ports, self._ports = self._ports, []
        for p in ports:
            if self._loop is not None:
                self._loop.remove_reader(p.sock.fileno())
            p.sock.close()
        if ports:
            self.log.info("ra.stopped")

    def listeners(self) -> list[dict]:
        return [{"service": "ra", "proto": "icmpv6", "port": 0, "interface": p.iface,
                 "address": "::"}
                for p in self._ports]

    def _on_readable(self, port: _Port) -> None:
        obs = self.runtime.observer
        for _ in range(BATCH):
            try:
                data, anc, _flags, addr = port.sock.recvmsg(RECV_SIZE, socket.CMSG_SPACE(4))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                obs.count("ra.recv_errors")
                return
            obs.count("ra.rx")
            try:
                msg = ndp.decode(data)
            except ndp.NdpError:
                obs.count("ra.malformed")
                continue
            source = str(addr[0]).split("%")[0]
            verdict = port.responder.on_message(msg, source, hop_limit_of(anc), self.clock())
            if verdict != ANSWER:
                obs.count(f"ra.drop.{verdict}")
                if verdict == "router_heard":
                    self.rlog.info("ra.router_heard", interface=port.iface, router=source,
                                   hold_s=port.responder.foreign_router_until - self.clock())
                continue
            try:
                port.sock.sendto(self._answer, (source, 0, 0, port.ifindex))
            except OSError as exc:
                obs.count("ra.send_errors")
                self.rlog.warning("ra.send_failed", interface=port.iface, to=source, error=exc.strerror)
                continue
            obs.count("ra.answered")
            self.rlog.info("ra.answered", interface=port.iface, to=source)
