"""BootTimeline against log lines captured from a real lab boot (no root, no VM needed).

The lines below were copied from sidusd.log and the console log of a real
``python3 -m sidusd.lab demo`` run; the tests check which steps they produce,
that other machines' events and failed transfers are ignored, and that a line
still being written is not read half-way.
"""

from __future__ import annotations

import json

from sidusd.lab.demo import tree_fingerprint
from sidusd.lab.follow import BootFollower, read_events
from sidusd.lab.timeline import boot_markers

MAC = "52:54:00:13:20:01"
OTHER = "52:54:00:13:20:02"

OFFER = {"component": "dhcp", "mac": MAC, "xid": 1416660261, "port": 67, "file": "pxelinux.0",
         "kind": "offer", "arch": "bios", "ip": "0.0.0.0", "dest": "255.255.255.255:68",
         "interface": "br0", "event": "dhcp.reply", "level": "info",
         "timestamp": "2026-11-24T20:05:03.012400Z"}
PXELINUX = {"component": "tftp", "file": "pxelinux.0", "peer": "10.13.20.198:40957", "mac": None,
            "bytes": 42430, "size": 42430, "blksize": 1432, "windowsize": 1, "retransmits": 0,
            "duration_s": 0.017049, "outcome": "ok", "error": None, "event": "tftp.transfer",
            "level": "info", "timestamp": "2026-11-24T20:05:19.164328Z"}
CONFIG = dict(PXELINUX, file="pxelinux.cfg/01-52-54-00-13-20-01", mac=MAC,
              timestamp="2026-11-24T20:05:19.241010Z")
CONSOLE = """[    0.000000] Linux version 6.1.0-56-amd64 (debian-kernel@lists.debian.org)\r
SIDUS-BOOT: root mounted: sidus-root / overlay rw,relatime,lowerdir=/run/sidus/ro,upperdir=/run/sidus/rw/upper 0 0\r
SIDUS-BOOT: cmdline: BOOT_IMAGE=demo/vmlinuz root=/dev/nfs sidus.demo=poweroff\r
SIDUS-BOOT: writable: yes\r
SIDUS-BOOT: probe-before: absent\r
SIDUS-BOOT: READY\r
"""


def _write(path, *events, tail=""):
    path.write_text("".join(json.dumps(e) + "\n" for e in events) + tail)


def _timeline(tmp_path, t0):
    tl = BootFollower(MAC, tmp_path / "sidusd.log", tmp_path / "console.log")
    tl.t0 = t0
    return tl


def test_steps_from_sidusd_events_and_console_markers(tmp_path):
    from datetime import datetime
    t0 = datetime.fromisoformat("2026-11-24T20:05:00.000000+00:00").timestamp()
    _write(tmp_path / "sidusd.log", OFFER, PXELINUX, CONFIG)
    (tmp_path / "console.log").write_text(CONSOLE)
    tl = _timeline(tmp_path, t0)
    steps = {s.key: s for s in tl.poll()}
    assert set(steps) == {"dhcp", "pxelinux.0", "config", "linux", "root", "overlay", "ready"}
    assert steps["dhcp"].t_s == 3.0 and steps["config"].t_s == 19.2     # sidusd's own timestamps
    assert "proxyDHCP offer" in steps["dhcp"].label and "pxelinux.0" in steps["dhcp"].label
    assert "(sidus-root overlay)" in steps["root"].label
    assert tl.first_missing() == "TFTP ldlinux.c32"
    assert tl.poll() == []                     # nothing new, nothing reported twice


def test_other_machines_failed_transfers_and_partial_lines_are_ignored(tmp_path):
    log = tmp_path / "sidusd.log"
    failed = dict(PXELINUX, outcome="failed", error="timeout")
    _write(log, dict(OFFER, mac=OTHER), dict(CONFIG, mac=OTHER), failed,
           tail=json.dumps(OFFER)[:40])           # sidusd is still writing this line
    tl = _timeline(tmp_path, 0.0)
    assert tl.poll() == []
    with open(log, "a") as f:
        f.write(json.dumps(OFFER)[40:] + "\nnot json: a traceback line\n")
    assert [s.key for s in tl.poll()] == ["dhcp"]
    assert len(read_events(log)) == 4


def test_full_dhcp_offer_names_the_address(tmp_path):
    _write(tmp_path / "sidusd.log", dict(OFFER, ip="10.13.20.100"))
    tl = _timeline(tmp_path, 0.0)
    (step,) = tl.poll()
    assert "address 10.13.20.100" in step.label


def test_boot_markers_and_fingerprint(tmp_path):
    assert boot_markers(CONSOLE)[2:4] == ["writable: yes", "probe-before: absent"]
    (tmp_path / "a").write_text("x")
    before = tree_fingerprint(tmp_path)
    assert tree_fingerprint(tmp_path) == before
    (tmp_path / "b").write_text("y")
    assert tree_fingerprint(tmp_path) != before
