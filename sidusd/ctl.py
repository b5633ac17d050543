"""`sidusctl`: the operator's command line for a running sidusd.

    sidusctl [--socket PATH] [--json] status
    sidusctl clients [MAC]
    sidusctl hosts list
    sidusctl hosts add MAC --profile P [--hostname H] [--image I] [--ip A] [--append ARGS] [--persistent]
    sidusctl hosts remove MAC [--delete-disk]
    sidusctl hosts disk MAC [--show-secret]
    sidusctl hosts reset-disk MAC
    sidusctl hosts show MAC | set MAC [--FIELD V] [--unset F] | adopt MAC;  sidusctl tftp-root populate [DIR]
    sidusctl hosts import FILE... [--format F] [--profile P] [--replace] [--dry-run]  (sidusd/ctl_import.py)
    sidusctl reload | watch
    sidusctl --server HOST:PORT [--cert C --key K --ca CA] COMMAND;  sidusctl --all COMMAND  (TCP, mutual TLS)
    sidusctl pki ca DIR | server DIR NAME --address IP | client DIR NAME       (sidusd/ctl_remote.py)

It talks to the daemon's control socket (``--socket``, else ``$SIDUS_SOCKET``, else the
daemon's config's, :func:`sidusd.cliconfig.control_socket`) with :mod:`sidusd.control.messages`,
and imports nothing else of the daemon but :func:`sidusd.boot.inventory.normalize_mac` (and, for
``hosts import``, :mod:`sidusd.ctl_import` with the pure parsers of :mod:`sidusd.boot.hostimport`).

Exit codes: 0 success; 1 the daemon answered with an error (refused request,
failed reload); 2 usage error (bad option, invalid MAC); 3 the daemon is not
reachable (no socket, connection refused, no answer); 4 permission denied
(root is needed); 5 the daemon's answer is not a valid response.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import socket
import sys
from typing import Any

from sidusd import ctl_inventory, ctl_remote, tftproot
from sidusd.cliconfig import CONFIG_ENV, DEFAULT_CONFIG, ToolConfigError, control_socket
from sidusd.control import messages as m
from sidusd.ctl_errors import (  # noqa: F401 (sidusctl's names)
    EXIT_ERROR,
    EXIT_OK,
    EXIT_PERMISSION,
    EXIT_PROTOCOL,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CtlError,
)
from sidusd.ctl_format import _cell, _keys, fmt_duration, fmt_size, fmt_time, table  # noqa: F401 (sidusctl's names)
from sidusd.errors import RemoteProtocolError, SidusError

DEFAULT_TIMEOUT_S = 30.0


# -- talking to the daemon ---------------------------------------------------

def call(path: str, op: str, args: dict[str, Any] | None = None,
         timeout_s: float = DEFAULT_TIMEOUT_S) -> m.Response:
    """Send one request to the daemon at ``path`` and return its decoded response."""
    request = m.encode_request(op, args)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        try:
            s.connect(path)
        except FileNotFoundError:
            raise CtlError(EXIT_UNREACHABLE, f"sidusd is not running: no control socket at {path}") from None
        except ConnectionRefusedError:
            raise CtlError(EXIT_UNREACHABLE,
                           f"sidusd is not running: {path} refuses connections (stale socket)") from None
        except PermissionError:
            raise CtlError(EXIT_PERMISSION,
                           f"permission denied on {path}: sidusctl must run as root") from None
        except TimeoutError:
            raise CtlError(EXIT_UNREACHABLE, f"sidusd does not accept connections on {path}") from None
        except OSError as exc:
            raise CtlError(EXIT_UNREACHABLE, f"cannot connect to {path}: {exc.strerror or exc}") from None
        buf = bytearray()
        try:
            try:
                s.sendall(request)
            except (BrokenPipeError, ConnectionResetError):
                pass        # refused early (e.g. too many connections): its error line may be waiting
            while b"\n" not in buf:
                if len(buf) > m.MAX_RESPONSE_BYTES:
                    raise CtlError(EXIT_PROTOCOL, f"response from sidusd exceeds {m.MAX_RESPONSE_BYTES} bytes")
                chunk = s.recv(1 << 16)
                if not chunk:
                    raise CtlError(EXIT_PROTOCOL, "sidusd closed the connection without answering")
                buf += chunk
        except TimeoutError:
            raise CtlError(EXIT_UNREACHABLE, f"no answer from sidusd within {timeout_s:g} s ({path})") from None
        except OSError as exc:
            raise CtlError(EXIT_UNREACHABLE, f"connection to {path} failed: {exc.strerror or exc}") from None
    try:
        return m.decode_response(bytes(buf[:buf.index(b"\n")]))
    except RemoteProtocolError as exc:
        raise CtlError(EXIT_PROTOCOL, f"bad response from sidusd: {exc}") from None



def render_status(r: dict[str, Any], tz: dt.tzinfo | None = None) -> str:
    """The `sidusctl status` page."""
    out = [f"sidusd {r.get('version', '?')}  pid {r.get('pid', '?')}  up {fmt_duration(r.get('uptime_s'))}",
           f"config            {r.get('config_path') or '-'} (generation {r.get('generation', '-')})"]
    lr = r.get("last_reload")
    if not lr:
        out.append("last reload       none since start")
    elif lr.get("ok"):
        out.append(f"last reload       ok at {fmt_time(lr.get('t'), tz)}")
        out += [f"                  note: {x}" for x in lr.get("restart_needed") or []]
    else:
        out.append(f"last reload       REFUSED at {fmt_time(lr.get('t'), tz)}: {lr.get('error')}")
    by = r.get("transfers_by_service") or {}
    detail = f" ({', '.join(f'{k} {v}' for k, v in sorted(by.items()))})" if by else ""
    out.append(f"transfers         {r.get('active_transfers', 0)} in flight{detail}")
    rows = [{"service": name, **l} for name, ls in (r.get("listeners") or {}).items() for l in ls]
    out += [""] + (table([k.upper() for k in _keys(rows, ["service"])],
                         [[d.get(k) for k in _keys(rows, ["service"])] for d in rows])
                   if rows else ["no listeners"])
    procs = r.get("processes") or []
    if procs:
        out += [""] + table(["PROCESS", "PID", "USER", "STATE", "CAPABILITIES", "RESTARTS"],
                            [[p.get("role"), p.get("pid"), p.get("user"), p.get("state", "running"),
                              _caps(p.get("cap_eff")), p.get("restarts", "-")] for p in procs])
    backends = r.get("backend_status") or {}
    if backends:
        brows = [{"backend": k, **(v if isinstance(v, dict) else {"value": v})} for k, v in backends.items()]
        keys = _keys(brows, ["backend", "ok"])
        out += [""] + table([k.upper() for k in keys], [[d.get(k) for k in keys] for d in brows])
    out += ctl_inventory.problem_lines(r.get("preflight") or [])
    counters = r.get("counters") or {}
    out += [""] + (table(["COUNTER", "VALUE"], sorted(counters.items())) if counters else ["no counters yet"])
    return "\n".join(out)


def _caps(hexmask: Any) -> str:
    """A capability mask from /proc (hex) for people: none, or the mask."""
    try:
        return "none" if int(str(hexmask), 16) == 0 else f"0x{int(str(hexmask), 16):x}"
    except ValueError:
        return "-"


def _field(v: Any) -> str:
    text = _cell(v)
    return json.dumps(text, ensure_ascii=False) if not text or any(c.isspace() or c in "\"=" for c in text) else text


_POSITIONAL = ("event", "t", "file", "bytes", "size", "duration_s")


def render_event(e: dict[str, Any], tz: dt.tzinfo | None = None) -> str:
    """One timeline line: ``12:03:04.123  tftp  pxelinux.0  412 B  0.01 s``."""
    parts = [fmt_time(e.get("t"), tz, millis=True), str(e.get("event", "?"))]
    if e.get("event") == "up" and isinstance(e.get("after_s"), (int, float)):   # a machine's up-report
        return "  ".join([parts[0], f"up after {e['after_s']} s", f"stage={_field(e.get('stage'))}"])
    size = e.get("bytes", e.get("size"))
    rest = {k: v for k, v in e.items() if k not in _POSITIONAL}
    if "file" in e and size is not None:
        parts += [str(e["file"]), fmt_size(size)]
        if "duration_s" in e:
            parts.append(fmt_duration(e["duration_s"]))
    else:
        rest = {k: v for k, v in e.items() if k not in ("event", "t")}
    parts += [f"{k}={_field(v)}" for k, v in rest.items()]
    return "  ".join(parts)


def render_clients(clients: list[dict[str, Any]], tz: dt.tzinfo | None = None) -> str:
    """Each recently seen machine, then its boot timeline indented."""
    if not clients:
        return "no machine seen yet"
    lines = table(["MAC", "IP", "ARCH", "LAST SEEN", "EVENTS", "ANSWER"],
                  [[c.get("mac"), c.get("ip"), c.get("arch"), fmt_time(c.get("last_seen"), tz),
                    len(c.get("timeline") or []), ctl_inventory.answer_cell(c)] for c in clients])
    out = [lines[0]]
    for line, c in zip(lines[1:], clients, strict=True):
        out.append(line)
        if c.get("conflict"):
            out.append(f"    CONFLICT: claimed from {', '.join(c.get('claimed_from') or [])} "
                       "recently; disk secrets are withheld (docs/security.md, L2 spoofing)")
        out += ["    " + render_event(e, tz) for e in c.get("timeline") or []]
    return "\n".join(out)


_HOST_COLS = ("mac", "hostname", "profile", "image", "ip", "append")


def render_hosts(hosts: list[dict[str, Any]]) -> str:
    """The inventory's hosts as a table."""
    if not hosts:
        return "no hosts in the inventory"
    keys = list(_HOST_COLS) + [k for k in _keys(hosts) if k not in _HOST_COLS]
    return "\n".join(table([k.upper() for k in keys], [[h.get(k) for k in keys] for h in hosts]))


def render_disk(d: dict[str, Any]) -> str:
    """A host's iSCSI disk, one ``key: value`` per line (the secret only if the daemon sent it)."""
    rows = [("disk", d.get("backing_file")), ("size", fmt_size(d.get("size_bytes"))),
            ("used", fmt_size(d.get("used_bytes"))), ("target", d.get("target")),
            ("initiator", d.get("initiator")), ("chap user", d.get("user")),
            ("served", "yes" if d.get("served") else "NO (target missing: see sidusctl status)"),
            ("logged in", "yes" if d.get("logged_in") else "no")]
    if "secret" in d:
        rows.append(("chap secret", d["secret"]))
    return "\n".join(f"{k + ':':<12} {_cell(v)}" for k, v in rows)


def render(op: str, result: Any, tz: dt.tzinfo | None = None) -> str:
    """The human output of ``op`` for a successful ``result``."""
    if op == m.OP_STATUS:
        return render_status(result, tz)
    if op == m.OP_CLIENTS:
        return render_clients(result, tz)
    if op == m.OP_HOSTS_LIST:
        return render_hosts(result)
    if op == m.OP_HOSTS_ADD:
        host, prev = result.get("host") or {}, result.get("previous")
        if not prev:
            out = f"host {host.get('mac')} added\n" + render_hosts([host])
        else:
            out = f"host {host.get('mac')} replaced (before / after)\n" + render_hosts([prev, host])
        return out + ("\n" + render_disk(result["disk"]) if result.get("disk") else "")
    if op == m.OP_HOSTS_REMOVE:
        return f"host {result.get('removed')} removed" + (" (disk deleted)" if result.get("disk_deleted") else "")
    if op in (m.OP_HOSTS_DISK, m.OP_HOSTS_RESET_DISK):
        return ("disk wiped: the next boot makes a new file system\n" if op == m.OP_HOSTS_RESET_DISK
                else "") + render_disk(result)
    if isinstance(result, dict) and (own := ctl_inventory.render(op, result, render_hosts, _cell)) is not None:
        return own
    if op == m.OP_RELOAD:
        lines = [f"reloaded (generation {result.get('generation', '-')})"]
        return "\n".join(lines + [f"warning: {x}" for x in result.get("restart_needed") or []])
    return json.dumps(result, indent=2)


# -- command line ----------------------------------------------------------------

def _options(p: argparse.ArgumentParser, main: bool) -> None:
    """The global options, accepted before and after the command (``SUPPRESS`` on subcommands
    so that they do not overwrite what was given before the command)."""
    d = (lambda v: v) if main else (lambda v: argparse.SUPPRESS)
    p.add_argument("--socket", default=d(None), metavar="PATH",
                   help=f"control socket (default ${m.SOCKET_ENV}, else control.socket_path of the config)")
    p.add_argument("--config", default=d(None), metavar="FILE",
                   help=f"the daemon's config, read for its control socket (default ${CONFIG_ENV}, "
                        f"else {DEFAULT_CONFIG})")
    p.add_argument("--json", action="store_true", default=d(False), help="print the daemon's raw result as JSON")
    p.add_argument("--timeout", type=float, default=d(DEFAULT_TIMEOUT_S), metavar="SECONDS",
                   help=f"give up waiting for the daemon after this long (default {DEFAULT_TIMEOUT_S:g})")
    ctl_remote.add_options(p, d)        # --server, --all, --cert, --key, --ca (sidusd/ctl_remote.py)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _options(common, main=False)
    p = argparse.ArgumentParser(prog="sidusctl", description="Control a running sidusd.",
                                epilog="exit codes: 0 ok, 1 daemon error, 2 usage, 3 daemon unreachable, "
                                       "4 permission denied, 5 bad response")
    _options(p, main=True)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    sub.add_parser("status", parents=[common], help="daemon, listeners, counters, backends")
    c = sub.add_parser("clients", parents=[common], help="recently seen machines and their boot timeline")
    c.add_argument("mac", nargs="?", help="only this machine")
    h = sub.add_parser("hosts", parents=[common], help="the inventory's hosts")
    hs = h.add_subparsers(dest="hosts_cmd", required=True,
                          metavar="list|show|add|set|adopt|remove|disk|reset-disk|import")
    hs.add_parser("list", parents=[common], help="list the hosts")
    a = hs.add_parser("add", parents=[common],
                      help="add a host, or replace the one with this MAC (written to the inventory file)")
    a.add_argument("mac")
    a.add_argument("--profile", required=True)
    a.add_argument("--hostname")
    a.add_argument("--image", help="image name (default: the profile's)")
    a.add_argument("--ip", help="reserved address (full DHCP mode)")
    a.add_argument("--append", metavar="ARGS", help="extra kernel command line arguments")
    a.add_argument("--persistent", action="store_true",
                   help="the profile must be overlay: iscsi; create the host's disk now and show it")
    r = hs.add_parser("remove", parents=[common], help="remove a host (and its iSCSI target)")
    r.add_argument("mac")
    r.add_argument("--delete-disk", action="store_true", help="also delete its iSCSI disk and secret")
    d = hs.add_parser("disk", parents=[common], help="a persistent host's disk: size, use, logged in")
    d.add_argument("mac")
    d.add_argument("--show-secret", action="store_true", help="also print its CHAP secret")
    z = hs.add_parser("reset-disk", parents=[common],
                      help="wipe a persistent host's disk (factory reset; refused while it is logged in)")
    z.add_argument("mac")
    ctl_inventory.add_parsers(hs, common)
    tftproot.add_parser(sub, common)
    ctl_remote.add_pki_parser(sub, common)
    from sidusd import ctl_import
    ctl_import.add_parser(hs, common)
    sub.add_parser("reload", parents=[common], help="re-read config and inventory (like SIGHUP)")
    sub.add_parser("watch", parents=[common], help="live view of the boots (/ filter, q quit)").add_argument(
        "--interval", type=float, default=1.0, metavar="SECONDS", help="refresh period (default 1)")
    return p


def _mac(text: str) -> str:
    from sidusd.boot.inventory import normalize_mac
    try:
        return normalize_mac(text)
    except (ValueError, SidusError) as exc:
        raise CtlError(EXIT_USAGE, getattr(exc, "reason", None) or str(exc)) from None


def _request(ns: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    if ns.cmd == "clients":
        return m.OP_CLIENTS, ({"mac": _mac(ns.mac)} if ns.mac else {})
    if ns.cmd == "hosts":
        if ns.hosts_cmd == "list":
            return m.OP_HOSTS_LIST, {}
        if ns.hosts_cmd == "remove":
            return m.OP_HOSTS_REMOVE, {"mac": _mac(ns.mac), **({"delete_disk": True} if ns.delete_disk else {})}
        if ns.hosts_cmd == "disk":
            return m.OP_HOSTS_DISK, {"mac": _mac(ns.mac), **({"show_secret": True} if ns.show_secret else {})}
        if ns.hosts_cmd == "reset-disk":
            return m.OP_HOSTS_RESET_DISK, {"mac": _mac(ns.mac)}
        if ns.hosts_cmd in ctl_inventory.COMMANDS:
            return ctl_inventory.request(ns, _mac)
        args = {"mac": _mac(ns.mac), "profile": ns.profile}
        args.update({k: getattr(ns, k) for k in ("hostname", "image", "ip", "append") if getattr(ns, k) is not None})
        if ns.persistent:
            args["persistent"] = True
        return m.OP_HOSTS_ADD, args
    return {"status": m.OP_STATUS, "reload": m.OP_RELOAD}[ns.cmd], {}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sidusctl`` console script; returns the exit code."""
    ns = _parser().parse_args(argv)
    if ns.cmd == "tftp-root":                   # local: no daemon needed (sidusd/tftproot.py)
        return tftproot.main(ns.dir, ns.config)
    if ns.cmd == "pki":                         # local: the site's certificates (sidusd/ctl_remote.py)
        return ctl_remote.pki_main(ns)
    try:
        try:
            servers, tls = ctl_remote.targets(ns)
            path = "" if servers else control_socket(ns.socket, ns.config)
        except ToolConfigError as exc:
            raise CtlError(EXIT_USAGE, str(exc)) from None
        ctx = ctl_remote.context(tls) if tls is not None else None
        if ctx is not None and (ns.all or len(servers) > 1):        # fan-out: one line per server
            if ns.cmd == "watch" or (ns.cmd == "hosts" and ns.hosts_cmd == "import"):
                raise CtlError(EXIT_USAGE, f"{ns.cmd} talks to one server: give one --server, not several")
            return ctl_remote.fan_out(servers, ctx, *_request(ns), ns.timeout, ns.json, render)

        def send(op: str, args: dict[str, Any] | None, timeout_s: float) -> m.Response:
            if ctx is None:
                return call(path, op, args, timeout_s)
            return ctl_remote.call_tcp(servers[0], ctx, op, args, timeout_s)

        if ns.cmd == "hosts" and ns.hosts_cmd == "import":
            from sidusd import ctl_import
            return ctl_import.run(ns, lambda op, a: send(op, a, ns.timeout), render_hosts, CtlError)
        if ns.cmd == "watch":       # unreachable / permission denied: an exit code, then the screen
            from sidusd.watch import run
            send(m.OP_STATUS, None, ns.timeout)
            return run(lambda op: send(op, None, ns.timeout), max(0.2, ns.interval))
        op, args = _request(ns)
        try:
            resp = send(op, args, ns.timeout)
        except RemoteProtocolError as exc:      # the request itself is refused locally
            raise CtlError(EXIT_USAGE, str(exc)) from None
        if not resp.ok:
            raise CtlError(EXIT_ERROR, f"sidusd: {resp.error}")
        print(json.dumps(resp.result, indent=2) if ns.json else render(op, resp.result))
        return EXIT_OK
    except CtlError as exc:
        print(f"sidusctl: {exc}" if exc.code != EXIT_ERROR else str(exc), file=sys.stderr)
        return exc.code
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
