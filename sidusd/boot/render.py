"""pxelinux configuration files and iPXE scripts, rendered per machine (pure).

The documents are built in code (no template files): every interpolated value
is checked again here against a strict character set, so nothing that came
from an inventory, a config or a network peer can start a new line or a new
directive in a generated file, even if a caller builds a :class:`BootTarget`
by hand.  A value that fails the check raises :class:`RenderError`.  The
appends must also read the same in iPXE, pxelinux and Linux
(:func:`sidusd.boot.cmdline.append_problem`: neither format can quote).

The kernel command line (initramfs-tools ``nfs`` boot, ``Documentation/
admin-guide/nfs/nfsroot.rst``)::

    root=/dev/nfs boot=nfs nfsroot=<server>:<image_root>,<mount options> ip=dhcp
    sidus.overlay=<overlay> [sidus.hostname=<hostname>] <image append> <profile append> <host append>

Hosts with ``overlay: iscsi`` also get their disk's login (:class:`IscsiLogin`)::

    sidus.iscsi.target=<iqn> sidus.iscsi.portal=<ip>:<port> sidus.iscsi.initiator=<iqn>
    sidus.iscsi.user=<chap user> sidus.iscsi.secret=<chap secret> sidus.fallback=tmpfs|stop

These carry the host's CHAP secret: the runtime serves such a file only to the
address that did the DHCP exchange for that MAC.

Unknown machines (``pxelinux.cfg/default``): when ``dhcp.unknown_hosts`` is
``default`` the default profile's target is rendered; otherwise the file says
the machine is not in the inventory and boots the local disk (``LOCALBOOT 0``).
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from dataclasses import dataclass, field

from sidusd.boot.cmdline import append_problem
from sidusd.boot.inventory import BootTarget
from sidusd.boot.names import image_root_problem
from sidusd.errors import SidusError

MAX_CMDLINE_BYTES = 2047             # x86 COMMAND_LINE_SIZE is 2048 including the NUL
_FILE = re.compile(r"^[A-Za-z0-9._+~@=,-][A-Za-z0-9._+~/@=,-]*$")
_HOST = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_MOUNT_OPTS = re.compile(r"^[A-Za-z0-9=,._:-]+$")
_ARGS = re.compile(r"^[ !-#%'-[\]-{}~]*$")          # printable ASCII minus $ & \ |
_MAC = re.compile(r"^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$")
_IQN = re.compile(r"^iqn\.[0-9]{4}-[0-9]{2}\.[a-z0-9.-]+(?::[a-z0-9.:-]+)?$")
_SECRET = re.compile(r"^[A-Za-z0-9_-]{16,255}$")      # secrets.token_urlsafe alphabet
_HTTP_BASE = re.compile(r"^https?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?(?:/[A-Za-z0-9._~/-]*)?$")


class RenderError(SidusError):
    """A value cannot be written into a boot file safely (the inventory or config should have refused it)."""


def _check(what: str, value: str, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise RenderError(f"refusing to render {what}={value!r}: unsafe characters for a boot file")
    return value


@dataclass(frozen=True)
class RenderContext:
    """Per-request facts: the address the client reached us on, the NFS server, the HTTP base URL.

    ``http_base`` is None when HTTP is off: iPXE then fetches over ``tftp://server_ip/``.
    """
    server_ip: str
    nfs_server: str
    http_base: str | None = None
    mount_options: str = "tcp,vers=3"

    def __post_init__(self) -> None:
        try:
            ipaddress.IPv4Address(self.server_ip)
        except ValueError:
            raise RenderError(f"server_ip {self.server_ip!r} is not an IPv4 address") from None
        _check("nfs_server", self.nfs_server, _HOST)
        _check("mount_options", self.mount_options, _MOUNT_OPTS)
        if self.http_base is not None:
            _check("http_base", self.http_base, _HTTP_BASE)
            object.__setattr__(self, "http_base", self.http_base.rstrip("/"))


@dataclass(frozen=True)
class IscsiLogin:
    """One host's disk login (RFC 3720 §3.2.6 names, §11.1.4 CHAP); ``secret`` hidden from repr."""
    target_iqn: str
    portal: str
    port: int
    initiator_iqn: str
    user: str
    secret: str = field(repr=False)

    def args(self) -> list[str]:
        """The ``sidus.iscsi.*`` kernel arguments (each value checked)."""
        ipaddress.IPv4Address(_check("iscsi portal", self.portal, re.compile(r"^[0-9.]{7,15}$")))
        if not 0 < int(self.port) < 65536:
            raise RenderError(f"refusing to render iscsi port {self.port!r}")
        return [f"sidus.iscsi.target={_check('iscsi target', self.target_iqn, _IQN)}",
                f"sidus.iscsi.portal={self.portal}:{int(self.port)}",
                f"sidus.iscsi.initiator={_check('iscsi initiator', self.initiator_iqn, _IQN)}",
                f"sidus.iscsi.user={_check('iscsi user', self.user, _WORD)}",
                f"sidus.iscsi.secret={_check('iscsi secret', self.secret, _SECRET)}"]


def kernel_cmdline(target: BootTarget, ctx: RenderContext, iscsi: IscsiLogin | None = None) -> str:
    """The Linux command line for ``target``: NFS root + overlay + appends (image, profile, host).

    ``overlay: iscsi`` needs ``iscsi`` (that host's login); without it RenderError.
    """
    root = str(target.image_root)
    if image_root_problem(root) is not None:
        raise RenderError(f"refusing to render image_root={root!r}: {image_root_problem(root)}")
    parts = ["root=/dev/nfs", "boot=nfs", f"nfsroot={ctx.nfs_server}:{root},{ctx.mount_options}", "ip=dhcp",
             f"sidus.overlay={_check('overlay', target.overlay, _WORD)}"]
    if target.overlay == "iscsi":
        if iscsi is None:
            raise RenderError("overlay iscsi without the host's disk login (is the iSCSI target applied?)")
        parts += iscsi.args()
        parts.append(f"sidus.fallback={_check('fallback', target.fallback, _WORD)}")
    if target.hostname:
        parts.append(f"sidus.hostname={_check('hostname', target.hostname, _HOST)}")
    append = _check("append", target.append, _ARGS).strip()
    problem = append_problem(append)
    if problem is not None:
        raise RenderError(f"refusing to render append={append!r}: {problem}")
    if append:
        parts.append(append)
    line = " ".join(parts)
    if len(line) > MAX_CMDLINE_BYTES:
        raise RenderError(f"kernel command line of {len(line)} bytes exceeds {MAX_CMDLINE_BYTES}")
    return line


def _who(target: BootTarget) -> str:
    if target.mac is None:
        return f"machines not in the inventory (profile {_check('profile', target.profile, _WORD)})"
    who = _check("mac", target.mac, _MAC)
    if target.hostname:
        who += f" ({_check('hostname', target.hostname, _HOST)})"
    return f"{who}, profile {_check('profile', target.profile, _WORD)}"


def _pxelinux(target: BootTarget, ctx: RenderContext, iscsi: IscsiLogin | None = None) -> bytes:
    kernel = _check("kernel", target.kernel, _FILE)
    initrd = _check("initrd", target.initrd, _FILE)
    lines = [
        f"# sidus boot configuration for {_who(target)}, image {_check('image', target.image, _WORD)}",
        "# generated by sidusd: do not edit (edit the inventory, then `sidusctl reload`)",
        "DEFAULT sidus",
        "PROMPT 0",
        "TIMEOUT 0",
        "LABEL sidus",
        f"  KERNEL {kernel}",
        # initrd= in APPEND works with every pxelinux/syslinux.efi version (INITRD needs >= 5).
        f"  APPEND initrd={initrd} {kernel_cmdline(target, ctx, iscsi)}",
        # IPAPPEND 2: pxelinux adds BOOTIF=01-<mac>, so the initramfs configures the boot NIC.
        "  IPAPPEND 2",
    ]
    return ("\n".join(lines) + "\n").encode("ascii")


def pxelinux_config(target: BootTarget, ctx: RenderContext, iscsi: IscsiLogin | None = None) -> bytes:
    """``pxelinux.cfg/01-<mac>`` for ``target`` (syslinux PXELINUX config file format)."""
    return _pxelinux(target, ctx, iscsi)


def pxelinux_default(ctx: RenderContext, target: BootTarget | None = None) -> bytes:
    """``pxelinux.cfg/default``: the default profile's ``target``, or local boot when there is none.

    ``LOCALBOOT 0`` boots the first local disk on BIOS pxelinux; syslinux.efi
    cannot local-boot and stops with the message instead.
    """
    if target is not None:
        return _pxelinux(target, ctx)
    lines = [
        "# sidus: machines not in the inventory are not booted (dhcp.unknown_hosts: ignore)",
        "# generated by sidusd: do not edit",
        "DEFAULT local",
        "PROMPT 0",
        "TIMEOUT 0",
        "SAY sidus: this machine is not in the inventory; booting from the local disk.",
        "LABEL local",
        "  LOCALBOOT 0",
    ]
    return ("\n".join(lines) + "\n").encode("ascii")


def ipxe_script(target: BootTarget, ctx: RenderContext, iscsi: IscsiLogin | None = None) -> bytes:
    """An iPXE script that loads kernel and initrd over HTTP (or TFTP when HTTP is off) and boots."""
    base = ctx.http_base if ctx.http_base is not None else f"tftp://{ctx.server_ip}"
    kernel = _check("kernel", target.kernel, _FILE)
    initrd = _check("initrd", target.initrd, _FILE)
    name = posixpath.basename(initrd)
    lines = [
        "#!ipxe",
        f"# sidus boot script for {_who(target)}, image {_check('image', target.image, _WORD)}",
        "# generated by sidusd: do not edit",
        # BOOTIF as pxelinux's IPAPPEND 2 gives it; ${netX/...} is the interface iPXE booted from.
        f"kernel {base}/{kernel} initrd={name} {kernel_cmdline(target, ctx, iscsi)} BOOTIF=01-${{netX/mac:hexhyp}}",
        f"initrd --name {name} {base}/{initrd}",
        "boot",
    ]
    return ("\n".join(lines) + "\n").encode("ascii")
