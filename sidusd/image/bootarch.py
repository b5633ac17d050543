"""What a tree's kernel, initrd and programs are built for: a check before anything is published.

A build for arm64 that ended with an amd64 kernel (a recipe naming ``linux-image-amd64``, a
debootstrap that ignored ``--arch``) would be published, served and fail on every arm64 machine at
the firmware's ``LoadImage``.  :func:`check_boot_files` refuses such a generation before its commit:
the kernel's header (:func:`sidusd.image.foreign.kernel_arch`), every ELF program and module in the
initrd (:func:`sidusd.image.foreign.elf_arch`; there must be one), and sidus's overlay script in it.
:func:`tree_arch` says what a tree to import is, from its ``/bin/sh`` (or busybox) ELF header.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import tempfile
from collections import Counter
from pathlib import Path

from sidusd.errors import BackendError
from sidusd.image import foreign
from sidusd.image.publish import find_boot_files
from sidusd.storage.runner import Runner

HEAD = 4096
#: sidus's init-bottom script, which every initrd of an image carries (sidusd/data/initramfs)
OVERLAY = "scripts/init-bottom/sidus-overlay"
EXTERNAL = {"zstd": ("zstd", "-q", "-d", "-f"), "lz4": ("lz4", "-q", "-d", "-f"), "lzop": ("lzop", "-q", "-d", "-f")}
MAX_INITRD_BYTES = 1 << 30


def _kernel_head(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(HEAD)
    if foreign.compression(head) == "gzip":       # a gzip'd Image (some distributions' arm64 vmlinuz)
        with gzip.open(path, "rb") as g:
            head = g.read(HEAD)
    return head


def kernel_file_arch(path: Path) -> str | None:
    """The architecture of the kernel image at ``path`` (None: not recognised)."""
    return foreign.kernel_arch(_kernel_head(path))


def _decompress(part: bytes, runner: Runner | None) -> bytes:
    kind = foreign.compression(part)
    if kind == "cpio":
        return part
    if kind == "gzip":
        return gzip.decompress(part)
    if kind in ("xz", "lzma"):
        return lzma.decompress(part)
    if kind == "bzip2":
        return bz2.decompress(part)
    if kind in EXTERNAL:
        with tempfile.TemporaryDirectory(prefix="sidus-initrd-") as d:
            src, out = Path(d) / "in", Path(d) / "out"
            src.write_bytes(part)
            (runner or Runner()).run([*EXTERNAL[kind], str(src), "-o", str(out)], timeout_s=600).check()
            if out.stat().st_size > MAX_INITRD_BYTES:
                raise BackendError("initrd too large to inspect", detail=f"{out.stat().st_size} bytes")
            return out.read_bytes()
    raise BackendError("initrd of unknown compression", detail=f"starts {part[:8].hex()}")


def initrd_contents(path: Path, runner: Runner | None = None) -> tuple[Counter[str], set[str]]:
    """(architectures of the ELF files -> count, member names) of the initramfs at ``path``."""
    data = path.read_bytes()
    start = foreign.skip_early_cpio(data)
    names: set[str] = set()
    archs: Counter[str] = Counter()
    early = data[:start]
    for blob in (early, _decompress(data[start:], runner) if start < len(data) else b""):
        pos = 0
        while pos < len(blob):
            it = foreign.cpio_files(blob, pos)
            try:
                while True:
                    name, mode, body = next(it)
                    names.add(name.removeprefix("./"))
                    if mode & 0o170000 == 0o100000:
                        a = foreign.elf_arch(body[:20])
                        if a is not None:
                            archs[a] += 1
            except StopIteration as stop:
                end = stop.value
            if end is None or end <= pos:
                break
            pos = end
            while pos < len(blob) and blob[pos] == 0:
                pos += 1
    return archs, names


def boot_problem(arch: str, kernel: str | None, initrd_archs: Counter[str], has_overlay: bool) -> str | None:
    """Why these boot files must not be published under an ``arch`` image (None: they may) (pure)."""
    ok_kernel = {arch} | ({"x86"} if arch in ("amd64", "i386") else set())
    if kernel not in ok_kernel:
        return f"the kernel is {kernel or 'not a kernel image known here'}, not {arch}"
    if not initrd_archs:
        return "the initrd has no program (no ELF file): not an initramfs-tools initrd"
    other = {a: n for a, n in initrd_archs.items() if a != arch}
    if other:
        return (f"the initrd has programs for {', '.join(f'{a} ({n})' for a, n in sorted(other.items()))}, "
                f"besides {initrd_archs.get(arch, 0)} for {arch}")
    if not has_overlay:
        return f"the initrd has no {OVERLAY} (sidus's overlay hook did not run)"
    return None


def check_boot_files(root: Path, arch: str, runner: Runner | None = None) -> dict[str, object]:
    """BackendError unless ``root``'s newest kernel and its initrd are ``arch`` ones (see the module
    docstring); what was found, for the generation's meta record."""
    bf = find_boot_files(root)
    kernel = kernel_file_arch(bf.kernel)
    archs, names = initrd_contents(bf.initrd, runner)
    problem = boot_problem(arch, kernel, archs, OVERLAY in names)
    if problem is not None:
        raise BackendError(f"{bf.kernel.name} / {bf.initrd.name} are not a {arch} kernel and initrd; "
                           "nothing is published", detail=problem)
    return {"architecture": arch, "kernel_arch": kernel, "initrd_elf": dict(archs)}


def tree_arch(root: Path) -> str | None:
    """The architecture of a root file system tree's programs: the ELF behind ``bin/sh`` (its
    symlinks resolved inside the tree), else ``bin/busybox``; None when neither is an ELF."""
    root = Path(os.path.realpath(root))
    for rel in ("bin/sh", "usr/bin/sh", "bin/busybox", "usr/bin/busybox", "bin/dash", "usr/bin/dash"):
        p = _resolve_inside(root, rel)
        if p is None:
            continue
        try:
            with open(p, "rb") as f:
                a = foreign.elf_arch(f.read(20))
        except OSError:
            continue
        if a is not None:
            return a
    return None


def _resolve_inside(root: Path, rel: str, depth: int = 0) -> Path | None:
    """``rel`` under ``root`` with its symlinks (absolute ones too) taken as the tree's own."""
    parts = Path(rel).parts
    cur = root
    for i, part in enumerate(parts):
        nxt = cur / part
        if nxt.is_symlink():
            if depth > 20:
                return None
            target = os.readlink(nxt)
            base = root if target.startswith("/") else cur
            rest = os.path.normpath(os.path.join(str(base.relative_to(root)), target.lstrip("/"), *parts[i + 1:]))
            if rest.startswith(".."):
                return None
            return _resolve_inside(root, rest, depth + 1)
        cur = nxt
    return cur if cur.is_file() else None
