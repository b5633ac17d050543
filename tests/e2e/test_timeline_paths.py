"""BootTimeline for the UEFI and iPXE -> HTTP paths (no root, no VM needed).

The events have the shape sidusd writes (``tftp.transfer``, ``http.transfer``
from sidusd.net.http_server); the tests check which steps each path expects
and that HEAD requests, 404s and cut transfers are not counted as steps.
"""

from __future__ import annotations

import json

import pytest

from sidusd.lab.follow import BootFollower

MAC = "52:54:00:13:20:1f"
SCRIPT = "boot/52-54-00-13-20-1f.ipxe"
OFFER = {"component": "dhcp", "mac": MAC, "file": "http://10.13.20.1:8080/" + SCRIPT, "kind": "offer",
         "arch": "bios", "ip": "0.0.0.0", "event": "dhcp.reply", "timestamp": "2026-11-24T20:05:03Z"}


def http(file, status=200, outcome="ok", method="GET", mac=MAC):
    return {"component": "http", "event": "http.transfer", "method": method, "file": file,
            "peer": "10.13.20.150:40000", "mac": mac, "status": status, "bytes": 10, "size": 10,
            "range": None, "duration_s": 0.1, "outcome": outcome, "timestamp": "2026-11-24T20:05:09Z"}


def tftp(file, outcome="ok"):
    return {"component": "tftp", "event": "tftp.transfer", "file": file, "mac": MAC, "bytes": 10,
            "outcome": outcome, "error": None, "timestamp": "2026-11-24T20:05:09Z"}


def _timeline(tmp_path, path, *events):
    (tmp_path / "sidusd.log").write_text("".join(json.dumps(e) + "\n" for e in events))
    (tmp_path / "console.log").write_text("")
    return BootFollower(MAC, tmp_path / "sidusd.log", tmp_path / "console.log", path=path)


def test_ipxe_http_steps_come_from_http_transfers(tmp_path):
    tl = _timeline(tmp_path, "ipxe-http", OFFER, http(SCRIPT, method="HEAD"), http("demo/vmlinuz", 404),
                   http("demo/vmlinuz", 200, outcome="timeout"), tftp("demo/vmlinuz"),
                   http(SCRIPT), http("demo/vmlinuz", 206), http("demo/initrd.img"))
    steps = {s.key: s.label for s in tl.poll()}
    assert set(steps) == {"dhcp", "config", "kernel", "initrd"}
    assert steps["kernel"] == "HTTP kernel demo/vmlinuz" and SCRIPT in steps["config"]
    assert "pxelinux.0" not in tl.order and tl.first_missing() == "Linux kernel started"


def test_ipxe_http_ignores_what_is_not_a_complete_get(tmp_path):
    tl = _timeline(tmp_path, "ipxe-http", http(SCRIPT, method="HEAD"), http("demo/vmlinuz", 404),
                   http("demo/initrd.img", 200, outcome="timeout"), http("demo/vmlinuz", mac="52:54:00:00:00:09"),
                   tftp("demo/vmlinuz"))
    assert tl.poll() == []


def test_uefi_steps_are_syslinux_efi_and_ldlinux_e64(tmp_path):
    tl = _timeline(tmp_path, "uefi", OFFER, tftp("syslinux.efi", outcome="probe"), tftp("syslinux.efi"),
                   tftp("ldlinux.e64"), tftp("pxelinux.0"))
    keys = [s.key for s in tl.poll()]
    assert keys == ["dhcp", "syslinux.efi", "ldlinux.e64"]
    assert tl.first_missing() == "TFTP pxelinux.cfg/01-52-54-00-13-20-1f (rendered for this MAC)"


def test_unknown_path_is_refused(tmp_path):
    with pytest.raises(ValueError):
        _timeline(tmp_path, "floppy")
