"""Whole boot, qemu start to up: sidus against dnsmasq (proxyDHCP + TFTP), dnsmasq + tftpd-hpa, and
on the iPXE path dnsmasq + an HTTP server (busybox httpd).

    sudo .venv/bin/python -m bench.bootcompare [--boots N] [--paths bios,uefi,ipxe] [--servers ...]
                                               [--workdir DIR] [--json FILE]

One run, one lab (:mod:`sidusd.lab`: the namespaces, the site DHCP server that
hands out addresses only, nfs-ganesha, the demo image), one VM MAC.  Each
round boots the same VM once per server and path, the servers' order rotated
every round (interleaved).  Paths (qemu's NIC ROM is iPXE in all three):

* ``bios``  SeaBIOS + the iPXE ROM of ipxe-qemu, handed pxelinux.0 (TFTP: pxelinux.0, ldlinux.c32,
            pxelinux.cfg/01-<mac>, kernel, initrd);
* ``uefi``  OVMF + iPXE's EFI ROM, handed syslinux.efi (the same over TFTP);
* ``ipxe``  SeaBIOS + the iPXE ROM, handed an iPXE script that loads kernel and initrd.

Servers:

* ``sidus``          sidusd: proxyDHCP + TFTP + HTTP (and the NFS export), as shipped, plus
                     ``dhcp.ipv6_no_router: true`` (``--sidus-ra off`` leaves it out); on the
                     ipxe path ``boot.ipxe_chain: true``: script, kernel and initrd over its HTTP.
* ``dnsmasq``        dnsmasq ``--dhcp-range=...,proxy --pxe-service=... --enable-tftp`` (the recipe
                     of bench/peers.py) on the lab bridge; on the ipxe path
                     ``--dhcp-match=set:ipxe,175 --dhcp-boot=tag:ipxe,<script>``: script, kernel
                     and initrd over its TFTP.
* ``dnsmasq+hpa``    the same dnsmasq for proxyDHCP, TFTP by tftpd-hpa (bench/peers.py
                     fetches it into bench/.peers/).
* ``dnsmasq+httpd``  ipxe path only: the same dnsmasq handing out the script's URL on busybox
                     httpd, which serves script, kernel and initrd over HTTP.

For the peers sidusd is restarted with ``dhcp.mode: off`` and TFTP off: it only
keeps the NFS export (the same nfs-ganesha, the same image) and the HTTP server
that takes the guest's ``sidus.up`` report.  They serve a copy of the lab's TFTP
root plus the ``pxelinux.cfg/01-<mac>`` and the iPXE script that sidusd renders
for that MAC (fetched from sidusd first; the script's kernel and initrd URLs
pointed at the peer), so every server sends the same bytes.

The timeline of a boot comes from the wire, the same way for every server: a
pcap of the lab bridge (tcpdump in the lab namespace, lab traffic only) read by
:func:`wire_timeline` (the VM's first DHCPDISCOVER, the site server's DHCPACK,
each TFTP RRQ or HTTP GET and the client's last ACK of each transfer), and from
the guest console (``Linux version``, the ``SIDUS-BOOT:`` markers ``root
mounted`` and ``READY``, seen by polling every 0.2 s).  "up" is ``READY``.
Phases: firmware (qemu start -> first DISCOVER), dhcp (-> ACK), idle (ACK ->
first file request), each file (its request -> its last ACK), kernel (initrd
end -> Linux banner), root (-> root mounted), init (-> READY).

Prints every boot's timeline, then per path and server the median of each
phase and of the whole boot, and the ratio sidus / peer of the medians.
Needs root (namespaces, qemu on a tap) and the lab's packages.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .bootreport import markdown, print_boot, print_summary, summarize
from .bootwire import PATH_SERVERS, PATHS, SERVERS, pcap_packets, phases, tftp_turnaround, wire_timeline

SITE_IP = "10.13.20.2"
SERVER_IP = "10.13.20.1"
HTTP_PORT = 8080                     # sidusd's HTTP server in the lab (sidusd.lab.demo.HTTP_PORT)
PEER_HTTP_PORT = 8081                # busybox httpd, the dnsmasq+httpd peer (ipxe path only)
BOOT_TIMEOUT_S = 400.0


def ipxe_script_for(script: str, base: str, new_base: str) -> str:
    """sidusd's iPXE script with the kernel and initrd fetched from ``new_base`` instead of ``base``
    (``http://<server>:<port>``): the same script, kernel command line included (its
    ``sidus.up=`` URL stays: that report goes to sidusd whichever server booted the VM), for a
    peer that serves the files over TFTP (``tftp://<server>``) or its own HTTP server."""
    out = []
    for line in script.splitlines(keepends=True):
        words = line.split(" ")
        if words[0] == "kernel" and len(words) > 1 and words[1].startswith(base + "/"):
            words[1] = new_base + words[1][len(base):]
        elif words[0] == "initrd" and words[-1].rstrip("\n").startswith(base + "/"):
            words[-1] = new_base + words[-1][len(base):]
        out.append(" ".join(words))
    text = "".join(out)
    if text.count(new_base + "/") != 2:
        raise ValueError(f"not a sidus iPXE script with a kernel and an initrd under {base}: {script!r}")
    return text


# -- the lab (root, qemu): everything below runs the real thing ---------------------------------

def _console_times(vm: Any, follower: Any, lab: Any, timeout_s: float) -> dict[str, float]:
    times: dict[str, float] = {}

    def on_step(step: Any) -> None:
        if step.key in ("linux", "root", "ready") and step.key not in times:
            times[step.key] = time.time()
    lab.follow(vm, follower, timeout_s, until="ready", on_step=on_step)
    return times


class Rig:
    """One lab and the servers that take turns on it."""

    def __init__(self, workdir: Path, mac: str, sidus_ra: bool):
        from sidusd.lab.demo import HostSpec, Lab
        from sidusd.lab.image import build_demo_image
        self.workdir, self.mac = workdir, mac
        self.image = build_demo_image(workdir / "image", progress=lambda m: print("   " + m, flush=True))
        self.lab = Lab(workdir / "lab", mode="proxy", progress=lambda m: print("== " + m, flush=True),
                       dhcp_extra={"ipv6_no_router": True} if sidus_ra else {})
        self.host = HostSpec(mac, "bench1", "sidus.demo=poweroff")
        self.peer_root = workdir / "peer-tftp"
        self.peer_http_root = workdir / "peer-http"
        self.script_name = f"boot/{mac.replace(':', '-')}.ipxe"      # the path sidusd serves it under
        self.procs: list[subprocess.Popen] = []
        self.sidus_mode = "serve"

    def up(self) -> None:
        self.lab.up(self.image, [self.host])
        self._make_peer_root()

    def _make_peer_root(self) -> None:
        """A copy of the TFTP root with the pxelinux.cfg/01-<mac> sidusd renders (fetched over TFTP)
        and its iPXE script (fetched over HTTP) with the kernel and initrd URLs pointed at the peer:
        ``tftp://`` in the TFTP root, the peer's httpd in ``peer-http/`` (:func:`ipxe_script_for`)."""
        for d in (self.peer_root, self.peer_http_root):
            if d.exists():
                shutil.rmtree(d)
        shutil.copytree(self.lab.tftp_root, self.peer_root)
        shutil.copytree(self.lab.tftp_root / "demo", self.peer_http_root / "demo", copy_function=os.link)
        url = f"http://{SERVER_IP}:{HTTP_PORT}/{self.script_name}"
        res = subprocess.run(self.lab.topology.lab_argv(["curl", "-sSf", url]), check=True, timeout=30,
                             capture_output=True, text=True)
        base = f"http://{SERVER_IP}:{HTTP_PORT}"
        for root, new_base in ((self.peer_root, f"tftp://{SERVER_IP}"),
                               (self.peer_http_root, f"http://{SERVER_IP}:{PEER_HTTP_PORT}")):
            (root / self.script_name).parent.mkdir(parents=True, exist_ok=True)
            (root / self.script_name).write_text(ipxe_script_for(res.stdout, base, new_base))
        cfg_name = "pxelinux.cfg/01-" + self.mac.replace(":", "-")
        (self.peer_root / "pxelinux.cfg").mkdir(exist_ok=True)
        out = self.peer_root / cfg_name
        argv = self.lab.topology.lab_argv(["busybox", "tftp", "-g", "-r", cfg_name, "-l", str(out), SERVER_IP])
        subprocess.run(argv, check=True, timeout=30, capture_output=True)
        text = out.read_text()
        if "demo/vmlinuz" not in text:
            raise RuntimeError(f"sidusd rendered no kernel line for {cfg_name}: {text!r}")

    def _sidusd(self, mode: str) -> None:
        """Restart sidusd serving (``serve``; ``serve-ipxe``: with ``boot.ipxe_chain``, so the NIC's
        iPXE is handed its script over HTTP) or keeping only the NFS export and the HTTP server
        that takes the guest's ``sidus.up`` report (``nfs-only``)."""
        if mode == self.sidus_mode:
            return
        lab = self.lab
        lab.stop_sidusd()
        orig = lab.config_dict

        def cfg(exports_file: Path, pid_file: Path) -> dict[str, Any]:
            c = orig(exports_file, pid_file)
            if mode == "nfs-only":
                c["dhcp"] = {"mode": "off"}
                c["tftp"] = dict(c["tftp"], enabled=False)
            elif mode == "serve-ipxe":
                c["boot"] = dict(c.get("boot", {}), ipxe_chain=True)
            return c
        exports = lab.workdir / "ganesha-exports.conf"
        lab.config_dict = cfg  # type: ignore[method-assign]   (this lab object only)
        try:
            lab.write_config(exports, lab.ganesha.pid_file)
        finally:
            del lab.config_dict
        lab.start_sidusd()
        lab.ganesha.wait_exported(str(self.image.root), 30.0)
        self.sidus_mode = mode

    def dnsmasq_argv(self, server: str, path: str) -> list[str]:
        """The peer's dnsmasq: proxyDHCP on br0 (``--pxe-service`` per architecture); on the ipxe
        path a client that is already iPXE (option 175) gets the script instead (``--dhcp-boot``:
        over TFTP from this host, or the httpd's URL), the usual recipe; ``dnsmasq``: its TFTP too."""
        ipxe = "tag:!ipxe," if path == "ipxe" else ""
        argv = [shutil.which("dnsmasq") or "/usr/sbin/dnsmasq", "--keep-in-foreground",
                "--conf-file=/dev/null", "--port=0", "--user=root", "--pid-file=",
                "--interface=br0", "--bind-interfaces", f"--listen-address={SERVER_IP}",
                "--dhcp-range=10.13.20.0,proxy,255.255.255.0",
                f'--pxe-service={ipxe}x86PC,"sidus",pxelinux',
                f'--pxe-service={ipxe}BC_EFI,"sidus",syslinux.efi',
                f'--pxe-service={ipxe}X86-64_EFI,"sidus",syslinux.efi',
                f"--dhcp-leasefile={self.workdir / 'peer.leases'}",
                f"--log-facility={self.workdir / 'peer-dnsmasq.log'}", "--log-dhcp"]
        if path == "ipxe":
            # ",,<address>": the OFFER's siaddr; without it dnsmasq sends 0.0.0.0 with a URL and this
            # iPXE asks the proxy on port 4011 again and again, then says "Nothing to boot"
            script = (f"http://{SERVER_IP}:{PEER_HTTP_PORT}/{self.script_name}" if server == "dnsmasq+httpd"
                      else self.script_name)
            argv += ["--dhcp-match=set:ipxe,175", f"--dhcp-boot=tag:ipxe,{script},,{SERVER_IP}"]
        if server == "dnsmasq":
            argv += ["--enable-tftp", f"--tftp-root={self.peer_root}"]
        return argv

    def start(self, server: str, path: str) -> None:
        from bench.peers import ensure_peers
        self._sidusd(("serve-ipxe" if path == "ipxe" else "serve") if server == "sidus" else "nfs-only")
        if server == "sidus":
            return
        topo = self.lab.topology

        def spawn(argv: list[str]) -> None:
            self.procs.append(subprocess.Popen(topo.lab_argv(argv), stdin=subprocess.DEVNULL,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                               start_new_session=True))
        spawn(self.dnsmasq_argv(server, path))
        if server == "dnsmasq+hpa":
            hpa = ensure_peers(["tftpd-hpa"])["tftpd-hpa"]
            spawn([str(hpa), "-L", "-u", "root", "-s", str(self.peer_root), "-a", f"{SERVER_IP}:69"])
        elif server == "dnsmasq+httpd":
            spawn([shutil.which("busybox") or "/bin/busybox", "httpd", "-f",
                   "-p", f"{SERVER_IP}:{PEER_HTTP_PORT}", "-h", str(self.peer_http_root)])
        time.sleep(1.0)
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{server}: {p.args[-1]!r}... exited with {p.returncode}")

    def stop_peers(self) -> None:
        from bench.peers import stop_server
        procs, self.procs = self.procs, []
        for p in procs:
            stop_server(p)

    def boot(self, server: str, path: str, index: int) -> dict[str, Any]:
        """One boot of the VM through ``server``; its phases."""
        from sidusd.lab.proc import terminate
        lab = self.lab
        pcap = self.workdir / f"boot-{index:02d}-{path}-{server.replace('+', '-')}.pcap"
        dump = subprocess.Popen(lab.topology.lab_argv(["tcpdump", "-i", "br0", "-U", "-s", "400", "-w", str(pcap)]),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(1.0)
        vm = lab.boot_vm(self.mac, name=f"b{index:02d}", uefi=path == "uefi")
        t0 = time.time()
        follower = lab.timeline(vm)
        follower.t0 = t0
        try:
            console = _console_times(vm, follower, lab, BOOT_TIMEOUT_S)
            vm.wait_exit(20)
        finally:
            vm.stop()
            lab.vms.remove(vm)
            time.sleep(0.5)
            terminate(dump, 5)
        wire = wire_timeline(pcap_packets(pcap.read_bytes()), self.mac)
        ph = phases(wire, t0, console)
        turn = tftp_turnaround(pcap_packets(pcap.read_bytes()), "demo/initrd.img")
        return {"server": server, "path": path, "round": index, "phases": ph, "pcap": str(pcap),
                "initrd_turnaround": turn,
                "ra": None if wire.ra is None else round(wire.ra - t0, 2),
                "files": [(n, round(s - t0, 2), round(e - t0, 2)) for n, s, e in wire.files]}

    def close(self) -> None:
        self.stop_peers()
        self.lab.close()


def schedule(servers: list[str], paths: list[str], rnd: int) -> list[tuple[str, str]]:
    """The boots of round ``rnd``: the servers' order rotated by one each round (interleaved),
    each server's paths in turn, a server only on the paths it takes part in (:data:`PATH_SERVERS`)."""
    k = rnd % len(servers)
    return [(s, p) for s in servers[k:] + servers[:k] for p in paths if s in PATH_SERVERS[p]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--boots", type=int, default=3, help="boots per server and path (default 3)")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--sidus-ra", choices=("on", "off"), default="on",
                    help="dhcp.ipv6_no_router for sidus (default on)")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/sidus-bootcompare"))
    ap.add_argument("--json", type=Path, help="write every boot's phases here")
    ap.add_argument("--markdown", type=Path, help="write the tables of docs/performance.md here")
    ap.add_argument("--from-json", type=Path, help="no boots: summarize (and --markdown) an earlier --json")
    args = ap.parse_args(argv)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        for i, r in enumerate(results):            # a run from before initrd_turnaround: its pcaps
            pcap = args.workdir / f"boot-{i:02d}-{r['path']}-{r['server'].replace('+', '-')}.pcap"
            if r.get("initrd_turnaround") is None and pcap.exists():
                r["initrd_turnaround"] = tftp_turnaround(pcap_packets(pcap.read_bytes()), "demo/initrd.img")
        for r in results:
            print_boot(r)
        print_summary(summarize(results))
        if args.markdown:
            args.markdown.write_text(markdown(results))
        return 0
    paths = [p for p in args.paths.split(",") if p]
    servers = [s for s in args.servers.split(",") if s]
    for s in servers:
        if s not in SERVERS:
            ap.error(f"unknown server {s!r} (known: {', '.join(SERVERS)})")
    for p in paths:
        if p not in PATHS:
            ap.error(f"unknown path {p!r} (known: {', '.join(PATHS)})")
    from sidusd.lab.vm import mac_for
    rig = Rig(args.workdir, mac_for(0), args.sidus_ra == "on")
    results: list[dict[str, Any]] = []
    try:
        rig.up()
        for rnd in range(args.boots):
            for server, path in schedule(servers, paths, rnd):
                rig.start(server, path)
                try:
                    r = rig.boot(server, path, len(results))
                    results.append(r)
                    print_boot(r)
                finally:
                    rig.stop_peers()
    finally:
        rig.close()
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    print_summary(summarize(results))
    if args.markdown:
        args.markdown.write_text(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
