"""NfsManager + GaneshaBackend against a real nfs-ganesha (and rpcbind) in a netns.

The namespace, ganesha and rpcbind are created here and stopped by PID (and
the namespace removed) also when an assertion fails.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import pytest
from conftest import require_root, require_tool
from netns import NetNs

from sidusd import config as config_mod
from sidusd.lab.ganesha import GaneshaServer
from sidusd.storage.nfs import NfsManager
from sidusd.storage.runner import Runner

pytestmark = pytest.mark.netns

SERVER_IP = "10.13.20.1"


def make_config(tmp: Path, server: GaneshaServer, images: dict[str, Path]):
    lines = ["dhcp: {mode: 'off'}", f"tftp: {{root: {tmp}}}",
             "nfs:", "  backend: ganesha", "  client_networks: [10.13.20.0/24]",
             f"  ganesha_config: {server.exports_file}", f"  ganesha_pid_file: {server.pid_file}",
             "images:"]
    lines += [f"  {name}: {{root: {root}, kernel: k, initrd: i}}" for name, root in images.items()]
    return config_mod.parse("\n".join(lines) + "\n", "test.yaml", tmp)


def test_apply_add_remove_and_health(tmp_path):
    require_root()
    for t in ("ganesha.nfsd", "rpcbind", "showmount", "unshare"):
        require_tool(t)
    roots = {"alpha": tmp_path / "img-alpha", "beta": tmp_path / "img-beta"}
    for r in roots.values():
        r.mkdir()
        (r / "etc").mkdir()
    with NetNs("sidus-t-nfs") as ns:
        ns.run("ip", "link", "add", "sv0", "type", "veth", "peer", "name", "sv1")
        ns.run("ip", "addr", "add", f"{SERVER_IP}/24", "dev", "sv0")
        ns.run("ip", "link", "set", "sv0", "up")
        ns.run("ip", "link", "set", "sv1", "up")
        server = GaneshaServer(ns.name, tmp_path / "ganesha", tmp_path / "sidus-exports.conf", SERVER_IP)
        try:
            server.start()
            server.wait_ready(timeout_s=60)
            assert server.exports() == []

            cfg = make_config(tmp_path, server, roots)
            manager = NfsManager(cfg, Runner())
            asyncio.run(manager.apply(cfg))
            server.wait_exported(roots["alpha"], timeout_s=30)
            server.wait_exported(roots["beta"], timeout_s=30)
            assert sorted(server.exports()) == sorted(str(r) for r in roots.values())
            health = manager.health()
            assert health["ok"], health
            assert health["backend"] == "ganesha"
            assert sorted(health["exports"]) == sorted(str(r) for r in roots.values())

            # beta leaves the config: ganesha stops exporting it, without a restart
            pid_before = int(server.pid_file.read_text())
            cfg2 = make_config(tmp_path, server, {"alpha": roots["alpha"]})
            asyncio.run(manager.apply(cfg2))
            server.wait_unexported(roots["beta"], timeout_s=30)
            assert server.exports() == [str(roots["alpha"])]
            assert int(server.pid_file.read_text()) == pid_before and server.running()

            # and comes back
            asyncio.run(manager.apply(cfg))
            server.wait_exported(roots["beta"], timeout_s=30)

            # ganesha dies: health says so, with the reason
            server.stop()
            health = manager.health()
            assert not health["ok"]
            assert "not running" in health["detail"], health
            with pytest.raises(Exception) as ei:
                asyncio.run(manager.apply(cfg))
            assert "not running" in str(ei.value)
        finally:
            log = server.log_tail()
            server.stop()
            print(log)


# -- the demo image boots from this NFS server ---------------------------------------

VM_MAC = "52:54:00:13:20:e1"
BOOT_TIMEOUT_S = 420


def _wait_for(log: Path, proc, marker: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if marker in text:
            return text
        if proc.poll() is not None:
            break
        time.sleep(1)
    text = log.read_text(errors="replace") if log.exists() else ""
    raise AssertionError(f"{marker!r} not on the console (qemu rc={proc.poll()}); tail:\n" + text[-3000:])


@pytest.mark.e2e
@pytest.mark.parametrize("demo", ["poweroff", "reboot-after-write"])
def test_demo_image_boots_over_nfs_with_tmpfs_overlay(tmp_path, demo):
    """kernel + initrd given to qemu directly: NFS root from ganesha, overlay, init markers.

    Independent of the PXE part (no sidusd): dnsmasq only hands out an address.
    ``reboot-after-write`` boots twice: what the first boot wrote is gone (tmpfs).
    """
    require_root()
    for t in ("ganesha.nfsd", "rpcbind", "showmount", "unshare", "dnsmasq", "qemu-system-x86_64",
              "mkinitramfs", "busybox"):
        require_tool(t)
    from sidusd.lab.image import build_demo_image
    image = build_demo_image(tmp_path / "image", progress=lambda m: None)
    with NetNs("sidus-t-boot") as ns:
        ns.run("ip", "link", "add", "br0", "type", "bridge")
        ns.run("ip", "addr", "add", f"{SERVER_IP}/24", "dev", "br0")
        ns.run("ip", "link", "set", "br0", "up")
        ns.run("ip", "tuntap", "add", "dev", "tap0", "mode", "tap")
        ns.run("ip", "link", "set", "tap0", "master", "br0")
        ns.run("ip", "link", "set", "tap0", "up")
        server = GaneshaServer(ns.name, tmp_path / "ganesha", tmp_path / "sidus-exports.conf", SERVER_IP)
        try:
            server.start()
            server.wait_ready(timeout_s=60)
            cfg = make_config(tmp_path, server, {"demo": image.root})
            asyncio.run(NfsManager(cfg, Runner()).apply(cfg))
            server.wait_exported(image.root, timeout_s=30)
            ns.popen(["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0", "--user=root",
                      "--interface=br0", "--bind-interfaces", "--dhcp-authoritative",
                      "--dhcp-range=10.13.20.100,10.13.20.150,255.255.255.0,1h",
                      f"--dhcp-leasefile={tmp_path / 'leases'}", f"--pid-file={tmp_path / 'dnsmasq.pid'}"],
                     stdout=open(tmp_path / "dnsmasq.log", "wb"), stderr=subprocess.STDOUT)
            console = tmp_path / "console.log"
            append = (f"console=ttyS0 root=/dev/nfs boot=nfs nfsroot={SERVER_IP}:{image.root},tcp,vers=3 "
                      "ip=dhcp sidus.overlay=tmpfs sidus.overlay_size=64m panic=-1 "
                      f"sidus.hostname=vm-e1 sidus.demo={demo}")
            qemu = ns.popen(["qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-display", "none",
                             "-vga", "none", "-monitor", "none", "-serial", f"file:{console}",
                             *(["-no-reboot"] if demo == "poweroff" else []),
                             "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", append,
                             "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
                             "-device", f"virtio-net-pci,netdev=n0,mac={VM_MAC}"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            text = _wait_for(console, qemu, "SIDUS-BOOT: READY", BOOT_TIMEOUT_S)
            if demo == "poweroff":
                qemu.wait(60)                                  # poweroff -f ends qemu
            else:
                first = text.split("SIDUS-BOOT: READY")[0]
                deadline = time.monotonic() + BOOT_TIMEOUT_S
                while console.read_text(errors="replace").count("SIDUS-BOOT: probe-before:") < 2:
                    assert qemu.poll() is None and time.monotonic() < deadline, console.read_text()[-3000:]
                    time.sleep(1)
                qemu.terminate()
                qemu.wait(30)
                text = console.read_text(errors="replace")
                assert "SIDUS-BOOT: probe written" in first
                second = text[len(first):].split("SIDUS-BOOT: READY", 1)[1]
                assert "SIDUS-BOOT: probe-before: absent" in second    # the tmpfs upper is gone
                assert "SIDUS-BOOT: writable: yes" in second
                text = first
            lines = [ln.strip() for ln in text.splitlines() if ln.startswith("SIDUS-BOOT:")]
            root_line = next(ln for ln in lines if ln.startswith("SIDUS-BOOT: root mounted: "))
            assert root_line.split()[3:6] == ["sidus-root", "/", "overlay"], root_line
            assert "lowerdir=/run/sidus/ro,upperdir=/run/sidus/rw/upper" in root_line
            assert "SIDUS-BOOT: writable: yes" in lines
            assert "SIDUS-BOOT: probe-before: absent" in lines
            assert f"SIDUS-BOOT: cmdline: {append}" in lines
            assert "SIDUS-BOOT: hostname: vm-e1" in lines
            assert "Begin: sidus-overlay: tmpfs overlay (size 64m) on the read-only root ... done." in text
            # nothing was written into the exported image
            assert not (image.root / ".sidus-write-probe").exists()
            assert not (image.root / "var" / "sidus-reboot-probe").exists()
            assert sorted(p.name for p in image.root.iterdir()) == [
                "bin", "dev", "etc", "mnt", "proc", "root", "run", "sbin", "sys", "tmp", "usr", "var"]
        finally:
            log = server.log_tail()
            server.stop()
            print(log)
