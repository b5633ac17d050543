"""`sidusctl hosts show | set | adopt` and the reason column of `sidusctl clients`.

    sidusctl hosts show MAC
    sidusctl hosts set MAC [--profile P] [--hostname H] [--image I] [--ip A] [--append ARGS] [--unset FIELD]...
    sidusctl hosts adopt MAC [--profile P] [--hostname H] [--image I] [--append ARGS]
    sidusctl hosts clear-conflict MAC
    sidusctl hosts rotate-secret MAC

Argument parsing, the request of each command and its human output; the socket
talk and the exit codes are :mod:`sidusd.ctl`'s.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from sidusd.control import messages as m

COMMANDS = ("show", "set", "adopt", "clear-conflict", "rotate-secret")
SIMPLE = {"show": m.OP_HOSTS_SHOW, "clear-conflict": m.OP_HOSTS_CLEAR_CONFLICT,
          "rotate-secret": m.OP_HOSTS_ROTATE_SECRET}       # the commands that take a MAC only


def add_parsers(hs: Any, common: argparse.ArgumentParser) -> None:
    """The ``hosts show|set|adopt`` subcommands on the ``hosts`` subparsers ``hs``."""
    s = hs.add_parser("show", parents=[common], help="one host: its fields, what it boots, what was seen of it")
    s.add_argument("mac")
    e = hs.add_parser("set", parents=[common], help="change some fields of a host, keep the others")
    e.add_argument("mac")
    for name, help_ in (("profile", None), ("hostname", None), ("image", "image name"),
                        ("ip", "reserved address (full DHCP mode)"),
                        ("append", "extra kernel command line arguments (replaces the host's)")):
        e.add_argument(f"--{name}", help=help_, metavar="ARGS" if name == "append" else None)
    e.add_argument("--unset", action="append", choices=("hostname", "image", "ip", "append"), default=None,
                   help="clear this field (repeatable)")
    a = hs.add_parser("adopt", parents=[common],
                      help="make a machine seen in `sidusctl clients` a host (profile: boot.default_profile)")
    a.add_argument("mac")
    for name in ("profile", "hostname", "image", "append"):
        a.add_argument(f"--{name}", metavar="ARGS" if name == "append" else None)
    hs.add_parser("clear-conflict", parents=[common],
                  help="forget the addresses a MAC was claimed from (after checking a CONFLICT)").add_argument("mac")
    hs.add_parser("rotate-secret", parents=[common],
                  help="a new iSCSI CHAP secret for a persistent host (after a suspected theft)").add_argument("mac")


def request(ns: argparse.Namespace, mac: Callable[[str], str]) -> tuple[str, dict[str, Any]]:
    """The op and arguments of ``hosts show|set|adopt``; ``mac`` normalizes (usage error if bad)."""
    if ns.hosts_cmd in SIMPLE:
        return SIMPLE[ns.hosts_cmd], {"mac": mac(ns.mac)}
    names = ("profile", "hostname", "image", "ip", "append") if ns.hosts_cmd == "set" else (
        "profile", "hostname", "image", "append")
    args: dict[str, Any] = {"mac": mac(ns.mac)}
    args.update({k: getattr(ns, k) for k in names if getattr(ns, k) is not None})
    if ns.hosts_cmd == "set":
        if ns.unset:
            args["unset"] = list(ns.unset)
        return m.OP_HOSTS_SET, args
    return m.OP_HOSTS_ADOPT, args


def answer_cell(c: dict[str, Any]) -> str:
    """The ANSWER column of ``clients``: ``-`` (answered or unknown), else ``NONE: reason``."""
    u = c.get("unanswered")
    return f"NONE: {u.get('reason') or u.get('code')}" if u else "-"


def problem_lines(problems: list[dict[str, Any]]) -> list[str]:
    """The PROBLEMS section of ``sidusctl status`` (sidusd/preflight.py), empty when there is none."""
    if not problems:
        return []
    return (["", f"PROBLEMS ({len(problems)}): what a boot needs and does not find (sidusd --check)"]
            + [f"  {p.get('key')}: {p.get('path')}: {p.get('reason')}; fix: {p.get('fix')}" for p in problems])


def _kv(rows: list[tuple[str, Any]], cell: Callable[[Any], str]) -> list[str]:
    return [f"{k + ':':<14} {cell(v)}" for k, v in rows]


def render(op: str, result: dict[str, Any], hosts_table: Callable[[list[dict[str, Any]]], str],
           cell: Callable[[Any], str]) -> str | None:
    """The human output of the ops of this module (None: not one of them)."""
    if op == m.OP_HOSTS_SHOW:
        h, b, c = result.get("host"), result.get("boots"), result.get("client")
        out = [f"host {result.get('mac')}" + ("" if h else " (not in the inventory)")]
        if h:
            out += _kv([(k, h.get(k)) for k in ("profile", "hostname", "image", "ip", "append")], cell)
        if b:
            out += ["boots:"] + ["  " + x for x in _kv(
                [(k, b.get(k)) for k in ("profile", "image", "image_root", "kernel", "initrd", "overlay",
                                         "append", "why") if k in b], cell)]
        else:
            out.append("boots:         nothing (not in the inventory and dhcp.unknown_hosts is ignore)")
        if c:
            u = c.get("unanswered")
            out += ["seen:"] + ["  " + x for x in _kv(
                [("ip", c.get("ip")), ("arch", c.get("arch")), ("events", c.get("events")),
                 ("answer", f"NONE: {u.get('reason')}" if u else "answered")], cell)]
        else:
            out.append("seen:          not recently")
        return "\n".join(out)
    if op == m.OP_HOSTS_SET:
        return (f"host {result['host'].get('mac')} changed ({', '.join(result.get('changed') or [])}; "
                "before / after)\n" + hosts_table([result["previous"], result["host"]]))
    if op == m.OP_HOSTS_ADOPT:
        return f"host {result['host'].get('mac')} adopted\n" + hosts_table([result["host"]])
    if op == m.OP_HOSTS_CLEAR_CONFLICT:
        was = ", ".join(result.get("claimed_from") or []) or "no address"
        return (f"host {result.get('mac')}: claims forgotten (it was claimed from {was}"
                + ("; a CONFLICT" if result.get("conflict") else "") + ")")
    if op == m.OP_HOSTS_ROTATE_SECRET:
        return (f"host {result.get('mac')}: new CHAP secret set on {result.get('target')} "
                "(its next boot config carries it; a session logged in with the old one stays up)")
    return None
