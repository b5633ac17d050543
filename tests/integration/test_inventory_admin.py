"""Inventory an admin can live with, through the real daemon and the control socket: machines that got
no DHCP answer are listed with the reason (and logged at info, once per machine, not per DISCOVER);
``sidusctl hosts adopt`` makes one a host, ``hosts show`` and ``hosts set`` (some fields changed, the
others kept).  DHCP requests built by scapy in a netns made and removed here (test_dhcp_netns.Lab)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from test_dhcp_netns import REPO, SILENCE_S, lab, request  # noqa: F401  (lab: the fixture)

pytestmark = pytest.mark.netns

BIOS = b"PXEClient:Arch:00000:UNDI:002001"
IA32 = b"PXEClient:Arch:00006:UNDI:003016"
STRANGER = "52:54:00:00:15:01"        # not in the inventory; unknown hosts are ignored
KNOWN32 = "52:54:00:00:15:02"         # a host, IA32 UEFI firmware: no boot_files.uefi_ia32


def ctl(lab, *args: str) -> subprocess.CompletedProcess:  # noqa: F811
    return subprocess.run([sys.executable, "-m", "sidusd.ctl", "--socket", str(lab.tmp / "control.sock"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=30)


def discover(lab, mac: str, xid: int, vci: bytes = BIOS, arch: int = 0,  # noqa: F811
             wait_s: float = SILENCE_S):
    return lab.exchange(request(mac, xid, "discover", vci, arch), ("255.255.255.255", 67), xid, wait_s=wait_s)


def test_unanswered_clients_adopt_show_set(lab):  # noqa: F811  (the fixture)
    lab.configure("proxy", hosts=[{"mac": KNOWN32, "hostname": "ia32", "profile": "default"}])
    path = lab.tmp / "sidus.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["dhcp"]["unknown_hosts"] = "ignore"
    path.write_text(yaml.safe_dump(cfg))
    lab.start()

    for i in range(3):                                    # a PXE ROM retries
        assert discover(lab, STRANGER, 0x1500 + i) is None
    assert discover(lab, KNOWN32, 0x1510, IA32, 6) is None
    clients = {c["mac"]: c for c in lab.ctl_json("clients")}
    assert clients[STRANGER]["unanswered"]["code"] == "unknown_host"
    assert "dhcp.unknown_hosts is ignore" in clients[STRANGER]["unanswered"]["reason"]
    assert clients[KNOWN32]["unanswered"]["code"] == "no_boot_file"
    assert "boot_files.uefi_ia32" in clients[KNOWN32]["unanswered"]["reason"]
    assert clients[KNOWN32]["arch"] is not None           # its firmware type, from option 93
    text = ctl(lab, "clients").stdout
    assert "ANSWER" in text and "NONE: not in the inventory" in text and "NONE: no boot_files.uefi_ia32" in text
    logged = [e for e in lab.events() if e.get("event") == "dhcp.unanswered"]
    assert [(e["mac"], e["level"]) for e in logged] == [(STRANGER, "info"), (KNOWN32, "info")], logged

    # adopt the stranger: it becomes a host of the default profile and is answered
    r = ctl(lab, "hosts", "adopt", STRANGER, "--hostname", "node15")
    assert r.returncode == 0, r.stderr
    assert "adopted" in r.stdout and "node15" in r.stdout
    got = discover(lab, STRANGER, 0x1520, wait_s=3.0)
    assert got is not None, lab.log_tail()
    assert got[0].file.rstrip(b"\0") == b"pxelinux.0"
    clients = {c["mac"]: c for c in lab.ctl_json("clients")}
    assert clients[STRANGER]["unanswered"] is None
    show = lab.ctl_json("hosts", "show", STRANGER)
    assert show["host"]["hostname"] == "node15" and show["host"]["profile"] == "default"
    assert show["boots"]["image"] == "demo" and show["client"]["unanswered"] is None
    assert "node15" in ctl(lab, "hosts", "show", STRANGER).stdout

    # set: one field changed, the others kept (in the file too)
    r = ctl(lab, "hosts", "set", STRANGER, "--append", "sidus.marker=15")
    assert r.returncode == 0, r.stderr
    inv = yaml.safe_load((lab.tmp / "inventory.yaml").read_text())
    (h,) = [h for h in inv["hosts"] if h["mac"] == STRANGER]
    assert h["hostname"] == "node15" and h["append"] == "sidus.marker=15" and h["profile"] == "default"
    after = json.loads(ctl(lab, "--json", "hosts", "set", STRANGER, "--unset", "hostname").stdout)
    assert after["host"]["hostname"] is None and after["host"]["append"] == "sidus.marker=15"
    assert after["previous"]["hostname"] == "node15" and after["changed"] == ["hostname"]

    # refusals: the reason, exit 1, nothing changed
    for args, said in [(("hosts", "set", "52:54:00:00:15:99", "--append", "x"), "no host 52:54:00:00:15:99"),
                       (("hosts", "set", STRANGER), "nothing to change"),
                       (("hosts", "adopt", "52:54:00:00:15:98"), "no machine with MAC 52:54:00:00:15:98"),
                       (("hosts", "adopt", STRANGER), "in the inventory already"),
                       (("hosts", "set", STRANGER, "--profile", "nosuch"), "nosuch"),
                       (("hosts", "show", "52:54:00:00:15:97"), "no host 52:54:00:00:15:97")]:
        r = ctl(lab, *args)
        assert r.returncode == 1 and said in r.stderr, (args, r.returncode, r.stderr)
    assert yaml.safe_load((lab.tmp / "inventory.yaml").read_text()) == {
        **inv, "hosts": [{k: v for k, v in x.items() if k != "hostname" or x["mac"] != STRANGER}
                         for x in inv["hosts"]]}
