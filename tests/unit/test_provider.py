"""sidusd.boot.provider: the one decision for a requested name (TFTP and HTTP), the secret guard."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidusd import config
from sidusd.boot import claims, provider, render
from sidusd.boot.inventory import Host, Inventory, Profile
from sidusd.observability import Observer
from sidusd.runtime import Runtime, Snapshot

M1, M2, M3 = "52:54:00:00:00:01", "52:54:00:00:00:02", "52:54:00:00:00:03"
UNKNOWN = "52:54:00:00:00:99"
PXE = {M: "pxelinux.cfg/01-" + M.replace(":", "-") for M in (M1, M2, M3, UNKNOWN)}
LOGIN = render.IscsiLogin("iqn.2026-11.org.example:sidus-disk-525400000001", "10.0.0.1", 3260,
                          "iqn.2026-11.org.example:sidus-host-525400000001", "sidus-525400000001",
                          "S3cretS3cretS3cret")


def cfg(unknown: str = "default") -> config.Config:
    return config.parse(f"""
dhcp: {{mode: proxy, interfaces: [eth1], unknown_hosts: {unknown}}}
tftp: {{root: /srv/tftp}}
images:
  demo: {{root: /srv/images/demo, kernel: demo/vmlinuz, initrd: demo/initrd.img}}
""")


INV = Inventory(
    {"default": Profile("default", "demo"), "persist": Profile("persist", "demo", overlay="iscsi")},
    {M1: Host(M1, "persist", hostname="vm1"), M2: Host(M2, "default", hostname="vm2"),
     M3: Host(M3, "default", hostname="vm3")})


class Logins:
    """A stand-in for Runtime.iscsi_login that records who asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []

    def __call__(self, mac: str, server_ip: str) -> render.IscsiLogin:
        self.asked.append((mac, server_ip))
        return LOGIN


def decide(name: str, client_ip: str = "10.0.0.5", dhcp_mac: str | None = None,
           server_ip: str = "10.0.0.1", c: config.Config | None = None, login=None):
    return provider.decide(name, provider.Asker(server_ip, client_ip, dhcp_mac), c or cfg(), INV,
                           login or Logins())


# -- the answers --------------------------------------------------------------------------

def test_a_file_name_is_a_file_below_the_root_with_its_parts():
    assert decide("/images/demo/vmlinuz") == provider.FileAt(Path("/srv/tftp"), ("images", "demo", "vmlinuz"))
    assert decide("boot\\x64\\wdsnbp.com") == provider.FileAt(Path("/srv/tftp"), ("boot", "x64", "wdsnbp.com"))


@pytest.mark.parametrize("name", ["../etc/passwd", "a//b", "", "x\x00y", "a/./b", "x" * 256])
def test_a_name_never_served_is_refused_with_code_name(name):
    out = decide(name)
    assert isinstance(out, provider.Refusal) and out.code == provider.NAME and out.reason


def test_a_per_mac_config_is_rendered_for_its_host():
    out = decide(PXE[M2], dhcp_mac=M2)
    assert isinstance(out, provider.Document) and out.kind == "pxelinux" and out.mac == M2
    assert b"10.0.0.1" in out.body                              # the server IP is the local address
    assert out.booted_mac == M2 and out.target is not None and out.target.hostname == "vm2"
    ipxe = decide("boot/52-54-00-00-00-02.ipxe")
    assert isinstance(ipxe, provider.Document) and ipxe.kind == "ipxe" and ipxe.body.startswith(b"#!ipxe")


def test_pxelinux_default_records_the_mac_that_did_dhcp_from_that_ip():
    out = decide("pxelinux.cfg/default", dhcp_mac=M3)
    assert isinstance(out, provider.Document) and out.mac is None and out.booted_mac == M3


def test_an_unknown_mac_is_not_found_when_unknown_hosts_are_ignored():
    out = decide(PXE[UNKNOWN], c=cfg("ignore"))
    assert isinstance(out, provider.Refusal) and out.code == provider.NOT_FOUND and out.cause is None
    assert out.mac == UNKNOWN
    served = decide(PXE[UNKNOWN])                                 # default profile otherwise
    assert isinstance(served, provider.Document)


def test_an_unsafe_value_is_not_found_with_cause_render():
    out = decide(PXE[M2], server_ip="evil.example")
    assert isinstance(out, provider.Refusal) and out.code == provider.NOT_FOUND
    assert out.cause == provider.RENDER and "IPv4" in out.reason


def test_a_file_that_cannot_be_opened_is_not_found_or_access():
    assert provider.refused_open(True, "x: no such file") == provider.Refusal(provider.NOT_FOUND, "x: no such file")
    assert provider.refused_open(False, "x: symbolic link refused").code == provider.ACCESS


# -- the secret guard ---------------------------------------------------------------------

def test_a_config_with_disk_credentials_goes_to_the_ip_that_did_that_macs_dhcp():
    login = Logins()
    out = decide(PXE[M1], client_ip="10.0.0.5", dhcp_mac=M1, login=login)
    assert isinstance(out, provider.Document)
    assert b"sidus.iscsi.secret=S3cretS3cretS3cret" in out.body
    assert login.asked == [(M1, "10.0.0.1")]
    # the MAC's notation in the DHCP table does not matter
    assert isinstance(decide(PXE[M1], dhcp_mac="52-54-00-00-00-01"), provider.Document)


@pytest.mark.parametrize("dhcp_mac", [M2, None, "not a mac"])
def test_another_ip_is_refused_and_the_login_never_looked_up(dhcp_mac):
    login = Logins()
    for name in (PXE[M1], "52:54:00:00:00:01.ipxe"):
        out = decide(name, client_ip="10.0.0.6", dhcp_mac=dhcp_mac, login=login)
        assert isinstance(out, provider.Refusal)
        assert (out.code, out.cause, out.mac) == (provider.NOT_FOUND, provider.SECRET, M1)
    assert login.asked == []


def test_a_host_without_secret_is_served_to_anyone():
    assert isinstance(decide(PXE[M3], client_ip="10.0.0.99", dhcp_mac=None), provider.Document)


# -- the edges map every code, and the runtime emits what a decision implies ---------------

def test_every_refusal_code_has_a_tftp_error_and_an_http_status():
    from sidusd.net import http_server, tftp_intake
    from sidusd.proto import tftp
    assert set(tftp_intake.REFUSALS) == set(provider.CODES) == set(http_server.REFUSALS)
    assert {c: v[0] for c, v in tftp_intake.REFUSALS.items()} == {
        "name": tftp.ERR_ACCESS, "not_found": tftp.ERR_NOT_FOUND, "access": tftp.ERR_ACCESS,
        "internal": tftp.ERR_UNDEFINED}
    assert {c: v[0] for c, v in http_server.REFUSALS.items()} == {
        "name": 403, "not_found": 404, "access": 403, "internal": 500}


def test_runtime_provide_counts_the_secret_refusal_from_the_decision(tmp_path):
    obs = Observer()
    rt = Runtime(tmp_path / "sidus.yaml", Snapshot(cfg(), INV, 1), observer=obs, iscsi_watch_s=0)
    obs.client_seen(M1, "10.0.0.5")
    obs.client_seen(M2, "10.0.0.6")
    # the right address passes the guard (then meets the renderer: no disk applied in this runtime)
    assert rt.provide(PXE[M1], "10.0.0.1", "10.0.0.5").cause == provider.RENDER
    refused = rt.provide(PXE[M1], "10.0.0.1", "10.0.0.6")
    assert isinstance(refused, provider.Refusal) and refused.cause == provider.SECRET
    assert rt.render("ipxe", M1, "10.0.0.1", "10.0.0.6") is None
    assert obs.snapshot()["render.secret_refused"] == 2
    assert isinstance(rt.provide("images/demo/vmlinuz", "10.0.0.1", "10.0.0.6"), provider.FileAt)
    assert rt.provide(PXE[M2], "evil.example", "10.0.0.6").cause == provider.RENDER
    assert obs.snapshot()["render.errors"] == 2


# -- issue 14 item 14: a MAC claimed by another host does not hand over its secret -----------

class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class LoginRuntime(Runtime):
    """A runtime whose host M1 has its disk applied (the login the iSCSI manager would give)."""

    def iscsi_login(self, mac: str, server_ip: str) -> render.IscsiLogin | None:
        return LOGIN if mac == M1 else None


def _runtime(tmp_path, inv: Inventory = INV, clock: Clock | None = None):
    obs = Observer(clock=clock or Clock())
    return LoginRuntime(tmp_path / "sidus.yaml", Snapshot(cfg(), inv, 1), observer=obs, iscsi_watch_s=0), obs


def _served_secret(out) -> bool:
    return isinstance(out, provider.Document) and b"sidus.iscsi.secret=S3cretS3cretS3cret" in out.body


def test_a_spoofed_4011_claim_of_a_booted_mac_gets_no_secret_and_shows_a_conflict(tmp_path):
    """The attack: M1 booted from 10.0.0.5; a host at 10.0.0.66 sends a 4011 REQUEST with chaddr M1,
    ciaddr 10.0.0.66 (net/dhcp_server.py notes ``client_seen(M1, ciaddr)`` for the ACK), then asks
    for M1's config.  Before: served, with M1's CHAP secret.  Now: refused to both addresses."""
    clock = Clock()
    rt, obs = _runtime(tmp_path, clock=clock)
    obs.client_seen(M1, "10.0.0.5")
    assert _served_secret(rt.provide(PXE[M1], "10.0.0.1", "10.0.0.5"))
    clock.t += 30
    obs.client_seen(M1, "10.0.0.66")                        # the spoofed claim
    for ip in ("10.0.0.66", "10.0.0.5"):
        for name in (PXE[M1], "52:54:00:00:00:01.ipxe"):
            out = rt.provide(name, "10.0.0.1", ip)
            assert isinstance(out, provider.Refusal) and out.cause == provider.SECRET, (ip, name, out)
    assert "conflict" in rt.provide(PXE[M1], "10.0.0.1", "10.0.0.66").reason
    rec = obs.clients[M1].as_dict()
    assert rec["conflict"] is True and rec["claimed_from"] == ["10.0.0.66", "10.0.0.5"]
    # the window passes without a new claim from 10.0.0.5: the address that claimed it last is served
    clock.t += claims.CLAIM_WINDOW_S
    obs.client_seen(M1, "10.0.0.66")
    assert _served_secret(rt.provide(PXE[M1], "10.0.0.1", "10.0.0.66"))
    assert obs.clients[M1].as_dict()["conflict"] is False


def test_a_host_with_a_fixed_ip_gets_its_secret_at_that_address_only(tmp_path):
    inv = INV.with_host(Host(M1, "persist", hostname="vm1", ip="10.0.0.5"))
    rt, obs = _runtime(tmp_path, inv)
    obs.client_seen(M1, "10.0.0.66")                        # alone: no conflict, but not its address
    out = rt.provide(PXE[M1], "10.0.0.1", "10.0.0.66")
    assert isinstance(out, provider.Refusal) and out.cause == provider.SECRET and "10.0.0.5" in out.reason
    rt2, obs2 = _runtime(tmp_path, inv)
    obs2.client_seen(M1, "10.0.0.5")
    assert _served_secret(rt2.provide(PXE[M1], "10.0.0.1", "10.0.0.5"))


def test_hosts_without_a_secret_are_not_affected_by_a_conflict(tmp_path):
    rt, obs = _runtime(tmp_path)
    obs.client_seen(M3, "10.0.0.7")
    obs.client_seen(M3, "10.0.0.8")
    assert isinstance(rt.provide(PXE[M3], "10.0.0.1", "10.0.0.8"), provider.Document)


@pytest.mark.parametrize("claimed, fixed, ok", [
    ((), None, True), (("10.0.0.5",), None, True), (("10.0.0.5", "10.0.0.9"), None, False),
    (("10.0.0.9", "10.0.0.5"), None, False), (("10.0.0.5",), "10.0.0.5", True), (("10.0.0.5",), "10.0.0.6", False),
])
def test_secret_problem_table(claimed, fixed, ok):
    assert (claims.secret_problem("10.0.0.5", claimed, fixed) is None) == ok


def test_claims_are_bounded_and_windowed():
    c = claims.Claims()
    for i in range(10):
        c.note(f"10.0.0.{i}", 100.0 + i)
    assert len(c.seen) == claims.MAX_ADDRESSES
    assert c.recent(110.0) == ("10.0.0.9", "10.0.0.8", "10.0.0.7", "10.0.0.6")
    assert c.recent(109.0 + claims.CLAIM_WINDOW_S) == ("10.0.0.9",)
    assert not c.conflict(109.0 + claims.CLAIM_WINDOW_S) and c.conflict(110.0)
    c.note("10.0.0.6", 200.0)                               # seen again: newest
    assert c.recent(200.0)[0] == "10.0.0.6"


def test_sidusctl_clients_shows_a_conflict(tmp_path):
    from sidusd import ctl
    rt, obs = _runtime(tmp_path)
    obs.client_seen(M1, "10.0.0.5")
    obs.client_seen(M1, "10.0.0.66")
    obs.client_seen(M2, "10.0.0.6")
    text = ctl.render_clients([r.as_dict() for r in reversed(obs.clients.values())])
    lines = text.splitlines()
    assert lines[1].startswith(M2) and not lines[2].startswith("    CONFLICT")
    assert lines[3] == ("    CONFLICT: claimed from 10.0.0.66, 10.0.0.5 recently; disk secrets are withheld "
                        "(docs/security.md, L2 spoofing)")
