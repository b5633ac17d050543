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

The rack's side (the directory, the manifest, the steps after rsync) is sidusd.image.rollout_rack;
``--to host:/path`` goes over ssh with those steps run on the rack (sidusd.image.rollout_remote).
The racks are pushed side by side (``--parallel``); one that fails does not stop the others.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from sidusd.errors import BackendError
from sidusd.image import rollout_plan as rp
from sidusd.image.chroot import ImageLock
from sidusd.image.generations import ImageStore
from sidusd.image.rollout_rack import (  # noqa: F401
    PushResult,
    PushSource,
    Rack,
    begin,
    commit,
    push_source,
    run_rsync,
    tree_manifest,
    walk_entries,
)
from sidusd.observability import get_logger

log = get_logger("image.rollout")


def push(store: ImageStore, tftp_root: Path, name: str, number: int, rack: Rack, *, serve: bool,
         rsync: str = "rsync", extra: Sequence[str] = (),
         on_start: Callable[[subprocess.Popen], None] | None = None) -> PushResult:
    """Push generation ``number`` of image ``name`` to ``rack`` (see the module's text)."""
    src = push_source(store, tftp_root, name, number)
    with ImageLock(rack.store.image_dir(name), f"push of generation {number}"):    # one push per rack image
        return _push_locked(name, number, rack, src, serve=serve, rsync=rsync, extra=extra, on_start=on_start)


def _push_locked(name: str, number: int, rack: Rack, source: PushSource, *, serve: bool, rsync: str,
                 extra: Sequence[str], on_start: Callable[[subprocess.Popen], None] | None) -> PushResult:
    src_root, src_boot, manifest, count = source.root, source.boot, source.manifest, source.count
    plan = begin(rack, name, number, source.parent)
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
