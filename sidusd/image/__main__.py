"""``sidus-image`` / ``python3 -m sidusd.image``: build and administer network-boot images.

Commands (docs/images.md)::

    sidus-image build RECIPE [--arch ARCH] [--no-switch] [--keep-failed]
    sidus-image list [NAME] [--json]
    sidus-image update NAME
    sidus-image run NAME -- CMD [ARG...]
    sidus-image shell NAME [--from N]     (at its end: publish, keep or discard; sidusd/image/shell.py)
    sidus-image publish NAME [N]         serve a kept generation
    sidus-image drop NAME N              remove an unserved generation
    sidus-image diff NAME A B [--json]
    sidus-image rollback NAME [--to N]
    sidus-image gc NAME [--keep N] [--dry-run]
    sidus-image import NAME DIR [--in-place] [--no-switch] [--arch ARCH]   (docs/migration.md)
    sidus-image push NAME [N] --to RACK [--to RACK...] [--no-serve]   (docs/scale.md "Image rollout")
    sidus-image rack-scan RACK
    sidus-image rack-receive RACK NAME N --manifest H ...   (the rack side of a push over ssh)

``build``, ``update``, ``run`` and ``shell`` take ``-m/--message TEXT`` (why this generation;
shown by ``list`` and kept by ``gc`` in ``meta/removed.jsonl``).

Where it works comes from the daemon's config (``--config``, else ``$SIDUS_CONFIG``, else
/etc/sidus/sidus.yaml; :func:`sidusd.cliconfig.image_paths`): the images directory beside its
``images_file``, ``tftp.root``, ``control.socket_path`` (``sidusctl reload`` after a switch, while
sidusd runs).  Each can be overridden: ``--images-dir`` / ``$SIDUS_IMAGES_DIR``, ``--tftp-root`` /
``$SIDUS_TFTP_ROOT``, ``--images-file``, ``--control-socket`` / ``$SIDUS_SOCKET``; with both
directories given, no config is read.  ``--cache-dir``: the debootstrap package cache.
Exit codes: 0 ok, 1 operation failed (the message names the stage), 2 usage or
recipe error, 75 the image is busy (another administration holds its lock),
130 interrupted by Ctrl-C, 143 stopped by SIGTERM, 129 by SIGHUP (what is left is said).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidusd.image.build import Administrator

# Only the standard library above: each command imports what it needs, when it runs (a `run`
# neither msgspec, nor structlog and asyncio, nor the rollout and view code;
# tests/unit/test_image_imports.py, docs/performance.md "Image generations (issue 16)").

EXIT_BUSY = 75


ROLLOUT_CMDS = ("push", "rack-scan", "rack-receive")                 # their parsers are sidusd.image.rollout's
_LOCAL_CMDS = ("build", "update", "run", "shell", "publish", "drop", "list", "rollback", "gc", "diff", "import",
               "mount-views")
# commands whose code logs only through sidusd.image.lazylog: logging set up at the first event written
DEFERRED_LOGGING = ("build", "update", "run", "shell", "publish", "drop", "rollback", "diff")


def _command_word(argv: list[str]) -> str | None:
    """The sub-command named in ``argv`` (after the global options), None if none is or on doubt."""
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    _global_options(pre)
    pre.add_argument("rest", nargs=argparse.REMAINDER)
    try:
        ns, _ = pre.parse_known_args(argv)
    except (argparse.ArgumentError, SystemExit):
        return None
    return ns.rest[0] if ns.rest else None


def _parser(with_rollout: bool = True) -> argparse.ArgumentParser:
    """The command line; ``with_rollout=False``: without ``push`` and ``rack-scan`` (for any other
    command: their module is not imported)."""
    p = argparse.ArgumentParser(prog="sidus-image", description="Build and administer sidus network-boot images.")
    _global_options(p)
    sub = p.add_subparsers(dest="cmd", required=True)
    _local_parsers(sub)
    if with_rollout:
        from sidusd.image import rollout
        rollout.add_parsers(sub)
    return p


def _global_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help="the daemon's sidus.yaml (default $SIDUS_CONFIG, else /etc/sidus/sidus.yaml): the "
                        "directories below, and for list and gc its inventory and booted records (docs/images.md)")
    p.add_argument("--images-dir", type=Path, default=None,
                   help="default $SIDUS_IMAGES_DIR, else the directory of the config's images_file")
    p.add_argument("--tftp-root", type=Path, default=None, help="default $SIDUS_TFTP_ROOT, else tftp.root")
    p.add_argument("--images-file", type=Path, default=None,
                   help="generated images file; default the config's images_file, else <images-dir>/images.yaml")
    p.add_argument("--control-socket", type=Path, default=None,
                   help="sidusd's control socket, for `sidusctl reload` after a switch (default $SIDUS_SOCKET, "
                        "else control.socket_path)")
    p.add_argument("-v", "--verbose", action="store_true", help="log events at info level (default: warnings)")
    p.add_argument("--log-format", choices=("auto", "json", "console"), default="auto")
    p.add_argument("--cache-dir", type=Path, default=None, help="debootstrap package cache (kept between builds)")
    p.add_argument("--btrfs-snapshots", action="store_true",
                   help="on btrfs, make generations as subvolume snapshots (kernel nfsd; nfs-ganesha 4 "
                        "cannot export them; docs/images.md)")
    p.add_argument("--views", action="store_true",
                   help="publish a new generation as an overlay layer served through a read-only overlay view "
                        "(costs what changed, also on ext4; flattened beyond --view-depth; docs/images.md)")
    p.add_argument("--view-depth", type=int, default=None, metavar="N",
                   help="layers a view stacks above its flat base before a generation is flattened (default 8)")


def _local_parsers(sub) -> None:
    b = sub.add_parser("build", help="build a new generation from a recipe")
    b.add_argument("recipe", type=Path)
    b.add_argument("--arch", default=None, metavar="ARCH",
                   help="Debian architecture of the image (default: the recipe's architecture, amd64); "
                        "another than the host's needs qemu-user-static (sidusd/image/arch.py)")
    for sp in (b, sub.add_parser("update", help="apt update + full-upgrade in a new generation"),
               sub.add_parser("run", help="run a command in a new generation"),
               sub.add_parser("shell", help="interactive shell in a new generation")):
        if sp.prog.split()[-1] != "build":
            sp.add_argument("name")
        sp.add_argument("--no-switch", action="store_true", help="do not serve the new generation")
        sp.add_argument("--keep-failed", action="store_true", help="keep a failed generation's directory")
        sp.add_argument("-m", "--message", default=None, help="why this generation (shown by list)")
        if sp.prog.split()[-1] == "run":
            sp.add_argument("command", nargs="*", help="after --: the command and its arguments")
        if sp.prog.split()[-1] == "shell":
            sp.add_argument("--from", dest="parent", type=int, default=None,
                            help="start from generation N (a kept session) instead of the served one")
    pb = sub.add_parser("publish", help="serve a generation kept by a shell session (default: the newest)")
    pb.add_argument("name")
    pb.add_argument("number", type=int, nargs="?")
    pb.add_argument("--force", action="store_true", help="even when a newer generation is served now")
    dr = sub.add_parser("drop", help="remove an unserved generation (e.g. a kept shell session)")
    dr.add_argument("name")
    dr.add_argument("number", type=int)
    ls = sub.add_parser("list", help="generations, size, date")
    ls.add_argument("name", nargs="?")
    ls.add_argument("--json", action="store_true")
    rb = sub.add_parser("rollback", help="serve the previous generation")
    rb.add_argument("name")
    rb.add_argument("--to", type=int, default=None)
    gc = sub.add_parser("gc", help="remove old unserved generations")
    gc.add_argument("name")
    gc.add_argument("--keep", type=int, default=2)
    gc.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    df = sub.add_parser("diff", help="packages and files changed between two generations")
    df.add_argument("name")
    df.add_argument("a", type=int)
    df.add_argument("b", type=int)
    df.add_argument("--json", action="store_true")
    sub.add_parser("mount-views", help="(re)mount every overlay view of the images directory (idempotent; "
                                       "sidus-views.service runs it at boot, before nfs-ganesha and sidusd)")
    im = sub.add_parser("import", help="adopt a hand-made SIDUS tree as generation 1 (docs/migration.md)")
    im.add_argument("name")
    im.add_argument("dir", type=Path)
    im.add_argument("--in-place", action="store_true", help="move DIR into the image (same file system), no copy")
    im.add_argument("--no-switch", action="store_true", help="do not serve the new generation")
    im.add_argument("--keep-failed", action="store_true", help="keep a failed copy's directory")
    im.add_argument("--arch", default=None, metavar="ARCH",
                    help="the tree's Debian architecture: another is refused (default: what its bin/sh is)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``sidus-image``."""
    from sidusd.image import lazylog
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    finally:
        lazylog.end_deferral()          # main() called in a process that goes on (tests)


def _main(argv: list[str]) -> int:
    after: list[str] | None = None
    if "run" in argv and "--" in argv[argv.index("run"):]:
        # `run NAME [options] -- CMD...`: the options before `--` are sidus-image's, what follows the
        # command's (argparse's REMAINDER alone would take `-m TEXT` after NAME as the command)
        i = argv.index("--", argv.index("run"))
        argv, after = argv[:i], argv[i + 1:]
    args = _parser(with_rollout=_command_word(argv) not in _LOCAL_CMDS).parse_args(argv)
    from sidusd.image import lazylog
    lazylog.defer_setup(args.log_format, "info" if args.verbose else "warning")
    if args.cmd not in DEFERRED_LOGGING:
        lazylog.setup_now()              # code that logs through sidusd.observability itself
    from sidusd.cliconfig import ToolConfigError, image_paths
    from sidusd.errors import ConfigError, SidusError
    from sidusd.image.build import Administrator
    from sidusd.image.chroot import LockBusy
    try:
        where = image_paths(images_dir=args.images_dir, tftp_root=args.tftp_root, images_file=args.images_file,
                            control_socket=args.control_socket, config_flag=args.config)
    except ToolConfigError as e:
        print(f"sidus-image: {e}", file=sys.stderr)
        return 2
    sock = where.control_socket
    if sock is not None and not (args.control_socket or _socket_env()) and not sock.exists():
        sock = None                      # the config's socket, and no sidusd: it reads the images file at start
    args.config = where.config
    try:
        adm = Administrator(where.images_dir, where.tftp_root, cache_dir=args.cache_dir,
                            images_file=where.images_file, control_socket=sock,
                            btrfs_snapshots=args.btrfs_snapshots, views=args.views, view_depth=args.view_depth)
    except ValueError as e:                # --views with --btrfs-snapshots, a --view-depth out of range
        print(f"sidus-image: {e}", file=sys.stderr)
        return 2
    remounted = adm.store.mount_views()                 # views come back after a reboot (idempotent)
    for img, n, what in remounted:
        if what != "already mounted" or args.cmd == "mount-views":
            print(f"sidus-image: {img} generation {n}: view {what}", file=sys.stderr)
    if args.cmd == "mount-views":
        return 1 if any(w.startswith("FAILED") for _, _, w in remounted) else 0
    served_before = _served_now(adm)
    try:
        if args.cmd == "build":
            from sidusd.image.arch import check_build_host, with_arch
            from sidusd.image.recipe import read_recipe
            recipe = with_arch(read_recipe(args.recipe), args.arch)
            check_build_host(recipe, adm.out)
            adm.build(recipe, switch=not args.no_switch, keep_failed=args.keep_failed,
                      message=args.message)
        elif args.cmd == "update":
            adm.update(args.name, switch=not args.no_switch, keep_failed=args.keep_failed, message=args.message)
        elif args.cmd == "run":
            cmd = after if after is not None else args.command
            if not cmd:
                print("sidus-image run: give the command after --", file=sys.stderr)
                return 2
            adm.run(args.name, cmd, switch=not args.no_switch, keep_failed=args.keep_failed, message=args.message)
        elif args.cmd == "shell":
            from sidusd.image import shell
            try:
                adm.shell(args.name, args.parent, switch=not args.no_switch, keep_failed=args.keep_failed,
                          message=args.message)
            except shell.Discarded as e:
                print(f"sidus-image: {e}", file=sys.stderr)
        elif args.cmd in ("publish", "drop"):
            from sidusd.image import cli_views, shell
            if args.cmd == "drop":
                shell.drop(adm, args.name, args.number)
                print(f"{args.name}: generation {args.number} removed")
                return 0
            return cli_views.say_served(adm, args.name, shell.publish_kept(adm, args.name, args.number, args.force))
        elif args.cmd in ("list", "rollback", "gc", "diff"):
            from sidusd.image import cli_views
            if args.cmd == "list":
                cli_views.list_generations(adm, args.name, args.json, args.config)
            elif args.cmd == "rollback":
                return cli_views.say_served(adm, args.name, adm.rollback(args.name, args.to))
            elif args.cmd == "gc":
                return cli_views.gc_generations(adm, args.name, args.keep, args.config, args.dry_run)
            else:
                return cli_views.diff_generations(adm, args.name, args.a, args.b, args.json)
        elif args.cmd in ROLLOUT_CMDS:
            from sidusd.image import rollout
            return rollout.run(args, adm.store, where.tftp_root)
        elif args.cmd == "import":
            from sidusd.image.importer import import_tree
            import_tree(adm, args.name, args.dir, in_place=args.in_place, switch=not args.no_switch,
                        keep_failed=args.keep_failed, arch=args.arch)
    except LockBusy as e:
        print(f"sidus-image: {e}", file=sys.stderr)
        return EXIT_BUSY
    except ConfigError as e:
        print(f"sidus-image: {e}", file=sys.stderr)
        return 2
    except (SidusError, OSError) as e:
        print(f"sidus-image: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return _interrupted(adm, served_before, "interrupted", 130)
    except SystemExit as e:           # SIGTERM / SIGHUP (sidusd.image.chroot.signals_as_exceptions)
        if e.code not in STOP_CODES:
            raise
        return _interrupted(adm, served_before, f"stopped by {STOP_CODES[e.code]}", e.code)
    return 0


STOP_CODES = {128 + signal.SIGTERM: "SIGTERM", 128 + signal.SIGHUP: "SIGHUP"}


def _socket_env() -> str | None:
    from sidusd.control import SOCKET_ENV
    return os.environ.get(SOCKET_ENV)


def _served_now(adm: Administrator) -> dict[str, int | None]:
    return {n: adm.store.current(n) for n in adm.store.names()}


def _interrupted(adm: Administrator, before: dict[str, int | None], what: str, code: int) -> int:
    """What an interrupted command leaves, said as it is (Ctrl-C: 130, SIGTERM: 143, SIGHUP: 129):
    which generation is served, the half-made generations and mounts still there, if any."""
    from sidusd.image.chroot import mounts_under
    now = _served_now(adm)
    changed = [f"{n}: generation {g} is served now" for n, g in now.items() if g != before.get(n, g)]
    left = [f"{adm.store.image_dir(n) / p}" for n in adm.store.names() for p in adm.store.leftovers(n)]
    mounted = mounts_under(adm.store.dir) if adm.store.dir.exists() else []
    parts = ["; ".join(changed) if changed else "the served generation is unchanged"]
    if left:
        parts.append("NOT cleaned up: " + ", ".join(left)
                     + " (the next build, update, run, shell or import of the image removes it)")
    if mounted:
        parts.append("STILL MOUNTED: " + ", ".join(mounted))
    if not left and not mounted:
        parts.append("nothing is left mounted, no half-made generation is left")
    with contextlib.suppress(OSError):          # stderr may be a terminal gone (hang-up)
        print(f"sidus-image: {what}; " + "; ".join(parts), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
