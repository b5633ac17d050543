"""``sidus-image import NAME DIR``: a hand-made SIDUS tree becomes generation 1 of an image.

The tree (the documentation's ``/srv/nfsroot/sidus``: debootstrap'd, the aufs ``rootaufs``
init-bottom script, ``/etc/hostname`` removed) is copied into ``gen-0001.partial``
(``cp -a --reflink=auto --one-file-system``), or with ``in_place`` renamed there (same file
system, no copy; put back where it was if the import fails).  Then, like a build
(:mod:`sidusd.image.build`), in a :class:`~sidusd.image.chroot.Chroot`:

1. ``rootaufs``  every ``etc/initramfs-tools/scripts/*/rootaufs*`` moves to
   ``etc/initramfs-tools/disabled-by-sidus/`` (it would fight sidus's overlay over the root),
   and the ``aufs`` line of ``etc/initramfs-tools/modules`` is commented out (no current kernel
   has aufs).
2. ``initramfs``  sidus's hook, init-bottom script and module list (the builder's
   :func:`~sidusd.image.build.initramfs_files`) are installed; the site's own ``modules`` lines
   are kept; ``initramfs.conf`` gets ``BOOT=nfs``, ``BUSYBOX=y`` and an empty ``DEVICE=`` (the
   documentation's ``DEVICE=eth0`` is not a name the initramfs's udev gives today);
   ``update-initramfs`` runs inside for every kernel (:data:`~sidusd.image.stages.INITRAMFS_SCRIPT`).
   A tree without initramfs-tools whose newest kernel's initrd already carries sidus's
   ``scripts/init-bottom/sidus-overlay`` (one made on the host from ``.deb`` files, like the arm64
   lab's, sidusd/lab/arm64.py) keeps that initrd: no initramfs stage (``own_initrd`` in the meta).
3. ``hostname``  no ``/etc/hostname``; on a systemd tree the builder's sidus-hostname unit names
   the machine from ``sidus.hostname=`` or DHCP.

The newest ``boot/vmlinuz-*`` with its initrd is published and served, the same way as a build's.

The generation is marked with the tree's architecture (``architecture`` in its meta record): the
ELF header of its ``bin/sh`` (:func:`sidusd.image.bootarch.tree_arch`).  ``--arch ARCH`` says
what the tree must be: another is refused before anything is copied, with what it is.  A foreign
tree (arm64 on an amd64 host) needs qemu-user-static's handler for ``update-initramfs``
(:func:`sidusd.image.arch.prepare_foreign`), and its kernel and initrd are checked to be of its
architecture before they are published (:func:`sidusd.image.arch.verify_generation`).
"""

from __future__ import annotations

import lzma
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

from sidusd.errors import BackendError, ConfigError, SidusError
from sidusd.image import stages as st
from sidusd.image.build import Administrator, initramfs_files
from sidusd.image.chroot import mounts_under
from sidusd.image.stages import Stage
from sidusd.observability import get_logger

log = get_logger("image.import")
SCRIPTS = "etc/initramfs-tools/scripts"
DISABLED = "etc/initramfs-tools/disabled-by-sidus"
MODULES = "etc/initramfs-tools/modules"
CONF = "etc/initramfs-tools/initramfs.conf"
COPY_TIMEOUT_S = 3600
OVERLAY = "scripts/init-bottom/sidus-overlay"      # = sidusd.image.bootarch.OVERLAY


@dataclass(frozen=True)
class Found:
    """What :func:`check_tree` found in a tree."""
    kernels: tuple[str, ...]
    rootaufs: tuple[str, ...]
    systemd: bool
    own_initrd: bool = False      # no initramfs-tools, an initrd with sidus's overlay script: kept


def check_tree(src: Path) -> Found:
    """Refuse what cannot become an image (the message says why and what to do)."""
    if not src.is_dir() or src.is_symlink():
        raise ConfigError("DIR", f"{src} is not a directory")
    if Path(os.path.realpath(src)) == Path("/"):
        raise ConfigError("DIR", "/ is this machine's own root, not an image tree")
    for rel, why in (("etc", "no etc/: not a root file system"),
                     ("bin/sh", "no bin/sh: nothing can run inside (update-initramfs)")):
        p = src / rel
        if not (p.exists() or p.is_symlink()):
            raise ConfigError("DIR", f"{src}: {why}")
    kernels = tuple(sorted(p.name[len("vmlinuz-"):] for p in (src / "boot").glob("vmlinuz-*")))
    if not kernels:
        raise ConfigError("DIR", f"{src}/boot has no vmlinuz-*: install a kernel in the tree "
                          "(linux-image-amd64)")
    own = False
    if not any((src / rel).exists() for rel in ("usr/sbin/update-initramfs", "sbin/update-initramfs")):
        own = _has_sidus_initrd(src)
        if not own:
            raise ConfigError("DIR", f"{src}: no usr/sbin/update-initramfs: install initramfs-tools in the tree "
                              "first (chroot DIR apt-get install initramfs-tools), or bring an initrd with "
                              f"sidus's overlay script ({OVERLAY}) for its newest kernel")
    missing = [k for k in kernels if not (src / "lib" / "modules" / k).is_dir()
               and not (src / "usr" / "lib" / "modules" / k).is_dir()]
    if len(missing) == len(kernels):
        raise ConfigError("DIR", f"{src}: no lib/modules/ for kernel(s) {', '.join(missing)}")
    left = mounts_under(src)
    if left:
        raise ConfigError("DIR", f"something is mounted in {src} ({', '.join(left)}): unmount it first "
                          "(the documentation's chroot mounts /proc, /sys, /run/shm, /dev/pts)")
    rootaufs = tuple(sorted(str(p.relative_to(src)) for p in (src / SCRIPTS).glob("*/rootaufs*")
                            if p.is_file()))
    return Found(kernels, rootaufs, (src / "etc" / "systemd").is_dir(), own)


def _has_sidus_initrd(src: Path) -> bool:
    """Whether the newest kernel of ``src`` has an initrd carrying sidus's overlay script."""
    from sidusd.image.bootarch import initrd_contents
    from sidusd.image.publish import find_boot_files
    try:
        return OVERLAY in initrd_contents(find_boot_files(src).initrd)[1]
    except (SidusError, OSError, EOFError, ValueError, zlib.error, lzma.LZMAError):   # none, or unreadable
        return False


def disable_rootaufs(root: Path) -> list[str]:
    """Move the rootaufs scripts out of the initramfs and comment out its ``aufs`` module."""
    done = []
    for p in sorted((root / SCRIPTS).glob("*/rootaufs*")):
        if not p.is_file():
            continue
        dst = root / DISABLED / p.relative_to(root / SCRIPTS)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(p, dst)
        os.chmod(dst, 0o644)
        done.append(f"{p.relative_to(root)} -> {dst.relative_to(root)}")
    mod = root / MODULES
    if mod.is_file() and not mod.is_symlink():
        lines = mod.read_text(errors="replace").splitlines()
        new = [f"# {ln}   # sidus import: aufs is replaced by overlay" if ln.split("#")[0].split()[:1] == ["aufs"]
               else ln for ln in lines]
        if new != lines:
            mod.write_text("\n".join(new) + "\n")
            done.append(f"{MODULES}: aufs commented out")
    return done


def import_plan(root: Path, initramfs: dict[str, bytes], systemd: bool, own_initrd: bool = False) -> list[Stage]:
    """The stages run on the imported root (its current modules file decides what is added;
    ``own_initrd``: no initramfs stage, the tree's initrd is kept)."""
    mod = root / MODULES
    site = mod.read_bytes() if mod.is_file() and not mod.is_symlink() else b""
    ours = initramfs["modules"]
    wanted = [ln for ln in ours.decode().splitlines() if ln.strip() and not ln.startswith("#")]
    have = {ln.split("#")[0].strip() for ln in site.decode(errors="replace").splitlines()}
    modules = site + (b"" if site.endswith(b"\n") or not site else b"\n") + ours if set(wanted) - have else site
    files = [(f"etc/initramfs-tools/{rel}", data, 0o755) for rel, data in sorted(initramfs.items())
             if rel != "modules"] + [(MODULES, modules, 0o644)]
    conf = ("sed", "-i", "-e", "s/^BOOT=.*/BOOT=nfs/", "-e", "s/^BUSYBOX=.*/BUSYBOX=y/",
            "-e", "s/^DEVICE=.*/DEVICE=/", "/" + CONF)
    stages = []
    if systemd:
        stages.append(Stage("hostname", "no /etc/hostname: sidus.hostname= or DHCP names the machine",
                            chroot=True, files=(("usr/lib/sidus/sidus-hostname", st.HOSTNAME_SCRIPT, 0o755),
                                                (st.HOSTNAME_UNIT_PATH, st.HOSTNAME_UNIT, 0o644)),
                            commands=(("mkdir", "-p", "/etc/systemd/system/sysinit.target.wants"),
                                      ("ln", "-sfn", f"/{st.HOSTNAME_UNIT_PATH}",
                                       "/etc/systemd/system/sysinit.target.wants/sidus-hostname.service")),
                            remove=("etc/hostname",)))
    else:
        stages.append(Stage("hostname", "no /etc/hostname", remove=("etc/hostname",)))
    if own_initrd:
        return stages
    stages.append(Stage("initramfs", "sidus overlay hook + modules, BOOT=nfs, update-initramfs inside",
                        chroot=True, files=tuple(files),
                        commands=((conf if (root / CONF).is_file() else ("true",)),
                                  ("sh", "-c", st.INITRAMFS_SCRIPT)),
                        timeout_s=1800))
    return stages


def tree_architecture(src: Path, wanted: str | None, host: str) -> str:
    """The architecture the imported tree is marked with; ConfigError when it is not ``wanted``."""
    from sidusd.image.bootarch import tree_arch
    found = tree_arch(src)
    if wanted is not None and found != wanted:
        what = (f"an {found} tree (its bin/sh is an {found} program)" if found else
                "a tree whose architecture cannot be told (no ELF program at bin/sh or bin/busybox)")
        raise ConfigError("--arch", f"{src} is {what}, not {wanted}: nothing imported")
    return found or host


def import_tree(adm: Administrator, name: str, src: Path, in_place: bool = False, switch: bool = True,
                keep_failed: bool = False, arch: str | None = None) -> int:
    """Adopt ``src`` as generation 1 of image ``name``; its number (1).  ``arch``: what the tree
    must be (None: whatever its programs are)."""
    from sidusd.image.arch import host_architecture, prepare_foreign, verify_generation, with_arch_name
    src = Path(os.path.abspath(src))
    found = check_tree(src)
    architecture = tree_architecture(src, with_arch_name(arch), host_architecture())
    if adm.store.numbers(name):
        raise ConfigError("NAME", f"image {name} exists already ({adm.store.image_dir(name)}): import makes "
                          "generation 1 of a new image; pick another name")
    images = Path(os.path.realpath(adm.store.dir))
    real = Path(os.path.realpath(src))
    if real == images or images in real.parents or real in images.parents:
        raise ConfigError("DIR", f"{src} and the images directory {adm.store.dir} contain one another")
    if in_place:
        adm.store.dir.mkdir(parents=True, exist_ok=True)
        if os.stat(src).st_dev != os.stat(adm.store.dir).st_dev:
            raise ConfigError("--in-place", f"{src} is not on the file system of {adm.store.dir}: it cannot be "
                              "moved without a copy (drop --in-place to copy it)")
    initramfs = initramfs_files()
    if not found.own_initrd:                      # update-initramfs runs inside: the handler, or why not
        prepare_foreign(architecture, adm.out)

    def work(part: Path, logfile: Path) -> dict:
        if in_place:
            os.rmdir(part)
            os.rename(src, part)
        try:
            if not in_place:
                adm.runner.run(["cp", "-a", "--reflink=auto", "--one-file-system", f"{src}/.", str(part)],
                               timeout_s=COPY_TIMEOUT_S).check()
            done = disable_rootaufs(part)
            for line in done:
                print(f"rootaufs: {line}", file=adm.out, flush=True)
            meta = adm._stages(import_plan(part, initramfs, found.systemd, found.own_initrd), part, logfile, None)
        except BaseException:
            if in_place and part.exists() and not src.exists():
                os.rename(part, src)           # put the site's tree back where it was
                log.warning("image.import.restored", path=str(src))
            raise
        if not meta.get("kernel"):
            raise BackendError(f"no kernel with an initrd in {src}/boot after update-initramfs",
                               detail=f"kernels: {', '.join(found.kernels)}")
        meta.update(verify_generation(part, architecture, adm.runner))
        meta.update(source=str(src), in_place=in_place, rootaufs_disabled=done, own_initrd=found.own_initrd)
        return meta

    n = adm._new_generation(name, None, "import", work, switch, keep_failed)
    if in_place:
        print(f"{name}: {src} is now {adm.store.path(name, n)} (administer it with sidus-image run/shell; "
              f"the old exports of {src} are gone)", file=adm.out, flush=True)
    return n

