"""Pushing a generation to a rack server with rsync; the rack's images file (docs/scale.md "Image rollout").

``sidus-image push NAME [N] --to RACK [--to RACK2 ...] [--no-serve]``: generation N (default the
served one) of the build host goes to each rack directory (local path: the rack's disk, or its
NFS/sshfs mount), its root and its kernel + initrd, each by rsync into a staging directory with
``--link-dest`` against the rack's nearest arrived generation (only changed files travel).  The
manifest of what arrived is compared with the source's, the staging directories are renamed into
place, then the completion marker is written (fsync'd), then the rack's images file, which lists
arrived generations only (sidusd.image.rollout_plan: the rule).  An interrupted push (rsync killed,
Ctrl-C, a crash) leaves ``.incoming`` and no marker: the rack does not serve it, the next push
resumes it.  ``sidus-image rack-scan RACK`` rewrites the rack's images file from the markers,
checking each manifest against the disk.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sidusd.errors import BackendError
from sidusd.fsutil import _fsync_dir, atomic_write
from sidusd.image import publish
from sidusd.image import rollout_plan as rp
from sidusd.image.chroot import ImageLock
from sidusd.image.generations import ImageStore
from sidusd.observability import get_logger

log = get_logger("image.rollout")
RSYNC_TIMEOUT_S = 6 * 3600


def walk_entries(top: Path) -> list[rp.Entry]:
    """The manifest entries of the tree under ``top`` (lstat, not followed)."""
    out: list[rp.Entry] = []
    top = Path(top)
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for n in [".", *dirnames, *filenames] if dirpath == str(top) else [*dirnames, *filenames]:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, top)
            m = st.st_mode
            kind, size, mtime, target = "?", 0, 0, ""
            if stat.S_ISREG(m):
                kind, size, mtime = "f", st.st_size, int(st.st_mtime)
            elif stat.S_ISDIR(m):
                kind = "d"
            elif stat.S_ISLNK(m):
                kind, target, mtime = "l", os.readlink(p), int(st.st_mtime)
            elif stat.S_ISCHR(m) or stat.S_ISBLK(m):
                kind, target = ("c" if stat.S_ISCHR(m) else "b"), f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            elif stat.S_ISFIFO(m):
                kind = "p"
            out.append(rp.Entry(rel, kind, stat.S_IMODE(m), st.st_uid, st.st_gid, size, mtime, target))
    return out


def tree_manifest(root: Path, boot: Path) -> tuple[str, int]:
    """(hash, entries) of a generation: its root and its boot-file directory together."""
    entries = [rp.Entry("root/" + e.path, e.kind, e.mode, e.uid, e.gid, e.size, e.mtime, e.target)
               for e in walk_entries(root)]
    entries += [rp.Entry("boot/" + e.path, e.kind, e.mode, e.uid, e.gid, e.size, e.mtime, e.target)
                for e in walk_entries(boot)]
    return rp.manifest_hash(entries), len(entries)


@dataclass(frozen=True)
class PushResult:
    rack: Path
    image: str
    generation: int
    already: bool
    link_dest: int | None
    stats: rp.RsyncStats
    served: bool


class Rack:
    """One rack server's directory (layout: sidusd.image.rollout_plan)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.store = ImageStore(self.path / "images")
        self.tftp_root = self.path / "tftp"
        self.images_file = self.path / "images" / "images.yaml"

    def marker_path(self, name: str, n: int) -> Path:
        return self.store.image_dir(name) / "meta" / (rp.gen_name(n) + rp.MARKER_SUFFIX)

    def marker(self, name: str, n: int) -> rp.Marker | None:
        try:
            data = self.marker_path(name, n).read_bytes()
        except OSError:
            data = None
        return rp.parse_marker(data, name, n)

    def boot_dir(self, name: str, n: int) -> Path:
        return publish.tftp_dir(self.tftp_root, name) / rp.gen_name(n)

    def partly_on_disk(self, name: str) -> list[int]:
        """Generations with a final root or a final boot-file directory (both, or one: a crash)."""
        boot = publish.tftp_dir(self.tftp_root, name)
        got = set(self.store.numbers(name))
        if boot.is_dir():
            got |= {int(p.name[4:]) for p in boot.iterdir()
                    if p.is_dir() and p.name.startswith("gen-") and p.name[4:].isdigit()}
        return sorted(got)

    def on_disk(self, name: str) -> list[int]:
        return [n for n in self.store.numbers(name) if self.boot_dir(name, n).is_dir()]

    def arrived(self, name: str, verify: bool = False) -> list[int]:
        """Generations of ``name`` this rack may serve (marker valid; ``verify``: and the manifest
        of the disk matches it)."""
        disk = self.on_disk(name)
        markers = {n: self.marker(name, n) for n in disk}
        manifests = None
        if verify:
            manifests = {n: tree_manifest(self.store.path(name, n), self.boot_dir(name, n))[0]
                         for n in disk if markers[n] is not None}
        return rp.arrived(markers, disk, manifests)

    def entries(self, verify: bool = False) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for name in self.store.names():
            got = self.arrived(name, verify)
            out.update(rp.rack_entries(name, got, self.store.current(name),
                                       {n: str(self.store.path(name, n).resolve()) for n in got}))
        return dict(sorted(out.items()))

    def write_images_file(self, verify: bool = False) -> dict[str, dict[str, str]]:
        """Rewrite the rack's images file (the rack sidusd's ``images_file``) from the markers."""
        entries = self.entries(verify)
        publish.write_images_file(self.images_file, entries)
        return entries


def run_rsync(argv: list[str], on_start: Callable[[subprocess.Popen], None] | None) -> rp.RsyncStats:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    if on_start is not None:
        on_start(proc)
    try:
        out, err = proc.communicate(timeout=RSYNC_TIMEOUT_S)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        raise BackendError(f"rsync failed (exit {proc.returncode}): the rack keeps the generation as "
                           f"{argv[-1]} and does not serve it; push again to resume",
                           detail=err.decode("utf-8", "replace")[-2000:])
    return rp.parse_stats(out.decode("utf-8", "replace"))


def push(store: ImageStore, tftp_root: Path, name: str, number: int, rack: Rack, *, serve: bool,
         rsync: str = "rsync", extra: Sequence[str] = (),
         on_start: Callable[[subprocess.Popen], None] | None = None) -> PushResult:
    """Push generation ``number`` of image ``name`` to ``rack`` (see the module's text)."""
    if number not in store.numbers(name):
        raise BackendError(f"image {name} has no complete generation {number} to push")
    src_root = store.path(name, number)
    src_boot = publish.tftp_dir(tftp_root, name) / rp.gen_name(number)
    if not ((src_boot / "vmlinuz").is_file() and (src_boot / "initrd.img").is_file()):
        raise BackendError(f"image {name} generation {number} has no published kernel and initrd in {src_boot}")
    manifest, count = tree_manifest(src_root, src_boot)
    with ImageLock(rack.store.image_dir(name), f"push of generation {number}"):    # one push per rack image
        return _push_locked(store, name, number, rack, src_root, src_boot, manifest, count,
                            serve=serve, rsync=rsync, extra=extra, on_start=on_start)


def _push_locked(store: ImageStore, name: str, number: int, rack: Rack, src_root: Path, src_boot: Path,
                 manifest: str, count: int, *, serve: bool, rsync: str, extra: Sequence[str],
                 on_start: Callable[[subprocess.Popen], None] | None) -> PushResult:
    parent = store.meta(name, number).get("parent")
    plan = begin(rack, name, number, parent if isinstance(parent, int) else None)
    stats = rp.RsyncStats(0, 0, 0, 0)
    if not plan.already:
        base, link = rack.path, plan.link_dest
        # the boot files are compared by content (-c): publish copies them anew for each generation
        # (a new mtime), an unchanged kernel must not travel again; the root by rsync's quick check
        for src, stg, link_dir, more in (
                (src_boot, plan.staging_boot, rack.boot_dir(name, link) if link else None, ["-c"]),
                (src_root, plan.staging_root, rack.store.path(name, link) if link else None, [])):
            argv = rp.rsync_argv(rsync, str(src), str(base / stg),
                                 str(link_dir.resolve()) if link_dir else None, [*more, *extra])
            stats = stats + run_rsync(argv, on_start)
    commit(rack, plan, rp.Marker(name, number, manifest, count, str(src_root)), serve=serve)
    log.info("image.rollout.pushed", image=name, generation=number, rack=str(rack.path),
             link_dest=plan.link_dest, files=stats.files, bytes=stats.transferred_bytes)
    return PushResult(rack.path, name, number, plan.already, plan.link_dest, stats, serve)


def begin(rack: Rack, name: str, number: int, parent: int | None) -> rp.PushPlan:
    """The rack side's first step (under the rack image's lock): the plan, a final directory
    without a marker taken back to staging, the staging directories' parents made."""
    plan = rp.plan_push(name, number, parent, rack.arrived(name), rack.partly_on_disk(name))
    if plan.already:
        return plan
    base = rack.path
    if plan.reclaim:                    # renamed into place, crashed before the marker: resume
        for fin, stg in ((plan.final_root, plan.staging_root), (plan.final_boot, plan.staging_boot)):
            if (base / fin).exists():       # never served (no marker): back to staging
                if (base / stg).exists():
                    shutil.rmtree(base / stg)
                os.rename(base / fin, base / stg)
    for sub in (plan.staging_root, plan.staging_boot):
        (base / sub).parent.mkdir(parents=True, exist_ok=True)
    (base / "images" / name / "meta").mkdir(parents=True, exist_ok=True)
    return plan


def commit(rack: Rack, plan: rp.PushPlan, marker: rp.Marker, *, serve: bool) -> None:
    """The rack side's last step, after rsync: the manifest of what arrived checked against
    ``marker``'s (the source's), renamed into place, the marker written, ``current`` switched
    (``serve``), the images file rewritten.  Raises (nothing renamed) when the manifest differs."""
    name, number, base = plan.image, plan.generation, rack.path
    if not plan.already:
        got, _ = tree_manifest(base / plan.staging_root, base / plan.staging_boot)
        if got != marker.manifest:
            raise BackendError(f"image {name} generation {number}: what arrived on {rack.path} differs from the "
                               "source (changed or cut during the push?); not served, push again")
        os.rename(base / plan.staging_boot, base / plan.final_boot)
        os.rename(base / plan.staging_root, base / plan.final_root)
        _fsync_dir((base / plan.final_root).parent)
        _fsync_dir((base / plan.final_boot).parent)
        atomic_write(rack.marker_path(name, number), marker.to_json())
    if serve:
        rack.store.switch(name, number)
    rack.write_images_file()


# -- sidus-image push / rack-scan ------------------------------------------------------

def add_parsers(sub) -> None:
    """``push`` and ``rack-scan`` of sidus-image."""
    ps = sub.add_parser("push", help="publish a generation to rack servers (rsync of the changed files)")
    ps.add_argument("name")
    ps.add_argument("number", type=int, nargs="?", default=None, help="default: the served generation")
    ps.add_argument("--to", dest="racks", type=Path, action="append", required=True, metavar="RACK",
                    help="a rack server's directory, or [user@]host:/path over ssh (repeat for several racks)")
    ps.add_argument("--no-serve", action="store_true", help="copy it, but let the rack keep serving its current one")
    ps.add_argument("--rsync-arg", dest="rsync_args", action="append", default=[], metavar="ARG",
                    help="one more rsync option (e.g. --bwlimit=10m)")
    ps.add_argument("--parallel", type=int, default=4, metavar="N",
                    help="racks pushed at once (default 4): a slow or dead rack does not hold back the others")
    ps.add_argument("--ssh", default="ssh", metavar="CMD",
                    help="the ssh command for host:path racks, with its options (default: ssh)")
    ps.add_argument("--remote-cmd", default="sidus-image", metavar="CMD",
                    help="sidus-image on the rack, for host:path racks (default: sidus-image)")
    rr = sub.add_parser("rack-receive", help="the rack side of a push over ssh (run by push, not by hand)")
    rr.add_argument("rack", type=Path)
    rr.add_argument("name")
    rr.add_argument("number", type=int)
    rr.add_argument("--parent", type=int, default=None)
    rr.add_argument("--manifest", required=True)
    rr.add_argument("--entries", type=int, required=True)
    rr.add_argument("--source", default="")
    rr.add_argument("--no-serve", action="store_true")
    rs = sub.add_parser("rack-scan", help="rewrite a rack's images file from its completion markers")
    rs.add_argument("rack", type=Path)


def run(args, store: ImageStore, tftp_root: Path) -> int:
    """Run ``push`` / ``rack-scan`` / ``rack-receive``; the exit code (errors of one rack are
    printed and the next rack is pushed: a rack that is down or slow does not stop the rollout)."""
    if args.cmd == "rack-scan":
        entries = Rack(args.rack).write_images_file(verify=True)
        print(f"{args.rack}: {len(entries)} image name(s) served: {', '.join(entries) or 'none'}")
        return 0
    from sidusd.image import rollout_remote
    if args.cmd == "rack-receive":
        return rollout_remote.receive(args)
    number = args.number if args.number is not None else store.current(args.name)
    if number is None:
        raise BackendError(f"image {args.name} has no served generation; name one")
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from sidusd.errors import SidusError
    from sidusd.image.chroot import LockBusy
    live: list[subprocess.Popen] = []           # every rsync started: killed on Ctrl-C / SIGTERM

    def one(r: Path) -> PushResult:
        target = rp.parse_target(str(r))        # a Path keeps host:/path as it is
        if target.host is None:
            return push(store, tftp_root, args.name, number, Rack(Path(target.path)), serve=not args.no_serve,
                        extra=args.rsync_args, on_start=live.append)
        return rollout_remote.push_ssh(store, tftp_root, args.name, number, target, serve=not args.no_serve,
                                       extra=args.rsync_args, ssh=args.ssh, remote_cmd=args.remote_cmd,
                                       on_start=live.append)

    code = 0
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        todo = {pool.submit(one, r): r for r in args.racks}
        try:
            for fut in as_completed(todo):
                r = todo[fut]
                try:
                    res = fut.result()
                except LockBusy as e:
                    print(f"sidus-image: {r}: {e}", file=sys.stderr, flush=True)
                    code = code or 75
                    continue
                except (SidusError, OSError, ValueError) as e:
                    print(f"sidus-image: {r}: {e}", file=sys.stderr, flush=True)
                    code = 1
                    continue
                how = "already there" if res.already else (
                    f"{res.stats.files} file(s), {res.stats.transferred_bytes} bytes sent"
                    + (f" (unchanged files linked from generation {res.link_dest})" if res.link_dest
                       else " (full copy)"))
                print(f"{r}: {args.name} generation {number} arrived: {how}" + ("; served" if res.served else ""),
                      flush=True)
        except BaseException:
            for f in todo:
                f.cancel()
            for p in live:                      # the pushes under way fail (nothing served) and end
                if p.poll() is None:
                    p.kill()
            raise
    return code
