"""Overlay views: a generation published as a layer, served through a read-only overlay mount.

With views (``ImageStore(views=True)``, ``sidus-image --views``) generation N+1 is not
flattened into a hard-link farm: the upper directory its work wrote is kept as a layer
and ``gen-N`` is the mount point of a read-only overlayfs *view* of it over its parent's
layers down to a flat base generation (docs/images.md "Overlay views")::

    gen-0001/                 a flat base (a build, or a flattened generation)
    gen-0002/                 mount point of generation 2's view (an empty directory when unmounted)
    gen-0002.ovl/layer/       what generation 2 changed: generation 2's work overlay's upper directory
    gen-0002.ovl/stack        the view's layers, top first: "2 1" (2's layer, then base 1)
    gen-0002.ovl/vupper/      the view's own empty upper directory (index=on needs one: a lower-only
    gen-0002.ovl/vwork/       overlay's root handle does not decode) and work directory
    gen-0001.base/            base 1's tree after gc removed generation 1 while a view stacks on it

The mount options (what nfs-ganesha 4 needs to export an overlay, measured):
``ro,upperdir=vupper,workdir=vwork,lowerdir=<layer N>:...:<base>,index=on,nfs_export=on,
redirect_dir=nofollow,metacopy=off``.

Refcounts are the stacks themselves: a layer (or a base) is needed while a view
generation's ``stack`` names it; :func:`free_unneeded` removes what none names.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import time
from pathlib import Path

from sidusd.errors import BackendError
from sidusd.fsutil import atomic_write
from sidusd.image import layers
from sidusd.storage.runner import Runner

VIEW_OPTS = "ro,index=on,nfs_export=on,redirect_dir=nofollow,metacopy=off"
# Flatten when a stack would hold more layers than this above its base (docs/images.md): every
# name not in the top layer is looked up in each layer below (a cold lookup costs up to DEPTH+1
# lookups), and the lowerdir option lists every layer's path in one mount-option page (4 KiB).
DEFAULT_DEPTH = 8
# overlayfs takes up to 500 lower layers (OVL_MAX_STACK); the legacy mount(2) data is one page:
# 32 layers of paths up to 120 bytes fit with the other options.
MAX_DEPTH = 32
_KEEP_XATTRS = (layers.OPAQUE,)             # what a lower layer needs (whiteouts are char devices 0/0)


def ovl_dir(image_dir: Path, number: int) -> Path:
    return Path(image_dir) / f"gen-{number:04d}.ovl"


def base_kept(image_dir: Path, number: int) -> Path:
    """Where a base generation's tree goes when gc removes the generation but a stack needs it."""
    return Path(image_dir) / f"gen-{number:04d}.base"


def check_depth(depth: int) -> int:
    """``depth`` if it is a valid stack depth; else ValueError with the reason."""
    if not 1 <= depth <= MAX_DEPTH:
        raise ValueError(f"view depth {depth}: must be 1..{MAX_DEPTH} (overlayfs takes one mount-option "
                         f"page of lower directories; each layer costs a lookup on a cold path)")
    return depth


def stack_of(image_dir: Path, number: int) -> list[int] | None:
    """Generation ``number``'s stack (its layers, top first, then its base), or None: not a view."""
    try:
        text = (ovl_dir(image_dir, number) / "stack").read_text()
    except OSError:
        return None
    try:
        return [int(x) for x in text.split()] or None
    except ValueError:
        return None


def parent_stack(image_dir: Path, parent: int) -> list[int]:
    """The layers a child of ``parent`` works over: the parent's stack, or ``[parent]`` (flat)."""
    return stack_of(image_dir, parent) or [parent]


def layer_paths(image_dir: Path, stack: list[int]) -> list[Path]:
    """The directories of ``stack`` (top first): each generation's layer, then the base's tree."""
    d = Path(image_dir)
    out = [ovl_dir(d, k) / "layer" for k in stack[:-1]]
    base = d / f"gen-{stack[-1]:04d}"
    out.append(base if not os.path.lexists(base_kept(d, stack[-1])) else base_kept(d, stack[-1]))
    return out


def strip_overlay_xattrs(layer: Path) -> None:
    """Drop overlayfs's bookkeeping of the work mount (``origin``, ``impure``...) from a finished
    upper directory, keeping what makes it a layer (opaque directories, whiteouts): the entries
    are then plain files that a view reads and a flatten can hard-link."""
    for dirpath, dirnames, filenames in os.walk(layer):
        for n in ["", *dirnames, *filenames]:
            p = os.path.join(dirpath, n) if n else dirpath
            for a in os.listxattr(p, follow_symlinks=False):
                if a.startswith(layers.OVL_XATTR) and a not in _KEEP_XATTRS:
                    os.removexattr(p, a, follow_symlinks=False)


def count_layer(layer: Path) -> layers.Changes:
    """What a layer changed (the same counts as :func:`layers.apply_upper` reports)."""
    ch = layers.Changes()
    for dirpath, dirnames, filenames in os.walk(layer):
        ch.dirs += len(dirnames)
        for n in filenames:
            st = os.lstat(os.path.join(dirpath, n))
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                ch.removed += 1
            else:
                ch.files += 1
                ch.bytes += st.st_blocks * 512
    return ch


def publish_layer(image_dir: Path, number: int, part: Path, stack: list[int]) -> layers.Changes:
    """Keep generation ``number``'s work upper (``gen-N.layer/upper``, unmounted) as its layer and
    record its ``stack``; the rest of the work layer (overlayfs's work dir) is removed."""
    work = layers.layer_dir(part)
    od = ovl_dir(image_dir, number)
    if os.path.lexists(od):                         # a number used again after a drop
        shutil.rmtree(od)
    od.mkdir(mode=0o700)
    upper = work / "upper"
    strip_overlay_xattrs(upper)
    ch = count_layer(upper)
    # a new root directory for the layer, the upper's entries moved into it: overlayfs marks the
    # upper root "in use" until the work mount's superblock goes, which a copy of the mount in
    # another mount namespace (a process unshared meanwhile) delays, and a view refuses such a lower
    layer = od / "layer"
    layer.mkdir(mode=0o755)
    ust = os.lstat(upper)
    for e in os.listdir(upper):
        os.rename(upper / e, layer / e)
    layers.set_dir_meta(str(upper), ust, str(layer))
    os.utime(layer, ns=(ust.st_atime_ns, ust.st_mtime_ns), follow_symlinks=False)
    _view_dirs(od)
    atomic_write(od / "stack", (" ".join(str(k) for k in stack) + "\n").encode())
    shutil.rmtree(work)                             # overlayfs's (empty) work directory and the stack file
    return ch


def probe(image_dir: Path, runner: Runner) -> None:
    """Refuse views where they would not be served: mount a tiny view with :data:`VIEW_OPTS` next
    to the generations and check the kernel kept ``index=on`` and ``nfs_export=on`` (it falls back
    to off, with only a kernel log line, on a file system without usable file handles)."""
    d = Path(image_dir) / ".view-probe"
    shutil.rmtree(d, ignore_errors=True)
    for sub in ("lower", "upper", "work", "mnt"):
        (d / sub).mkdir(parents=True)
    opts = f"{VIEW_OPTS},upperdir={d / 'upper'},workdir={d / 'work'},lowerdir={d / 'lower'}"
    try:
        res = runner.run(["mount", "-t", "overlay", "-o", opts, "sidus-view-probe", str(d / "mnt")])
        if not res.ok:
            raise BackendError(f"overlay views refused: the kernel cannot mount one under {image_dir}",
                               detail=(res.err or res.out).strip())
        try:
            kept = _super_opts(d / "mnt")
        finally:
            runner.run(["umount", str(d / "mnt")])
        lost = [o for o in ("index=on", "nfs_export=on") if o not in kept]
        if lost:
            raise BackendError(f"overlay views refused under {image_dir}: the kernel dropped "
                               f"{', '.join(lost)} (no NFS export of a view; see dmesg)")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _super_opts(mp: Path) -> set[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            parts = line.split(" ")
            if len(parts) > 4 and parts[4] == str(mp):
                return set(parts[-1].strip().split(","))
    return set()


def _view_dirs(od: Path) -> None:
    """The view's own empty upper and work directories (old ones, which a mount in another mount
    namespace may still hold -- overlayfs refuses an upper in use -- are renamed away, never
    removed under a mount; they go with the layer).  The view's root directory is its upper's
    (an overlay shows a merged directory with the upper one's attributes): it gets the layer
    root's owner, mode, xattrs and times."""
    for sub in ("vupper", "vwork"):
        if os.path.lexists(od / sub):
            os.rename(od / sub, od / f"{sub}.old.{time.time_ns()}")
        (od / sub).mkdir(mode=0o755)
    top = os.lstat(od / "layer")
    layers.set_dir_meta(str(od / "layer"), top, str(od / "vupper"))
    os.utime(od / "vupper", ns=(top.st_atime_ns, top.st_mtime_ns), follow_symlinks=False)


def _source(image_dir: Path, number: int) -> str:
    return f"sidus-view-{Path(image_dir).name}-{number:04d}"


def mount_opts(image_dir: Path, number: int, stack: list[int]) -> str:
    od = ovl_dir(image_dir, number)
    lower = ":".join(str(p) for p in layer_paths(image_dir, stack))
    return f"{VIEW_OPTS},upperdir={od / 'vupper'},workdir={od / 'vwork'},lowerdir={lower}"


def mounted(path: Path) -> bool:
    return os.path.ismount(path)


def mount(image_dir: Path, number: int, runner: Runner) -> bool:
    """Mount generation ``number``'s view on ``gen-N`` unless it is mounted (idempotent); True
    when this call mounted it.  BackendError says what the kernel said."""
    stack = stack_of(image_dir, number)
    root = Path(image_dir) / f"gen-{number:04d}"
    if stack is None:
        raise BackendError(f"generation {number} of {image_dir} is not a view")
    if mounted(root):
        return False
    missing = [str(p) for p in layer_paths(image_dir, stack) if not p.is_dir()]
    if missing:
        raise BackendError(f"cannot mount the view of {root}: layers missing", detail=", ".join(missing))
    root.mkdir(mode=0o755, exist_ok=True)
    argv = ["mount", "-t", "overlay", "-o", mount_opts(image_dir, number, stack), _source(image_dir, number),
            str(root)]
    res = runner.run(argv)
    if not res.ok and not mounted(root):        # its upper still held by an unmounted view's copy in
        _view_dirs(ovl_dir(image_dir, number))  # another mount namespace: an empty upper is as good
        res = runner.run(argv)
    if not res.ok and mounted(root):            # mounted meanwhile (another sidus-image): idempotent
        return False
    if not res.ok:
        raise BackendError(f"cannot mount the overlay view {root}", detail=(res.err or res.out).strip())
    return True


def umount(image_dir: Path, number: int, runner: Runner) -> None:
    root = Path(image_dir) / f"gen-{number:04d}"
    if mounted(root):
        res = runner.run(["umount", str(root)])
        if not res.ok:
            raise BackendError(f"cannot unmount the view {root} (in use? an NFS export of it?)",
                               detail=(res.err or res.out).strip())


def view_numbers(image_dir: Path) -> list[int]:
    """Generations of the image at ``image_dir`` that are views (a ``gen-N`` with a stack)."""
    d = Path(image_dir)
    out = []
    for p in d.glob("gen-*.ovl") if d.is_dir() else ():
        n = int(p.name[4:-4])
        if (d / f"gen-{n:04d}").is_dir() and stack_of(d, n) is not None:
            out.append(n)
    return sorted(out)


def needed(image_dir: Path) -> set[int]:
    """Layers and bases some view's stack names (the refcounts: one per naming stack)."""
    return {k for n in view_numbers(image_dir) for k in stack_of(image_dir, n) or ()}


def kept_numbers(image_dir: Path) -> set[int]:
    """Numbers of layers and bases on disk (a new generation never takes one)."""
    d = Path(image_dir)
    return {int(p.name.split(".")[0][4:]) for p in (*d.glob("gen-*.ovl"), *d.glob("gen-*.base"))}


def free_unneeded(image_dir: Path) -> list[str]:
    """Remove the layers and kept bases of removed generations that no stack needs any more."""
    d = Path(image_dir)
    need, freed = needed(d), []
    for p in sorted([*d.glob("gen-*.ovl"), *d.glob("gen-*.base")]):
        n = int(p.name.split(".")[0][4:])
        if n in need or (p.suffix == ".ovl" and (d / f"gen-{n:04d}").is_dir()):
            continue
        shutil.rmtree(p)
        freed.append(p.name)
    return freed


def remove(image_dir: Path, number: int, runner: Runner) -> None:
    """Remove generation ``number`` (a view or a flat tree) keeping what other stacks need: a view
    is unmounted and its mount point removed, its layer stays while a descendant stacks on it; a
    flat base that a view stacks on becomes ``gen-N.base``."""
    d = Path(image_dir)
    root = d / f"gen-{number:04d}"
    if stack_of(d, number) is not None:
        umount(d, number, runner)
        if root.is_dir():
            root.rmdir()
    elif number in needed(d) and root.is_dir():
        os.rename(root, base_kept(d, number))
    free_unneeded(d)


def mount_all(images_dir: Path, runner: Runner | None = None) -> list[tuple[str, int, str]]:
    """(Re)mount every view of every image under ``images_dir`` (idempotent): (image, gen, what)."""
    runner = runner or Runner()
    out = []
    d = Path(images_dir)
    for img in sorted(p for p in d.iterdir() if p.is_dir() and not p.is_symlink()) if d.is_dir() else ():
        for n in view_numbers(img):
            try:
                out.append((img.name, n, "mounted" if mount(img, n, runner) else "already mounted"))
            except BackendError as e:
                out.append((img.name, n, f"FAILED: {e} {e.detail or ''}".strip()))
    return out


def umount_all(images_dir: Path, runner: Runner | None = None) -> None:
    runner = runner or Runner()
    d = Path(images_dir)
    for img in sorted(p for p in d.iterdir() if p.is_dir()) if d.is_dir() else ():
        for n in view_numbers(img):
            umount(img, n, runner)


def main(argv: list[str] | None = None) -> int:
    """``python -m sidusd.image.views IMAGES_DIR``: mount every view (sidus-views.service)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m sidusd.image.views IMAGES_DIR", file=sys.stderr)
        return 2
    rc = 0
    for img, n, what in mount_all(Path(args[0])):
        print(f"{img} generation {n}: {what}")
        rc = 1 if what.startswith("FAILED") else rc
    return rc


if __name__ == "__main__":
    sys.exit(main())
