"""The TFTP servers a boot storm runs against: sidusd and its C peers.

Peers: dnsmasq (Debian ``dnsmasq-base``, installed), tftpd-hpa and atftpd.  The
last two conflict as Debian packages, so :func:`ensure_peers` fetches them with
``apt-get download`` into ``bench/.peers/`` (git-ignored) and unpacks them with
``dpkg-deb -x``; their binaries run from there.  Every server listens on
127.0.0.1:69 inside the network namespace the benchmark runs in.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PEERS_DIR = BENCH / ".peers"
PACKAGES = {"tftpd-hpa": "usr/sbin/in.tftpd", "atftpd": "usr/sbin/atftpd"}
SERVERS = ("sidusd", "dnsmasq", "tftpd-hpa", "atftpd")
DHCP_SERVERS = ("sidusd", "dnsmasq")      # proxyDHCP
HTTP_SERVERS = ("sidusd",)                # HTTP boot (the C peers have none)


class BenchSetupError(RuntimeError):
    """A tool or package the benchmark needs is missing (the message names it)."""


def _tool(name: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None)
    if not path:
        raise BenchSetupError(f"missing tool: {name}")
    return path


def peer_binary(package: str) -> Path:
    """Where the unpacked binary of ``package`` lives under bench/.peers/."""
    return PEERS_DIR / package / PACKAGES[package]


def ensure_peers(packages: list[str] | tuple[str, ...] = tuple(PACKAGES)) -> dict[str, Path]:
    """Download and unpack the peer packages that are not there yet; returns their binaries."""
    out = {}
    for pkg in packages:
        binary = peer_binary(pkg)
        if not binary.exists():
            PEERS_DIR.mkdir(parents=True, exist_ok=True)
            debs = PEERS_DIR / "debs"
            debs.mkdir(exist_ok=True)
            for old in debs.glob(f"{pkg}_*.deb"):
                old.unlink()
            r = subprocess.run([_tool("apt-get"), "download", pkg], cwd=debs,
                               capture_output=True, text=True, timeout=300)
            found = sorted(debs.glob(f"{pkg}_*.deb"))
            if r.returncode != 0 or not found:
                raise BenchSetupError(f"apt-get download {pkg} failed: {r.stderr.strip()[-400:]}")
            subprocess.run([_tool("dpkg-deb"), "-x", str(found[-1]), str(PEERS_DIR / pkg)],
                           check=True, timeout=120)
            if not binary.exists():
                raise BenchSetupError(f"{pkg}: {PACKAGES[pkg]} not in the package")
        out[pkg] = binary
    return out


@dataclass(frozen=True)
class DhcpSide:
    """The server end of the bench's DHCP link: interface and address (a /24)."""

    iface: str = "sb0"
    server_ip: str = "10.77.0.1"
    network: str = "10.77.0.0"
    netmask: str = "255.255.255.0"


@dataclass
class ServerSpec:
    """How to start one server: argv, and the files it needs written first."""

    name: str
    argv: list[str]
    workdir: Path


def server_spec(name: str, root: Path, workdir: Path, max_transfers: int, port: int = 69,
                dhcp: DhcpSide | None = None, http_port: int | None = None,
                http_clients: int = 0, address: str = "127.0.0.1",
                sidusd_tftp: dict | None = None) -> ServerSpec:
    """The command line that serves ``root`` over TFTP on ``address``:``port`` (127.0.0.1).

    ``dhcp``: also answer proxyDHCP on that interface (sidusd and dnsmasq
    only), TFTP then on every address (the boot server address is the
    interface's).  ``http_port``: sidusd also serves HTTP boot there, with
    iPXE chainloading, and limits fitting ``http_clients`` clients that all
    come from one address.  ``sidusd_tftp``: more keys of sidusd's ``tftp:`` section.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    if dhcp is not None and name not in DHCP_SERVERS:
        raise BenchSetupError(f"{name} has no DHCP server")
    if http_port is not None and name not in HTTP_SERVERS:
        raise BenchSetupError(f"{name} has no HTTP server")
    if name == "sidusd":
        cfg = write_sidusd_config(root, workdir, max_transfers, port, dhcp=dhcp, http_port=http_port,
                                  http_clients=http_clients, address=address, tftp=sidusd_tftp)
        return ServerSpec(name, [sys.executable, "-m", "sidusd", "--config", str(cfg)], workdir)
    if name == "dnsmasq":
        if port != 69:
            raise BenchSetupError("dnsmasq serves TFTP on port 69 only")
        argv = [_tool("dnsmasq"), "--keep-in-foreground", "--conf-file=/dev/null",
                "--port=0", "--enable-tftp", f"--tftp-root={root}",
                f"--tftp-max={max_transfers}", "--quiet-tftp", "--user=root",
                "--pid-file=", f"--listen-address={address}", "--bind-interfaces",
                "--log-facility=-"]
        if dhcp is not None:
            # proxyDHCP (dnsmasq(8): a dhcp-range with "proxy") + a PXE service for BIOS
            # clients: OFFER on 67, ACK on 4011, boot file pxelinux.0 (".0" added by dnsmasq).
            argv += [f"--interface={dhcp.iface}", f"--listen-address={dhcp.server_ip}",
                     f"--dhcp-range={dhcp.network},proxy,{dhcp.netmask}",
                     '--pxe-service=x86PC,"sidus",pxelinux', "--quiet-dhcp",
                     f"--dhcp-leasefile={workdir / 'leases'}"]
        return ServerSpec(name, argv, workdir)
    if name == "tftpd-hpa":
        # -L: stay in the foreground; forks one child per transfer.
        return ServerSpec(name, [str(peer_binary("tftpd-hpa")), "-L", "-u", "root", "-s", str(root),
                                 "-a", f"{address}:{port}"], workdir)
    if name == "atftpd":
        return ServerSpec(name, [str(peer_binary("atftpd")), "--daemon", "--no-fork", "--user", "root",
                                 "--group", "root", "--port", str(port), "--bind-address", address,
                                 "--logfile", "/dev/null", "--maxthread", str(max_transfers),
                                 str(root)], workdir)
    raise BenchSetupError(f"unknown server {name!r} (known: {', '.join(SERVERS)})")


def pushers_keys(pushers: str | None) -> dict | None:
    """sidusd's ``tftp:`` keys for a bench's ``--pushers`` (None: sidusd's default)."""
    if pushers is None:
        return None
    return {"pushers": pushers if pushers == "auto" else int(pushers)}


def write_sidusd_config(root: Path, workdir: Path, max_transfers: int, port: int,
                        dhcp: DhcpSide | None = None, http_port: int | None = None,
                        http_clients: int = 0, address: str = "127.0.0.1",
                        tftp: dict | None = None) -> Path:
    """A sidusd config serving ``root`` on ``address`` (127.0.0.1; DHCP off) and logging at warning.

    With ``dhcp``: proxyDHCP on that interface, TFTP on 0.0.0.0.  With
    ``http_port``: HTTP boot on 0.0.0.0 and ``boot.ipxe_chain`` (BIOS clients
    get undionly.kpxe, iPXE gets its script's URL); every simulated client
    connects from one address, so ``http.max_per_client`` is raised to fit them.
    """
    (workdir / "state").mkdir(exist_ok=True)
    (workdir / "image").mkdir(exist_ok=True)
    cfg = {
        "state_dir": str(workdir / "state"),
        "inventory_file": str(workdir / "inventory.yaml"),
        "log": {"format": "json", "level": "warning"},
        "control": {"socket_path": str(workdir / "control.sock")},
        "dhcp": {"mode": "off"},
        "tftp": {"address": address, "port": port, "root": str(root),
                 "max_transfers": max_transfers,
                 # every simulated client is 127.0.0.1: the per-client cap must not bite
                 "max_transfers_per_client": max_transfers, **(tftp or {})},
        "nfs": {"backend": "none", "server_address": "127.0.0.1"},
        "images": {"demo": {"root": str(workdir / "image"), "kernel": "images/demo/vmlinuz",
                            "initrd": "images/demo/initrd.img", "append": "console=ttyS0"}},
    }
    if dhcp is not None:
        cfg["dhcp"] = {"mode": "proxy", "interfaces": [dhcp.iface]}
        cfg["tftp"]["address"] = "0.0.0.0"
    if http_port is not None:
        conns = max(64, 4 * http_clients)
        cfg["http"] = {"enabled": True, "address": "0.0.0.0", "port": http_port,
                       "max_connections": conns, "max_per_client": conns}
        cfg["boot"] = {"ipxe_chain": True}
    inv = {"profiles": {"default": {"image": "demo", "overlay": "tmpfs", "append": ""}}, "hosts": []}
    (workdir / "inventory.yaml").write_text(yaml.safe_dump(inv))
    path = workdir / "sidus.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM (SIGKILL after 15 s), then SIGKILL to its process group: the children it forked."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)     # children (tftpd-hpa forks per transfer)
    except ProcessLookupError:
        pass
