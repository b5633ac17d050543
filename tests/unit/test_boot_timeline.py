"""sidusd.lab.timeline: the demo's boot timeline, fed events, console text and the time (no files, no clock).

The file-following side (sidusd.lab.follow.BootFollower, reading sidusd's log
as it grows) is tested in tests/e2e/test_timeline*.py with log lines from a
real lab boot.
"""

from __future__ import annotations

import ast
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sidusd.lab import timeline
from sidusd.lab.timeline import BootTimeline, Step, boot_markers, next_boot_ready, parse_events

MAC = "52:54:00:13:20:01"
T0 = 1_000.0
OFFER = {"event": "dhcp.reply", "mac": MAC, "kind": "offer", "ip": "0.0.0.0", "file": "pxelinux.0",
         "timestamp": "1970-01-01T00:16:43.000000Z"}                     # T0 + 3 s


def tftp(file, at_s, **kw):
    """sidusd's summary of a TFTP transfer that ended ``at_s`` after T0."""
    stamp = datetime.fromtimestamp(T0 + at_s, UTC).isoformat().replace("+00:00", "Z")
    return {"event": "tftp.transfer", "file": file, "mac": MAC, "outcome": "ok", "error": None,
            "timestamp": stamp, **kw}


def test_event_steps_take_sidusd_timestamps_console_steps_take_now():
    tl = BootTimeline(MAC, T0)
    new = tl.feed([OFFER, tftp("pxelinux.0", 5.0)], "", now=T0 + 50)
    assert [(s.key, s.t_s) for s in new] == [("dhcp", 3.0), ("pxelinux.0", 5.0)]
    assert "proxyDHCP offer" in new[0].label and "boot file pxelinux.0" in new[0].label
    console = "[ 0.0] Linux version 6.1\r\nSIDUS-BOOT: root mounted: srv:/x / nfs ro 0 0\r\n"
    assert tl.feed([], console, now=T0 + 61.26) == [Step("linux", "Linux kernel started", 61.3),
                                                    Step("root", "root mounted (srv:/x nfs)", 61.3)]
    assert tl.feed([OFFER], console, now=T0 + 70) == []          # nothing reported twice
    assert tl.first_missing() == "TFTP ldlinux.c32"
    tl.feed([], console + "SIDUS-BOOT: writable: yes\nSIDUS-BOOT: READY\n", now=T0 + 80)
    assert [k for k in tl.order if k not in tl.reached] == ["ldlinux.c32", "config", "kernel", "initrd"]


def test_a_step_before_t0_counts_as_zero():
    tl = BootTimeline(MAC, T0 + 100)
    (step,) = tl.feed([OFFER], "", now=T0 + 200)
    assert step.t_s == 0.0


def test_other_machines_failed_transfers_and_size_probes_are_not_steps():
    tl = BootTimeline(MAC, T0)
    other = "52:54:00:13:20:02"
    events = [dict(OFFER, mac=other), tftp("pxelinux.0", 1, mac=other), tftp("pxelinux.0", 1, error="timeout"),
              tftp("pxelinux.0", 1, outcome="probe"), dict(OFFER, kind="nak"), {"event": "dhcp.reply"}]
    assert tl.feed(events, "", now=T0) == []
    assert [s.key for s in tl.feed([dict(OFFER, mac=MAC.upper().replace(":", "-"))], "", now=T0)] == ["dhcp"]


def test_full_dhcp_offer_names_the_address_and_the_site_lease_is_a_step_in_proxy_mode():
    tl = BootTimeline(MAC, T0, site_dhcp=True)
    assert "address" in tl.order
    (dhcp,) = tl.feed([dict(OFFER, ip="10.13.20.100", file=None)], "", now=T0)
    assert dhcp.label == "DHCP offer from sidusd: address 10.13.20.100"
    (addr,) = tl.feed([], "", now=T0 + 4, site_ip="10.13.20.150")
    assert (addr.key, addr.t_s) == ("address", 4.0) and "10.13.20.150" in addr.label
    plain = BootTimeline(MAC, T0)
    assert "address" not in plain.order and plain.feed([], "", now=T0, site_ip="10.13.20.150") == []


def test_paths_name_their_files():
    uefi = BootTimeline(MAC, T0, path="uefi")
    keys = [s.key for s in uefi.feed([tftp("syslinux.efi", 1), tftp("ldlinux.e64", 2), tftp("pxelinux.0", 3)],
                                     "", now=T0)]
    assert keys == ["syslinux.efi", "ldlinux.e64"] and "pxelinux.0" not in uefi.order
    http = BootTimeline(MAC, T0, path="ipxe-http")
    ok = {"event": "http.transfer", "mac": MAC, "status": 200, "outcome": "ok", "method": "GET"}
    events = [dict(ok, file="/boot/52-54-00-13-20-01.ipxe", method="HEAD"), dict(ok, file="/demo/vmlinuz", status=404),
              dict(ok, file="/boot/52-54-00-13-20-01.ipxe"), dict(ok, file="demo/vmlinuz", status=206),
              tftp("demo/initrd.img", 1)]
    assert [s.key for s in http.feed(events, "", now=T0)] == ["config", "kernel"]
    assert [k for k in http.order if k not in http.reached][:2] == ["dhcp", "initrd"]
    assert http.labels["initrd"] == "HTTP initrd demo/initrd.img"
    with pytest.raises(ValueError):
        BootTimeline(MAC, T0, path="floppy")


def test_parse_events_leaves_a_line_being_written_for_the_next_read():
    done = json.dumps(OFFER).encode() + b"\nnot json: a traceback line\n[1, 2]\n"
    partial = json.dumps(OFFER).encode()[:40]
    events, used = parse_events(done + partial)
    assert events == [OFFER] and used == len(done)
    assert parse_events(partial) == ([], 0)


def test_boot_markers_in_order_without_prefix_or_carriage_returns():
    assert boot_markers("x\r\nSIDUS-BOOT: writable: yes \r\nSIDUS-BOOT: READY\r\n") == ["writable: yes", "READY"]


def test_the_timeline_module_reads_no_file_and_no_clock():
    tree = ast.parse(Path(timeline.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "json", "re", "dataclasses", "datetime", "typing"}, imported
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert "open" not in calls


def test_the_next_boots_ready_is_the_one_after_its_kernel_banner():
    # reboot-after-write: boot 1 prints READY after "probe written", then reboots
    boot1 = ("[    0.000000] Linux version 6.1.0-57-amd64\r\nSIDUS-BOOT: probe-before: absent\r\n"
             "SIDUS-BOOT: probe written\r\nSIDUS-BOOT: READY\r\n")
    after = boot1.index("probe written") + len("probe written")
    assert next_boot_ready(boot1, after) is None               # boot 1's READY is not boot 2's
    rebooting = boot1 + "reboot: Restarting system\r\n[    0.000000] Linux version 6.1.0-57-amd64\r\n"
    assert next_boot_ready(rebooting, after) is None          # boot 2 began, no READY yet
    both = rebooting + "SIDUS-BOOT: probe-before: absent\r\nSIDUS-BOOT: READY\r\n"
    m = next_boot_ready(both, after)
    assert m is not None and m.start() == both.rindex("SIDUS-BOOT: READY")
