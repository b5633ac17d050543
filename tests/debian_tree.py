"""One debootstrap'd bookworm tree for the whole e2e suite, cached by its debootstrap command line.

The documentation's way (/work/shared/reference/sidus-documentation.txt, "Deboostrap"):
``debootstrap --include=$MyInclude --exclude=$MyExclude SUITE $SIDUS MIRROR``.  Here the include
list is only what an NFS-booted systemd machine needs (:data:`INCLUDE`), the exclude list the
documentation's entries that apply to bookworm.  Two e2e tests use the tree:

* tests/e2e/test_migration.py copies it into a hand-made SIDUS (rootaufs, ``/etc/hostname``
  removed) and imports that with ``sidus-image import``;
* tests/e2e/test_debian_image.py builds the debian-e2e recipe with the same include/exclude, and
  its Administrator's runner (:class:`SharedDebootstrap`) answers the builder's debootstrap
  command (the very same argv) with a copy of the cached tree.

So the suite debootstraps once: ``lab-state/image-cache/trees/<key>/root`` (git-ignored), where
``key`` is a digest of the argv without its target directory and ``--cache-dir`` (the .deb
download cache, lab-state/image-cache/debootstrap).  A tree older than :data:`MAX_AGE_S` is made
again (the mirror moves on).  Copies are real copies (``cp -a --reflink=auto``): the tests change
their trees, never the cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from sidusd.storage.runner import Result, Runner

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "lab-state" / "image-cache"
DEBS = CACHE / "debootstrap"
TREES = CACHE / "trees"
SUITE = "bookworm"
VARIANT = "minbase"
# the boot needs: a kernel, initramfs-tools (+ busybox: the overlay's remount), the NFS client, systemd
INCLUDE = ("linux-image-amd64", "initramfs-tools", "busybox", "nfs-common", "systemd-sysv")
# the documentation's MyExclude, where bookworm still has the package
EXCLUDE = ("nano", "network-manager", "exim4", "apache2")
MAX_AGE_S = 7 * 24 * 3600
DEBOOTSTRAP_TIMEOUT_S = 3600
COPY_TIMEOUT_S = 900


def key(argv: Sequence[str]) -> str:
    """The cache key of a debootstrap argv: everything but the target and ``--cache-dir``."""
    args = [a for a in argv if not a.startswith("--cache-dir=")]
    args[-2] = "TARGET"
    return hashlib.sha256(json.dumps(args).encode()).hexdigest()[:16]


def debootstrap_argv(target: str, mirror: str) -> list[str]:
    """The documentation's command line (amd64, main), minbase, with :data:`INCLUDE` / :data:`EXCLUDE`;
    the same argv as the builder's for a recipe with these include/exclude (sidusd.image.stages)."""
    return ["debootstrap", f"--variant={VARIANT}", "--arch=amd64", "--components=main",
            "--include=" + ",".join(INCLUDE), "--exclude=" + ",".join(EXCLUDE),
            f"--cache-dir={DEBS}", SUITE, target, mirror]


def cached_tree(argv: Sequence[str], runner: Runner | None = None, log=print) -> Path:
    """The tree that ``argv`` (a debootstrap command line) makes: from the cache, or made now.

    One process at a time per command line (a lock file beside the tree): scripts/test runs
    the serial tests and the background ones in two pytest processes, and both may want it
    first on a fresh machine; the second waits for the first's tree instead of removing it."""
    TREES.mkdir(parents=True, exist_ok=True)
    with open(TREES / f"{key(argv)}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _cached_tree(argv, runner or Runner(), log)


def _cached_tree(argv: Sequence[str], runner: Runner, log) -> Path:
    d = TREES / key(argv)
    root, stamp = d / "root", d / "stamp.json"
    if stamp.is_file() and root.is_dir() and time.time() - stamp.stat().st_mtime < MAX_AGE_S:
        log(f"debootstrap: cached tree {root}")
        return root
    shutil.rmtree(d, ignore_errors=True)
    part = d / "root.partial"
    part.mkdir(parents=True)
    DEBS.mkdir(parents=True, exist_ok=True)
    args = list(argv)
    args[-2] = str(part)
    log(f"debootstrap: {' '.join(args)}")
    t = time.monotonic()
    res = runner.run(args, timeout_s=DEBOOTSTRAP_TIMEOUT_S)
    if not res.ok:
        shutil.rmtree(d, ignore_errors=True)
        res.check()
    os.rename(part, root)
    stamp.write_text(json.dumps({"argv": list(argv), "seconds": round(time.monotonic() - t, 1)}) + "\n")
    log(f"debootstrap: done in {time.monotonic() - t:.0f} s")
    return root


def copy_tree(src: Path, dest: Path, runner: Runner | None = None) -> Path:
    """A real copy of ``src`` at ``dest`` (its parent is made; dest itself must not exist)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.mkdir()
    (runner or Runner()).run(["cp", "-a", "--reflink=auto", f"{src}/.", str(dest)],
                             timeout_s=COPY_TIMEOUT_S).check()
    return dest


class SharedDebootstrap(Runner):
    """A Runner that answers a debootstrap command with a copy of :func:`cached_tree`'s tree
    (made by that same command line); every other command runs as usual."""

    def run(self, argv, timeout_s=30, input=None, env=None) -> Result:
        if argv and argv[0] == "debootstrap":
            tree = cached_tree(argv, Runner(), log=lambda msg: None)
            target = Path(argv[-2])
            target.mkdir(parents=True, exist_ok=True)
            return super().run(["cp", "-a", "--reflink=auto", f"{tree}/.", str(target)], COPY_TIMEOUT_S)
        return super().run(argv, timeout_s, input, env)
