"""The btrfs fast path of image generations: subvolume snapshots (docs/images.md).

When the images directory is on btrfs (and ``btrfs`` from btrfs-progs is
installed), a build makes its generation as a subvolume, and a new generation
is a writable snapshot of its parent: O(1) to make whatever the tree weighs,
directories shared too (a hard-link farm makes one new directory per
directory), every later write copy-on-write, so the parent cannot change.  A
published generation is set read-only (``btrfs property set ... ro true``);
``gc`` deletes it with ``btrfs subvolume delete`` (the space is freed in the
background, in proportion to what it alone held).  Sizes come from ``btrfs
filesystem du`` (extents, not inodes: a snapshot's files have their own inodes).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from sidusd.storage.runner import Runner

BTRFS_SUPER_MAGIC = 0x9123683E
SUBVOL_INO = 256           # the root directory of every btrfs subvolume
TIMEOUT_S = 600


def _fstype(path: Path) -> int | None:
    """statfs(2) f_type of ``path`` (Linux), None if unknown."""
    import ctypes
    import ctypes.util

    class _Statfs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    buf = _Statfs()
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return None
    return buf.f_type & 0xFFFFFFFF


def available(path: Path) -> bool:
    """``path`` is on btrfs and the btrfs tool is installed."""
    return _fstype(path) == BTRFS_SUPER_MAGIC and shutil.which("btrfs") is not None


def is_subvolume(path: Path) -> bool:
    try:
        return os.lstat(path).st_ino == SUBVOL_INO and _fstype(path) == BTRFS_SUPER_MAGIC
    except OSError:
        return False


def create(path: Path, runner: Runner) -> None:
    runner.run(["btrfs", "-q", "subvolume", "create", str(path)], timeout_s=TIMEOUT_S).check()


def snapshot(src: Path, dst: Path, runner: Runner) -> None:
    """A writable snapshot of ``src`` at ``dst``."""
    runner.run(["btrfs", "-q", "subvolume", "snapshot", str(src), str(dst)], timeout_s=TIMEOUT_S).check()


def set_readonly(path: Path, runner: Runner, ro: bool = True) -> None:
    runner.run(["btrfs", "property", "set", "-ts", str(path), "ro", "true" if ro else "false"],
               timeout_s=TIMEOUT_S).check()


def delete(path: Path, runner: Runner) -> None:
    runner.run(["btrfs", "-q", "subvolume", "delete", str(path)], timeout_s=TIMEOUT_S).check()


def parse_du(text: str) -> dict[str, tuple[int, int]]:
    """``btrfs filesystem du -s --raw`` output -> path: (exclusive bytes, shared bytes)."""
    out: dict[str, tuple[int, int]] = {}
    for line in text.splitlines():
        parts = line.split(None, 3)
        if len(parts) == 4 and parts[0].isdigit() and parts[1].isdigit():
            total, excl = int(parts[0]), int(parts[1])
            out[parts[3]] = (excl, total - excl)
    return out


def du(roots: Mapping[int, Path], runner: Runner) -> dict[int, tuple[int, int]]:
    """Generation -> (own, shared) bytes of its extents."""
    res = runner.run(["btrfs", "filesystem", "du", "-s", "--raw", *map(str, roots.values())],
                     timeout_s=TIMEOUT_S).check()
    by_path = parse_du(res.out)
    return {n: by_path.get(str(p), (0, 0)) for n, p in roots.items()}
