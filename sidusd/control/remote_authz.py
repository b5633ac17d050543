"""Who may run which control op over TCP (pure: no socket, no asyncio, no time).

A client of the TCP listener has passed mutual TLS: its certificate was issued by
``control.tcp.client_ca``.  Its role comes from the certificate's common name (CN):
listed in ``control.tcp.admins`` -> ``admin`` (every op), in ``control.tcp.readers`` ->
``read`` (the ops of :data:`READ_OPS` only), in neither -> no role, every op refused.
The decision is returned, never acted on: the edge (sidusd/control/remote.py) answers,
counts and logs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from . import messages as m

Role = Literal["admin", "read"]
ROLE_ADMIN: Role = "admin"
ROLE_READ: Role = "read"

#: the ops that change nothing and show no secret (hosts.disk can show a CHAP secret: admin)
READ_OPS = frozenset({m.OP_STATUS, m.OP_CLIENTS, m.OP_HOSTS_LIST, m.OP_HOSTS_SHOW, m.OP_IMAGES_STATUS})


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str          # "" when allowed; else a fixed short code: no_role, read_only, unknown_op


def subject_cn(peercert: Any) -> str | None:
    """The common name of a certificate as ``ssl.SSLSocket.getpeercert()`` gives it (None: none).

    ``subject`` is a tuple of RDNs, each a tuple of (key, value) pairs; a certificate with two
    CNs is refused (None): which one would count is a guess an attacker could steer."""
    if not isinstance(peercert, dict):
        return None
    cns = [v for rdn in peercert.get("subject") or () for (k, v) in rdn if k == "commonName"]
    return cns[0] if len(cns) == 1 and isinstance(cns[0], str) and cns[0] else None


def role_for(cn: str | None, admins: Iterable[str], readers: Iterable[str]) -> Role | None:
    """The role of the client named ``cn`` (exact, case-sensitive match; admin wins)."""
    if cn is None:
        return None
    if cn in tuple(admins):
        return ROLE_ADMIN
    if cn in tuple(readers):
        return ROLE_READ
    return None


def decide(role: Role | None, op: str) -> Decision:
    """May a client with ``role`` run ``op``?"""
    if role is None:
        return Decision(False, "no_role")
    if op not in m.OPS:
        return Decision(False, "unknown_op")
    if role == ROLE_ADMIN:
        return Decision(True, "")
    if role == ROLE_READ:
        return Decision(True, "") if op in READ_OPS else Decision(False, "read_only")
    return Decision(False, "no_role")


def denial_message(decision: Decision, cn: str | None, op: str) -> str:
    """The error line a refused client reads."""
    who = f"certificate CN={cn!r}" if cn else "a certificate without a single CN"
    if decision.reason == "read_only":
        return f"permission denied: {who} is read-only (control.tcp.readers); {op} needs control.tcp.admins"
    if decision.reason == "unknown_op":
        return f"unknown op {op!r}"
    return f"permission denied: {who} is in neither control.tcp.admins nor control.tcp.readers"


def parse_listen(text: str) -> tuple[str, int]:
    """``"ip:port"`` / ``"[v6]:port"`` -> (ip, port); ValueError with the reason."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not ip:port (e.g. 10.0.0.5:9744)")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} in {text!r} is not an IP address (a name would be resolved "
                         "at each start: give the address)") from None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port!r} in {text!r} is not 1-65535")
    return host, int(port)


def listen_problem(text: str) -> str | None:
    """What is wrong with ``control.tcp.listen`` (None: nothing)."""
    try:
        parse_listen(text)
    except ValueError as exc:
        return f"listen: {exc}"
    return None


def names_problem(admins: Iterable[str], readers: Iterable[str]) -> str | None:
    """A listener nobody may use, an empty name, or a name in both lists is refused."""
    a, r = tuple(admins), tuple(readers)
    if not a and not r:
        return ("admins and readers are both empty: no certificate could run any op; list the "
                "clients' certificate CNs (sidusctl pki client NAME)")
    if any(not n.strip() for n in a + r):
        return "an empty name in admins or readers"
    both = sorted(set(a) & set(r))
    if both:
        return f"{', '.join(both)} in both admins and readers: give each name one role"
    return None
