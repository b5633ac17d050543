"""net.dhcp_server group commit: the REQUESTs of one loop turn, one journal write, then the ACKs.

The service runs on ``lo`` with sockets on 127.0.0.1 (the replies go to the
relay address, 127.0.0.1:67 of nobody) and a real :class:`LeaseStore` whose
write and fsync are counted or made to fail.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
from pathlib import Path
from types import SimpleNamespace

from sidusd.config import Config, DhcpConfig, PoolConfig, TftpConfig
from sidusd.net.dhcp_server import DhcpService
from sidusd.net.io import local_io
from sidusd.net.leasestore import LeaseStore
from sidusd.observability import Observer
from sidusd.proto import dhcp

IP = ipaddress.IPv4Address


def _config(lease_file: Path) -> Config:
    pool = PoolConfig(network=ipaddress.IPv4Network("127.0.0.0/8"), range_start=IP("127.0.1.10"),
                      range_end=IP("127.0.1.20"), lease_time_s=600, lease_file=lease_file)
    return Config(tftp=TftpConfig(root=Path("/nonexistent")),
                  dhcp=DhcpConfig(mode="full", interfaces=("lo",), pool=pool))


def _request(mac: int, ip: str) -> bytes:
    opts = ((dhcp.OPT_MESSAGE_TYPE, bytes([dhcp.DHCPREQUEST])), (dhcp.OPT_SERVER_ID, IP("127.0.0.1").packed),
            (dhcp.OPT_REQUESTED_IP, IP(ip).packed))
    return dhcp.encode(dhcp.DhcpPacket(op=1, xid=mac, chaddr=bytes([0x52, 0x54, 0, 0, 0, mac]) + bytes(10),
                                       giaddr=IP("127.0.0.1"), options=opts))


def _serve_one_turn(tmp: Path, fsync) -> tuple[Observer, list[dict], int]:
    writes = []

    def write(fd, view):
        writes.append(len(view))
        return os.write(fd, view)
    store = LeaseStore(tmp / "leases.jsonl", write=write, fsync=fsync)
    obs = Observer()
    runtime = SimpleNamespace(config=_config(tmp / "leases.jsonl"), observer=obs,
                              inventory=SimpleNamespace(hosts={}, resolve=lambda mac, cfg: SimpleNamespace()))

    def listener(service, address, port, device=None, rcvbuf=0):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        return s

    async def main():
        svc = DhcpService(runtime, local_io(lease_journal=lambda path: store, listener=listener))
        await svc.start()
        lst = svc._listeners[0]
        for mac, ip in ((1, "127.0.1.10"), (2, "127.0.1.11"), (3, "127.0.1.12")):
            svc.datagram_received(lst, _request(mac, ip), ("127.0.0.1", 67))   # one turn
        assert obs.counters["dhcp.acks"] == 0           # nothing leaves before the write
        for _ in range(20):
            await asyncio.sleep(0)
        leases = svc.leases()
        await svc.stop()
        return leases
    leases = asyncio.run(main())
    return obs, leases, len(writes)


def test_one_write_and_one_fsync_for_a_turn_then_the_acks(tmp_path):
    fsyncs = []
    obs, leases, writes = _serve_one_turn(tmp_path, lambda fd: fsyncs.append(os.fsync(fd)))
    assert writes == 1 and len(fsyncs) == 1
    assert obs.counters["dhcp.acks"] == 3 and obs.counters["dhcp.lease_syncs"] == 1
    assert [(l["ip"], l["state"]) for l in leases] == [(f"127.0.1.{n}", "bound") for n in (10, 11, 12)]
    assert len((tmp_path / "leases.jsonl").read_text().splitlines()) == 3


def test_a_failed_group_write_sends_no_ack_and_rolls_the_turn_back(tmp_path):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    obs, leases, _ = _serve_one_turn(tmp_path, full)
    assert "dhcp.acks" not in obs.counters and obs.counters["dhcp.lease_write_errors"] == 3
    assert leases == []                                  # no trace in memory of unACKed leases
    assert (tmp_path / "leases.jsonl").read_bytes() == b""   # nor on disk
