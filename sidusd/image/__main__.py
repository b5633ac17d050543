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
    sidus-image import NAME DIR [--in-place] [--no-switch]   (docs/migration.md)
    sidus-image push NAME [N] --to RACK [--to RACK...] [--no-serve]   (docs/scale.md "Image rollout")
    sidus-image rack-scan RACK

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
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from sidusd.cliconfig import ToolConfigError, image_paths
from sidusd.control.messages import SOCKET_ENV
from sidusd.errors import ConfigError, SidusError
from sidusd.image import publish, rollout, shell
from sidusd.image.build import Administrator
from sidusd.image.chroot import LockBusy
from sidusd.image.recipe import read_recipe
from sidusd.observability import setup_logging

EXIT_BUSY = 75


def _human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sidus-image", description="Build and administer sidus network-boot images.")
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
    sub = p.add_subparsers(dest="cmd", required=True)
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
    im = sub.add_parser("import", help="adopt a hand-made SIDUS tree as generation 1 (docs/migration.md)")
    im.add_argument("name")
    im.add_argument("dir", type=Path)
    im.add_argument("--in-place", action="store_true", help="move DIR into the image (same file system), no copy")
    im.add_argument("--no-switch", action="store_true", help="do not serve the new generation")
    im.add_argument("--keep-failed", action="store_true", help="keep a failed copy's directory")
    rollout.add_parsers(sub)
    return p


def _say_served(adm: Administrator, name: str, number: int) -> int:
    """After ``rollback`` / ``publish``: say "served" only when sidusd confirms it serves generation
    ``number`` (``images.status`` on its control socket, publish.confirm_served), as ``build``,
    ``update`` and ``run`` do; 1 when sidusd refuses it (the switch is done: the message says why)."""
    served = publish.confirm_served(adm.control_socket, name, adm.store.path(name, number).resolve())
    print(f"{name}: generation {number}: {served.text}")
    if served.refused:
        print(f"sidus-image: {name}: generation {number} is switched, but sidusd does not serve it: "
              f"{served.text}", file=sys.stderr)
        return 1
    return 0


def _list(adm: Administrator, name: str | None, as_json: bool, config_path: Path | None) -> None:
    users = _image_users(config_path)
    booted_by_root = _booted_by_root(config_path)
    rows: list[dict[str, Any]] = []
    for n in ([name] if name else adm.store.names()):
        gens = adm.store.list(n)
        shares = adm.store.own_shared(n, [g.number for g in gens])
        for g in gens:
            used = users.get(f"{n}.gen-{g.number}", []) + (users.get(n, []) if g.current else [])
            recs = booted_by_root.get(os.path.realpath(g.path), [])
            rows.append({"image": n, "generation": g.number, "served": g.current, "kind": g.kind,
                         "created": g.created, "size_bytes": g.size_bytes, "kernel": g.meta.get("kver"),
                         "own_bytes": shares[g.number][0], "shared_bytes": shares[g.number][1],
                         "message": g.meta.get("message"),
                         "hosts": used,
                         "booted": [{"mac": r.mac, "hostname": r.hostname, "image": r.image,
                                     "first_served": _iso(r.first_s), "last_served": _iso(r.last_s)}
                                    for r in recs]})
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'IMAGE':<16} {'GEN':>4} {'SERVED':<6} {'KIND':<7} {'CREATED':<26} {'SIZE':>10} {'OWN':>10} "
          f"{'SHARED':>10}  {'KERNEL':<16} HOSTS (inventory) / BOOTED")
    for r in rows:
        booted_names = [f"{b['hostname'] or b['mac']} (booted)" for b in r["booted"]]
        print(f"{r['image']:<16} {r['generation']:>4} {'*' if r['served'] else '':<6} {r['kind']:<7} "
              f"{r['created']:<26} {_human(r['size_bytes']):>10} {_human(r['own_bytes']):>10} "
              f"{_human(r['shared_bytes']):>10}  {r['kernel'] or '-':<16} "
              f"{', '.join(r['hosts'] + booted_names) or '-'}")
        if r["message"]:
            print(f"{'':<22}{r['message']}")


def _diff(adm: Administrator, name: str, a: int, b: int, as_json: bool) -> int:
    from sidusd.image.history import diff
    for n in (a, b):
        if n not in adm.store.numbers(name):
            print(f"sidus-image diff: image {name} has no generation {n}", file=sys.stderr)
            return 1
    d = diff(adm.store.path(name, a), adm.store.path(name, b))
    if as_json:
        print(json.dumps(d, indent=1))
        return 0
    p = d["packages"]
    for k, v in p["added"].items():
        print(f"+ {k} {v}")
    for k, v in p["removed"].items():
        print(f"- {k} {v}")
    for k, (old, new) in p["upgraded"].items():
        print(f"~ {k} {old} -> {new}")
    for status, rel in d["files"]:
        print(f"{status} /{rel}")
    print(f"({len(p['added'])} added, {len(p['removed'])} removed, {len(p['upgraded'])} upgraded; "
          f"{len(d['files'])} other file(s) changed; not listed: {d['package_files_changed']} file(s) of "
          f"the changed packages, {d['package_state_changed']} of the package manager's state)")
    return 0


def _iso(t: float) -> str:
    import datetime as dt
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")


def _booted_by_root(config_path: Path | None, now: float | None = None, live_only: bool = True) -> dict[str, list]:
    """Resolved root directory -> live booted records (sidusd's booted file, ``booted:`` of
    sidus.yaml; docs/images.md "Booted generations"; every record with ``live_only=False``).
    Empty without a config or records."""
    if config_path is None:
        return {}
    import time

    from sidusd import config as config_mod
    from sidusd.boot.booted import users_by_root
    from sidusd.image.booted_store import read_table
    cfg = config_mod.read(config_path)
    if cfg.booted.file is None:
        return {}
    table = read_table(cfg.booted.file, cfg.booted.max_hosts)
    live = table.live(time.time() if now is None else now, cfg.booted.ttl_s) if live_only else table.records()
    out: dict[str, list] = {}
    for root, recs in users_by_root(live).items():
        out.setdefault(os.path.realpath(root), []).extend(recs)
    return out


def _gc(adm: Administrator, name: str, keep: int, config_path: Path | None, dry_run: bool = False) -> int:
    from sidusd.image.generations import booted_generations
    if config_path is None:
        print("sidus-image gc: no config read (both directories given, without --config): gc knows neither "
              "the inventory's pins nor the machines that booted a generation: only the served one and the "
              "--keep newest are kept",
              file=sys.stderr)
    pinned = _pinned(config_path, name)
    by_root = _booted_by_root(config_path)
    roots = {n: os.path.realpath(adm.store.path(name, n)) for n in adm.store.numbers(name)}
    booted = booted_generations(by_root, roots)
    for n in sorted(booted):
        who = ", ".join(r.hostname or r.mac for r in by_root[roots[n]])
        print(f"{name}: keeping generation {n}: booted by {who}")
    for n in sorted(pinned - booted):
        print(f"{name}: keeping generation {n}: pinned by the inventory")
    gone = adm.gc(name, keep, sorted(pinned | booted), dry_run=dry_run,
                  booted_by_root=_booted_by_root(config_path, live_only=False))
    print(f"{name}: {'would remove' if dry_run else 'removed'} generation(s) {', '.join(map(str, gone)) or 'none'}"
          + ("" if dry_run or not gone else f" (recorded in {adm.store.image_dir(name) / 'meta' / 'removed.jsonl'})"))
    return 0


def _image_users(config_path: Path | None) -> dict[str, list[str]]:
    """Image name -> hosts of the inventory (hostname or MAC) that boot it; "(unknown hosts)" for
    the default profile's image when sidusd serves unknown machines."""
    if config_path is None:
        return {}
    from sidusd import config as config_mod
    from sidusd.boot.inventory import parse_inventory
    cfg = config_mod.read(config_path)
    try:
        text = cfg.inventory_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    inv = parse_inventory(text, str(cfg.inventory_file))
    users: dict[str, list[str]] = {}
    for h in inv.hosts.values():
        prof = inv.profiles.get(h.profile)
        image = h.image or (prof.image if prof else None)
        if image:
            users.setdefault(image, []).append(h.hostname or h.mac)
    default = inv.profiles.get(cfg.boot.default_profile)
    if default is not None and cfg.dhcp.unknown_hosts == "default":
        users.setdefault(default.image, []).append("(unknown hosts)")
    return users


def _pinned(config_path: Path | None, name: str) -> set[int]:
    from sidusd.image.generations import pinned_generations
    return pinned_generations(_image_users(config_path), name)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``sidus-image``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    after: list[str] | None = None
    if "run" in argv and "--" in argv[argv.index("run"):]:
        # `run NAME [options] -- CMD...`: the options before `--` are sidus-image's, what follows the
        # command's (argparse's REMAINDER alone would take `-m TEXT` after NAME as the command)
        i = argv.index("--", argv.index("run"))
        argv, after = argv[:i], argv[i + 1:]
    args = _parser().parse_args(argv)
    setup_logging(args.log_format, "info" if args.verbose else "warning")
    try:
        where = image_paths(images_dir=args.images_dir, tftp_root=args.tftp_root, images_file=args.images_file,
                            control_socket=args.control_socket, config_flag=args.config)
    except ToolConfigError as e:
        print(f"sidus-image: {e}", file=sys.stderr)
        return 2
    sock = where.control_socket
    if sock is not None and not (args.control_socket or os.environ.get(SOCKET_ENV)) and not sock.exists():
        sock = None                      # the config's socket, and no sidusd: it reads the images file at start
    args.config = where.config
    adm = Administrator(where.images_dir, where.tftp_root, cache_dir=args.cache_dir,
                        images_file=where.images_file, control_socket=sock,
                        btrfs_snapshots=args.btrfs_snapshots)
    served_before = _served_now(adm)
    try:
        if args.cmd == "build":
            from sidusd.image.arch import check_build_host, with_arch
            recipe = with_arch(read_recipe(args.recipe), args.arch)
            check_build_host(recipe)
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
            try:
                adm.shell(args.name, args.parent, switch=not args.no_switch, keep_failed=args.keep_failed,
                          message=args.message)
            except shell.Discarded as e:
                print(f"sidus-image: {e}", file=sys.stderr)
        elif args.cmd == "publish":
            return _say_served(adm, args.name, shell.publish_kept(adm, args.name, args.number, args.force))
        elif args.cmd == "drop":
            shell.drop(adm, args.name, args.number)
            print(f"{args.name}: generation {args.number} removed")
        elif args.cmd == "list":
            _list(adm, args.name, args.json, args.config)
        elif args.cmd == "rollback":
            return _say_served(adm, args.name, adm.rollback(args.name, args.to))
        elif args.cmd == "gc":
            return _gc(adm, args.name, args.keep, args.config, args.dry_run)
        elif args.cmd == "diff":
            return _diff(adm, args.name, args.a, args.b, args.json)
        elif args.cmd in ("push", "rack-scan"):
            return rollout.run(args, adm.store, where.tftp_root)
        elif args.cmd == "import":
            from sidusd.image.importer import import_tree
            import_tree(adm, args.name, args.dir, in_place=args.in_place, switch=not args.no_switch,
                        keep_failed=args.keep_failed)
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
