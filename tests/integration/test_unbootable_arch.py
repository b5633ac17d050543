"""Architectures without a boot file, whatever their option 93 says (issue 18): an architecture
sidus knows but has no file for in the config (efi-ia32, 6, with ``boot_files.uefi_ia32: null``)
and one it cannot boot at all (ARM 32-bit UEFI, 10) get no answer, and both show up in
``sidusctl clients`` with their reason, logged once at info (not per DISCOVER); the arm64 case,
answered or not as the config says, is tests/integration/test_arm64_unanswered.py.  Through the
real daemon, scapy-built requests in a netns made and removed here (test_dhcp_netns.Lab)."""

from __future__ import annotations

import pytest
from test_dhcp_netns import SILENCE_S, lab, request  # noqa: F401  (lab: the fixture)

pytestmark = pytest.mark.netns

CASES = (("52:54:00:00:18:06", 6, b"PXEClient:Arch:00006:UNDI:003016",
          "no boot_files.uefi_ia32 configured for efi-ia32 (arch 6)"),
         ("52:54:00:00:18:10", 10, b"PXEClient:Arch:00010:UNDI:003016",
          "unsupported client architecture 10 (option 93)"))


def test_unbootable_architectures_are_listed_with_the_reason(lab):  # noqa: F811  (the fixture)
    lab.configure("proxy", hosts=[{"mac": mac, "hostname": f"h{code}", "profile": "default"}
                                  for mac, code, _, _ in CASES])
    lab.start()
    for mac, code, vci, _ in CASES:
        for i in range(3):                                    # the firmware retries
            xid = 0x1800 + code * 16 + i
            got = lab.exchange(request(mac, xid, "discover", vci, code), ("255.255.255.255", 67), xid,
                               wait_s=SILENCE_S)
            assert got is None, (code, got)
    clients = {c["mac"]: c for c in lab.ctl_json("clients")}
    for mac, code, _, why in CASES:
        c = clients.get(mac)
        assert c is not None, (code, mac, sorted(clients))
        assert c["unanswered"] is not None and c["unanswered"]["code"] == "no_boot_file", c
        assert why in c["unanswered"]["reason"], c
        logged = [e for e in lab.events() if e.get("event") == "dhcp.unanswered" and e.get("mac") == mac]
        assert [e["level"] for e in logged] == ["info"], logged          # once, at info, not 3 times
