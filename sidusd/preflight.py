"""What a boot needs, checked before it is needed: ``sidusd --check``, the start and every reload.

A config can be valid key by key and still leave every machine unbootable: the
TFTP root missing, ``pxelinux.0`` there but not ``ldlinux.c32`` (pxelinux
stops with "Failed to load ldlinux.c32"), an image whose root was never built
(the NFS mount of every node fails).  This module says so beforehand, naming
the config key, the path and the fix.

Pure core, thin edge:

* :func:`needs` (pure): what ``config`` needs on disk and on the network, as
  :class:`Need` rows (a directory, a regular file, an interface);
* :func:`problems` (pure): the needs that are not in ``present`` (what the edge
  found), as :class:`Problem` rows;
* :func:`at_check`, :func:`fatal_at_start`, :func:`refused_at_reload` (pure):
  which problems stop what.  ``--check`` fails on every problem but a missing
  interface (warned: the check may run before the interface is up); the start
  is refused for a missing TFTP root or interface (nothing could be served);
  a reload is refused for each problem the running config does not have (a
  mistake is refused, the old config keeps serving; a problem that is already
  there is reported, not a reason to refuse an unrelated change);
* :func:`gather` and :func:`inspect` (I/O): look at the file system and
  ``/sys/class/net``; :func:`nfs_problem` asks the NFS backend whether it runs.

Where the boot files come from (Debian packages) is :data:`SOURCES`;
``sidusctl tftp-root populate`` copies them (:func:`populate_plan`).
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DIR, FILE, IFACE = "dir", "file", "interface"
#: scopes: what a problem concerns (decides what it stops)
ROOT, BOOT, IMAGE, INTERFACE, NFS = "tftp_root", "boot_file", "image", "interface", "nfs"


@dataclass(frozen=True)
class Source:
    """Where a boot file comes from on Debian 12: its package and the installed path."""

    package: str
    path: str


#: (boot file family, file name) -> where Debian installs it.  Family "*": any.
SOURCES: dict[tuple[str, str], Source] = {
    ("bios", "pxelinux.0"): Source("pxelinux", "/usr/lib/PXELINUX/pxelinux.0"),
    ("bios", "lpxelinux.0"): Source("pxelinux", "/usr/lib/PXELINUX/lpxelinux.0"),
    ("bios", "ldlinux.c32"): Source("syslinux-common", "/usr/lib/syslinux/modules/bios/ldlinux.c32"),
    ("uefi_x64", "syslinux.efi"): Source("syslinux-efi", "/usr/lib/SYSLINUX.EFI/efi64/syslinux.efi"),
    ("uefi_x64", "ldlinux.e64"): Source("syslinux-common", "/usr/lib/syslinux/modules/efi64/ldlinux.e64"),
    ("uefi_ia32", "syslinux.efi"): Source("syslinux-efi", "/usr/lib/SYSLINUX.EFI/efi32/syslinux.efi"),
    ("uefi_ia32", "ldlinux.e32"): Source("syslinux-common", "/usr/lib/syslinux/modules/efi32/ldlinux.e32"),
    # Secure Boot: shim (signed by Microsoft's UEFI CA) loads grubx64.efi from its own directory;
    # that name is Debian's signed *network* GRUB (prefix /grub, docs/boot-chain.md)
    ("uefi_x64", "shimx64.efi"): Source("shim-signed", "/usr/lib/shim/shimx64.efi.signed"),
    ("uefi_x64", "grubx64.efi"): Source("grub-efi-amd64-signed",
                                        "/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed"),
    # arm64 UEFI (option 93 = 11): Debian's signed arm64 network GRUB, prefix /grub like grubnetx64
    # (it reads the same grub/grub.cfg); on an amd64 boot host through multiarch
    # (dpkg --add-architecture arm64; apt-get update): the package has no arm64 dependencies to pull
    ("arm64", "grubaa64.efi"): Source("grub-efi-arm64-signed:arm64",
                                      "/usr/lib/grub/arm64-efi-signed/grubnetaa64.efi.signed"),
    ("*", "undionly.kpxe"): Source("ipxe", "/usr/lib/ipxe/undionly.kpxe"),
    ("*", "undionly.kkpxe"): Source("ipxe", "/usr/lib/ipxe/undionly.kkpxe"),
    ("*", "ipxe.pxe"): Source("ipxe", "/usr/lib/ipxe/ipxe.pxe"),
    ("*", "snponly.efi"): Source("ipxe", "/usr/lib/ipxe/snponly.efi"),
    ("*", "ipxe.efi"): Source("ipxe", "/usr/lib/ipxe/ipxe.efi"),
}

#: (family, boot file name) -> the file the loader fetches next, from the same directory
COMPANIONS: dict[tuple[str, str], str] = {
    ("bios", "pxelinux.0"): "ldlinux.c32",
    ("bios", "lpxelinux.0"): "ldlinux.c32",
    ("uefi_x64", "syslinux.efi"): "ldlinux.e64",
    ("uefi_ia32", "syslinux.efi"): "ldlinux.e32",
    ("uefi_x64", "shimx64.efi"): "grubx64.efi",     # shim netboot.c: DEFAULT_LOADER, same directory
}


def source_of(family: str, name: str) -> Source | None:
    """The Debian source of boot file ``name`` (a path relative to tftp.root) for ``family``."""
    base = name.rsplit("/", 1)[-1]
    return SOURCES.get((family, base)) or SOURCES.get(("*", base))


@dataclass(frozen=True)
class Need:
    """One thing a boot needs: ``kind`` (dir, file, interface) at ``path``, for config ``key``."""

    key: str
    kind: str
    path: str
    scope: str
    fix: str
    image: str | None = None


@dataclass(frozen=True)
class Problem:
    """A need not met: the key, the path, what is wrong and the fix."""

    key: str
    path: str
    reason: str
    fix: str
    scope: str
    image: str | None = None

    def __str__(self) -> str:
        return f"{self.key}: {self.path}: {self.reason}; fix: {self.fix}"

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "path": self.path, "reason": self.reason, "fix": self.fix,
                "scope": self.scope, "image": self.image}


def _boot_files(config: Any) -> list[tuple[str, str, str]]:
    """(key, family, name) of each first file a loader of the config hands out (boot.loaders.in_use:
    each architecture's, each profile's, UEFI HTTP Boot's; with ``boot.ipxe_chain`` BIOS and x64
    UEFI get the iPXE binaries)."""
    from sidusd.boot.loaders import in_use
    return [(key, family, name) for key, family, _, name in in_use(config)]


def _file_fix(family: str, name: str) -> str:
    src = source_of(family, name)
    if src is None:
        return f"copy your {name} into tftp.root"
    return (f"apt-get install {src.package}, then `sidusctl tftp-root populate` "
            f"(copies {src.path})")


def needs(config: Any) -> list[Need]:
    """Everything ``config`` needs to boot a machine, in the order it is needed (pure)."""
    out: list[Need] = []
    serving = config.tftp.enabled or config.http.enabled
    root = Path(config.tftp.root)
    if serving:
        out.append(Need("tftp.root", DIR, str(root), ROOT,
                        f"mkdir -p {root}, then `sidusctl tftp-root populate`"))
        seen: set[str] = set()
        for key, family, name in _boot_files(config):
            for n, k in ((name, key), (_companion(family, name), f"{key} (its companion)")):
                if n is None or n in seen:
                    continue
                seen.add(n)
                out.append(Need(k, FILE, str(root / n), BOOT, _file_fix(family, n.rsplit("/", 1)[-1])))
    for name in sorted(config.images):
        img = config.images[name]
        where = f"images.{name}"
        out.append(Need(f"{where}.root", DIR, str(img.root), IMAGE,
                        f"build it (sidus-image build), correct {where}.root, or remove image {name}",
                        image=name))
        if serving:
            for part in ("kernel", "initrd"):
                out.append(Need(f"{where}.{part}", FILE, str(root / getattr(img, part)), IMAGE,
                                f"publish it (sidus-image publishes images/<name>/gen-N/), or correct "
                                f"{where}.{part} (relative to tftp.root)", image=name))
    if config.dhcp.mode != "off":
        for i, iface in enumerate(config.dhcp.interfaces):
            out.append(Need(f"dhcp.interfaces[{i}]", IFACE, iface, INTERFACE,
                            "correct dhcp.interfaces (`ip -br link` lists this machine's interfaces)"))
    return out


def _companion(family: str, name: str) -> str | None:
    comp = COMPANIONS.get((family, name.rsplit("/", 1)[-1]))
    if comp is None:
        return None
    d = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
    return d + comp


_REASONS = {DIR: "no such directory", FILE: "no such regular file (symlinks are not served)",
            IFACE: "no such network interface on this machine"}


def problems(wanted: Iterable[Need], present: frozenset[tuple[str, str]]) -> list[Problem]:
    """The needs whose ``(kind, path)`` is not in ``present`` (pure).  Below a missing directory
    (tftp.root, an image root) only that directory is named, not each file in it."""
    out: list[Problem] = []
    missing_dirs: list[str] = []
    for n in wanted:
        if (n.kind, n.path) in present:
            continue
        if n.kind == FILE and any(n.path.startswith(d.rstrip("/") + "/") for d in missing_dirs):
            continue
        if n.kind == DIR:
            missing_dirs.append(n.path)
        out.append(Problem(n.key, n.path, _REASONS[n.kind], n.fix, n.scope, n.image))
    return out


def at_check(found: list[Problem]) -> tuple[list[Problem], list[Problem]]:
    """``sidusd --check``: (errors, warnings); a missing interface is only a warning."""
    return ([p for p in found if p.scope != INTERFACE], [p for p in found if p.scope == INTERFACE])


def fatal_at_start(found: list[Problem]) -> list[Problem]:
    """The problems that refuse the start: nothing could be served (no TFTP root, no interface).
    The others (a boot file, an image) are logged at error and shown by ``sidusctl status``:
    one broken image or architecture does not stop the rest from booting."""
    return [p for p in found if p.scope in (ROOT, INTERFACE)]


def refused_at_reload(new: list[Problem], old: list[Problem]) -> list[Problem]:
    """The problems that refuse a reload: those the running config does not have (interfaces
    and the NFS backend are not reload matters: listeners need a restart, NFS goes to status)."""
    had = {(p.key, p.path) for p in old}
    return [p for p in new if p.scope not in (INTERFACE, NFS) and (p.key, p.path) not in had]


def broken_images(found: list[Problem]) -> dict[str, list[str]]:
    """Image name -> the problems that keep it from booting (for ``sidusctl status``)."""
    out: dict[str, list[str]] = {}
    for p in found:
        if p.image is not None:
            out.setdefault(p.image, []).append(str(p))
    return out


# ---------------------------------------------------------------- the edge (I/O)

def interface_exists(name: str) -> bool:
    """Whether this network namespace has interface ``name`` (``if_nametoindex``: the namespace of
    the process, where ``/sys/class/net`` shows the one sysfs was mounted in)."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def gather(wanted: Iterable[Need],
           has_interface: Callable[[str], bool] = interface_exists) -> frozenset[tuple[str, str]]:
    """The ``(kind, path)`` of the needs that exist on this machine."""
    out = set()
    for n in wanted:
        if n.kind == DIR:
            ok = os.path.isdir(n.path)
        elif n.kind == FILE:
            ok = os.path.isfile(n.path) and not os.path.islink(n.path)
        else:
            ok = has_interface(n.path)
        if ok:
            out.add((n.kind, n.path))
    return frozenset(out)


def inspect(config: Any, *, nfs: bool = False) -> list[Problem]:
    """Every problem of ``config`` on this machine (``nfs``: also ask the NFS backend)."""
    wanted = needs(config)
    found = problems(wanted, gather(wanted))
    if nfs:
        why = nfs_problem(config)
        if why is not None:
            found.append(why)
    return found


def inspect_serving(config: Any) -> list[Problem]:
    """What the daemon verifies at start, at reload and for status: :func:`inspect` with the NFS
    backend asked too. A backend that does not answer is logged at error and shown by ``sidusctl
    status`` but refuses neither (``fatal_at_start``, ``refused_at_reload``): the NFS server starts
    and restarts on its own, and TFTP/DHCP keep serving the machines that boot without it."""
    return inspect(config, nfs=True)


def nfs_problem(config: Any, proc: Path = Path("/proc")) -> Problem | None:
    """Whether the NFS server of ``nfs.backend`` runs (None: it does, or backend none)."""
    nfs = config.nfs
    if nfs.backend == "ganesha":
        from .storage.nfs import ganesha_running
        pid, why = ganesha_running(Path(nfs.ganesha_pid_file))
        if pid is None:
            return Problem("nfs.backend", str(nfs.ganesha_pid_file), why,
                           "systemctl start nfs-ganesha (apt-get install nfs-ganesha nfs-ganesha-vfs)", NFS)
    elif nfs.backend == "kernel":
        if shutil.which("exportfs") is None:
            return Problem("nfs.backend", "exportfs", "exportfs is not installed",
                           "apt-get install nfs-kernel-server", NFS)
        threads = proc / "fs/nfsd/threads"
        try:
            running = int(threads.read_text().strip() or 0) > 0
        except (OSError, ValueError):
            running = False
        if not running:
            return Problem("nfs.backend", str(threads), "the kernel NFS server is not running",
                           "systemctl start nfs-server", NFS)
    return None


def populate_plan(config: Any) -> list[tuple[Path, Source | None, str]]:
    """(destination, where it comes from or None, config key) of each boot file and companion
    that ``config`` serves from tftp.root (pure)."""
    root = Path(config.tftp.root)
    out: list[tuple[Path, Source | None, str]] = []
    seen: set[str] = set()
    for key, family, name in _boot_files(config):
        for n in (name, _companion(family, name)):
            if n is None or n in seen:
                continue
            seen.add(n)
            out.append((root / n, source_of(family, n), key))
    return out
