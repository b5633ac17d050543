"""The lab network itself: namespaces, bridge, taps, the site DHCP server, clean-up.

Cheap compared to a whole boot: the only VM here stops once iPXE has its address.
"""

from __future__ import annotations

import subprocess

import pytest
from conftest import require_root, require_tool

from sidusd.lab.sitedhcp import SiteDhcp
from sidusd.lab.topology import SERVER_IP, SITE_IP, Topology, netns_list, teardown_stale
from sidusd.lab.vm import Vm, mac_for

pytestmark = [pytest.mark.netns]


def _addrs(topo: Topology, ns: str) -> str:
    return subprocess.run(["ip", "-n", ns, "-br", "addr"], capture_output=True, text=True,
                          check=True).stdout


def test_topology_builds_and_tears_down_completely():
    require_root()
    require_tool("ip")
    topo = Topology().create()
    try:
        tap = topo.add_tap()
        assert {topo.lab_ns, topo.site_ns} <= set(netns_list())
        lab = _addrs(topo, topo.lab_ns)
        assert f"{SERVER_IP}/24" in lab and tap in lab and "vsite0" in lab, lab
        assert f"{SITE_IP}/24" in _addrs(topo, topo.site_ns)
        master = subprocess.run(["ip", "-n", topo.lab_ns, "-o", "link", "show", "master", "br0"],
                                capture_output=True, text=True, check=True).stdout
        assert tap in master and "vsite0" in master, master
    finally:
        topo.teardown()
    assert not {topo.lab_ns, topo.site_ns} & set(netns_list())
    topo.teardown()                      # idempotent


def test_teardown_stale_removes_a_dead_runs_namespaces_and_processes():
    require_root()
    require_tool("ip")
    dead = subprocess.Popen(["true"])
    dead.wait()                          # a pid that no longer runs: the "crashed" run
    topo = Topology(lab_id=f"{dead.pid}x0ddba11").create()
    left = subprocess.Popen(topo.lab_argv(["sleep", "300"]), start_new_session=True)
    try:
        mine = Topology().create()       # a live run's lab must survive
        try:
            removed = teardown_stale()
            assert topo.lab_ns in removed and topo.site_ns in removed
            assert mine.lab_ns not in removed and mine.lab_ns in netns_list()
            assert left.wait(10) is not None      # the leftover process was stopped
            assert not {topo.lab_ns, topo.site_ns} & set(netns_list())
        finally:
            mine.teardown()
    finally:
        if left.poll() is None:
            left.kill()
            left.wait()
        topo.teardown()


def test_site_dhcp_gives_an_address_and_no_boot_file(tmp_path):
    require_root()
    for tool in ("ip", "dnsmasq", "qemu-system-x86_64"):
        require_tool(tool)
    topo = Topology().create()
    site = SiteDhcp(topo, tmp_path)
    vm = None
    try:
        site.start()
        vm = Vm(topo, topo.add_tap(), mac_for(9), tmp_path, name="dhcp-only")
        vm.start()
        # the real iPXE ROM configures net0 from dnsmasq, then finds nothing to boot
        got = vm.wait_for(r"No filename or root path specified|Nothing to boot", 120)
        assert got, "\n".join(vm.console_tail(30) + site.log_tail(20))
        leases = site.leases()
        assert mac_for(9) in leases and leases[mac_for(9)].startswith("10.13.20.1"), leases
        log = "\n".join(site.log_tail(200))
        assert f"DHCPACK(site0) {leases[mac_for(9)]} {mac_for(9)}" in log, log
        sent = [ln for ln in log.splitlines() if " sent size:" in ln]
        assert sent, log
        # no boot file name (67), TFTP server (66) or PXE vendor options (43): addresses only
        for opt in ("option: 66 ", "option: 67 ", "option: 43 "):
            assert not [ln for ln in sent if opt in ln], log
    finally:
        if vm is not None:
            vm.stop()
        site.stop()
        topo.teardown()
    assert topo.lab_ns not in netns_list()
