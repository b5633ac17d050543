"""The bench's PXE DHCP client: proxyDHCP exchanges and latency probes, in a namespace of its own.

Run by :mod:`bench.storm` as ``unshare --net python -m bench.dhcpclient``; the
storm then moves the client end (``sc0``) of a veth pair into this process'
namespace and sends ``{"op": "up", ...}``.  The server end (``sb0``,
10.77.0.1/24) stays in the storm's namespace, where sidusd or dnsmasq answer
proxyDHCP on it.  Requests really cross a link: broadcast DISCOVERs from
0.0.0.0:68 out of ``sc0`` (as a PXE ROM sends them) and unicast REQUESTs from
the client address to the server's port 4011.

Packets are built and read with sidus' own codec (:mod:`sidusd.proto.dhcp`):
DISCOVER with option 60 ``PXEClient:Arch:00000:UNDI:002001``, 93 (arch 0,
BIOS), 94, 97 (UUID) and 55, like a PXE ROM; with ``ipxe`` also option 77
``iPXE`` and 175, like iPXE after a chainload.

Commands, one JSON object a line on stdin; one JSON answer a line on stdout:

* ``{"op": "up", "iface", "address"}``: configure the link (answer ``{"ok": true}``).
* ``{"op": "boot", "id", "mac", "ipxe"}``: what firmware does — DISCOVER ->
  OFFER, then (unless the OFFER already carries the boot file and the client
  is iPXE, which skips it) REQUEST to the server's port 4011 -> ACK.  Answer:
  ``{"id", "ok", "file", "siaddr", "offer_ms", "ack_ms", "error"}``.  Several
  run at once (replies told apart by xid).
* ``{"op": "probe", "count", "interval_s"}``: one exchange after the other
  (DISCOVER->OFFER and REQUEST->ACK timed separately, ``time.perf_counter``
  from send to receipt), until ``count`` are done or ``{"op": "stop"}``
  arrives.  Answer: ``{"probe": {"offer_ms": [...], "ack_ms": [...], "lost_offer",
  "lost_ack"}}``.

A reply that does not decode, or is not for an outstanding xid, is counted
(``"ignored"`` in the probe answer) and dropped.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import random
import socket
import subprocess
import sys
import time
from typing import Any

from sidusd.errors import RemoteProtocolError
from sidusd.proto import dhcp

CLIENT_PORT, SERVER_PORT, PXE_PORT = 68, 67, 4011
WAIT_S = 2.0                         # a reply not received by then is lost
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
VENDOR = b"PXEClient:Arch:00000:UNDI:002001"


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


PXE_BOOT_MENU, PXE_BOOT_ITEM = 9, 71      # PXE 2.1 §2.2.5 vendor sub-options


def boot_item(offer: dhcp.DhcpPacket) -> bytes | None:
    """Option 43 of the 4011 REQUEST: the first boot menu item of the OFFER (PXE 2.1 §2.2.6).

    A PXE ROM asks the boot server for the item it picked from the menu (here:
    the first, as with no prompt); an OFFER without a menu gets none.
    """
    raw = offer.option(dhcp.OPT_VENDOR_SPECIFIC)
    if not raw:
        return None
    try:
        subs = dict(dhcp.decode_suboptions(raw))
    except RemoteProtocolError:
        return None
    menu = subs.get(PXE_BOOT_MENU)
    if not menu or len(menu) < 2:
        return None
    return dhcp.encode_suboptions([(PXE_BOOT_ITEM, menu[:2] + b"\x00\x00")])


def request_packet(kind: int, xid: int, mac: str, ipxe: bool, *, ciaddr: str = "0.0.0.0",
                   server_id: bytes | None = None, item: bytes | None = None) -> bytes:
    """A PXE ROM's (or iPXE's) DISCOVER or REQUEST (PXE 2.1 §2.2.1, RFC 4578)."""
    uuid = b"\x00" + bytes.fromhex("5a1d0000" + mac.replace(":", "")[-8:] + "0" * 16)
    opts: list[tuple[int, bytes]] = [
        (dhcp.OPT_MESSAGE_TYPE, bytes((kind,))),
        (dhcp.OPT_MAX_MESSAGE_SIZE, (1472).to_bytes(2, "big")),
        (dhcp.OPT_PARAMETER_LIST, bytes((1, 3, 6, 43, 54, 60, 66, 67, 97, 128, 175))),
        (dhcp.OPT_CLIENT_ARCH, b"\x00\x00"),
        (dhcp.OPT_CLIENT_NDI, b"\x01\x02\x01"),
        (dhcp.OPT_CLIENT_UUID, uuid),
        (dhcp.OPT_VENDOR_CLASS, VENDOR),
    ]
    if server_id is not None:
        opts.append((dhcp.OPT_SERVER_ID, server_id))
    if item is not None:
        opts.append((dhcp.OPT_VENDOR_SPECIFIC, item))
    if ipxe:
        opts += [(dhcp.OPT_USER_CLASS, b"iPXE"), (dhcp.OPT_IPXE_ENCAP, b"\x13\x01\x01")]
    pkt = dhcp.DhcpPacket(op=dhcp.BOOTREQUEST, xid=xid, chaddr=mac_bytes(mac),
                          ciaddr=ipaddress.IPv4Address(ciaddr), options=tuple(opts))
    return dhcp.encode(pkt)


class Client(asyncio.DatagramProtocol):
    """One socket on port 68 of the client link; replies handed to whoever waits for their xid."""

    def __init__(self) -> None:
        self.waiting: dict[tuple[int, int], asyncio.Future] = {}
        self.ignored = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        t = time.perf_counter()
        try:
            pkt = dhcp.decode(data)
        except RemoteProtocolError:
            self.ignored += 1
            return
        fut = self.waiting.pop((pkt.xid, pkt.message_type or 0), None)
        if fut is None or fut.done():
            self.ignored += 1
            return
        fut.set_result((t, pkt))

    async def ask(self, data: bytes, dest: tuple[str, int], xid: int, kind: int) -> tuple[float, Any]:
        """Send ``data``; (milliseconds to the reply of type ``kind``, packet), or (nan, None)."""
        fut = asyncio.get_running_loop().create_future()
        self.waiting[(xid, kind)] = fut
        assert self.transport is not None
        t0 = time.perf_counter()
        self.transport.sendto(data, dest)
        try:
            t1, pkt = await asyncio.wait_for(fut, WAIT_S)
        except TimeoutError:
            self.waiting.pop((xid, kind), None)
            return float("nan"), None
        return (t1 - t0) * 1000, pkt


class Session:
    def __init__(self, client: Client, address: str):
        self.client, self.address = client, address

    async def boot(self, mac: str, ipxe: bool) -> dict[str, Any]:
        """DISCOVER -> OFFER (-> REQUEST on 4011 -> ACK), as the firmware does."""
        xid = random.getrandbits(32)
        ms, offer = await self.client.ask(request_packet(dhcp.DHCPDISCOVER, xid, mac, ipxe),
                                          ("255.255.255.255", SERVER_PORT), xid, dhcp.DHCPOFFER)
        out: dict[str, Any] = {"ok": False, "offer_ms": ms, "ack_ms": None}
        if offer is None:
            out["error"] = "no OFFER"
            return out
        sid = offer.option(dhcp.OPT_SERVER_ID) or offer.siaddr.packed
        server = str(ipaddress.IPv4Address(sid))
        boot = offer.file.decode(errors="replace") or (offer.option(dhcp.OPT_BOOTFILE) or b"").decode()
        if not (ipxe and boot):           # iPXE skips the 4011 step when the OFFER has the file
            ms2, ack = await self.client.ask(
                request_packet(dhcp.DHCPREQUEST, xid, mac, ipxe, ciaddr=self.address, server_id=sid,
                               item=boot_item(offer)),
                (server, PXE_PORT), xid, dhcp.DHCPACK)
            out["ack_ms"] = ms2
            if ack is None:
                out["error"] = "no ACK on port 4011"
                return out
            boot = ack.file.decode(errors="replace") or (ack.option(dhcp.OPT_BOOTFILE) or b"").decode()
            server = str(ack.siaddr) if ack.siaddr != ipaddress.IPv4Address(0) else server
        elif offer.siaddr != ipaddress.IPv4Address(0):
            server = str(offer.siaddr)
        out.update(ok=bool(boot), file=boot, siaddr=server, error=None if boot else "no boot file")
        return out

    async def probe(self, count: int, interval_s: float, stop: asyncio.Event) -> dict[str, Any]:
        offer_ms: list[float] = []
        ack_ms: list[float] = []
        lost_offer = lost_ack = 0
        i = 0
        while i < count and not stop.is_set():
            mac = f"52:54:00:d0:{(i >> 8) & 0xff:02x}:{i & 0xff:02x}"
            r = await self.boot(mac, False)
            if r["offer_ms"] != r["offer_ms"]:          # nan: lost
                lost_offer += 1
            else:
                offer_ms.append(round(r["offer_ms"], 3))
                if r["ack_ms"] is None or r["ack_ms"] != r["ack_ms"]:
                    lost_ack += 1
                else:
                    ack_ms.append(round(r["ack_ms"], 3))
            i += 1
            try:
                await asyncio.wait_for(stop.wait(), interval_s)
            except TimeoutError:
                pass
        return {"offer_ms": offer_ms, "ack_ms": ack_ms, "lost_offer": lost_offer, "lost_ack": lost_ack,
                "ignored": self.client.ignored}


def link_up(iface: str, address: str) -> None:
    for argv in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", address, "dev", iface],
                 ["ip", "link", "set", iface, "up"]):
        subprocess.run(argv, check=True, capture_output=True, timeout=10)


async def main_async() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    write_lock = asyncio.Lock()

    async def say(obj: dict[str, Any]) -> None:
        async with write_lock:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()

    # in our own namespace now (unshare ran before python): the storm may move the link here
    await say({"hello": os.getpid(), "netns": os.readlink("/proc/self/ns/net")})
    session: Session | None = None
    stop = asyncio.Event()
    tasks: set[asyncio.Task] = set()

    async def do_boot(cmd: dict[str, Any]) -> None:
        assert session is not None
        try:
            r = await session.boot(cmd["mac"], bool(cmd.get("ipxe")))
        except Exception as exc:        # reported to the storm, which counts the client failed
            r = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        await say({"id": cmd["id"], **r})

    async def do_probe(cmd: dict[str, Any]) -> None:
        assert session is not None
        stop.clear()
        r = await session.probe(int(cmd["count"]), float(cmd["interval_s"]), stop)
        await say({"probe": r})

    while line := await reader.readline():
        cmd = json.loads(line)
        op = cmd.get("op")
        if op == "up":
            iface = cmd["iface"]
            link_up(iface, cmd["address"])
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, iface.encode())
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind(("0.0.0.0", CLIENT_PORT))
            client = Client()
            await loop.create_datagram_endpoint(lambda client=client: client, sock=sock)
            session = Session(client, cmd["address"].split("/")[0])
            await say({"id": cmd.get("id"), "ok": True, "pid": os.getpid()})
        elif op == "boot":
            t = asyncio.create_task(do_boot(cmd))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        elif op == "probe":
            t = asyncio.create_task(do_probe(cmd))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        elif op == "stop":
            stop.set()
        else:
            await say({"id": cmd.get("id"), "ok": False, "error": f"unknown op {op!r}"})
    stop.set()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


def main() -> int:
    asyncio.run(main_async())
    return 0


if __name__ == "__main__":
    sys.exit(main())
