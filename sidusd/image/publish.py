"""Publishing a generation's kernel and initrd where sidusd serves them over TFTP.

The TFTP server refuses symlinks (sidusd.net.files.open_confined), so the
served kernel and initrd are *copies*::

    <tftp_root>/images/<name>/gen-0002/vmlinuz, initrd.img   one copy per generation
    <tftp_root>/images/<name>/vmlinuz, initrd.img            the served generation's, replaced by rename(2)

The ``images:`` entry of sidus.yaml names the stable pair and the stable root
``<images_dir>/<name>/current`` (see :func:`config_snippet` and docs/images.md).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from sidusd.errors import BackendError
from sidusd.fsutil import _fsync_dir

TFTP_SUBDIR = "images"
_KVER = re.compile(r"^vmlinuz-(\d+\.\d+[A-Za-z0-9.+~_-]*)$")


@dataclass(frozen=True)
class BootFiles:
    """Kernel and initrd of one generation's root."""
    kver: str
    kernel: Path
    initrd: Path


def _version_key(kver: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", kver)]


def find_boot_files(root: Path) -> BootFiles:
    """The newest ``boot/vmlinuz-*`` of ``root`` that has its ``boot/initrd.img-*``."""
    boot = Path(root) / "boot"
    found = []
    for p in boot.glob("vmlinuz-*") if boot.is_dir() else ():
        m = _KVER.fullmatch(p.name)
        initrd = boot / f"initrd.img-{m.group(1)}" if m else None
        if m and p.is_file() and not p.is_symlink() and initrd.is_file() and not initrd.is_symlink():
            found.append(BootFiles(m.group(1), p, initrd))
    if not found:
        raise BackendError(f"no kernel with an initrd in {boot}",
                           detail="the recipe needs linux-image-<arch> (and initramfs-tools)")
    return max(found, key=lambda b: _version_key(b.kver))


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.tmp"
    try:
        shutil.copyfile(src, tmp, follow_symlinks=False)
        os.chmod(tmp, 0o644)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.rename(tmp, dst)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise BackendError(f"cannot publish {dst}", detail=str(e)) from e


def tftp_dir(tftp_root: Path, name: str) -> Path:
    return Path(tftp_root) / TFTP_SUBDIR / name


def publish_generation(root: Path, tftp_root: Path, name: str, number: int) -> BootFiles:
    """Copy generation ``number``'s kernel and initrd to its own directory under the TFTP root."""
    bf = find_boot_files(root)
    d = tftp_dir(tftp_root, name) / f"gen-{number:04d}"
    d.mkdir(parents=True, exist_ok=True)
    _copy_atomic(bf.kernel, d / "vmlinuz")
    _copy_atomic(bf.initrd, d / "initrd.img")
    _fsync_dir(d)
    return bf


def serve_generation(tftp_root: Path, name: str, number: int) -> None:
    """Make generation ``number``'s published pair the served one (initrd first, then kernel)."""
    d = tftp_dir(tftp_root, name)
    src = d / f"gen-{number:04d}"
    if not (src / "vmlinuz").is_file() or not (src / "initrd.img").is_file():
        raise BackendError(f"generation {number} of {name} has no published kernel/initrd in {src}")
    _copy_atomic(src / "initrd.img", d / "initrd.img")
    _copy_atomic(src / "vmlinuz", d / "vmlinuz")
    _fsync_dir(d)


def unpublish_generation(tftp_root: Path, name: str, number: int) -> None:
    """Remove generation ``number``'s copies from the TFTP root (gc)."""
    shutil.rmtree(tftp_dir(tftp_root, name) / f"gen-{number:04d}", ignore_errors=True)


def config_snippet(name: str, served_root: Path, append: str = "") -> str:
    """The ``images:`` entry of sidus.yaml for an image built here."""
    lines = [f"  {name}:", f"    root: {served_root}",
             f"    kernel: {TFTP_SUBDIR}/{name}/vmlinuz", f"    initrd: {TFTP_SUBDIR}/{name}/initrd.img"]
    if append:
        lines.append(f"    append: \"{append}\"")
    return "images:\n" + "\n".join(lines) + "\n"
