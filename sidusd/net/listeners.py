"""The one place that binds a listening socket (DHCP 67/4011 per interface, TFTP 69, HTTP).

:func:`bind_listener` binds one, with the options its service needs; the
single-process daemon reaches it through :func:`sidusd.net.io.local_io`.  The
privilege-separated supervisor binds them all up front with
:func:`bind_listeners` (as root) and hands them to the worker, whose
``ServiceIO.listener`` adopts the inherited descriptor instead of binding.

Errors are :class:`~sidusd.errors.StartupError` worded as the services say
them (``tftp: cannot listen on 0.0.0.0:69: Address already in use``).
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import StartupError

if TYPE_CHECKING:
    from ..config import Config

SIOCGIFADDR = 0x8915
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
KIND = {"dhcp": "udp", "tftp": "udp", "http": "tcp", "ra": "raw"}
HTTP_BACKLOG = 1024


def interface_ipv4(ifname: str) -> ipaddress.IPv4Address:
    """The primary IPv4 address of ``ifname`` (ioctl SIOCGIFADDR).  Raises OSError."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("256s", ifname.encode()[:15])
        res = fcntl.ioctl(s.fileno(), SIOCGIFADDR, req)
    return ipaddress.IPv4Address(res[20:24])


def open_socket(ifname: str, port: int) -> socket.socket:
    """A non-blocking UDP socket on 0.0.0.0:``port`` bound to device ``ifname`` (DHCP)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, ifname.encode())
        s.bind(("0.0.0.0", port))
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


ICMP6_FILTER = 1                        # <netinet/icmp6.h>, level IPPROTO_ICMPV6
ALL_ROUTERS = "ff02::2"


def open_icmp6(ifname: str) -> socket.socket:
    """A non-blocking raw ICMPv6 socket on ``ifname`` for Router Solicitations/Advertisements
    (``dhcp.ipv6_no_router``, :mod:`sidusd.net.ra`): only types 133/134 pass the filter,
    ff02::2 joined, each packet's hop limit reported, 255 on what it sends (RFC 4861 §6.1)."""
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, ifname.encode())
        blocked = [0xFFFFFFFF] * 8
        for t in (133, 134):
            blocked[t >> 5] &= ~(1 << (t & 31))
        s.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("=8I", *blocked))
        mreq = socket.inet_pton(socket.AF_INET6, ALL_ROUTERS) + struct.pack("=I", socket.if_nametoindex(ifname))
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


def _bind(service: str, address: str, port: int, device: str | None, rcvbuf: int) -> socket.socket:
    if service == "dhcp":
        return open_socket(device or "", port)
    if service == "ra":
        return open_icmp6(device or "")
    kind = socket.SOCK_DGRAM if KIND[service] == "udp" else socket.SOCK_STREAM
    s = socket.socket(socket.AF_INET, kind)
    try:
        if service == "tftp":
            s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, max(65536, rcvbuf))
            s.setblocking(False)
            s.bind((address, port))
        else:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((address, port))
            s.listen(HTTP_BACKLOG)
            s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


def bind_listener(service: str, address: str, port: int, device: str | None = None,
                  rcvbuf: int = 0) -> socket.socket:
    """The non-blocking listening socket of ``service`` (dhcp | tftp | http) on ``address:port``.

    DHCP sockets are on 0.0.0.0 bound to ``device`` (``SO_BINDTODEVICE``,
    broadcast allowed); TFTP asks for ``IP_PKTINFO`` and a receive buffer of
    at least ``rcvbuf`` bytes; HTTP listens (``SO_REUSEADDR``).
    """
    try:
        return _bind(service, address, port, device, rcvbuf)
    except OSError as exc:
        where = (f"{device} udp/{port}" if service == "dhcp" else f"{device} icmpv6" if service == "ra"
                 else f"{address}:{port}")
        raise StartupError(f"{service}: cannot listen on {where}: {exc.strerror}") from None


def check_interface(iface: str) -> str:
    """The IPv4 address of ``iface`` as text; StartupError saying why there is none."""
    try:
        return str(interface_ipv4(iface))
    except OSError as exc:
        reasons: dict[int | None, str] = {errno.ENODEV: "no such interface",
                                          errno.EADDRNOTAVAIL: "it has no IPv4 address"}
        why = reasons.get(exc.errno, exc.strerror)
        raise StartupError(f"dhcp: interface {iface}: {why}") from None


@dataclass
class Listener:
    """One socket bound for a service (the supervisor's table, passed to the worker)."""

    service: str
    kind: str                   # udp | tcp
    address: str
    port: int
    device: str | None
    sock: socket.socket

    def describe(self) -> dict[str, Any]:
        return {"fd": self.sock.fileno(), "service": self.service, "kind": self.kind,
                "address": self.address, "port": self.port, "device": self.device or ""}


def bind_listeners(config: Config) -> list[Listener]:
    """Every socket the config's services listen on, bound now (root).  StartupError as the services say it."""
    out: list[Listener] = []

    def add(service: str, address: str, port: int, device: str | None = None, rcvbuf: int = 0) -> None:
        s = bind_listener(service, address, port, device, rcvbuf)
        out.append(Listener(service, KIND[service], address, port, device, s))

    try:
        if config.dhcp.mode != "off":
            d = config.dhcp
            for iface in d.interfaces:
                check_interface(iface)
                for port in (d.port, d.pxe_port):
                    add("dhcp", "0.0.0.0", port, iface)
                if d.ipv6_no_router:
                    add("ra", "0.0.0.0", 0, iface)
        if config.tftp.enabled:
            t = config.tftp
            add("tftp", str(t.address), int(t.port), rcvbuf=t.intake_queue * 512)
        if config.http.enabled:
            add("http", str(config.http.address), int(config.http.port))
    except BaseException:
        for l in out:
            l.sock.close()
        raise
    return out
