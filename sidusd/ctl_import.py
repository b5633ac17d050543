"""``sidusctl hosts import FILE...``: a hand-made site's hosts into the inventory, all or nothing.

The files are read here (the parsers, :mod:`sidusd.boot.hostimport`, are pure); every error is
printed with its file and line and nothing is sent.  Otherwise the hosts go to the daemon as one
``hosts.import`` request, which writes them in one inventory change (it checks again: a MAC that
reached the inventory since is refused, nothing is imported).  docs/migration.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sidusd.boot import hostimport as hi
from sidusd.control import messages as m
from sidusd.errors import RemoteProtocolError

MAX_FILE_BYTES = 16 * 1024 * 1024
REFUSED, BAD_FILES = 1, 2          # sidusctl's EXIT_ERROR, EXIT_USAGE


def add_parser(hs: Any, common: argparse.ArgumentParser) -> None:
    """The ``hosts import`` subcommand under ``hs`` (the ``hosts`` subparsers)."""
    i = hs.add_parser("import", parents=[common],
                      help="add the hosts of a CSV, /etc/ethers, dhcpd.conf or pxelinux.cfg/ (all or nothing)")
    i.add_argument("files", nargs="+", metavar="FILE", help="a file, or a pxelinux.cfg/ directory")
    i.add_argument("--format", choices=("auto", *hi.FORMATS), default="auto",
                   help="default auto: a directory is pxelinux, *.csv or a 'mac,...' header csv, "
                        "'hardware ethernet' dhcpd, else ethers")
    i.add_argument("--profile", help="profile of every host whose file names none")
    i.add_argument("--iscsi-profile", metavar="PROFILE",
                   help="profile of the pxelinux hosts that booted with aufs=iscsi (default: --profile)")
    i.add_argument("--image", help="image of every host whose file names none (default: the profile's)")
    i.add_argument("--replace", action="store_true", help="replace hosts already in the inventory")
    i.add_argument("--dry-run", action="store_true", help="check the files and show the hosts; change nothing")


def read(path: Path, fmt: str) -> hi.Parsed:
    """Parse one FILE argument (a directory is a pxelinux.cfg/)."""
    src = str(path)
    try:
        if path.is_dir():
            if fmt not in ("auto", "pxelinux"):
                return hi.Parsed(errors=(hi.ImportIssue(src, f"is a directory, not a {fmt} file"),))
            files = {}
            for p in sorted(path.iterdir()):
                if p.is_file() and not p.is_symlink() and p.stat().st_size <= MAX_FILE_BYTES:
                    files[p.name] = p.read_text(encoding="utf-8", errors="replace")
            return hi.parse_pxelinux(files, src.rstrip("/"))
        if fmt == "pxelinux":
            return hi.Parsed(errors=(hi.ImportIssue(src, "--format pxelinux takes a pxelinux.cfg/ directory"),))
        if path.stat().st_size > MAX_FILE_BYTES:
            return hi.Parsed(errors=(hi.ImportIssue(src, f"larger than {MAX_FILE_BYTES} bytes"),))
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        return hi.Parsed(errors=(hi.ImportIssue(src, f"not UTF-8 text ({e.reason} at byte {e.start})"),))
    except OSError as e:
        return hi.Parsed(errors=(hi.ImportIssue(src, e.strerror or str(e)),))
    return hi.parse(hi.detect_format(path.name, text) if fmt == "auto" else fmt, text, src)


def batch(ns: argparse.Namespace, hosts: tuple[hi.ImportedHost, ...]) -> tuple[list[dict[str, Any]],
                                                                               list[hi.ImportIssue]]:
    """The ``hosts.import`` entries, or the hosts that have no profile."""
    out, errors = [], []
    for h in hosts:
        profile = h.profile or ((ns.iscsi_profile or ns.profile) if h.overlay_hint == "iscsi" else ns.profile)
        if profile is None:
            errors.append(hi.ImportIssue(h.source, "no profile: the file names none, give --profile"))
            continue
        entry = {"mac": h.mac, "profile": profile, "source": h.source, "append": h.append or None,
                 "hostname": h.hostname, "ip": h.ip, "image": h.image or ns.image}
        out.append({k: v for k, v in entry.items() if v is not None})
    return out, errors


def run(ns: argparse.Namespace, send: Callable[[str, dict[str, Any]], Any],
        render_hosts: Callable[[list[dict[str, Any]]], str], error: Callable[[int, str], Exception]) -> int:
    """Run ``hosts import`` with sidusctl's ``send(op, args) -> Response``, its table and its error
    type (raised with sidusctl's exit code: 1 the daemon refused, 2 errors in the files)."""
    listed = send(m.OP_HOSTS_LIST, {})
    if not listed.ok:
        raise error(REFUSED, f"sidusd: {listed.error}")
    existing = {h["mac"]: f"host {h.get('hostname') or h['mac']}, profile {h.get('profile')}"
                for h in listed.result or []}
    parsed = hi.merge([read(Path(f), ns.format) for f in ns.files], existing, ns.replace)
    entries, errors = batch(ns, parsed.hosts)
    errors = list(parsed.errors) + errors
    for note in parsed.notes:
        print(f"note: {note}", file=sys.stderr)
    if not errors and not entries:
        errors.append(hi.ImportIssue(", ".join(ns.files), "no host found"))
    if errors:
        for e in errors:
            print(f"sidusctl: {e}", file=sys.stderr)
        raise error(BAD_FILES, f"{len(errors)} error(s): nothing imported")
    dropped = sum(1 for h in parsed.hosts if h.dropped)
    if ns.dry_run:
        print(render_hosts(entries))
        print(f"dry run: {len(entries)} host(s) would be imported; nothing changed")
        return 0
    try:
        resp = send(m.OP_HOSTS_IMPORT, {"hosts": entries, "replace": ns.replace})
    except RemoteProtocolError as exc:
        raise error(BAD_FILES, f"{exc} ({len(entries)} hosts: import the files in parts)") from None
    if not resp.ok:
        raise error(REFUSED, f"sidusd: {resp.error}")
    if ns.json:
        print(json.dumps(resp.result, indent=2))
        return 0
    r = resp.result or {}
    print(render_hosts(entries))
    print(f"imported {r.get('imported')} host(s): {len(r.get('added') or [])} added, "
          f"{len(r.get('replaced') or [])} replaced"
          + (f"; {dropped} pxelinux APPEND line(s) lost the arguments sidusd renders itself "
             "(docs/migration.md)" if dropped else ""))
    return 0
