"""sidusd/data/initramfs/scripts/nfs-top/sidus-link, run for real (busybox sh and applets) against a
fake /sys/class/net: it brings up the boot interface (ip= device, else BOOTIF's MAC, else DEVICE) and
returns only once the kernel reports the link up, so klibc ipconfig's first DHCPDISCOVER does not fail
and cost 10 s (docs/quirks.md "The initramfs waits before its own DHCP"; the real ipconfig in a netns:
tests/integration/test_initrd_dhcp_netns.py).  It never fails the boot and does nothing when it cannot
tell which interface boots."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import require_tool

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "sidusd/data/initramfs/scripts/nfs-top/sidus-link"
APPLETS = ("sh", "cat", "sleep", "tr", "cut")

# the fake "ip link set up": records the device and brings its link up 0.3 s later, as a NIC does
FAKE_UP = """#!/bin/sh
echo "$1" >> "$SIDUS_TEST_LOG"
[ -n "$SIDUS_TEST_NEVER" ] && exit 0
( sleep 0.3; echo 1 > "$SIDUS_SYSNET/$1/carrier"; echo "${SIDUS_TEST_STATE:-up}" > "$SIDUS_SYSNET/$1/operstate" ) &
"""


@pytest.fixture
def box(tmp_path):
    bb = require_tool("busybox")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for a in APPLETS:
        (bin_ / a).symlink_to(bb)
    net = tmp_path / "net"
    for name, mac in (("lo", "00:00:00:00:00:00"), ("ens4", "52:54:00:13:20:02"), ("ens3", "52:54:00:13:20:01"),
                      ("ens6", "52:54:00:ab:cd:ef")):
        (net / name).mkdir(parents=True)
        (net / name / "address").write_text(mac + "\n")
        (net / name / "operstate").write_text("down\n")
        (net / name / "carrier").write_text("0\n")
    up = tmp_path / "fake-up"
    up.write_text(FAKE_UP)
    up.chmod(0o755)
    return tmp_path


def run(box: Path, cmdline: str = "ip=dhcp", **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = box / "up.log"
    log.unlink(missing_ok=True)
    full = {"PATH": str(box / "bin"), "SIDUS_CMDLINE": cmdline, "SIDUS_SYSNET": str(box / "net"),
            "SIDUS_LINKUP": str(box / "fake-up"), "SIDUS_TEST_LOG": str(log), **env}
    r = subprocess.run([str(box / "bin/sh"), str(SCRIPT)], env=full, capture_output=True, text=True, timeout=30)
    return r, (log.read_text().split() if log.exists() else [])


def state(box: Path, dev: str) -> str:
    return (box / "net" / dev / "operstate").read_text().strip()


def test_bootif_interface_is_brought_up_and_waited_for(box):
    r, upped = run(box, IP="dhcp", BOOTIF="01-52-54-00-13-20-01")
    assert r.returncode == 0, r
    assert upped == ["ens3"]                       # the BOOTIF MAC's interface, not ens4 or lo
    # it returned only after the link came up (0.3 s after "ip link set up"), not at once
    assert "sidus-link: ens3 is up (operstate up)" in r.stdout, r
    assert state(box, "ens3") == "up" and state(box, "ens4") == "down"


def test_uppercase_bootif_and_ip_device_win(box):
    r, upped = run(box, IP="dhcp", BOOTIF="01-52-54-00-AB-CD-EF")      # sysfs has lower case
    assert r.returncode == 0 and upped == ["ens6"] and "ens6 is up" in r.stdout, r
    # ip=<client>:<server>:<gw>:<mask>:<host>:<device>:<proto> names the device: it wins over BOOTIF
    r, upped = run(box, IP="::::bench1:ens4:dhcp", BOOTIF="01-52-54-00-13-20-01")
    assert r.returncode == 0 and upped == ["ens4"] and "ens4 is up" in r.stdout, r
    # no ip= device, no BOOTIF: initramfs.conf's DEVICE=
    r, upped = run(box, IP="dhcp", DEVICE="ens3")
    assert r.returncode == 0 and upped == ["ens3"] and "ens3 is up" in r.stdout, r


def test_nothing_done_without_a_boot_interface_or_when_off(box):
    for env in ({"IP": "dhcp"}, {"IP": "off", "BOOTIF": "01-52-54-00-13-20-01"},
                {"IP": "none", "DEVICE": "ens3"}, {"IP": "dhcp", "BOOTIF": "garbage"}):
        r, upped = run(box, **env)
        assert r.returncode == 0 and upped == [] and r.stdout == "", (env, r)
    r, upped = run(box, "ip=dhcp sidus.linkwait=0", IP="dhcp", BOOTIF="01-52-54-00-13-20-01")
    assert r.returncode == 0 and upped == [] and r.stdout == "", r
    r, upped = run(box, IP="::::h:../x:dhcp")
    assert r.returncode == 0 and upped == [] and "not a device name" in r.stdout, r


def test_a_link_that_never_comes_up_costs_at_most_linkwait_and_never_fails(box):
    r, upped = run(box, "ip=dhcp sidus.linkwait=1", IP="dhcp", BOOTIF="01-52-54-00-13-20-01",
                   SIDUS_TEST_NEVER="1")
    assert r.returncode == 0 and upped == ["ens3"], r
    assert "sidus-link: ens3 not up after 1s (operstate down): left to ipconfig" in r.stdout, r
    r, upped = run(box, "ip=dhcp sidus.linkwait=1", IP="dhcp", BOOTIF="01-52-54-00-99-99-99")
    assert r.returncode == 0 and upped == [] and "no device with address 52:54:00:99:99:99 after 1s" in r.stdout
    r, _ = run(box, "sidus.linkwait=soon", IP="dhcp", BOOTIF="01-52-54-00-13-20-01")
    assert r.returncode == 0 and "is not a number of seconds" in r.stdout and "ens3 is up" in r.stdout, r


def test_a_driver_without_link_state_is_taken_as_up_once_carrier_holds(box):
    r, upped = run(box, IP="dhcp", BOOTIF="01-52-54-00-13-20-01", SIDUS_TEST_STATE="unknown")
    assert r.returncode == 0 and upped == ["ens3"], r
    assert "sidus-link: ens3 is up (operstate unknown)" in r.stdout, r


def test_a_late_device_is_waited_for(box):
    late = box / "net" / "ens5"
    r0 = subprocess.Popen(["sh", "-c", f"sleep 0.4; mkdir {late}; echo 52:54:00:13:20:05 > {late}/address; "
                                       f"echo down > {late}/operstate; echo 0 > {late}/carrier"])
    try:
        r, upped = run(box, IP="dhcp", BOOTIF="01-52-54-00-13-20-05")
    finally:
        r0.wait(timeout=10)
    assert r.returncode == 0 and upped == ["ens5"] and "ens5 is up" in r.stdout, r


def test_prereqs_and_mode():
    r = subprocess.run(["sh", str(SCRIPT), "prereqs"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0 and r.stdout.strip() == ""
    assert os.access(SCRIPT, os.X_OK)


def test_the_lab_image_and_sidus_image_builds_install_it(tmp_path):
    require_tool("mkinitramfs")
    from sidusd.image.build import initramfs_files
    from sidusd.image.recipe import parse_recipe
    from sidusd.image.stages import plan
    from sidusd.lab.image import make_conf_dir
    make_conf_dir(tmp_path / "conf")
    placed = tmp_path / "conf/scripts/nfs-top/sidus-link"
    assert placed.read_bytes() == SCRIPT.read_bytes() and os.access(placed, os.X_OK)
    files = initramfs_files()
    assert files["scripts/nfs-top/sidus-link"] == SCRIPT.read_bytes()
    st = plan(parse_recipe("name: k\npackages: [linux-image-amd64]\n"), mirror="http://deb.example/debian",
              initramfs=files)
    modes = {p: m for s in st if s.name == "initramfs" for p, _, m in s.files}
    assert modes["etc/initramfs-tools/scripts/nfs-top/sidus-link"] == 0o755
