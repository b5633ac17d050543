"""What a requested boot file name is served as, for TFTP and HTTP alike (pure).

:func:`decide` is the one place that answers "what does this name mean for
this asker": a :class:`Document` (rendered per MAC, its bytes), a
:class:`FileAt` (a file below the served root, as validated components, to be
opened by the edge through ``ServiceIO.open_file``) or a :class:`Refusal`
with a protocol-neutral ``code``.  The TFTP edge maps the codes to TFTP error
codes (RFC 1350 section 5), the HTTP edge to status codes (RFC 9110 section
15), one small table each.

The edge supplies the facts (:class:`Asker`: the local address the request
arrived on, the client's address and the MAC that did the DHCP exchange from
that address) and the live config and inventory; the decision reads nothing
else.  Whatever a decision implies for the operator (counters, log events, the
booted record) is emitted by the caller from the decision's result
(``Runtime.provide``).

The per-MAC secret guard lives here: a per-MAC config carrying a disk
credential (``overlay: iscsi``) is rendered only for the address that did the
DHCP exchange for that MAC, only while no other address claimed that MAC
recently (``boot.claims``: a conflict), and, when the inventory gives the host
a fixed ``ip``, only for that address; any other asker is refused
``not_found`` with ``cause = SECRET`` (the client learns nothing more than
"no such file"; the reason goes to the operator's log).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sidusd.boot import claims, content, grub, render
from sidusd.boot.inventory import BootTarget, Inventory, normalize_mac
from sidusd.config import Config
from sidusd.errors import InventoryError

# Refusal codes (protocol-neutral)
NAME = "name"                # the name itself is never served (boot.content.Refused)
NOT_FOUND = "not_found"      # nothing under that name (no file, no boot target, or guarded)
ACCESS = "access"            # a file exists but may not be served (symlink, not a regular file ...)
INTERNAL = "internal"        # a bug of ours while deciding (set by the edge that caught it)
CODES = (NAME, NOT_FOUND, ACCESS, INTERNAL)

# Why a document was refused, when the operator must hear of it (``Refusal.cause``)
SECRET = "secret"            # the per-MAC secret guard (``render.secret_refused``)
RENDER = "render"            # an unsafe value met the renderer (``render.errors``)

SECRET_REASON = ("a boot config with disk credentials goes only to the address that did the "
                 "DHCP exchange for that MAC")

Login = Callable[[str, str], "render.IscsiLogin | None"]
"""``login(mac, server_ip)``: host ``mac``'s disk login, None when no disk is applied."""


@dataclass(frozen=True)
class Asker:
    """The facts about one request, supplied by the edge."""

    server_ip: str                  # the local address the request arrived on
    client_ip: str
    dhcp_mac: str | None = None     # the MAC of the last DHCP exchange from client_ip (None: none)
    claimed_from: tuple[str, ...] = ()  # the addresses dhcp_mac was claimed from recently (boot.claims)


@dataclass(frozen=True)
class Document:
    """A rendered document: its bytes, and what was served to whom (for the booted record)."""

    body: bytes
    kind: str
    mac: str | None                 # the MAC the name carries (None for the ``-default`` kinds)
    booted_mac: str | None = None   # record: this MAC was served ``target``
    target: BootTarget | None = None


@dataclass(frozen=True)
class FileAt:
    """A file to open below ``root`` (components validated by :func:`boot.content.resolve`)."""

    root: Path
    parts: tuple[str, ...]


Response = Document | FileAt


@dataclass(frozen=True)
class Refusal:
    """Nothing is served: ``code`` (one of :data:`CODES`), ``reason`` for logs and messages."""

    code: str
    reason: str
    mac: str | None = None
    cause: str | None = None        # SECRET or RENDER: the caller counts and logs it
    kind: str | None = None


def context(config: Config, server_ip: str) -> render.RenderContext:
    """The render context for a request that arrived on ``server_ip``; raises RenderError."""
    nfs_server = str(config.nfs.server_address) if config.nfs.server_address else server_ip
    http_base = f"http://{server_ip}:{config.http.port}" if config.http.enabled else None
    return render.RenderContext(server_ip=server_ip, nfs_server=nfs_server,
                                http_base=http_base, mount_options=config.nfs.mount_options)


def _same_mac(a: str | None, b: str) -> bool:
    if a is None:
        return False
    try:
        return normalize_mac(a) == b
    except InventoryError:
        return False


def _known(mac: str, inventory: Inventory) -> bool:
    try:
        return normalize_mac(mac) in inventory.hosts
    except InventoryError:
        return False


def document(kind: str, mac: str | None, asker: Asker, config: Config, inventory: Inventory,
             login: Login) -> Document | Refusal:
    """The document of a generated name (``boot.content.Generated``), or why there is none."""
    try:
        ctx = context(config, asker.server_ip)
        if kind in ("pxelinux-default", "grub-default"):
            target = inventory.resolve(None, config)
            body = (render.pxelinux_default(ctx, target) if kind == "pxelinux-default"
                    else grub.grub_default(ctx, target, grub.http_server(config, asker.server_ip)))
            # booted record: the MAC is the one that did DHCP from this IP.  Every GRUB reads
            # grub/grub.cfg before its per-MAC name: a host in the inventory is recorded there.
            booted = asker.dhcp_mac if target else None
            if kind == "grub-default" and booted is not None and _known(booted, inventory):
                booted = None
            return Document(body, kind, None, booted, target)
        if mac is None:
            return Refusal(NOT_FOUND, "no MAC in the name", None, kind=kind)
        target = inventory.resolve(mac, config)
        if target is None:
            return Refusal(NOT_FOUND, "no boot target for this MAC", mac, kind=kind)
        iscsi = None
        if target.overlay == "iscsi" and target.mac is not None:
            if not _same_mac(asker.dhcp_mac, target.mac):
                return Refusal(NOT_FOUND, SECRET_REASON, target.mac, SECRET, kind)
            host = inventory.hosts.get(target.mac)
            fixed = str(host.ip) if host is not None and host.ip is not None else None
            problem = claims.secret_problem(asker.client_ip, asker.claimed_from, fixed)
            if problem is not None:
                return Refusal(NOT_FOUND, problem, target.mac, SECRET, kind)
            iscsi = login(target.mac, asker.server_ip)
        if kind == "pxelinux":
            body = render.pxelinux_config(target, ctx, iscsi)
        elif kind == "ipxe":
            body = render.ipxe_script(target, ctx, iscsi)
        elif kind == "grub":
            body = grub.grub_config(target, ctx, iscsi, grub.http_server(config, asker.server_ip))
        else:
            return Refusal(NOT_FOUND, f"unknown document kind {kind!r}", mac, kind=kind)
        return Document(body, kind, mac, mac, target)
    except render.RenderError as exc:
        # one bad target must not break the request loop: "not found" to the client,
        # a counted, logged reason to the operator
        return Refusal(NOT_FOUND, str(exc), mac, RENDER, kind)


def decide(name: str, asker: Asker, config: Config, inventory: Inventory,
           login: Login) -> Response | Refusal:
    """What ``name`` (a TFTP RRQ file name or a decoded HTTP path) is served as for ``asker``."""
    res = content.resolve(name)
    if isinstance(res, content.Refused):
        return Refusal(NAME, res.reason)
    if isinstance(res, content.StaticPath):
        return FileAt(Path(config.tftp.root), res.parts)
    return document(res.kind, res.mac, asker, config, inventory, login)


def refused_open(missing: bool, reason: str) -> Refusal:
    """The refusal for a :class:`FileAt` the edge could not open (``NotServable``)."""
    return Refusal(NOT_FOUND if missing else ACCESS, reason)
