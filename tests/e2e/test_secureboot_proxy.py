"""Secure Boot through shim -> GRUB in ``dhcp.mode: proxy``: a site DHCP server (the lab's dnsmasq)
hands out the address, sidusd is the proxyDHCP, Debian's signed shim, GRUB and kernel boot the demo
image to READY with the per-host argument.

What each stage reads (docs/quirks.md "shim and GRUB in proxyDHCP mode"): the firmware and shim take
the boot file and its server from the proxy offer when the site's ACK carries no boot file (shim
``netboot.c`` ``parseDhcp4``); Debian's GRUB 2.06 takes its TFTP server from the ACK only (``siaddr``,
else the ``sname`` field: ``grub-core/net/bootp.c`` ``grub_net_configure_by_dhcp_ack``, called by
``efinet.c`` with ``pxe_mode->dhcp_ack``).  So the site's DHCP server must set next-server (siaddr) to
sidusd, with no boot file: the lab's dnsmasq does (``--dhcp-boot=,,10.13.20.1``).  The pcap of the lab
bridge proves who asked whom.  ``boot.loader.grub_http`` is on: under Secure Boot GRUB cannot load
``http.mod`` and takes the TFTP branch.  The second test runs the same chain with Secure Boot off and
sees the kernel and initrd come over HTTP.  Two boots, each 1-3 min under TCG on a loaded machine.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import require_lab, require_tool

from sidusd.preflight import SOURCES

pytestmark = [pytest.mark.e2e, pytest.mark.netns]

CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")
SHIM = Path(SOURCES[("uefi_x64", "shimx64.efi")].path)
GRUB = Path(SOURCES[("uefi_x64", "grubx64.efi")].path)
HTTP_MOD = Path("/usr/lib/grub/x86_64-efi/http.mod")       # grub-efi-amd64-bin
READY_TIMEOUT_S = 600


def _need() -> None:
    require_lab()
    require_tool("tcpdump")
    for path, pkg in ((CODE, "ovmf"), (VARS, "ovmf"), (SHIM, "shim-signed"), (GRUB, "grub-efi-amd64-signed"),
                      (HTTP_MOD, "grub-efi-amd64-bin")):
        if not path.is_file():
            pytest.skip(f"missing {path} (package {pkg})")


def boot_through_shim(workdir: Path, image, mac: str, append: str, *, mode: str = "proxy",
                      site_next_server: str | None = None, boot_extra: dict | None = None,
                      secure: bool = True, timeout_s: float = READY_TIMEOUT_S,
                      until: str | None = None, progress=lambda msg: None) -> dict:
    """One lab boot of ``mac`` through shim -> GRUB (Secure Boot on unless ``secure`` is False),
    with a pcap of the lab bridge, until the READY marker (or ``until`` on the console); returns
    console, markers, sidusd timeline, pcap path, timings."""
    from sidusd.lab.demo import HostSpec, Lab, boot_markers
    from sidusd.lab.topology import BRIDGE
    from sidusd.lab.vm import OVMF_CODE, OVMF_VARS, Vm

    code, vars_src = (CODE, VARS) if secure else (OVMF_CODE, OVMF_VARS)

    class SbVm(Vm):
        """The lab's UEFI VM on the given firmware, no (unsigned) NIC ROM: OVMF's own PXE boots."""

        def argv(self) -> list[str]:
            out = super().argv()
            i = out.index("-drive")
            out[i:i + 4] = (["-machine", "q35,smm=on", "-global", "driver=cfi.pflash01,property=secure,value=on"]
                            if secure else []) + [
                "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
                "-drive", f"if=pflash,format=raw,unit=1,file={self.ovmf_vars}"]
            return [a.split(",romfile=")[0] + ",romfile=,bootindex=1" if ",romfile=" in a else a for a in out]

    class SbLab(Lab):
        def publish_tftp(self, image) -> None:
            super().publish_tftp(image)
            shutil.copyfile(SHIM, self.tftp_root / "shimx64.efi")
            shutil.copyfile(GRUB, self.tftp_root / "grubx64.efi")
            # GRUB's modules directory: `insmod http` reads $prefix/x86_64-efi/http.mod
            (self.tftp_root / "grub" / "x86_64-efi").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(HTTP_MOD, self.tftp_root / "grub" / "x86_64-efi" / "http.mod")

        def config_dict(self, exports_file, pid_file):
            cfg = super().config_dict(exports_file, pid_file)
            cfg["boot"] = {**cfg.get("boot", {}), "boot_files": {"uefi_x64": "shimx64.efi"}, **(boot_extra or {})}
            return cfg

    lab = SbLab(workdir, mode=mode, progress=progress, site_next_server=site_next_server)
    pcap = workdir / "bridge.pcap"
    dump = None
    try:
        lab.up(image, [HostSpec(mac, "e2e-sbp", append)])
        assert lab.topology is not None
        dump = subprocess.Popen(lab.topology.lab_argv(
            ["tcpdump", "-i", BRIDGE, "-U", "-s", "600", "-w", str(pcap),
             # DHCP, TFTP read requests, HTTP requests: no data packets (a small pcap, read fast)
             "udp port 67 or udp port 68 or udp dst port 69 or (tcp dst port 8080 and tcp[tcpflags] & tcp-push != 0)"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(1.0)                                   # tcpdump opens the bridge
        tap = lab.topology.add_tap()
        vm = SbVm(lab.topology, tap, mac, lab.workdir, name="sbp1", uefi=True)
        lab.vms.append(vm)
        vm.workdir.mkdir(parents=True, exist_ok=True)
        vm.console_log.write_bytes(b"")
        shutil.copyfile(vars_src, vm.ovmf_vars)
        errlog = open(vm.workdir / f"{vm.name}-qemu.stderr", "wb")
        try:
            vm.proc = subprocess.Popen(lab.topology.lab_argv(vm.argv()), stdin=subprocess.DEVNULL, stdout=errlog,
                                       stderr=errlog, start_new_session=True)
        finally:
            errlog.close()
        t0 = vm.started_at = time.monotonic()
        def done(text: str) -> bool:
            return until in text if until is not None else "READY" in boot_markers(text)

        while time.monotonic() < t0 + timeout_s and vm.running() and not done(vm.console_text()):
            time.sleep(1)
        took = time.monotonic() - t0
        clients = lab.sidusctl("clients", mac)
        return {"console": vm.console_text(), "markers": boot_markers(vm.console_text()), "took": took,
                "timeline": clients[0]["timeline"] if clients else [], "pcap": pcap,
                "sidusd_log": lab.sidusd_log_tail(40), "site_log": lab.site.log_tail(20) if lab.site else []}
    finally:
        if dump is not None:
            dump.terminate()
            dump.wait(10)
        lab.close()


def pcap_summary(pcap: Path) -> dict:
    """From the pcap: the site server's ACK (siaddr, file), sidusd's proxy offer (siaddr, file), and
    every TFTP read request and HTTP GET as (time from the first packet, destination, name)."""
    from scapy.all import BOOTP, DHCP, IP, TCP, UDP, rdpcap

    out: dict = {"ack": None, "proxy": None, "rrq": [], "get": []}
    pkts = rdpcap(str(pcap))
    t0 = float(pkts[0].time) if pkts else 0.0
    for p in pkts:
        if BOOTP in p and DHCP in p and p[BOOTP].op == 2:
            kind = next((o[1] for o in p[DHCP].options if isinstance(o, tuple) and o[0] == "message-type"), None)
            entry = (p[IP].src, p[BOOTP].siaddr, p[BOOTP].file.rstrip(b"\0").decode(errors="replace"))
            if kind == 5 and p[BOOTP].yiaddr != "0.0.0.0":          # the site's ACK: an address
                out["ack"] = out["ack"] or entry
            elif p[BOOTP].yiaddr == "0.0.0.0":                      # a proxy offer / ACK: no address
                out["proxy"] = out["proxy"] or entry
        elif UDP in p and p[UDP].dport == 69 and bytes(p[UDP].payload)[:2] == b"\x00\x01":   # RFC 1350 RRQ
            name = bytes(p[UDP].payload)[2:].split(b"\0")[0].decode(errors="replace")
            out["rrq"].append((float(p.time) - t0, p[IP].dst, name))
        elif TCP in p and bytes(p[TCP].payload).startswith(b"GET "):
            line = bytes(p[TCP].payload).split(b" ")[1].decode(errors="replace")
            out["get"].append((float(p.time) - t0, p[IP].dst, line))
    return out


def test_secure_boot_proxy_mode_with_site_next_server(tmp_path, demo_image):
    """Site DHCP: address + next-server (sidusd), no boot file; sidusd: proxyDHCP + TFTP; Secure Boot on."""
    from sidusd.lab.topology import SERVER_IP, SITE_IP
    from sidusd.lab.vm import mac_for

    _need()
    mac = mac_for(33)
    r = boot_through_shim(tmp_path / "lab", demo_image, mac, "sidus.demo=poweroff sidus.test=sbproxy",
                          site_next_server=SERVER_IP, boot_extra={"loader": {"grub_http": True}})
    console, markers = r["console"], r["markers"]
    assert "READY" in markers, (r["took"], console[-4000:], r["sidusd_log"], r["site_log"])
    assert "secureboot: Secure boot enabled" in console, console[-3000:]
    # boot.loader.grub_http is on, but Secure Boot makes GRUB refuse `insmod http`: the TFTP branch
    assert "sidus: no http module in this GRUB" in console and "over http from" not in console, console[-3000:]
    cmdline = " ".join(m.split(":", 1)[1] for m in markers if m.startswith("cmdline:"))
    assert "sidus.test=sbproxy" in cmdline and f"BOOTIF=01-{mac.replace(':', '-')}" in cmdline, markers
    # the wire: the site's ACK names sidusd as next-server and no file; sidusd's proxy offer the file
    wire = pcap_summary(r["pcap"])
    assert wire["ack"] == (SITE_IP, SERVER_IP, ""), wire
    assert wire["proxy"] is not None and wire["proxy"][0] == SERVER_IP and wire["proxy"][2] == "shimx64.efi", wire
    asked = [(dst, name.lstrip("/")) for _, dst, name in wire["rrq"]]
    assert asked and all(dst == SERVER_IP for dst, _ in asked), asked          # nothing asked of the site server
    files = [str(e.get("file")).lstrip("/") for e in r["timeline"] if e["event"] == "tftp"]
    chain = ["shimx64.efi", "grubx64.efi", "grub/grub.cfg", "grub/grub.cfg-01-" + mac, "demo/vmlinuz",
             "demo/initrd.img"]
    assert list(dict.fromkeys(f for f in files if f in chain)) == chain, files
    assert not [e for e in r["timeline"] if e["event"] == "http" and "demo/" in str(e.get("file"))], r["timeline"]
    print(f"secure boot, proxy mode: READY after {r['took']:.0f} s; TFTP: {files}")


def test_grub_loads_kernel_and_initrd_over_http_without_secure_boot(tmp_path, demo_image):
    """The same chain (shim -> GRUB, proxy mode, site next-server) with Secure Boot off: GRUB loads
    ``http.mod`` and fetches kernel and initrd from sidusd's HTTP server.  Stops when the kernel
    runs /init (the initrd is in memory by then)."""
    from sidusd.lab.demo import HTTP_PORT
    from sidusd.lab.topology import SERVER_IP
    from sidusd.lab.vm import OVMF_CODE, OVMF_VARS, mac_for

    _need()
    for path in (OVMF_CODE, OVMF_VARS):
        if not path.is_file():
            pytest.skip(f"missing {path} (package ovmf)")
    mac = mac_for(34)
    r = boot_through_shim(tmp_path / "lab", demo_image, mac, "sidus.test=grubhttp", site_next_server=SERVER_IP,
                          boot_extra={"loader": {"grub_http": True}}, secure=False,
                          until="Run /init as init process", timeout_s=400)
    console = r["console"]
    assert f"sidus: kernel and initrd over http from {SERVER_IP}:{HTTP_PORT}" in console, console[-3000:]
    assert "Run /init as init process" in console, (r["took"], console[-3000:], r["sidusd_log"])
    line = next(l for l in console.splitlines() if "Kernel command line:" in l)
    assert "sidus.test=grubhttp" in line, line
    http = {str(e.get("file")).lstrip("/"): e for e in r["timeline"] if e["event"] == "http"}
    tftp = {str(e.get("file")).lstrip("/") for e in r["timeline"] if e["event"] == "tftp"}
    assert {"demo/vmlinuz", "demo/initrd.img"} <= set(http), r["timeline"]
    assert {"demo/vmlinuz", "demo/initrd.img"}.isdisjoint(tftp) and "grub/x86_64-efi/http.mod" in tftp, tftp
    gets = [name for _, dst, name in pcap_summary(r["pcap"])["get"] if dst == SERVER_IP]
    assert "/demo/vmlinuz" in gets and "/demo/initrd.img" in gets, gets
    took = {k: http[k].get("duration_s") for k in ("demo/vmlinuz", "demo/initrd.img")}
    print(f"GRUB over http: kernel+initrd {took}; /init after {r['took']:.0f} s")


def measure(path: str, workdir: Path) -> None:
    """``sudo .venv/bin/python tests/e2e/test_secureboot_proxy.py tftp|http [WORKDIR]``: one boot of the
    chain above with Secure Boot off to the kernel's /init, printing sidusd's kernel and initrd
    transfer durations (docs/boot-chain.md "GRUB: TFTP vs HTTP")."""
    from sidusd.lab.image import build_demo_image
    from sidusd.lab.topology import SERVER_IP

    image = build_demo_image(workdir / "image", progress=print)
    r = boot_through_shim(workdir / f"lab-{path}", image, "52:54:00:13:20:31", "sidus.test=measure",
                          site_next_server=SERVER_IP, secure=False, until="Run /init as init process",
                          boot_extra={"loader": {"grub_http": path == "http"}}, timeout_s=400, progress=print)
    for e in r["timeline"]:
        if str(e.get("file", "")).lstrip("/") in ("demo/vmlinuz", "demo/initrd.img"):
            print(f"{e['event']} {e.get('file')}: {e.get('bytes')} bytes in {e.get('duration_s')} s")
    print(f"/init after {r['took']:.1f} s from qemu start; load average {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    import sys
    measure(sys.argv[1], Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/sidus-grub-measure"))
