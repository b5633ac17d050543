"""Issue 14 item 14, on the real daemon: a MAC claimed from a second address is a conflict.

The daemon (``python3 -m sidusd``, privilege separation on) runs in a network
namespace made here, proxy mode on ``vs0``; scapy builds the packets (the
``Lab`` and ``request`` helpers of test_dhcp_netns.py, in namespaces of our
own).  A PXE client does what real firmware does: the REQUEST it broadcasts
to the site's server (option 50: its address), then the ProxyDHCP REQUEST to
4011 (ciaddr: its address).  Another host then sends a 4011 REQUEST with the
same MAC and its own address as ciaddr -- the spoof that used to make it the
MAC's address silently.  ``sidusctl clients`` must show the conflict and both
addresses (the secret guard that reads the same table: tests/unit/test_provider.py).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from test_dhcp_netns import CLIENT_IP, REPO, SERVER_IP, WAIT_S, Lab, netns_lab, request

pytestmark = pytest.mark.netns

MAC = "52:54:00:00:44:01"
OTHER = "52:54:00:00:44:02"
ATTACKER_IP = "10.77.0.66"
VCI = b"PXEClient:Arch:00000:UNDI:002001"


@pytest.fixture
def claims_lab(tmp_path):
    with netns_lab(tmp_path, "sidus-t-claim") as lab:
        yield lab


def _pxe_boot_claims(lab: Lab, mac: str, ip: str, xid: int) -> None:
    site = request(mac, xid, "request", VCI, 0, extra=[("server_id", "10.77.0.254"), ("requested_addr", ip)])
    lab.sock.sendto(site, ("255.255.255.255", 67))           # for the site's server; we only note it
    ack = lab.exchange(request(mac, xid + 1, "request", VCI, 0, ciaddr=ip, extra=[("server_id", SERVER_IP)]),
                       (SERVER_IP, 4011), xid + 1)
    assert ack is not None, f"no proxy ACK\n{lab.log_tail()}"


def test_a_mac_claimed_from_a_second_address_shows_as_a_conflict(claims_lab):
    lab = claims_lab
    lab.configure("proxy", hosts=[{"mac": MAC, "profile": "default"}, {"mac": OTHER, "profile": "default"}])
    lab.start()
    _pxe_boot_claims(lab, MAC, CLIENT_IP, 0x4400)
    _pxe_boot_claims(lab, OTHER, "10.77.0.51", 0x4410)
    mine = {c["mac"]: c for c in lab.ctl_json("clients")}
    assert mine[MAC]["conflict"] is False and mine[MAC]["claimed_from"] == [CLIENT_IP], mine[MAC]

    # the spoof: another host's 4011 REQUEST with MAC in chaddr and its own address in ciaddr
    got = lab.exchange(request(MAC, 0x4420, "request", VCI, 0, ciaddr=ATTACKER_IP,
                               extra=[("server_id", SERVER_IP)]), (SERVER_IP, 4011), 0x4420, wait_s=WAIT_S)
    assert got is not None, lab.log_tail()
    mine = {c["mac"]: c for c in lab.ctl_json("clients")}
    assert mine[MAC]["ip"] == ATTACKER_IP
    assert mine[MAC]["conflict"] is True, mine[MAC]
    assert mine[MAC]["claimed_from"] == [ATTACKER_IP, CLIENT_IP]
    assert mine[OTHER]["conflict"] is False and mine[OTHER]["claimed_from"] == ["10.77.0.51"]
    text = subprocess.run([sys.executable, "-m", "sidusd.ctl", "--socket", str(lab.tmp / "control.sock"),
                           "clients", MAC], capture_output=True, text=True, cwd=REPO, timeout=30)
    assert text.returncode == 0, text.stderr
    assert f"CONFLICT: claimed from {ATTACKER_IP}, {CLIENT_IP} recently" in text.stdout, text.stdout


def test_in_full_mode_a_4011_claim_from_an_address_we_did_not_lease_moves_nothing(claims_lab):
    """Full DHCP mode: the lease table is the authority.  Before: the spoofed ciaddr became the
    MAC's address and a conflict (``claimed_from`` [attacker, leased]); now it is a refused
    claim attempt, counted, and the MAC stays at the address we leased it."""
    lab = claims_lab
    lab.configure("full", hosts=[{"mac": MAC, "profile": "default"}])
    lab.start()
    offer = lab.exchange(request(MAC, 0x4500, "discover", VCI, 0), ("255.255.255.255", 67), 0x4500)
    assert offer is not None, lab.log_tail()
    leased = offer[0].yiaddr
    ack = lab.exchange(request(MAC, 0x4501, "request", VCI, 0, extra=[("server_id", SERVER_IP),
                                                                      ("requested_addr", leased)]),
                       ("255.255.255.255", 67), 0x4501)
    assert ack is not None and ack[0].yiaddr == leased, lab.log_tail()
    got = lab.exchange(request(MAC, 0x4502, "request", VCI, 0, ciaddr=ATTACKER_IP,
                               extra=[("server_id", SERVER_IP)]), (SERVER_IP, 4011), 0x4502, wait_s=WAIT_S)
    assert got is not None, lab.log_tail()
    mine = {c["mac"]: c for c in lab.ctl_json("clients")}[MAC]
    assert mine["ip"] == leased and mine["claimed_from"] == [leased], mine
    assert mine["conflict"] is False and mine["claim_attempts"] == [ATTACKER_IP], mine
    assert lab.counters()["dhcp.claims_refused"] == 1


def test_sidusctl_hosts_clear_conflict_on_the_privsep_daemon(claims_lab):
    """The admin's answer to a CONFLICT (supervisor and worker both forget the claims)."""
    lab = claims_lab
    lab.configure("proxy", hosts=[{"mac": MAC, "profile": "default"}])
    lab.start()
    _pxe_boot_claims(lab, MAC, CLIENT_IP, 0x4600)
    _pxe_boot_claims(lab, MAC, ATTACKER_IP, 0x4610)
    assert {c["mac"]: c for c in lab.ctl_json("clients")}[MAC]["conflict"] is True
    done = subprocess.run([sys.executable, "-m", "sidusd.ctl", "--socket", str(lab.tmp / "control.sock"),
                           "hosts", "clear-conflict", MAC], capture_output=True, text=True, cwd=REPO, timeout=30)
    assert done.returncode == 0, done.stderr
    assert f"claimed from {ATTACKER_IP}, {CLIENT_IP}; a CONFLICT" in done.stdout, done.stdout
    _pxe_boot_claims(lab, MAC, CLIENT_IP, 0x4620)                   # the real host boots again
    mine = {c["mac"]: c for c in lab.ctl_json("clients")}[MAC]
    assert mine["conflict"] is False and mine["claimed_from"] == [CLIENT_IP], mine
    log = lab.log_path.read_text()
    assert "control.conflict_cleared" in log and "worker.bad_snapshot" not in log, log
