"""What ``sidus-image`` prints for ``list``, ``diff``, ``gc``, ``rollback`` and ``publish``
(docs/images.md "Generations"), and what it reads of the daemon's config for them: the
inventory's hosts (pins) and sidusd's booted records.  Out of sidusd/image/__main__.py so that
the command imports this only for these commands (a ``run`` never does).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidusd.image import publish

if TYPE_CHECKING:
    from sidusd.image.build import Administrator


def human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def say_served(adm: Administrator, name: str, number: int) -> int:
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


def list_generations(adm: Administrator, name: str | None, as_json: bool, config_path: Path | None) -> None:
    users = image_users(config_path)
    by_root = booted_by_root(config_path)
    rows: list[dict[str, Any]] = []
    for n in ([name] if name else adm.store.names()):
        gens = adm.store.list(n)
        shares = adm.store.own_shared(n, [g.number for g in gens])
        boot = publish.boot_sharing(adm.tftp_root, n, [g.number for g in gens])     # kernel + initrd
        for g in gens:
            used = users.get(f"{n}.gen-{g.number}", []) + (users.get(n, []) if g.current else [])
            recs = by_root.get(os.path.realpath(g.path), [])
            rows.append({"image": n, "generation": g.number, "served": g.current, "kind": g.kind,
                         "created": g.created, "size_bytes": g.size_bytes, "kernel": g.meta.get("kver"),
                         "own_bytes": shares[g.number][0] + boot[g.number][0],
                         "shared_bytes": shares[g.number][1] + boot[g.number][1],
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
              f"{r['created']:<26} {human(r['size_bytes']):>10} {human(r['own_bytes']):>10} "
              f"{human(r['shared_bytes']):>10}  {r['kernel'] or '-':<16} "
              f"{', '.join(r['hosts'] + booted_names) or '-'}")
        if r["message"]:
            print(f"{'':<22}{r['message']}")


def diff_generations(adm: Administrator, name: str, a: int, b: int, as_json: bool) -> int:
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


def booted_by_root(config_path: Path | None, now: float | None = None, live_only: bool = True) -> dict[str, list]:
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


def gc_generations(adm: Administrator, name: str, keep: int, config_path: Path | None, dry_run: bool = False) -> int:
    from sidusd.image.generations import booted_generations
    if config_path is None:
        print("sidus-image gc: no config read (both directories given, without --config): gc knows neither "
              "the inventory's pins nor the machines that booted a generation: only the served one and the "
              "--keep newest are kept",
              file=sys.stderr)
    pinned = pinned_by_inventory(config_path, name)
    by_root = booted_by_root(config_path)
    roots = {n: os.path.realpath(adm.store.path(name, n)) for n in adm.store.numbers(name)}
    booted = booted_generations(by_root, roots)
    for n in sorted(booted):
        who = ", ".join(r.hostname or r.mac for r in by_root[roots[n]])
        print(f"{name}: keeping generation {n}: booted by {who}")
    for n in sorted(pinned - booted):
        print(f"{name}: keeping generation {n}: pinned by the inventory")
    gone = adm.gc(name, keep, sorted(pinned | booted), dry_run=dry_run,
                  booted_by_root=booted_by_root(config_path, live_only=False))
    print(f"{name}: {'would remove' if dry_run else 'removed'} generation(s) {', '.join(map(str, gone)) or 'none'}"
          + ("" if dry_run or not gone else f" (recorded in {adm.store.image_dir(name) / 'meta' / 'removed.jsonl'})"))
    return 0


def image_users(config_path: Path | None) -> dict[str, list[str]]:
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


def pinned_by_inventory(config_path: Path | None, name: str) -> set[int]:
    from sidusd.image.generations import pinned_generations
    return pinned_generations(image_users(config_path), name)
