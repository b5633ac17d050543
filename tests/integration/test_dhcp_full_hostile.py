"""Full DHCP under hostile clients (issue 14 items 1-5): the real daemon in a netns pair.

The lab (namespaces, veth, daemon, scapy-built packets) is the one of
test_dhcp_netns.py, in namespaces of its own names.  Each test is an attack
that worked on the code before the fix; its docstring says what it did then.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import require_tool
from test_dhcp_netns import SERVER_IP, SILENCE_S, Lab, netns_lab, opts_of, request

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
BCAST = ("255.255.255.255", 67)
VCI = b"PXEClient:Arch:00000:UNDI:002001"
OWNER, STRANGER = "52:54:00:14:01:01", "52:54:00:14:01:99"


@pytest.fixture
def lab(tmp_path):
    with netns_lab(tmp_path, "sidus-t-h14") as lab:
        yield lab


def configure_full(lab: Lab, hosts: list | None = None, range_end: str = "10.77.0.102",
                   lease_file: Path | None = None) -> Path:
    lab.configure("full", hosts=hosts)
    path = lab.tmp / "sidus.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["dhcp"]["pool"]["range_end"] = range_end
    if lease_file is not None:
        cfg["dhcp"]["pool"]["lease_file"] = str(lease_file)
    path.write_text(yaml.safe_dump(cfg))
    return Path(cfg["dhcp"]["pool"]["lease_file"])


def msg_type(got) -> int | None:
    return None if got is None else opts_of(got[0])["message-type"]


def dora(lab: Lab, mac: str, xid: int):
    """DISCOVER then SELECTING REQUEST; (offered ip, ACK reply or None)."""
    got = lab.exchange(request(mac, xid, "discover", VCI, 0), BCAST, xid)
    assert got is not None, f"no OFFER for {mac}\n{lab.log_tail()}"
    ip = got[0].yiaddr
    ack = lab.exchange(request(mac, xid + 1, "request", VCI, 0,
                               extra=[("server_id", SERVER_IP), ("requested_addr", ip)]), BCAST, xid + 1,
                       wait_s=SILENCE_S)
    return ip, ack


def send(lab: Lab, mac: str, xid: int, msg: str, ip: str, ciaddr: str = "0.0.0.0") -> None:
    lab.sock.sendto(request(mac, xid, msg, None, None, ciaddr=ciaddr,
                            extra=[("server_id", SERVER_IP), ("requested_addr", ip)]), BCAST)


def init_reboot(lab: Lab, mac: str, xid: int, ip: str):
    return lab.exchange(request(mac, xid, "request", None, None, extra=[("requested_addr", ip)]),
                        BCAST, xid, wait_s=SILENCE_S)


def settle(lab: Lab, counter: str, n: int, timeout_s: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        c = lab.counters()
        if c.get(counter, 0) >= n or time.monotonic() > deadline:
            return c
        time.sleep(0.1)


def test_reserved_address_goes_only_to_its_mac_on_a_first_start(lab):
    """Item 1.  Before: with the journal empty, ``if db`` was false and the
    reservations were skipped: the stranger's unsolicited SELECTING REQUEST for
    the owner's address was ACKed, then the owner was ACKed for it too."""
    journal = configure_full(lab, hosts=[{"mac": OWNER, "hostname": "node01", "profile": "default",
                                          "ip": "10.77.0.101"}])
    lab.start()
    lab.drain()
    grab = lab.exchange(request(STRANGER, 0x1401, "request", None, None,
                                extra=[("server_id", SERVER_IP), ("requested_addr", "10.77.0.101")]),
                        BCAST, 0x1401)
    assert msg_type(grab) == 6, f"the stranger was not NAKed: {msg_type(grab)}"
    assert msg_type(init_reboot(lab, STRANGER, 0x1402, "10.77.0.101")) != 5
    ip, ack = dora(lab, OWNER, 0x1410)
    assert ip == "10.77.0.101" and msg_type(ack) == 5
    ip2, ack2 = dora(lab, STRANGER, 0x1420)
    assert ip2 != "10.77.0.101" and msg_type(ack2) == 5
    bound = [json.loads(l) for l in journal.read_text().splitlines() if l.strip()]
    assert [(b["ip"], b["mac"]) for b in bound if b["ip"] == "10.77.0.101"] == [("10.77.0.101", OWNER)]


def test_decline_only_from_the_holder_and_rate_limited(lab):
    """Item 2.  Before: any MAC's DECLINE for an address evicted its holder (the
    victim's INIT-REBOOT went unanswered), each accepted DECLINE was fsync'd, and
    a client could DORA-DECLINE in a loop without limit."""
    configure_full(lab, range_end="10.77.0.120")
    lab.start()
    lab.drain()
    victim = "52:54:00:14:02:01"
    ip, ack = dora(lab, victim, 0x2401)
    assert msg_type(ack) == 5
    send(lab, STRANGER, 0x2410, "decline", ip)
    c = settle(lab, "dhcp.drop.decline_not_holder", 1)
    assert c.get("dhcp.drop.decline_not_holder") == 1 and "dhcp.decline" not in c
    again = init_reboot(lab, victim, 0x2420, ip)
    assert msg_type(again) == 5 and again[0].yiaddr == ip, "the victim lost its lease"
    syncs = lab.counters().get("dhcp.lease_syncs", 0)
    looper = "52:54:00:14:02:02"
    for i in range(6):                            # DORA, DECLINE, DORA, DECLINE...
        got, ack = dora(lab, looper, 0x2500 + 16 * i)
        assert msg_type(ack) == 5
        send(lab, looper, 0x2508 + 16 * i, "decline", got)
    c = settle(lab, "dhcp.drop.decline_rate", 3)
    assert c["dhcp.decline"] == 3 and c["dhcp.drop.decline_rate"] == 3      # per-MAC burst: 3
    # the 6 ACKs, not the 3 accepted DECLINEs (9 when each DECLINE was fsync'd).  Whether a DECLINE
    # is written in a group of its own (``dhcp.lease_unsynced_groups``) or with the next exchange's
    # ACK depends on the loop turn it lands in: not asserted (CI of 0cb2acd: none of its own).
    assert c["dhcp.lease_syncs"] - syncs == 6
    assert "dhcp.errors" not in c


def test_release_and_decline_log_without_traceback_and_rate_limited(lab):
    """Item 3.  Before: every RELEASE/DECLINE raised TypeError in
    ``log.info("dhcp.lease", event=...)``: counted ``dhcp.errors``, logged a
    traceback each (``dhcp.error``), without rate limit."""
    configure_full(lab, range_end="10.77.0.120")
    lab.start()
    lab.drain()
    macs = [f"52:54:00:14:03:{i:02x}" for i in range(8)]
    for i, mac in enumerate(macs):
        ip, ack = dora(lab, mac, 0x3400 + 8 * i)
        assert msg_type(ack) == 5
        send(lab, mac, 0x3404 + 8 * i, "release", "0.0.0.0", ciaddr=ip)
    c = settle(lab, "dhcp.release", len(macs))
    assert c["dhcp.release"] == len(macs) and "dhcp.errors" not in c
    events = lab.events()
    assert not [e for e in events if e.get("event") == "dhcp.error"]
    lines = [e for e in events if e.get("event") == "dhcp.lease"]
    assert 1 <= len(lines) <= 3 and lines[0]["change"] == "release"          # rate limited
    assert not any("Traceback" in l for l in lab.log_path.read_text().splitlines())


def test_acknowledged_lease_survives_a_disk_full_episode(lab):
    """Item 4.  Before: the write that met ENOSPC left a torn partial line; the
    next ACKed lease was appended to it, refused at restart (logged as info), and
    its address handed to someone else.  Real ENOSPC: a 64 KiB tmpfs."""
    require_tool("mount")
    fs = lab.tmp / "leasefs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "sidus-test-leasefs", str(fs)], check=True)
    try:
        journal = configure_full(lab, range_end="10.77.0.120", lease_file=fs / "leases.jsonl")
        journal.write_bytes(b"\n" * (3 * 4096 - 20))  # 20 bytes left in the journal's last page
        lab.start()
        lab.drain()
        fill = os.open(fs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fill, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fill)
        _, refused_ack = dora(lab, "52:54:00:14:04:01", 0x4401)
        assert refused_ack is None                           # no ACK for a lease not on disk
        assert settle(lab, "dhcp.lease_write_errors", 1)["dhcp.lease_write_errors"] >= 1
        assert journal.read_bytes().endswith(b"\n")          # no torn tail
        (fs / "filler").unlink()
        kept = "52:54:00:14:04:02"
        ip, ack = dora(lab, kept, 0x4410)
        assert msg_type(ack) == 5
        lab.kill9()
        with open(journal, "ab") as f:                       # and a corrupt record, for the warning
            f.write(b"garbage\n")
        lab.start()
        lab.drain()
        back = init_reboot(lab, kept, 0x4420, ip)
        assert msg_type(back) == 5 and back[0].yiaddr == ip, f"the ACKed lease was lost\n{lab.log_tail()}"
        other, _ = dora(lab, "52:54:00:14:04:03", 0x4430)
        assert other != ip
        loaded = [e for e in lab.events() if e.get("event") == "dhcp.leases.loaded"]
        assert loaded[-1]["refused"] == 1 and loaded[-1]["level"] == "warning", loaded[-1]
    finally:
        if lab.proc is not None and lab.proc.poll() is None:
            lab.kill9()
        subprocess.run(["umount", "-l", str(fs)], check=False)


def double_assignments(journal: Path) -> list[str]:
    """Addresses bound to a second MAC while the first one's lease was still running."""
    holder: dict[str, tuple[str, float]] = {}
    bad = []
    for line in journal.read_text().splitlines():
        if not line.strip():
            continue
        d = json.loads(line)
        cur = holder.get(d["ip"])
        if d["state"] == "free":
            if cur is not None and cur[0] == d["mac"]:
                del holder[d["ip"]]
            continue
        if d["state"] == "bound":
            if cur is not None and cur[0] != d["mac"] and cur[1] > time.time():
                bad.append(f"{d['ip']}: {cur[0]} and {d['mac']}")
            holder[d["ip"]] = (d["mac"], d["expires"])
    return bad


def test_perfdhcp_gets_unique_leases(lab):
    """Item 5, correctness under load (not timing): ISC perfdhcp, 100 clients at
    300 DORA/s for 3 s against a pool of 121 addresses; leases are granted and
    no address is held by two MACs (perfdhcp's own check and the journal's)."""
    require_tool("perfdhcp")
    journal = configure_full(lab, range_end="10.77.0.220")
    lab.start()
    sys.path.insert(0, str(REPO))
    from bench.perfdhcp import parse
    r = subprocess.run(["ip", "netns", "exec", lab.client.name, "perfdhcp", "-4", "-l", "vc0", "-r", "300",
                        "-R", "100", "-p", "3", "-b", "mac=02:14:05:00:00:00", "-x", "t", SERVER_IP],
                       capture_output=True, text=True, timeout=60)
    got = parse(r.stdout + r.stderr, 3.0)
    assert got["acks"] > 50, f"{got}\n{r.stdout[-1500:]}\n{lab.log_tail()}"
    assert got["non_unique"] == 0 and got["rejected"] == 0
    assert double_assignments(journal) == []
    c = lab.counters()
    assert c["dhcp.acks"] >= got["acks"] and "dhcp.errors" not in c
    assert lab.proc.poll() is None
