"""arm64 UEFI clients (option 93 = 11) are answered or not as ``boot.boot_files.arm64`` says, and
either way ``sidusctl clients`` lists them with their firmware type and, when unanswered, the reason
(logged at info, not per DISCOVER).  Through the real daemon, a reload in between; scapy-built
requests in a netns made and removed here (test_dhcp_netns.Lab)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from test_dhcp_netns import REPO, SILENCE_S, lab, request  # noqa: F401  (lab: the fixture)

pytestmark = pytest.mark.netns

ARM64 = b"PXEClient:Arch:00011:UNDI:003016"
MAC = "52:54:00:00:18:64"


def test_arm64_answered_as_the_config_says_and_listed_either_way(lab):  # noqa: F811  (the fixture)
    lab.configure("proxy", hosts=[{"mac": MAC, "hostname": "arm1", "profile": "default"}])
    lab.start()

    # boot_files.arm64: null (the shipped default): no answer, a reason in `sidusctl clients`
    for i in range(3):                                    # the firmware retries
        got = lab.exchange(request(MAC, 0x1864 + i, "discover", ARM64, 11), ("255.255.255.255", 67), 0x1864 + i,
                           wait_s=SILENCE_S)
        assert got is None, got
    (c,) = [c for c in lab.ctl_json("clients") if c["mac"] == MAC]
    assert c["arch"] == "efi-arm64", c
    assert c["unanswered"]["code"] == "no_boot_file", c
    assert "no boot_files.arm64 configured for efi-arm64 (arch 11)" in c["unanswered"]["reason"], c
    text = subprocess.run([sys.executable, "-m", "sidusd.ctl", "--socket", str(lab.tmp / "control.sock"),
                           "clients"], capture_output=True, text=True, cwd=REPO, timeout=30).stdout
    assert "NONE: no boot_files.arm64" in text, text
    logged = [e for e in lab.events() if e.get("event") == "dhcp.unanswered" and e.get("mac") == MAC]
    assert [(e["level"], e["arch"]) for e in logged] == [("info", "efi-arm64")], logged   # once, not 3 times

    # boot_files.arm64 set, reloaded: the same machine is answered with it
    (lab.tmp / "tftp" / "grubaa64.efi").write_bytes(b"MZ stand-in: preflight wants the file")
    path = lab.tmp / "sidus.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["boot"]["boot_files"] = {"arm64": "grubaa64.efi"}
    path.write_text(yaml.safe_dump(cfg))
    lab.ctl_json("reload")
    got = lab.exchange(request(MAC, 0x1870, "discover", ARM64, 11), ("255.255.255.255", 67), 0x1870, wait_s=3.0)
    assert got is not None, lab.log_tail()
    assert got[0].file.rstrip(b"\0") == b"grubaa64.efi"
    (c,) = [c for c in lab.ctl_json("clients") if c["mac"] == MAC]
    assert c["unanswered"] is None and c["arch"] == "efi-arm64", c
