"""Generations that cost what changed: overlayfs for the work, a hard-link farm to publish.

Work on generation N+1 happens in an overlayfs mount (docs/images.md "How a
generation shares its parent's files")::

    gen-0003.partial/        the merged view: the chroot's root
    gen-0003.layer/upper/    every change (copied-up files, new files, whiteouts, opaque dirs)
    gen-0003.layer/work/     overlayfs's work directory
    gen-0003.layer/lower     the parent generation's number (text)

The lower directory is generation N itself, read-only to overlayfs: whatever
runs in the chroot (``>>``, ``sed -i``, chmod, setfattr, link, rename, dpkg)
changes only the upper directory, N's inodes are never opened for writing.

Publishing N+1 (:func:`flatten`): a new directory made by hard-linking N's
tree (``cp -a -l``: new directories, every other entry a new name of N's inode;
cost O(number of entries), not bytes) -- made by a :class:`Farm` started with
the overlay, so it is built while the work runs (N is immutable, the farm
does not depend on what the work does) -- then the upper layer applied by
*replacing entries*, never by writing into an inode: a changed file is
``rename(2)``-d from the upper layer over its name (the shared inode only loses
a link), a whiteout (char device 0/0) removes the name, an opaque directory
(``trusted.overlay.opaque=y``) replaces the whole directory, and directories'
metadata (mode, owner, xattrs, times) is set on N+1's own new directories.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from sidusd.errors import BackendError
from sidusd.storage.runner import Runner

# redirect_dir=off: renaming a lower directory copies it up whole (rename(2) gets EXDEV and mv
# copies), so the upper layer never holds a redirect we would have to follow; metacopy=off: a
# chmod copies the data up too, so every upper file is complete; index=off, xino=off: no
# state outside upper/work.
OVERLAY_OPTS = "redirect_dir=off,metacopy=off,index=off,xino=off"
OVL_XATTR = "trusted.overlay."
OPAQUE = "trusted.overlay.opaque"
FARM_TIMEOUT_S = 3600


@dataclass
class Changes:
    """What one upper layer changed: names replaced or added, names removed, directories
    whose metadata or entries changed, bytes of the replaced/added files (st_blocks)."""
    files: int = 0
    removed: int = 0
    dirs: int = 0
    bytes: int = 0

    def as_meta(self) -> dict:
        return {"files": self.files, "removed": self.removed, "dirs": self.dirs, "bytes": self.bytes}


def layer_dir(part: Path) -> Path:
    """``gen-N.layer`` next to ``gen-N.partial``."""
    return part.with_name(part.name.removesuffix(".partial") + ".layer")


def _copy_xattrs(src: str, dst: str) -> None:
    """Make ``dst``'s xattrs those of ``src`` (overlayfs's own excepted)."""
    want = {}
    for n in os.listxattr(src, follow_symlinks=False):
        if not n.startswith(OVL_XATTR):
            want[n] = os.getxattr(src, n, follow_symlinks=False)
    for n in os.listxattr(dst, follow_symlinks=False):
        if n not in want:
            os.removexattr(dst, n, follow_symlinks=False)
    for n, v in want.items():
        os.setxattr(dst, n, v, follow_symlinks=False)


def set_dir_meta(src: str, st: os.stat_result, dst: str) -> None:
    """Directory ``dst`` (N+1's own, never shared) gets ``src``'s owner, mode and xattrs."""
    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    _copy_xattrs(src, dst)


def prepare(lower: Path | list[Path], part: Path, parent: int, runner: Runner) -> Path:
    """Mount the overlay for a new generation on ``part`` over ``lower`` (read-only; a list: the
    layers of an overlay view, top first, sidusd.image.views); the layer dir.

    The upper directory starts with the lower root's owner, mode and xattrs, so an untouched
    root directory publishes unchanged.  Raises BackendError when the mount fails."""
    layer = layer_dir(part)
    upper, work = layer / "upper", layer / "work"
    for d in (layer, upper, work, part):
        d.mkdir(mode=0o700 if d is layer else 0o755)
    (layer / "lower").write_text(f"{parent}\n")
    lowers = lower if isinstance(lower, list) else [lower]
    st = os.lstat(lowers[0])
    set_dir_meta(str(lowers[0]), st, str(upper))
    opts = f"lowerdir={':'.join(str(p) for p in lowers)},upperdir={upper},workdir={work},{OVERLAY_OPTS}"
    res = runner.run(["mount", "-t", "overlay", "-o", opts, f"sidus-{part.name}", str(part)])
    if not res.ok:
        raise BackendError(f"cannot mount overlayfs on {part}", detail=(res.err or res.out).strip())
    return layer


def _remove(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _opaque(path: str) -> bool:
    try:
        return os.getxattr(path, OPAQUE, follow_symlinks=False) == b"y"
    except OSError:
        return False


def replace_entry(src: str, dst: str) -> None:
    """Put upper entry ``src`` at ``dst`` by renaming it over the name: the inode ``dst`` named
    before (shared with the parent generation) is not opened, only unlinked from this tree."""
    if _is_dir(dst):
        shutil.rmtree(dst)
    for n in os.listxattr(src, follow_symlinks=False):
        if n.startswith(OVL_XATTR):
            os.removexattr(src, n, follow_symlinks=False)
    os.rename(src, dst)


def link_entry(src: str, dst: str) -> None:
    """Put layer entry ``src`` at ``dst`` as a new hard link (the layer is kept: flattening an
    overlay view's stack, whose layers other views still read)."""
    _remove(dst)
    os.link(src, dst, follow_symlinks=False)


def apply_upper(upper: Path, tree: Path, replace=replace_entry) -> Changes:
    """Apply overlayfs upper layer ``upper`` to ``tree`` (a hard-link farm of the lower), by
    replacing entries; the upper layer is consumed (its files are renamed into ``tree``) unless
    ``replace`` is :func:`link_entry`."""
    ch = Changes()
    times: list[tuple[str, os.stat_result]] = []
    stack = [(str(upper), str(tree))]
    set_dir_meta(str(upper), os.lstat(upper), str(tree))
    times.append((str(tree), os.lstat(upper)))
    while stack:
        udir, tdir = stack.pop()
        with os.scandir(udir) as it:
            entries = list(it)
        for e in entries:
            st = e.stat(follow_symlinks=False)
            dst = os.path.join(tdir, e.name)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:          # whiteout: the name is gone
                _remove(dst)
                ch.removed += 1
            elif stat.S_ISDIR(st.st_mode):
                if _opaque(e.path) or not _is_dir(dst):             # replaces the lower directory whole
                    _remove(dst)
                    os.mkdir(dst, 0o700)
                set_dir_meta(e.path, st, dst)
                times.append((dst, st))
                ch.dirs += 1
                stack.append((e.path, dst))
            else:
                replace(e.path, dst)
                ch.files += 1
                ch.bytes += st.st_blocks * 512
    for path, st in reversed(times):                                # children first: their changes set mtime
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    return ch


def link_farm(src: Path, dst: Path, runner: Runner) -> None:
    """``dst`` = a new tree of new directories whose other entries are hard links to ``src``'s."""
    runner.run(["cp", "-a", "-l", "--one-file-system", "-T", str(src), str(dst)],
               timeout_s=FARM_TIMEOUT_S).check()


def farm_dir(part: Path) -> Path:
    """``gen-N.farm`` next to ``gen-N.partial``: the parent's hard-link farm being made."""
    return part.with_name(part.name.removesuffix(".partial") + ".farm")


def spent_dir(part: Path) -> Path:
    """``gen-N.spent``: generation N's used-up layer (empty directories, overlayfs's work
    directory), left by :func:`flatten` for the next :class:`Farm` to remove off the clock."""
    return part.with_name(part.name.removesuffix(".partial") + ".spent")


class Farm:
    """The hard-link farm of ``lower`` at ``farm_dir(part)``, made in a thread from the moment the
    overlay is mounted (``cp`` runs while the work does; the parent never changes, so the farm
    is the same whenever it is made), then the ``spent`` layers of earlier generations removed.
    ``stacked``: layers (bottom first) applied to the farm by hard links after ``cp``: the farm of
    an overlay view's stack (sidusd.image.views), ``lower`` being its base.
    :meth:`wait` returns the farm or raises what ``cp`` said."""

    def __init__(self, lower: Path, part: Path, runner: Runner, spent: tuple[Path, ...] = (),
                 stacked: tuple[Path, ...] = ()):
        self.lower, self.path, self.runner, self.spent = lower, farm_dir(part), runner, spent
        self.stacked = stacked
        self.error: BaseException | None = None
        self._farmed = threading.Event()
        # not a daemon: a process leaving without commit or abort (a kept failure) waits for cp
        # rather than leave it writing a farm that the next administration removes
        self._thread = threading.Thread(target=self._make, name=f"farm-{part.name}", daemon=False)
        self._thread.start()

    def _make(self) -> None:
        try:
            link_farm(self.lower, self.path, self.runner)
            for lay in self.stacked:
                apply_upper(lay, self.path, link_entry)
        except BaseException as e:              # handed to wait()
            self.error = e
        finally:
            self._farmed.set()
        for p in self.spent:                    # wait() does not wait for this
            shutil.rmtree(p, ignore_errors=True)

    def wait(self) -> Path:
        self._farmed.wait()
        if self.error is not None:
            raise self.error
        return self.path


def flatten(lower: Path, part: Path, runner: Runner, replace=replace_entry, farm: Farm | None = None) -> Changes:
    """Turn the unmounted ``part`` (+ its layer) into a complete tree: farm of ``lower`` + upper.
    ``farm``: the farm started with the overlay (else it is made now).  The layer directory,
    used up, becomes ``gen-N.spent``."""
    layer = layer_dir(part)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(part)                              # the empty mount point
    if farm is None:
        link_farm(lower, part, runner)
    else:
        os.rename(farm.wait(), part)
    ch = apply_upper(layer / "upper", part, replace)
    spent = spent_dir(part)                         # removed by the next generation's Farm, off the clock
    if os.path.lexists(spent):                      # a number used again after a drop: rare
        shutil.rmtree(spent, ignore_errors=True)
    try:
        os.rename(layer, spent)
    except OSError:
        shutil.rmtree(layer)
    return ch


def lower_of(part: Path) -> int | None:
    """The parent generation recorded in ``part``'s layer, or None (no layer: a plain directory)."""
    try:
        return int((layer_dir(part) / "lower").read_text())
    except (OSError, ValueError):
        return None
