"""The demo boot lab's building blocks, shared by ``python3 -m sidusd.lab demo`` and tests/e2e.

:class:`Lab` owns everything one lab run starts: the network (topology.py),
the site DHCP server (sitedhcp.py), nfs-ganesha (ganesha.py), ``sidusd``
itself (``python3 -m sidusd --config FILE`` in the lab namespace, its JSON log
in a file) and the VMs (vm.py).  :meth:`Lab.close` stops all of it by PID and
removes the namespaces; it is idempotent and runs from ``finally``.

:meth:`Lab.timeline` follows a VM's boot (:mod:`sidusd.lab.follow`, around the
pure :mod:`sidusd.lab.timeline`): the ordered steps the demo prints.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sidusd.errors import StartupError

from .follow import BootFollower, read_events
from .proc import terminate
from .sitedhcp import RANGE, SiteDhcp
from .timeline import Step, boot_markers  # noqa: F401  (boot_markers: the e2e tests take it from here)
from .topology import BRIDGE, NETWORK, SERVER_IP, Topology, teardown_stale
from .vm import Vm

CODE_DIR = Path(__file__).resolve().parents[2]   # holds the sidusd package: a checkout or site-packages
PXELINUX = Path("/usr/lib/PXELINUX/pxelinux.0")
LDLINUX = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")
# UEFI loaders and iPXE binaries, published when the packages are there (syslinux-efi, ipxe)
SYSLINUX_EFI = Path("/usr/lib/SYSLINUX.EFI/efi64/syslinux.efi")
LDLINUX_E64 = Path("/usr/lib/syslinux/modules/efi64/ldlinux.e64")
IPXE_BINARIES = (Path("/usr/lib/ipxe/undionly.kpxe"), Path("/usr/lib/ipxe/snponly.efi"))
HTTP_PORT = 8080
SIDUSD_READY_TIMEOUT_S = 30.0
EXPORT_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0

# Where the demo image's init writes its probe (sidus.demo=reboot-after-write and
# every boot): inside the guest it lands in the tmpfs overlay, never in the image.
DEFAULT_PROBE_PATH = "/var/sidus-reboot-probe"


def server_probe_file(image: Any) -> Path:
    """The path the guest's probe would have on the server if the NFS root were written."""
    from . import image as image_mod
    probe = getattr(image, "probe_path", None) or getattr(image_mod, "PROBE_PATH", DEFAULT_PROBE_PATH)
    return Path(image.root) / str(probe).lstrip("/")


def tree_fingerprint(root: Path) -> dict[str, tuple[int, int, int]]:
    """``{relative path: (mode, size, mtime_ns)}`` of everything under ``root`` (symlinks not followed).

    Taken before and after a boot, equal fingerprints show the guest wrote
    nothing into the exported image root.
    """
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    st = os.lstat(root)
    out["."] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


# (what must exist, the Debian package that provides it)
REQUIREMENTS: tuple[tuple[str, str], ...] = (
    ("ip", "iproute2"),
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("/usr/lib/ipxe/qemu/efi-virtio.rom", "ipxe-qemu"),
    ("dnsmasq", "dnsmasq-base"),
    ("ganesha.nfsd", "nfs-ganesha"),
    ("/usr/lib/x86_64-linux-gnu/ganesha/libfsalvfs.so", "nfs-ganesha-vfs"),
    ("rpcbind", "rpcbind"),
    ("showmount", "nfs-common"),
    ("unshare", "util-linux"),
    (str(PXELINUX), "pxelinux"),
    (str(LDLINUX), "syslinux-common"),
    ("busybox", "busybox-static"),
    ("mkinitramfs", "initramfs-tools"),
    ("/boot/vmlinuz-*", "linux-image-amd64"),
)


def missing_requirements() -> list[tuple[str, str]]:
    """The tools and files the lab needs that are absent, with their apt package."""
    missing = []
    for what, package in REQUIREMENTS:
        if what.startswith("/"):
            ok = any(Path("/").glob(what[1:])) if "*" in what else Path(what).exists()
        else:
            ok = shutil.which(what) is not None or any(
                os.access(f"{d}/{what}", os.X_OK) for d in ("/usr/sbin", "/sbin"))
        if not ok:
            missing.append((what, package))
    return missing


@dataclass
class HostSpec:
    """One machine of the lab's inventory."""

    mac: str
    hostname: str
    append: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"mac": self.mac, "hostname": self.hostname, "profile": "default",
                "append": self.append}


@dataclass
class Lab:
    """One lab run.  Typical use::

        lab = Lab(workdir, mode="proxy")
        try:
            lab.up(image, [HostSpec(mac, "vm1", "sidus.demo=poweroff")])
            vm = lab.boot_vm(mac)
            ...
        finally:
            lab.close()
    """

    workdir: Path
    mode: str = "proxy"                     # dhcp.mode: proxy (with site DHCP) or full
    progress: Callable[[str], None] = print
    topology: Topology | None = None
    site: SiteDhcp | None = None
    ganesha: Any = None
    sidusd: subprocess.Popen | None = None
    vms: list[Vm] = field(default_factory=list)
    image: Any = None
    log_level: str = "info"                 # sidusd's log.level (debug shows every dropped packet)
    http: bool = True                       # sidusd's HTTP boot server on SERVER_IP:HTTP_PORT (and /up)
    ipxe_chain: bool = False                # boot.ipxe_chain: iPXE clients get the HTTP script URL
    extra_config: dict[str, Any] = field(default_factory=dict)   # top-level sections added (metrics:, web:)
    dhcp_extra: dict[str, Any] = field(default_factory=dict)     # keys added to dhcp: (ipv6_no_router)
    site_next_server: str | None = None     # proxy mode: the site DHCP's siaddr (SiteDhcp.next_server)

    # -- paths -------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.workdir / "sidus.yaml"

    @property
    def inventory_file(self) -> Path:
        return self.workdir / "inventory.yaml"

    @property
    def sidusd_log(self) -> Path:
        """sidusd's stderr: one JSON event per line."""
        return self.workdir / "sidusd.log"

    @property
    def control_socket(self) -> Path:
        return self.workdir / "control.sock"

    @property
    def tftp_root(self) -> Path:
        return self.workdir / "tftp"

    # -- set-up ------------------------------------------------------------
    def up(self, image: Any, hosts: list[HostSpec]) -> None:
        """Network, site DHCP (proxy mode), TFTP root, nfs-ganesha, config, sidusd; export ready."""
        if self.mode not in ("proxy", "full"):
            raise ValueError(f"mode must be proxy or full, not {self.mode!r}")
        self.image = image
        self.workdir.mkdir(parents=True, exist_ok=True)
        for old in ("sidusd.log", "site.leases", "leases.jsonl", "control.sock"):
            (self.workdir / old).unlink(missing_ok=True)
        stale = teardown_stale()
        if stale:
            self.progress(f"removed leftovers of an earlier run: {', '.join(stale)}")
        self.topology = Topology(with_site=self.mode == "proxy").create()
        self.progress(f"network: namespace {self.topology.lab_ns}, {BRIDGE} {SERVER_IP}/{NETWORK.prefixlen}"
                      + (f", site DHCP in {self.topology.site_ns}" if self.mode == "proxy" else ""))
        if self.mode == "proxy":
            self.site = SiteDhcp(self.topology, self.workdir, next_server=self.site_next_server)
            self.site.start()
            self.progress(f"site DHCP (dnsmasq, addresses only): {RANGE[0]}-{RANGE[1]}")
        self.publish_tftp(image)
        from .ganesha import GaneshaServer
        exports = self.workdir / "ganesha-exports.conf"
        exports.write_text("# no exports yet: sidusd (nfs.ganesha_config) writes this file\n")
        self.ganesha = GaneshaServer(self.topology.lab_ns, self.workdir / "ganesha", exports, SERVER_IP)
        self.ganesha.start()
        self.ganesha.wait_ready(EXPORT_TIMEOUT_S)
        self.progress(f"nfs-ganesha running (pid file {self.ganesha.pid_file}), no exports yet")
        self.write_inventory(hosts)
        self.write_config(exports, self.ganesha.pid_file)
        self.start_sidusd()
        self.ganesha.wait_exported(str(image.root), EXPORT_TIMEOUT_S)   # sidusd wrote + SIGHUP
        self.progress(f"sidusd exported {image.root} through nfs-ganesha (read-only)")

    def publish_tftp(self, image: Any) -> None:
        """pxelinux.0 + ldlinux.c32 + the image's kernel and initrd under the TFTP root;
        syslinux.efi + ldlinux.e64 (UEFI) and undionly.kpxe + snponly.efi (iPXE) when installed."""
        demo = self.tftp_root / "demo"
        demo.mkdir(parents=True, exist_ok=True)
        for src, dst in ((PXELINUX, self.tftp_root / "pxelinux.0"),
                         (LDLINUX, self.tftp_root / "ldlinux.c32"),
                         (Path(image.kernel), demo / "vmlinuz"),
                         (Path(image.initrd), demo / "initrd.img")):
            shutil.copyfile(src, dst)
        for src in (SYSLINUX_EFI, LDLINUX_E64, *IPXE_BINARIES):
            if src.exists():
                shutil.copyfile(src, self.tftp_root / src.name)

    def config_dict(self, exports_file: Path, pid_file: Path) -> dict[str, Any]:
        """The sidusd configuration of this lab (docs/architecture.md schema)."""
        dhcp: dict[str, Any] = {"mode": self.mode, "interfaces": [BRIDGE], **self.dhcp_extra}
        if self.mode == "full":
            dhcp["pool"] = {"network": str(NETWORK), "range_start": "10.13.20.100",
                            "range_end": "10.13.20.199", "router": SERVER_IP,
                            "lease_file": str(self.workdir / "leases.jsonl")}
        return {
            "state_dir": str(self.workdir / "state"),
            "inventory_file": str(self.inventory_file),
            "log": {"format": "json", "level": self.log_level},
            "control": {"socket_path": str(self.control_socket)},
            "dhcp": dhcp,
            "tftp": {"root": str(self.tftp_root)},
            **({"http": {"enabled": True, "address": SERVER_IP, "port": HTTP_PORT}} if self.http else {}),
            **({"boot": {"ipxe_chain": True}} if self.ipxe_chain else {}),
            "nfs": {"backend": "ganesha", "server_address": SERVER_IP,
                    "client_networks": [str(NETWORK)],
                    "ganesha_config": str(exports_file), "ganesha_pid_file": str(pid_file)},
            "images": {"demo": {"root": str(self.image.root), "kernel": "demo/vmlinuz",
                                "initrd": "demo/initrd.img", "append": "console=ttyS0" + (
                                    f" sidus.up=http://{SERVER_IP}:{HTTP_PORT}/up" if self.http else "")}},
            **self.extra_config,
        }

    def write_config(self, exports_file: Path, pid_file: Path) -> None:
        (self.workdir / "state").mkdir(exist_ok=True)
        self.config_file.write_text(yaml.safe_dump(self.config_dict(exports_file, pid_file),
                                                   sort_keys=False))

    def write_inventory(self, hosts: list[HostSpec]) -> None:
        """The inventory file: one default profile on the demo image, one entry per host."""
        inv = {"profiles": {"default": {"image": "demo", "overlay": "tmpfs", "append": ""}},
               "hosts": [h.as_dict() for h in hosts]}
        tmp = self.inventory_file.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(inv, sort_keys=False))
        os.replace(tmp, self.inventory_file)

    def start_sidusd(self) -> None:
        """``python3 -m sidusd --config FILE`` in the lab namespace; waits for ``daemon.ready``."""
        env = dict(os.environ, PYTHONPATH=str(CODE_DIR), PYTHONUNBUFFERED="1")
        assert self.topology is not None, "the network first (Lab.start)"
        argv = self.topology.lab_argv([sys.executable, "-m", "sidusd", "--config", str(self.config_file)])
        with open(self.sidusd_log, "ab") as log:
            self.sidusd = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                           env=env, cwd=str(CODE_DIR), start_new_session=True)
        deadline = time.monotonic() + SIDUSD_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if any(e.get("event") == "daemon.ready" for e in read_events(self.sidusd_log)):
                self.progress(f"sidusd running (pid {self.sidusd.pid}, dhcp {self.mode}, "
                              f"log {self.sidusd_log})")
                return
            if self.sidusd.poll() is not None:
                raise StartupError(f"sidusd exited with status {self.sidusd.returncode}:\n"
                                   + "\n".join(self.sidusd_log_tail(15)))
            time.sleep(0.2)
        raise StartupError(f"sidusd not ready after {SIDUSD_READY_TIMEOUT_S:g} s:\n"
                           + "\n".join(self.sidusd_log_tail(15)))

    # -- VMs ---------------------------------------------------------------
    def boot_vm(self, mac: str, name: str | None = None, reboot: bool = False,
                interactive: bool = False, uefi: bool = False) -> Vm:
        """Create a tap for a new VM with ``mac`` and start it (PXE boot begins at once)."""
        assert self.topology is not None, "the network first (Lab.start)"
        tap = self.topology.add_tap()
        vm = Vm(self.topology, tap, mac, self.workdir, name=name or f"vm{len(self.vms) + 1}",
                reboot=reboot, interactive=interactive, uefi=uefi)
        self.vms.append(vm)
        vm.start()
        return vm

    def timeline(self, vm: Vm) -> BootFollower:
        """A timeline that follows ``vm``'s boot from now on."""
        # qemu's NIC ROMs are iPXE (BIOS and EFI builds): with ipxe_chain on they get the HTTP
        # script; otherwise UEFI gets syslinux.efi and BIOS pxelinux.0
        path = "ipxe-http" if (self.ipxe_chain and self.http) else "uefi" if vm.uefi else "bios"
        tl = BootFollower(vm.mac, self.sidusd_log, vm.console_log,
                          log_offset=self.sidusd_log.stat().st_size if self.sidusd_log.exists() else 0,
                          site_leases=self.site.leases if self.site is not None else None, path=path)
        if vm.started_at is not None:           # count from the moment qemu started
            tl.t0 = time.time() - (time.monotonic() - vm.started_at)
        return tl

    def follow(self, vm: Vm, timeline: BootFollower, timeout_s: float, until: str = "ready",
               on_step: Callable[[Step], None] | None = None) -> bool:
        """Poll ``timeline`` until step ``until`` is reached, the VM exits, or time runs out.

        ``on_step`` is called for each step as it is reached.  True if ``until`` was reached.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            for step in timeline.poll():
                if on_step:
                    on_step(step)
            if until in timeline.reached:
                return True
            if not vm.running() or time.monotonic() >= deadline:
                for step in timeline.poll():     # what the last moments wrote
                    if on_step:
                        on_step(step)
                return until in timeline.reached
            time.sleep(0.2)

    # -- operator's view ---------------------------------------------------
    def sidusctl(self, *args: str, timeout_s: float = 10.0) -> Any:
        """Run the real ``sidusctl --socket S --json ARGS``; its parsed JSON output."""
        argv = [sys.executable, "-m", "sidusd.ctl", "--socket", str(self.control_socket), "--json", *args]
        env = dict(os.environ, PYTHONPATH=str(CODE_DIR))
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env,
                             cwd=str(CODE_DIR))
        if res.returncode != 0:
            raise RuntimeError(f"sidusctl {' '.join(args)} failed ({res.returncode}): "
                               f"{(res.stderr or res.stdout).strip()}")
        return json.loads(res.stdout) if res.stdout.strip() else None

    def sidusd_log_tail(self, n: int = 30) -> list[str]:
        try:
            return self.sidusd_log.read_text(errors="replace").splitlines()[-n:]
        except FileNotFoundError:
            return []

    def diagnostics(self, vm: Vm | None = None, n: int = 30) -> str:
        """Console tail, sidusd log tail, and the other servers' logs, for a failure report."""
        parts = []
        if vm is not None:
            parts += [f"--- last {n} console lines of {vm.name} ({vm.mac}) ---", *vm.console_tail(n)]
            if vm.qemu_errors().strip():
                parts += ["--- qemu stderr ---", vm.qemu_errors().strip()]
        parts += [f"--- last {n} lines of sidusd log ---", *self.sidusd_log_tail(n)]
        if self.site is not None:
            parts += ["--- site DHCP (dnsmasq) ---", *self.site.log_tail(12)]
        if self.ganesha is not None:
            try:
                parts += ["--- nfs-ganesha ---", self.ganesha.log_tail(12)]
            except Exception as exc:  # diagnostics must never hide the real failure
                parts.append(f"(no ganesha log: {exc})")
        return "\n".join(str(p) for p in parts)

    # -- tear-down ---------------------------------------------------------
    def stop_sidusd(self) -> None:
        """SIGTERM sidusd (by PID): it finishes transfers and exits; SIGKILL after a grace."""
        proc, self.sidusd = self.sidusd, None
        terminate(proc, STOP_TIMEOUT_S)

    def close(self) -> None:
        """Stop everything this lab started (by PID), remove its namespaces.  Idempotent."""
        errors = []
        steps = [vm.stop for vm in self.vms] + [self.stop_sidusd]
        if self.ganesha is not None:
            steps.append(self.ganesha.stop)
        if self.site is not None:
            steps.append(self.site.stop)
        if self.topology is not None:
            steps.append(self.topology.teardown)
        for step in steps:
            try:
                step()
            except Exception as exc:  # keep tearing down the rest
                errors.append(f"{getattr(step, '__qualname__', step)}: {exc}")
        self.vms.clear()
        self.ganesha = self.site = self.topology = None
        if errors:
            self.progress("tear-down problems: " + "; ".join(errors))
