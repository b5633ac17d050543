"""``sidus-image`` / ``python3 -m sidusd.image``: build and administer network-boot images.

Commands (docs/images.md)::

    sidus-image build RECIPE [--no-switch] [--keep-failed]
    sidus-image list [NAME] [--json]
    sidus-image update NAME
    sidus-image run NAME -- CMD [ARG...]
    sidus-image shell NAME
    sidus-image rollback NAME [--to N]
    sidus-image gc NAME [--keep N]
    sidus-image import NAME DIR [--in-place] [--no-switch]   (docs/migration.md)

Where it works comes from the daemon's config (``--config``, else ``$SIDUS_CONFIG``, else
/etc/sidus/sidus.yaml; :func:`sidusd.cliconfig.image_paths`): the images directory beside its
``images_file``, ``tftp.root``, ``control.socket_path`` (``sidusctl reload`` after a switch, while
sidusd runs).  Each can be overridden: ``--images-dir`` / ``$SIDUS_IMAGES_DIR``, ``--tftp-root`` /
``$SIDUS_TFTP_ROOT``, ``--images-file``, ``--control-socket`` / ``$SIDUS_SOCKET``; with both
directories given, no config is read.  ``--cache-dir``: the debootstrap package cache.
Exit codes: 0 ok, 1 operation failed (the message names the stage), 2 usage or
recipe error, 75 the image is busy (another administration holds its lock),
130 interrupted (everything was unmounted).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from sidusd.cliconfig import ToolConfigError, image_paths
from sidusd.control.messages import SOCKET_ENV
from sidusd.errors import ConfigError, SidusError
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
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a new generation from a recipe")
    b.add_argument("recipe", type=Path)
    for sp in (b, sub.add_parser("update", help="apt update + full-upgrade in a new generation"),
               sub.add_parser("run", help="run a command in a new generation"),
               sub.add_parser("shell", help="interactive shell in a new generation")):
        if sp.prog.split()[-1] != "build":
            sp.add_argument("name")
        sp.add_argument("--no-switch", action="store_true", help="do not serve the new generation")
        sp.add_argument("--keep-failed", action="store_true", help="keep a failed generation's directory")
        if sp.prog.split()[-1] == "run":
            sp.add_argument("command", nargs=argparse.REMAINDER)
    ls = sub.add_parser("list", help="generations, size, date")
    ls.add_argument("name", nargs="?")
    ls.add_argument("--json", action="store_true")
    rb = sub.add_parser("rollback", help="serve the previous generation")
    rb.add_argument("name")
    rb.add_argument("--to", type=int, default=None)
    gc = sub.add_parser("gc", help="remove old unserved generations")
    gc.add_argument("name")
    gc.add_argument("--keep", type=int, default=2)
    im = sub.add_parser("import", help="adopt a hand-made SIDUS tree as generation 1 (docs/migration.md)")
    im.add_argument("name")
    im.add_argument("dir", type=Path)
    im.add_argument("--in-place", action="store_true", help="move DIR into the image (same file system), no copy")
    im.add_argument("--no-switch", action="store_true", help="do not serve the new generation")
    im.add_argument("--keep-failed", action="store_true", help="keep a failed copy's directory")
    return p


def _list(adm: Administrator, name: str | None, as_json: bool, config_path: Path | None) -> None:
    users = _image_users(config_path)
    booted_by_root = _booted_by_root(config_path)
    rows: list[dict[str, Any]] = []
    for n in ([name] if name else adm.store.names()):
        for g in adm.store.list(n):
            used = users.get(f"{n}.gen-{g.number}", []) + (users.get(n, []) if g.current else [])
            recs = booted_by_root.get(os.path.realpath(g.path), [])
            rows.append({"image": n, "generation": g.number, "served": g.current, "kind": g.kind,
                         "created": g.created, "size_bytes": g.size_bytes, "kernel": g.meta.get("kver"),
                         "hosts": used,
                         "booted": [{"mac": r.mac, "hostname": r.hostname, "image": r.image,
                                     "first_served": _iso(r.first_s), "last_served": _iso(r.last_s)}
                                    for r in recs]})
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'IMAGE':<16} {'GEN':>4} {'SERVED':<6} {'KIND':<7} {'CREATED':<26} {'SIZE':>10}  {'KERNEL':<16} "
          "HOSTS (inventory) / BOOTED")
    for r in rows:
        booted_names = [f"{b['hostname'] or b['mac']} (booted)" for b in r["booted"]]
        print(f"{r['image']:<16} {r['generation']:>4} {'*' if r['served'] else '':<6} {r['kind']:<7} "
              f"{r['created']:<26} {_human(r['size_bytes']):>10}  {r['kernel'] or '-':<16} "
              f"{', '.join(r['hosts'] + booted_names) or '-'}")


def _iso(t: float) -> str:
    import datetime as dt
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")


def _booted_by_root(config_path: Path | None, now: float | None = None) -> dict[str, list]:
    """Resolved root directory -> live booted records (sidusd's booted file, ``booted:`` of
    sidus.yaml; docs/images.md "Booted generations").  Empty without a config or records."""
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
    live = table.live(time.time() if now is None else now, cfg.booted.ttl_s)
    out: dict[str, list] = {}
    for root, recs in users_by_root(live).items():
        out.setdefault(os.path.realpath(root), []).extend(recs)
    return out


def _gc(adm: Administrator, name: str, keep: int, config_path: Path | None) -> int:
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
    gone = adm.gc(name, keep, sorted(pinned | booted))
    print(f"{name}: removed generation(s) {', '.join(map(str, gone)) or 'none'}")
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
                        images_file=where.images_file, control_socket=sock)
    try:
        if args.cmd == "build":
            adm.build(read_recipe(args.recipe), switch=not args.no_switch, keep_failed=args.keep_failed)
        elif args.cmd == "update":
            adm.update(args.name, switch=not args.no_switch, keep_failed=args.keep_failed)
        elif args.cmd == "run":
            cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
            if not cmd:
                print("sidus-image run: give the command after --", file=sys.stderr)
                return 2
            adm.run(args.name, cmd, switch=not args.no_switch, keep_failed=args.keep_failed)
        elif args.cmd == "shell":
            adm.run(args.name, ["/bin/bash", "-i"] if (adm.store.path(args.name, adm._served(args.name))
                                                        / "bin/bash").exists() else ["/bin/sh", "-i"],
                    interactive=True, switch=not args.no_switch, keep_failed=args.keep_failed)
        elif args.cmd == "list":
            _list(adm, args.name, args.json, args.config)
        elif args.cmd == "rollback":
            n = adm.rollback(args.name, args.to)
            print(f"{args.name}: generation {n} served")
        elif args.cmd == "gc":
            return _gc(adm, args.name, args.keep, args.config)
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
        print("sidus-image: interrupted; nothing is left mounted, the served generation is unchanged",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
