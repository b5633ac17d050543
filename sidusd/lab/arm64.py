"""The arm64 demo image of the boot lab, assembled on the (amd64) host from Debian's arm64 packages.

No arm64 chroot, no emulation: every arm64 file comes out of a ``.deb`` fetched with multiarch
``apt-get download`` (``dpkg --add-architecture arm64; apt-get update``, done by scripts/setup)
and unpacked with ``dpkg-deb -x``; the architecture-independent parts come from the host.
:func:`build_arm64_image` makes, under ``workdir``:

* ``root/``  the busybox root of :mod:`sidusd.lab.image` (same init and markers, after one more
  marker: ``SIDUS-BOOT: machine: <uname -m>``), its ``/bin/busybox`` replaced by
  ``busybox-static:arm64``;
* ``boot/vmlinuz-<kver>``  the kernel of ``linux-image-arm64`` (an uncompressed arm64 ``Image``
  with the EFI stub: GRUB's ``linux`` loads it as an EFI program);
* ``boot/initrd.img-<kver>``  an initramfs-tools initramfs, made as ``mkinitramfs`` would with
  BOOT=nfs and BUSYBOX=y, but file by file: the host's ``/usr/share/initramfs-tools`` init and
  scripts (shell, the same version: Debian ships them as ``Architecture: all``), the arm64
  busybox (applet links as the ``zz-busybox`` hook makes them), klibc's ``ipconfig``,
  ``nfsmount`` and ``run-init`` where busybox has none (the ``klibc-utils`` hook), the kernel
  modules of :data:`MODULES` with their dependencies (``depmod -b`` on the host reads arm64
  modules), and sidus's init-bottom scripts (sidus-overlay, sidus-up) from sidusd/data/initramfs;
* ``root/boot/`` and ``root/lib/modules/<kver>/``  the same kernel and initrd, and the modules of
  the initramfs: the root is a tree ``sidus-image import --arch arm64`` takes as it is (no
  initramfs-tools in it; its initrd has sidus's overlay script: sidusd.image.importer), so the
  e2e boots a generation made by sidus-image;
* ``grubaa64.efi``  Debian's signed arm64 network GRUB (``grub-efi-arm64-signed``:
  ``grubnetaa64.efi.signed``, prefix ``/grub``, like grubnetx64).

Measured (2 cores): the download ~2 s (62 MB), the assembly ~10 s.  A stamp (a digest of the
package file names and of every input) makes a second call a no-op; the ``.deb`` files are kept
for :data:`MAX_AGE_S` (the mirror moves on).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sidusd import data
from sidusd.errors import BackendError
from sidusd.storage.runner import Runner

from .image import BUSYBOX, build_root

ARCH = "arm64"
IMAGE_VERSION = "2"        # 2: the root carries its boot/ and lib/modules/ (sidus-image import takes it)
KERNEL_META = "linux-image-arm64"
#: the packages besides the kernel: (package, what it gives)
PACKAGES = ("grub-efi-arm64-signed", "busybox-static", "klibc-utils", "libklibc")
#: loaded by the initramfs (conf/modules), with their dependencies: the NIC, the NFS root, the overlay
MODULES = ("virtio_pci", "virtio_net", "nfs", "nfsv3", "overlay")
GRUB_IN_DEB = "usr/lib/grub/arm64-efi-signed/grubnetaa64.efi.signed"
INITRAMFS_TOOLS = Path("/usr/share/initramfs-tools")
AAVMF_CODE = Path("/usr/share/AAVMF/AAVMF_CODE.fd")
AAVMF_VARS = Path("/usr/share/AAVMF/AAVMF_VARS.fd")
MAX_AGE_S = 7 * 24 * 3600
#: init-bottom/udev without udev: what Debian's does last, move the devtmpfs into the root (the
#: init's run-init opens ${rootmnt}/dev/console)
MOVE_DEV = """#!/bin/sh
[ "$1" = prereqs ] && exit 0
mount -n -o move /dev "${rootmnt:?}/dev"
"""
#: /sbin/init of the arm64 root: the machine type the kernel runs on, then the demo init
INIT_WRAPPER = """#!/bin/sh
echo "SIDUS-BOOT: machine: $(/bin/uname -m)"
exec /sbin/init.demo "$@"
"""
APT_TIMEOUT_S = 600


@dataclass(frozen=True)
class Arm64Image:
    """Paths of a built arm64 demo image (the fields of :class:`sidusd.lab.image.DemoImage`) + GRUB."""

    root: Path
    kernel: Path
    initrd: Path
    kver: str
    grub: Path


def missing_requirements() -> list[tuple[str, str]]:
    """(what, package) the arm64 lab lacks on this host."""
    out = []
    for path, pkg in ((Path("/usr/bin/qemu-system-aarch64"), "qemu-system-arm"), (AAVMF_CODE, "qemu-efi-aarch64"),
                      (AAVMF_VARS, "qemu-efi-aarch64"), (INITRAMFS_TOOLS / "init", "initramfs-tools"),
                      (BUSYBOX, "busybox-static"), (Path("/sbin/depmod"), "kmod")):
        if not path.exists():
            out.append((str(path), pkg))
    return out


def multiarch_enabled(runner: Runner) -> bool:
    """True if dpkg knows the arm64 architecture (``dpkg --add-architecture arm64``)."""
    res = runner.run(["dpkg", "--print-foreign-architectures"], timeout_s=30)
    return res.ok and ARCH in res.out.split()


def kernel_package(runner: Runner) -> str:
    """The versioned kernel package that ``linux-image-arm64`` depends on (apt's cache, no network)."""
    res = runner.run(["apt-cache", "depends", f"{KERNEL_META}:{ARCH}"], timeout_s=60).check()
    for m in re.finditer(r"Depends:\s*(linux-image-[0-9][^\s:]*)", res.out):
        return m.group(1)
    raise BackendError("no arm64 kernel package", detail=f"apt-cache depends {KERNEL_META}:{ARCH}: {res.out!r}")


def download(debs: Path, runner: Runner, progress: Callable[[str], None]) -> list[Path]:
    """The ``.deb`` files (kept in ``debs`` while younger than MAX_AGE_S, else fetched again)."""
    if not multiarch_enabled(runner):
        raise BackendError("arm64 packages unavailable",
                           detail="dpkg --add-architecture arm64 && apt-get update (scripts/setup does it)")
    wanted = [kernel_package(runner), *PACKAGES]
    debs.mkdir(parents=True, exist_ok=True)
    have = {p.name.split("_")[0]: p for p in debs.glob(f"*_{ARCH}.deb")
            if time.time() - p.stat().st_mtime < MAX_AGE_S}
    fetch = [w for w in wanted if w not in have]
    for stale in debs.glob(f"*_{ARCH}.deb"):       # older kernels (the mirror moved on), old copies
        if stale.name.split("_")[0] in fetch or stale.name.split("_")[0] not in wanted:
            stale.unlink()
    if fetch:
        progress(f"arm64 image: apt-get download {' '.join(fetch)}")
        runner.run(["sh", "-c", 'cd "$1" && shift && exec apt-get download "$@"', "sh", str(debs),
                    *(f"{w}:{ARCH}" for w in fetch)], timeout_s=APT_TIMEOUT_S).check()
        have = {p.name.split("_")[0]: p for p in debs.glob(f"*_{ARCH}.deb")}
    return sorted(have[w] for w in wanted)


def _closure(moddir: Path, names: tuple[str, ...]) -> list[str]:
    """Module files (relative to moddir) of ``names`` and of everything they depend on (modules.dep)."""
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {Path(m).name.split(".ko")[0].replace("-", "_"): m for m in deps}
    out: list[str] = []
    todo = []
    for n in names:
        if n not in by_name:
            raise BackendError("arm64 kernel module missing", detail=f"{n} not in {moddir}/modules.dep")
        todo.append(by_name[n])
    while todo:
        m = todo.pop()
        if m not in out:
            out.append(m)
            todo.extend(deps[m])
    return out


def _initrd_tree(x: Path, kver: str, tree: Path, runner: Runner) -> None:
    """The initramfs contents (see the module docstring) at ``tree``, from the unpacked debs ``x``."""
    shutil.rmtree(tree, ignore_errors=True)
    for d in ("bin", "sbin", "lib", "etc", "conf/conf.d", "scripts", "proc", "sys", "dev", "run", "tmp",
              "var/lock", "root", "usr"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(INITRAMFS_TOOLS / "init", tree / "init")
    for rel in ("functions", "nfs", "local"):
        shutil.copy2(INITRAMFS_TOOLS / "scripts" / rel, tree / "scripts" / rel)
    for stage in ("init-top", "init-premount", "init-bottom", "nfs-top", "nfs-premount", "nfs-bottom",
                  "local-top", "local-premount", "local-block", "local-bottom"):
        (tree / "scripts" / stage).mkdir()
        (tree / "scripts" / stage / "ORDER").write_text("")    # the init's run_scripts sources it
    src = data.INITRAMFS
    for name in ("sidus-overlay", "sidus-up"):
        shutil.copyfile(src / "scripts" / "init-bottom" / name, tree / "scripts" / "init-bottom" / name)
        os.chmod(tree / "scripts" / "init-bottom" / name, 0o755)
    (tree / "scripts" / "init-bottom" / "udev").write_text(MOVE_DEV)
    os.chmod(tree / "scripts" / "init-bottom" / "udev", 0o755)
    # mkinitramfs's ORDER file: the init-bottom scripts in name order, as Debian's (udev last)
    (tree / "scripts" / "init-bottom" / "ORDER").write_text(
        "".join(f"/scripts/init-bottom/{n} \"$@\"\n[ -e /conf/param.conf ] && . /conf/param.conf\n"
                for n in ("sidus-overlay", "sidus-up", "udev")))
    (tree / "conf" / "initramfs.conf").write_text("BOOT=nfs\nBUSYBOX=y\nMODULES=list\nCOMPRESS=gzip\n")
    (tree / "conf" / "arch.conf").write_text(f"DPKG_ARCH={ARCH}\n")
    (tree / "conf" / "modules").write_text("".join(m + "\n" for m in MODULES))
    (tree / "etc" / "fstab").write_text("")
    # busybox: the applet list of the host's busybox-static (the same source version), as zz-busybox
    shutil.copy2(x / "bin" / "busybox", tree / "bin" / "busybox")
    for alias in runner.run([str(BUSYBOX), "--list-long"], timeout_s=30).check().out.split():
        alias = alias.lstrip("/")
        alias = alias[4:] if alias.startswith("usr/") else alias if "/" in alias else "bin/" + alias
        if not (tree / alias).exists():
            os.link(tree / "bin" / "busybox", tree / alias)
    # klibc-utils: its commands where busybox has none (nfsmount, ipconfig, run-init...), + libklibc
    for cmd in sorted((x / "usr" / "lib" / "klibc" / "bin").iterdir()):
        if cmd.name in ("gzip", "kinit", "zcat") or (tree / "sbin" / cmd.name).exists() \
                or (tree / "bin" / cmd.name).exists():
            continue
        shutil.copy2(cmd, tree / "bin" / cmd.name, follow_symlinks=True)
    for lib in [*x.glob("lib/klibc-*.so"), *x.glob("usr/lib/klibc-*.so")]:
        shutil.copy2(lib, tree / "lib" / lib.name)
    # modules: the closure of MODULES, then depmod for the busybox modprobe of the initramfs
    moddir = x / "lib" / "modules" / kver
    runner.run(["depmod", "-b", str(x), kver], timeout_s=300).check()     # the deb ships no modules.dep
    out = tree / "lib" / "modules" / kver
    for rel in _closure(moddir, MODULES):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(moddir / rel, out / rel)
    for meta in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (moddir / meta).exists():
            shutil.copy2(moddir / meta, out / meta)
    runner.run(["depmod", "-b", str(tree), kver], timeout_s=120).check()


def _digest(*parts: str | Path) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.read_bytes() if isinstance(part, Path) else part.encode())
        h.update(b"\0")
    return h.hexdigest()


def build_arm64_image(workdir: Path, progress: Callable[[str], None] = print,
                      runner: Runner | None = None) -> Arm64Image:
    """Build (or reuse) the arm64 demo image under ``workdir``; see the module docstring."""
    runner = runner or Runner()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    debs = download(workdir / "debs", runner, progress)
    kpkg = next(d for d in debs if d.name.startswith("linux-image-"))
    kver = kpkg.name.split("_")[0][len("linux-image-"):]
    inputs = sorted(p for p in data.INITRAMFS.rglob("*") if p.is_file())
    inputs += [INITRAMFS_TOOLS / "init", *(INITRAMFS_TOOLS / "scripts" / n for n in ("functions", "nfs", "local"))]
    digest = _digest(IMAGE_VERSION, INIT_WRAPPER, MOVE_DEV, *(d.name for d in debs), *inputs, BUSYBOX)
    image = Arm64Image(root=workdir / "root", kernel=workdir / "boot" / f"vmlinuz-{kver}",
                       initrd=workdir / "boot" / f"initrd.img-{kver}", kver=kver, grub=workdir / "grubaa64.efi")
    stamp = workdir / "arm64-image.stamp"
    done = [image.root / "sbin" / "init", image.kernel, image.initrd, image.grub]
    if stamp.is_file() and stamp.read_text().strip() == digest and all(p.exists() for p in done):
        progress(f"arm64 image: up to date ({workdir})")
        return image
    t0 = time.monotonic()
    x = workdir / "unpacked"
    shutil.rmtree(x, ignore_errors=True)
    for deb in debs:
        runner.run(["dpkg-deb", "-x", str(deb), str(x)], timeout_s=300).check()
    progress(f"arm64 image: initramfs for {kver} (BOOT=nfs, modules {', '.join(MODULES)})")
    tree = workdir / "initrd-tree"
    _initrd_tree(x, kver, tree, runner)
    boot = workdir / "boot"
    shutil.rmtree(boot, ignore_errors=True)
    boot.mkdir()
    tmp = boot / ".initrd.new"
    runner.run(["sh", "-c", 'cd "$1" && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 | gzip -6 > "$2"',
                "sh", str(tree), str(tmp)], timeout_s=300).check()
    os.replace(tmp, image.initrd)
    shutil.copy2(x / "boot" / f"vmlinuz-{kver}", image.kernel)
    shutil.copy2(x / GRUB_IN_DEB, image.grub)
    build_root(image.root)                     # the applet links of the host's busybox-static ...
    shutil.copy2(x / "bin" / "busybox", image.root / "bin" / "busybox")   # ... on the arm64 binary
    (image.root / "boot").mkdir()
    shutil.copy2(image.kernel, image.root / "boot" / image.kernel.name)
    shutil.copy2(image.initrd, image.root / "boot" / image.initrd.name)
    shutil.copytree(tree / "lib" / "modules" / kver, image.root / "lib" / "modules" / kver)
    sbin = image.root / "sbin"
    os.replace(sbin / "init", sbin / "init.demo")
    (sbin / "init").write_text(INIT_WRAPPER)
    os.chmod(sbin / "init", 0o755)
    shutil.rmtree(x, ignore_errors=True)
    shutil.rmtree(tree, ignore_errors=True)
    stamp.write_text(digest + "\n")
    progress(f"arm64 image: built in {time.monotonic() - t0:.0f} s")
    (workdir / "arm64-image.json").write_text(json.dumps({"kver": kver, "debs": [d.name for d in debs]}) + "\n")
    return image


if __name__ == "__main__":   # python3 -m sidusd.lab.arm64 WORKDIR
    import sys
    print(build_arm64_image(Path(sys.argv[1] if len(sys.argv) > 1 else "lab-state/arm64")))
