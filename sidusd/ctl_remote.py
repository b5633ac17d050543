"""`sidusctl` over TCP: one remote sidusd (``--server HOST:PORT``), every rack server (``--all``,
``control.servers``), and the site PKI (``sidusctl pki``).

The same request and response lines as the unix socket (:mod:`sidusd.control.messages`), inside
mutual TLS (:func:`sidusd.control.tls.client_context`: the client certificate of ``--cert`` /
``--key``, the server verified against ``--ca`` and the name dialled).  A fan-out sends the
request to each server (in parallel) and reports each: ``ok``, ``error`` (the daemon refused) or
``unreachable`` (no connection, TLS refused, no answer); the exit status is non-zero when any
server did not say ok: no partial success is silent.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sidusd.cliconfig import CA_ENV, CERT_ENV, KEY_ENV, SERVER_ENV, ClientTls, client_tls, remote_servers
from sidusd.control import messages as m
from sidusd.control.remote_authz import parse_listen
from sidusd.errors import ConfigError, RemoteProtocolError

MAX_PARALLEL = 32


def add_options(p: argparse.ArgumentParser, d: Callable[[Any], Any]) -> None:
    """The remote options (``d``: the default, SUPPRESS on subcommands, see ctl._options)."""
    p.add_argument("--server", action="append", default=d(None), metavar="HOST:PORT",
                   help=f"a remote sidusd's control.tcp listener (repeat: each of them; default ${SERVER_ENV})")
    p.add_argument("--all", action="store_true", default=d(False),
                   help="run the command on every rack server of control.servers in the config")
    p.add_argument("--cert", default=d(None), help=f"client certificate (default ${CERT_ENV}, control.client.cert)")
    p.add_argument("--key", default=d(None), help=f"its private key (default ${KEY_ENV}, control.client.key)")
    p.add_argument("--ca", default=d(None), help=f"the site CA (default ${CA_ENV}, control.client.ca)")


def targets(ns: argparse.Namespace) -> tuple[tuple[str, ...], ClientTls | None]:
    """The servers to talk to (() = the local socket) and, for them, the client's files."""
    if ns.socket and not ns.server and not ns.all:      # --socket: the local daemon, whatever $SIDUS_SERVER says
        return (), None
    servers = remote_servers(ns.server, ns.all, ns.config)
    return servers, (client_tls(ns.cert, ns.key, ns.ca, ns.config) if servers else None)


def context(tls: ClientTls) -> ssl.SSLContext:
    from sidusd.control.tls import client_context
    from sidusd.ctl_errors import EXIT_USAGE, CtlError
    try:
        return client_context(tls.cert, tls.key, tls.ca, prefix="sidusctl")
    except ConfigError as exc:
        raise CtlError(EXIT_USAGE, f"{exc.path.replace('sidusctl.', '--')}: {exc.reason}") from None


def call_tcp(server: str, ctx: ssl.SSLContext, op: str, args: dict[str, Any] | None,
             timeout_s: float) -> m.Response:
    """One request to ``server`` (``host:port``) over mutual TLS; CtlError as :func:`sidusd.ctl.call`."""
    from sidusd.ctl_errors import EXIT_PROTOCOL, EXIT_UNREACHABLE, EXIT_USAGE, CtlError
    try:
        host, port = parse_listen(server)
    except ValueError as exc:
        raise CtlError(EXIT_USAGE, f"--server {exc}") from None
    request = m.encode_request(op, args)
    buf = bytearray()
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as s:
            s.sendall(request)
            while b"\n" not in buf:
                if len(buf) > m.MAX_RESPONSE_BYTES:
                    raise CtlError(EXIT_PROTOCOL, f"response from {server} exceeds {m.MAX_RESPONSE_BYTES} bytes")
                chunk = s.recv(1 << 16)
                if not chunk:
                    raise CtlError(EXIT_UNREACHABLE, f"{server} closed the connection without answering "
                                                     "(TLS 1.3: a refused client certificate looks like this)")
                buf += chunk
    except ssl.SSLCertVerificationError as exc:
        raise CtlError(EXIT_UNREACHABLE, f"TLS with {server}: its certificate is not trusted "
                                         f"({exc.verify_message}; is --ca the site's CA?)") from None
    except ssl.SSLError as exc:
        raise CtlError(EXIT_UNREACHABLE, f"TLS with {server} failed: {exc.reason or exc}") from None
    except TimeoutError:
        raise CtlError(EXIT_UNREACHABLE, f"no answer from {server} within {timeout_s:g} s") from None
    except OSError as exc:
        raise CtlError(EXIT_UNREACHABLE, f"cannot reach {server}: {exc.strerror or exc}") from None
    try:
        return m.decode_response(bytes(buf[:buf.index(b"\n")]))
    except RemoteProtocolError as exc:
        raise CtlError(EXIT_PROTOCOL, f"bad response from {server}: {exc}") from None


def one(server: str, ctx: ssl.SSLContext, op: str, args: dict[str, Any] | None,
        timeout_s: float) -> dict[str, Any]:
    """``{"server", "status": ok|error|unreachable, "result" or "error"}`` for one server."""
    from sidusd.ctl_errors import EXIT_UNREACHABLE, CtlError
    try:
        resp = call_tcp(server, ctx, op, args, timeout_s)
    except CtlError as exc:
        return {"server": server, "status": "unreachable" if exc.code == EXIT_UNREACHABLE else "error",
                "error": str(exc)}
    if not resp.ok:
        return {"server": server, "status": "error", "error": f"sidusd: {resp.error}"}
    return {"server": server, "status": "ok", "result": resp.result}


def fan_out(servers: tuple[str, ...], ctx: ssl.SSLContext, op: str, args: dict[str, Any] | None,
            timeout_s: float, as_json: bool, render: Callable[[str, Any], str]) -> int:
    """``op`` on every server; one line each (``--json``: the list); 0 only if every one said ok."""
    from sidusd.ctl_errors import EXIT_ERROR, EXIT_OK, EXIT_UNREACHABLE
    from sidusd.ctl_format import table
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(servers))) as pool:
        rows = list(pool.map(lambda s: one(s, ctx, op, args, timeout_s), servers))
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        def detail(r: dict[str, Any]) -> str:
            text = render(op, r["result"]) if r["status"] == "ok" else r["error"]
            return (text.splitlines() or [""])[0]
        print("\n".join(table(["SERVER", "STATUS", "DETAIL"], [[r["server"], r["status"], detail(r)] for r in rows])))
    failed = [r for r in rows if r["status"] != "ok"]
    if not failed:
        return EXIT_OK
    print(f"sidusctl: {op} failed on {len(failed)} of {len(rows)} servers: "
          f"{', '.join(r['server'] for r in failed)}", file=sys.stderr)
    return EXIT_UNREACHABLE if all(r["status"] == "unreachable" for r in failed) else EXIT_ERROR


# -- sidusctl pki ------------------------------------------------------------------

def add_pki_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("pki", parents=[common], help="make the site CA, server and client certificates (openssl)")
    ps = p.add_subparsers(dest="pki_cmd", required=True, metavar="ca|server|client")
    ca = ps.add_parser("ca", help="a new CA: DIR/ca.crt, DIR/ca.key")
    ca.add_argument("dir")
    ca.add_argument("--name", default="sidus", help="the site's name (CN '<name> control CA')")
    sv = ps.add_parser("server", help="a rack server's certificate: DIR/NAME.crt, DIR/NAME.key")
    sv.add_argument("dir")
    sv.add_argument("name")
    sv.add_argument("--address", action="append", required=True, metavar="IP|DNS",
                    help="what sidusctl --server dials (repeatable; the certificate's subjectAltName)")
    cl = ps.add_parser("client", help="an operator's or tool's certificate, CN=NAME (list NAME in "
                                      "control.tcp.admins or readers)")
    cl.add_argument("dir")
    cl.add_argument("name")


def pki_main(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from sidusd.control import tls_pki
    try:
        if ns.pki_cmd == "ca":
            out = tls_pki.init_ca(Path(ns.dir), ns.name)
        else:
            out = tls_pki.issue(Path(ns.dir), ns.name, ns.pki_cmd, getattr(ns, "address", None) or ())
    except (tls_pki.PkiError, OSError) as exc:
        print(f"sidusctl pki: {exc}", file=sys.stderr)
        return 1
    print(f"{out} and {out.with_suffix('.key')} written")
    return 0
