"""Publishing a generation's kernel and initrd where sidusd serves them over TFTP.

The TFTP server refuses symlinks (sidusd.net.files.open_confined) and
nfs-ganesha refuses an export path through a symlink (ELOOP), so nothing
served goes through ``current``: each generation has its own kernel/initrd
copies and its own root directory, and the *generated images file*
(``images_file:`` in sidus.yaml) says which generation each image name serves::

    <tftp_root>/images/<name>/gen-0002/vmlinuz, initrd.img   one file per generation
    <images_dir>/images.yaml     images: {<name>: gen N's root/kernel/initrd, <name>.gen-N: ...}

A generation whose kernel (or initrd) is the parent's, byte for byte, gets a hard link to the
parent's published file instead of a copy (:func:`publish_generation`): no new bytes, and
nothing written into the parent's file (the link is made under a temporary name and renamed
into the new generation's directory; a changed file is a new inode).  ``gc`` removing one
generation's directory unlinks its names only: a file another generation links stays.

Switching generations = rewriting that file atomically + ``sidusctl reload``
(see docs/images.md).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from sidusd.errors import BackendError
from sidusd.fsutil import _fsync_dir, atomic_write

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
        if m is None:
            continue
        initrd = boot / f"initrd.img-{m.group(1)}"
        if p.is_file() and not p.is_symlink() and initrd.is_file() and not initrd.is_symlink():
            found.append(BootFiles(m.group(1), p, initrd))
    if not found:
        raise BackendError(f"no kernel with an initrd in {boot}",
                           detail="the recipe needs linux-image-<arch> (and initramfs-tools)")
    return max(found, key=lambda b: _version_key(b.kver))



def boot_meta(root: Path) -> dict[str, str]:
    """``kernel``/``initrd``/``kver`` of the generation at ``root`` for its meta record; empty
    when the tree has no kernel (yet): a generation without one is kept, just not bootable."""
    try:
        bf = find_boot_files(root)
    except BackendError:
        return {}
    return {"kernel": bf.kernel.name, "initrd": bf.initrd.name, "kver": bf.kver}

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


def _same_bytes(a: Path, b: Path, chunk: int = 1 << 20) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


def _parent_file(src: Path, parent_src: Path | None, published: Path) -> bool:
    """Whether ``published`` (the parent generation's TFTP file, made from ``parent_src``) has the
    bytes of ``src``: a plain 0644 file of the same size, and either the very inode the parent
    published (generations share unchanged inodes: immutable, so the same bytes) or equal bytes."""
    try:
        st, pst = os.stat(src), os.lstat(published)
    except OSError:
        return False
    if not stat.S_ISREG(pst.st_mode) or stat.S_IMODE(pst.st_mode) != 0o644 or pst.st_size != st.st_size:
        return False
    if parent_src is not None:
        with contextlib.suppress(OSError):
            if os.path.samestat(st, os.stat(parent_src)):
                return True
    try:
        return _same_bytes(src, published)
    except OSError:
        return False


def _link_atomic(existing: Path, dst: Path) -> bool:
    """``dst`` becomes a new name of ``existing``; False when the file system refuses the link
    (another file system, too many links: the caller copies)."""
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.tmp"
    try:
        tmp.unlink(missing_ok=True)
        os.link(existing, tmp, follow_symlinks=False)
        os.rename(tmp, dst)
        tmp.unlink(missing_ok=True)          # dst already was that inode: rename(2) did nothing
    except OSError:
        tmp.unlink(missing_ok=True)
        return False
    return True


def publish_generation(root: Path, tftp_root: Path, name: str, number: int, parent: int | None = None,
                       parent_root: Path | None = None) -> BootFiles:
    """Put generation ``number``'s kernel and initrd in its own directory under the TFTP root: a
    hard link to generation ``parent``'s published file when that has the same bytes (the kernel
    or initrd did not change), else a new copy.  ``parent_root``: the parent's root, whose boot
    files tell without reading them when the inode is the same."""
    bf = find_boot_files(root)
    d = tftp_dir(tftp_root, name) / f"gen-{number:04d}"
    d.mkdir(parents=True, exist_ok=True)
    pbf: BootFiles | None = None
    if parent is not None and parent_root is not None:
        with contextlib.suppress(BackendError, OSError):
            pbf = find_boot_files(parent_root)
    pd = tftp_dir(tftp_root, name) / f"gen-{parent:04d}" if parent is not None and parent != number else None
    for src, psrc, fname in ((bf.kernel, pbf.kernel if pbf else None, "vmlinuz"),
                             (bf.initrd, pbf.initrd if pbf else None, "initrd.img")):
        if not (pd is not None and _parent_file(src, psrc, pd / fname) and _link_atomic(pd / fname, d / fname)):
            _copy_atomic(src, d / fname)
    _fsync_dir(d)
    return bf


def boot_sharing(tftp_root: Path, name: str, numbers: list[int]) -> dict[int, tuple[int, int]]:
    """Generation -> (own bytes, shared bytes) of its published kernel and initrd (a file linked
    by several generations is shared; ``gc`` of one frees only its own); (0, 0) if none."""
    from sidusd.image.history import sharing
    dirs = {n: tftp_dir(tftp_root, name) / f"gen-{n:04d}" for n in numbers}
    out = sharing({n: p for n, p in dirs.items() if p.is_dir()})
    return {n: out.get(n, (0, 0)) for n in numbers}


def unpublish_generation(tftp_root: Path, name: str, number: int) -> None:
    """Remove generation ``number``'s copies from the TFTP root (gc)."""
    shutil.rmtree(tftp_dir(tftp_root, name) / f"gen-{number:04d}", ignore_errors=True)


def images_entries(store, tftp_root: Path) -> dict[str, dict[str, str]]:
    """The ``images:`` mapping for sidus.yaml's ``images_file``: per image, its served generation
    under the image's name and every generation as ``<name>.gen-N`` (to pin hosts); only
    generations with a published kernel + initrd are bootable, so only those are listed."""
    out: dict[str, dict[str, str]] = {}
    for name in store.names():
        cur = store.current(name)
        for n in store.numbers(name):
            d = tftp_dir(tftp_root, name) / f"gen-{n:04d}"
            if not ((d / "vmlinuz").is_file() and (d / "initrd.img").is_file()):
                continue
            rel = f"{TFTP_SUBDIR}/{name}/gen-{n:04d}"
            entry = {"root": str(store.path(name, n).resolve()), "kernel": f"{rel}/vmlinuz",
                     "initrd": f"{rel}/initrd.img"}
            out[f"{name}.gen-{n}"] = entry
            if n == cur:
                out[name] = dict(entry)
    return dict(sorted(out.items()))


def write_images_file(path: Path, entries: dict[str, dict[str, str]]) -> None:
    """Replace the generated images file atomically (readers see the old or the new one)."""
    from sidusd.yamlstrict import dump_yaml
    text = ("# written by sidus-image: do not edit (docs/images.md); sidus.yaml names it in images_file\n"
            + dump_yaml({"images": entries}))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), text.encode())


# -- "served": only when sidusd says so ----------------------------------------------

SERVED, UNCONFIRMED, NOT_SERVED = "served", "unconfirmed", "not served"


@dataclass(frozen=True)
class Served:
    """Whether sidusd serves a generation: ``state`` (served, unconfirmed, not served) and the words."""
    state: str
    text: str

    @property
    def refused(self) -> bool:
        return self.state == NOT_SERVED


def judge_served(result: dict, name: str, root: Path) -> Served:
    """sidusd's ``images.status`` answer about image ``name``, for generation root ``root`` (pure)."""
    if Path(str(result.get("root"))) != Path(root):
        return Served(NOT_SERVED, f"NOT served: sidusd serves {name} from {result.get('root')}, not {root} "
                                  "(see `sidusctl status`: last reload)")
    why = list(result.get("problems") or [])
    if result.get("exported") is False:
        why.append(f"{root} is not exported by the NFS backend ({result.get('nfs_backend')}; see sidusctl status)")
    if result.get("render_error"):
        why.append(f"its boot config does not render: {result['render_error']}")
    if why:
        return Served(NOT_SERVED, "NOT served: " + "; ".join(why))
    if result.get("exported") is None:
        return Served(SERVED, "served (nfs.backend is none: the NFS export is yours to make)")
    return Served(SERVED, "served (exported, boot config rendered)")


def confirm_served(control_socket: Path | None, name: str, root: Path, timeout_s: float = 30) -> Served:
    """Ask sidusd (control socket, ``images.status``) whether it serves ``root`` as image ``name``."""
    if control_socket is None:
        return Served(UNCONFIRMED, "switched; not confirmed served: no control socket to ask sidusd "
                                   "(`sidusctl reload`, then `sidusctl status`)")
    from sidusd.control import messages as m
    from sidusd.ctl import CtlError, call
    try:
        resp = call(str(control_socket), m.OP_IMAGES_STATUS, {"name": name}, timeout_s)
    except CtlError as exc:
        return Served(NOT_SERVED, f"NOT confirmed served: {exc}")
    if not resp.ok:
        return Served(NOT_SERVED, f"NOT served: sidusd says: {resp.error}")
    return judge_served(resp.result if isinstance(resp.result, dict) else {}, name, root)
