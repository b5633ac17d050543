"""Whole boots: iPXE (BIOS) -> sidusd DHCP -> pxelinux.0 -> per-MAC config -> kernel + initrd
over TFTP -> NFS root from nfs-ganesha -> overlay on tmpfs -> the demo image's markers.

Every peer is real: qemu with the iPXE ROM of ipxe-qemu, dnsmasq as the site
DHCP server, nfs-ganesha, the Debian kernel, sidusd started as
``python3 -m sidusd --config FILE`` and driven with the real ``sidusctl``.
"""

from __future__ import annotations

import ipaddress

import pytest

from sidusd.ctl import render_event
from sidusd.lab.demo import HostSpec, boot_markers, server_probe_file, tree_fingerprint
from sidusd.lab.topology import SERVER_IP
from sidusd.lab.vm import mac_for

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.background]   # its own labs: no fixed name

BOOT_TIMEOUT_S = 300         # ~45 s under TCG on an idle machine; CI machines are shared
POOL = (ipaddress.IPv4Address("10.13.20.100"), ipaddress.IPv4Address("10.13.20.199"))


def marker_value(markers: list[str], key: str) -> list[str]:
    """Values of ``key: value`` markers, in order."""
    return [m.split(":", 1)[1].strip() for m in markers if m.startswith(key + ":")]


def boot(lab, mac, name, until="ready", **kw):
    """Start a VM and follow its boot; fails with the diagnostics if ``until`` is not reached."""
    vm = lab.boot_vm(mac, name=name, **kw)
    tl = lab.timeline(vm)
    ok = lab.follow(vm, tl, BOOT_TIMEOUT_S, until=until)
    assert ok, (f"{name} ({mac}) did not reach {until!r}; first missing step: "
                f"{tl.first_missing()}\n{lab.diagnostics(vm)}")
    return vm, tl


def in_pool(ip: str) -> bool:
    return POOL[0] <= ipaddress.IPv4Address(ip) <= POOL[1]


def test_bios_proxy_boot_nfs_root_overlay(make_lab, demo_image):
    mac = mac_for(0)
    lab = make_lab("proxy", [HostSpec(mac, "e2e-proxy", "sidus.demo=poweroff sidus.test=proxy")],
                   demo_image)
    before = tree_fingerprint(demo_image.root)
    vm, tl = boot(lab, mac, "proxy1")
    # every step of the chain was seen, in sidusd's own events and on the console
    assert tl.first_missing() is None, lab.diagnostics(vm)
    assert vm.wait_exit(60) is not None, "the guest did not power off\n" + lab.diagnostics(vm)

    markers = boot_markers(vm.console_text())
    cmdline = " ".join(marker_value(markers, "cmdline"))
    assert "sidus.test=proxy" in cmdline and "console=ttyS0" in cmdline, markers
    assert marker_value(markers, "writable") == ["yes"], markers
    assert marker_value(markers, "probe-before") == ["absent"], markers
    # / is an overlay whose lower layer is the NFS root, its upper layer in RAM ...
    root_line = marker_value(markers, "root mounted")[0].split()
    assert root_line[1:3] == ["/", "overlay"] and "lowerdir=" in root_line[3], root_line
    assert f"nfsroot={SERVER_IP}:{demo_image.root}" in cmdline, cmdline
    # ... so the guest's writes never reached the exported image root on the server
    assert tree_fingerprint(demo_image.root) == before, "the guest wrote into the NFS root"

    # the address came from the site's DHCP server, not from sidusd (proxy mode)
    leases = lab.site.leases()
    assert mac in leases and in_pool(leases[mac]), leases
    # and the operator sees the machine and its timeline through sidusctl
    clients = lab.sidusctl("clients")
    mine = [c for c in clients if c["mac"] == mac]
    assert mine and mine[0]["arch"] == "bios", clients
    assert mine[0]["ip"] == leases[mac], clients     # learnt from the client's REQUEST to the site
    seen = [(e["event"], e.get("file")) for e in mine[0]["timeline"]]
    assert ("dhcp.offer", "pxelinux.0") in seen, seen
    assert ("tftp", "pxelinux.cfg/01-" + mac.replace(":", "-")) in seen, seen
    # the machine reported itself (initramfs: root, the image: multi-user): its timeline ends "up after N s"
    tl_events = mine[0]["timeline"]
    assert [e.get("stage") for e in tl_events if e["event"] == "up"] == ["root", "multiuser"], tl_events
    assert render_event(tl_events[-1]).split("  ")[1].startswith("up after "), tl_events[-1]
    assert 0 < tl_events[-1]["after_s"] < BOOT_TIMEOUT_S, tl_events[-1]
    assert any(m.startswith("up-report: up after") for m in markers), markers


def test_two_hosts_each_get_their_own_config(make_lab, demo_image):
    one, two = mac_for(1), mac_for(2)
    lab = make_lab("proxy", [HostSpec(one, "e2e-one", "sidus.demo=poweroff sidus.test=one"),
                             HostSpec(two, "e2e-two", "sidus.demo=poweroff sidus.test=two")],
                   demo_image)
    seen = {}
    for mac, name in ((one, "one"), (two, "two")):
        vm, tl = boot(lab, mac, f"host-{name}", until="root")
        lab_cmdline = vm.wait_for(r"SIDUS-BOOT: cmdline: .*$", 60)
        assert lab_cmdline, lab.diagnostics(vm)
        seen[name] = lab_cmdline.group(0)
        assert "config" in tl.reached, lab.diagnostics(vm)    # pxelinux.cfg/01-<its MAC>
        vm.stop()
    assert "sidus.test=one" in seen["one"] and "sidus.test=two" not in seen["one"], seen
    assert "sidus.test=two" in seen["two"] and "sidus.test=one" not in seen["two"], seen


def test_full_dhcp_mode_gives_address_and_boot_file(make_lab, demo_image):
    mac = mac_for(3)
    lab = make_lab("full", [HostSpec(mac, "e2e-full", "sidus.demo=poweroff sidus.test=full")],
                   demo_image)
    assert lab.site is None and lab.topology is not None and not lab.topology.with_site
    vm, tl = boot(lab, mac, "full1")
    assert tl.first_missing() is None, lab.diagnostics(vm)
    markers = boot_markers(vm.console_text())
    assert "sidus.test=full" in " ".join(marker_value(markers, "cmdline")), markers
    clients = lab.sidusctl("clients", mac)
    assert clients and clients[0]["ip"] and in_pool(clients[0]["ip"]), clients


def test_reboot_forgets_writes_and_follows_inventory_change(make_lab, demo_image):
    mac = mac_for(4)
    lab = make_lab("proxy", [HostSpec(mac, "e2e-reboot", "sidus.demo=reboot-after-write")],
                   demo_image)
    before = tree_fingerprint(demo_image.root)
    vm = lab.boot_vm(mac, name="reboot1", reboot=True)
    first = vm.wait_for(r"SIDUS-BOOT: probe written", BOOT_TIMEOUT_S)
    assert first, lab.diagnostics(vm)
    # during the guest's 5 s pause before it reboots, the operator changes the host
    lab.sidusctl("hosts", "add", mac, "--profile", "default", "--hostname", "e2e-reboot",
                 "--append", "sidus.demo=poweroff")
    # boot 1 prints READY after "probe written": boot 2's READY follows the next kernel banner
    second = vm.wait_next_boot_ready(BOOT_TIMEOUT_S, after=first.end())
    assert second, "no second boot\n" + lab.diagnostics(vm)
    assert vm.wait_exit(60) is not None, "the guest did not power off\n" + lab.diagnostics(vm)

    text = vm.console_text()
    boot1, boot2 = boot_markers(text[:first.end()]), boot_markers(text[first.end():])
    assert marker_value(boot1, "probe-before") == ["absent"], boot1
    assert "sidus.demo=reboot-after-write" in " ".join(marker_value(boot1, "cmdline")), boot1
    # second boot: a fresh overlay (the write is gone) and the new append from the inventory
    assert marker_value(boot2, "probe-before") == ["absent"], boot2
    cmdline2 = " ".join(marker_value(boot2, "cmdline"))
    assert "sidus.demo=poweroff" in cmdline2 and "reboot-after-write" not in cmdline2, boot2
    assert not server_probe_file(demo_image).exists(), "the guest wrote through to the NFS root"
    assert tree_fingerprint(demo_image.root) == before, "the guest wrote into the NFS root"
