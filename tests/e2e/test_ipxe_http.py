"""iPXE -> HTTP: a BIOS VM whose iPXE asks sidusd (``boot.ipxe_chain: true``, ``http.enabled``)
gets the URL of its per-MAC iPXE script, then fetches the script, the kernel
and the initrd from sidusd's HTTP server, and boots to the NFS root + overlay.

qemu's NIC ROM (ipxe-qemu) already *is* iPXE (it sends option 175), so the
chainload step (undionly.kpxe over TFTP) is skipped by the firmware itself:
this is the iPXE -> HTTP path, and no TFTP transfer of the kernel happens.
"""

from __future__ import annotations

import pytest
from conftest import require_lab

from sidusd.lab.demo import HTTP_PORT, HostSpec, Lab, boot_markers, tree_fingerprint
from sidusd.lab.topology import SERVER_IP, netns_list
from sidusd.lab.vm import mac_for

pytestmark = [pytest.mark.e2e, pytest.mark.netns]

BOOT_TIMEOUT_S = 400         # ~45 s under TCG on an idle machine; CI machines are shared


@pytest.fixture
def http_lab(request, tmp_path):
    """A proxy-mode lab with sidusd's HTTP server and ipxe_chain on; closed at the end."""
    require_lab()
    lab = Lab(tmp_path / "lab", mode="proxy", progress=lambda msg: None, http=True, ipxe_chain=True)
    yield lab
    names = [lab.topology.lab_ns, lab.topology.site_ns] if lab.topology is not None else []
    if any(getattr(request.node, f"rep_{w}", None) is not None
           and getattr(request.node, f"rep_{w}").failed for w in ("setup", "call")):
        for vm in list(lab.vms) or [None]:
            print(lab.diagnostics(vm))
    lab.close()
    assert not set(names) & set(netns_list()), "lab namespaces left behind"


def test_ipxe_fetches_script_kernel_initrd_over_http(http_lab, demo_image):
    lab, mac = http_lab, mac_for(20)
    lab.up(demo_image, [HostSpec(mac, "e2e-http", "sidus.demo=poweroff sidus.test=ipxe-http")])
    before = tree_fingerprint(demo_image.root)
    vm = lab.boot_vm(mac, name="http1")
    tl = lab.timeline(vm)
    assert lab.follow(vm, tl, BOOT_TIMEOUT_S), (f"no READY; first missing step: {tl.first_missing()}\n"
                                                + lab.diagnostics(vm))
    # every step: sidusd's DHCP offer, then script, kernel and initrd as http.transfer events
    assert tl.first_missing() is None, lab.diagnostics(vm)
    assert vm.wait_exit(60) is not None, "the guest did not power off\n" + lab.diagnostics(vm)

    markers = boot_markers(vm.console_text())
    cmdline = " ".join(m.split(":", 1)[1] for m in markers if m.startswith("cmdline:"))
    assert "sidus.test=ipxe-http" in cmdline and "BOOTIF=01-" + mac.replace(":", "-") in cmdline, markers
    assert "writable: yes" in markers, markers
    assert tree_fingerprint(demo_image.root) == before, "the guest wrote into the NFS root"

    # the operator's view: the offer carried the script URL, and the HTTP transfers are in the timeline
    clients = lab.sidusctl("clients", mac)
    assert clients and clients[0]["mac"] == mac, clients
    timeline = clients[0]["timeline"]
    script_url = f"http://{SERVER_IP}:{HTTP_PORT}/boot/{mac.replace(':', '-')}.ipxe"
    assert any(e["event"].startswith("dhcp.") and e.get("file") == script_url for e in timeline), timeline
    http = {e["file"]: e for e in timeline if e["event"] == "http" and e.get("status") == 200}
    sizes = {"demo/vmlinuz": demo_image.kernel.stat().st_size,
             "demo/initrd.img": demo_image.initrd.stat().st_size}
    for name, size in sizes.items():
        assert name in http and http[name]["bytes"] == size, (name, timeline)
    assert f"boot/{mac.replace(':', '-')}.ipxe" in http, timeline
    # and the kernel never went over TFTP
    assert not [e for e in timeline if e["event"] == "tftp" and e.get("file") in sizes], timeline
    status = lab.sidusctl("status")
    assert status["counters"].get("http.transfers.done", 0) >= 3, status["counters"]
    assert any(l.get("service") == "http" for l in status["listeners"].get("http", [])), status["listeners"]
