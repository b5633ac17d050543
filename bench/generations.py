"""What a new image generation costs: time and disk for one changed file in a 32 GB tree.

``python3 -m bench.generations`` (root): for each file system whose mkfs is
installed (ext4; XFS, btrfs when xfsprogs / btrfs-progs are), a loop-mounted
image file made here holds an images directory (sidusd.image.generations)
whose generation 1 is a synthetic 32 GiB tree of sparse files, in one of two
shapes:

* ``large``: ``--large-files`` files (default 1024) of 32 GiB / count each;
* ``many``: ``--many-files`` files (default 300000, 1000 per directory) of
  32 GiB / count each, 4 KiB of data at the head of each.

Then a new generation with one changed file (overlay mount, ``>>`` of 4 KiB to
one file, publish), timed end to end, with the file system's used blocks
before and after (``statvfs``: every byte the generation cost, directories
and metadata included); then ``rollback`` (switch back) and ``gc`` of the
old generation, timed.  ``--fs ext4-views`` (any ``FS-views``): the same with
``ImageStore(views=True)`` (sidusd.image.views: the new generation is its layer
and an overlay view mounted on ``gen-0002``, no farm).  ``--apt PACKAGE`` also builds sidusd/data/recipes/minimal.yaml
and compares ``sidus-image run NAME -- apt-get install PACKAGE`` (a new
generation) with the same apt-get in a plain chroot (a full copy), time and
disk, ``--repeat`` times interleaved (the ratio of each pair: the machine's load
moves both sides alike).  Results: docs/performance.md "Image generations (issue 16)".
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from sidusd.image import views
from sidusd.image.generations import ImageStore

TREE_BYTES = 32 << 30
NAME = "big"
REPO = Path(__file__).resolve().parents[1]


def used_bytes(path: Path) -> int:
    s = os.statvfs(path)
    return (s.f_blocks - s.f_bfree) * s.f_frsize


@contextlib.contextmanager
def loop_fs(fstype: str, work: Path, size_gib: int) -> Iterator[Path]:
    """A fresh ``fstype`` file system in a sparse image file, loop-mounted; its mount point."""
    img, mnt = work / f"{fstype}.img", work / f"{fstype}.mnt"
    with open(img, "wb") as f:
        f.truncate(size_gib << 30)
    mkfs = {"ext4": ["mkfs.ext4", "-q", "-F", "-N", "2000000"], "xfs": ["mkfs.xfs", "-q", "-f"],
            "btrfs": ["mkfs.btrfs", "-q", "-f"]}[fstype]
    subprocess.run([*mkfs, str(img)], check=True, capture_output=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        mnt.rmdir()
        img.unlink()


def make_tree(root: Path, shape: str, count: int, per_dir: int) -> int:
    """The synthetic 32 GiB tree; the number of files."""
    size = TREE_BYTES // count
    for i in range(count):
        d = root / "usr" / f"d{i // per_dir:05d}"
        if i % per_dir == 0:
            d.mkdir(parents=True)
        fd = os.open(d / f"f{i:07d}", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, size)
            if shape == "many":
                os.pwrite(fd, b"x" * 4096, 0)
        finally:
            os.close(fd)
    (root / "etc").mkdir()
    (root / "etc/motd").write_text("generation 1\n")
    return count


def one_case(fs: str, shape: str, count: int, work: Path, per_dir: int) -> dict:
    fstype = fs.split("-")[0]
    with loop_fs(fstype, work, 64) as mnt:
        try:
            return _one_case(fs, shape, count, mnt, per_dir)
        finally:
            views.umount_all(mnt / "images")


def _one_case(fs: str, shape: str, count: int, mnt: Path, per_dir: int) -> dict:
    st = ImageStore(mnt / "images", btrfs_snapshots=fs == "btrfs-snapshots", views=fs.endswith("-views"))
    n, part = st.begin(NAME, None)
    t = time.monotonic()
    files = make_tree(part, shape, count, per_dir)
    st.commit(NAME, n, {"kind": "build"})
    st.switch(NAME, n)
    make_s = time.monotonic() - t
    subprocess.run(["sync"], check=True)
    used0 = used_bytes(mnt)
    t0 = time.monotonic()
    n2, part2 = st.begin(NAME, 1)
    with open(part2 / "usr/d00000/f0000000", "ab") as f:      # one changed file: an append (>>)
        f.write(b"y" * 4096)
    t_changed = time.monotonic()
    st.commit(NAME, n2, {"kind": "run"})
    st.switch(NAME, n2)
    publish_s = time.monotonic() - t_changed
    new_s = time.monotonic() - t0
    subprocess.run(["sync"], check=True)
    extra = used_bytes(mnt) - used0
    t = time.monotonic()
    st.switch(NAME, 1)                                         # rollback
    rollback_s = time.monotonic() - t
    st.switch(NAME, n2)
    t = time.monotonic()
    st.remove(NAME, 1)                                         # gc of the old generation
    subprocess.run(["sync"], check=True)
    gc_s = time.monotonic() - t
    meta = st.meta(NAME, n2)
    return {"fs": fs, "shape": shape, "files": files, "dirs": -(-files // per_dir),
            "mechanism": meta.get("mechanism"), "tree_gib": TREE_BYTES >> 30,
            "make_tree_s": round(make_s, 1), "new_generation_s": round(new_s, 2),
            "publish_s": round(publish_s, 2),
            "extra_disk_mib": round(extra / 2**20, 2), "changes": meta.get("changes"),
            "rollback_s": round(rollback_s, 4), "gc_s": round(gc_s, 2)}


CACHE = REPO / "lab-state" / "image-cache" / "debootstrap"


def apt_case(package: str, work: Path, repeat: int = 1, cache: Path = CACHE, cli: bool = False) -> dict:
    """One package installed as a new generation vs in a plain chroot (a full copy), on a loop
    ext4 of its own (statvfs counts only this); ``repeat`` pairs, interleaved (plain, then the
    generation, then plain again...), so both sides see the same load.  ``cli``: the generation
    side is the ``sidus-image run`` command (a new Python process: its start-up counts), else
    :meth:`Administrator.run` in this one."""
    with loop_fs("ext4", work, 16) as mnt:
        return _apt_case(package, mnt, repeat, cache, cli)


def _apt_case(package: str, work: Path, repeat: int = 1, cache: Path = CACHE, cli: bool = False) -> dict:
    from sidusd.image.build import Administrator
    from sidusd.image.chroot import Chroot
    from sidusd.image.history import sharing
    from sidusd.image.recipe import read_recipe
    adm = Administrator(work / "images", work / "tftp", out=io.StringIO(),
                        cache_dir=cache)
    adm.build(read_recipe(REPO / "sidusd" / "data" / "recipes" / "minimal.yaml"))
    src = adm.store.path("minimal", 1)
    dirs = sum(1 for _ in os.walk(src))
    entries = sum(len(d) + len(f) for _, d, f in os.walk(src))
    argv = ["apt-get", "install", "-y", "--no-install-recommends", package]
    runs = []
    for _ in range(repeat):
        plain = work / "plain"
        subprocess.run(["cp", "-a", str(src), str(plain)], check=True)
        subprocess.run(["sync"], check=True)
        u = used_bytes(work)
        t = time.monotonic()
        with Chroot(plain) as ch:
            res = ch.run(argv, timeout_s=900)
        plain_s = time.monotonic() - t
        if not res.ok:
            raise SystemExit(f"plain chroot apt-get failed: {res.err[-500:]}")
        subprocess.run(["sync"], check=True)
        plain_changed = used_bytes(work) - u
        shutil.rmtree(plain)
        subprocess.run(["sync"], check=True)
        u = used_bytes(work)
        t = time.monotonic()
        if cli:
            subprocess.run([sys.executable, "-m", "sidusd.image", "--images-dir", str(adm.store.dir),
                            "--tftp-root", str(adm.tftp_root), "--images-file", str(adm.images_file),
                            "run", "minimal", "--", *argv], check=True, capture_output=True)
            n = max(adm.store.numbers("minimal"))
        else:
            n = adm.run("minimal", argv)
        gen_s = time.monotonic() - t
        subprocess.run(["sync"], check=True)
        gen_extra = used_bytes(work) - u
        run = {"plain_chroot_s": round(plain_s, 2), "generation_s": round(gen_s, 2),
               "time_ratio": round(gen_s / plain_s, 2), "plain_chroot_bytes_changed": plain_changed,
               "generation_extra_bytes": gen_extra, "disk_ratio": round(gen_extra / max(plain_changed, 1), 2),
               "disk_target_bytes": int(1.1 * plain_changed + (1 << 20)),
               "changes": adm.store.meta("minimal", n).get("changes"),
               "own_bytes": sharing({1: src, n: adm.store.path("minimal", n)})[n][0]}
        runs.append(run)
        adm.serve("minimal", 1)                                     # back to generation 1 for the next pair
        adm.store.remove("minimal", n)
    ratios = sorted(r["time_ratio"] for r in runs)
    return {"package": package, "cli": cli, "image_dirs": dirs, "image_entries": entries, "runs": runs,
            "time_ratio_median": ratios[len(ratios) // 2], "time_ratios": ratios,
            "disk_target_met": all(r["generation_extra_bytes"] <= r["disk_target_bytes"] for r in runs)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.generations", description=__doc__.split("\n")[0])
    p.add_argument("--fs", nargs="*", default=["ext4", "ext4-views", "xfs", "btrfs", "btrfs-snapshots"],
                   help="btrfs-snapshots: btrfs with sidus-image --btrfs-snapshots; ext4-views (xfs-views...): "
                        "with sidus-image --views (an overlay view per generation, no farm)")
    p.add_argument("--shapes", nargs="*", default=["large", "many"])
    p.add_argument("--large-files", type=int, default=1024)
    p.add_argument("--many-files", type=int, default=300_000)
    p.add_argument("--files-per-dir", type=int, default=1000,
                   help="files per directory (a Debian /usr has about 8: every directory costs a block)")
    p.add_argument("--apt", metavar="PACKAGE", default=None, help="also the one-package comparison")
    p.add_argument("--cache-dir", type=Path, default=CACHE, help="debootstrap's .deb cache")
    p.add_argument("--cli", action="store_true", help="time the sidus-image run command (its Python start-up too)")
    p.add_argument("--repeat", type=int, default=1, help="pairs of the one-package comparison (interleaved)")
    p.add_argument("--work", type=Path, default=None, help="where the image files go (default: a temp dir)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.generations: needs root (mount, loop devices)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="sidus-gen-bench-", dir=args.work))
    results = []
    try:
        for fs in args.fs:
            if shutil.which(f"mkfs.{fs.split('-')[0]}") is None:
                print(f"{fs}: skipped (no mkfs.{fs})", file=sys.stderr)
                continue
            for shape in args.shapes:
                count = args.large_files if shape == "large" else args.many_files
                r = one_case(fs, shape, count, work, args.files_per_dir)
                print(json.dumps(r), flush=True)
                results.append(r)
        if args.apt:
            r = apt_case(args.apt, work, args.repeat, args.cache_dir, args.cli)
            print(json.dumps(r), flush=True)
            results.append(r)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
