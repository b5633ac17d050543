"""GRUB configuration files, rendered per machine (pure): the Secure Boot path.

The chain (docs/boot-chain.md): the firmware loads ``shimx64.efi`` (Debian
``shim-signed``), shim loads ``grubx64.efi`` from the directory of its own
DHCP boot file name (``netboot.c`` ``parseDhcp4``: the boot file's directory +
``DEFAULT_LOADER``), which sidusd serves as Debian's signed network GRUB
(``grub-efi-amd64-signed``: ``grubnetx64.efi.signed``).  That image is built
with prefix ``/grub`` and the embedded config ``normal (memdisk)/grub.cfg``,
whose memdisk config is::

    if [ -e $prefix/x86_64-efi/grub.cfg ]; then
        source $prefix/x86_64-efi/grub.cfg
    else
        source $prefix/grub.cfg
    fi

so it asks the TFTP server for ``/grub/x86_64-efi/grub.cfg`` (answered "not
found") and then ``/grub/grub.cfg``: it never looks for a per-MAC name itself
(``normal`` is called with a file name, so ``grub_net_search_config_file`` is
not run).  :func:`grub_default` is that ``grub/grub.cfg``: it sources
``grub/grub.cfg-01-${net_default_mac}`` (GRUB writes the MAC with colons), a
per-MAC document (:func:`grub_config`) that boots and never returns; when
that name is not found, GRUB prints the error and goes on with the rest of
``grub.cfg``: the default profile's target, or a message and ``exit`` back to
the firmware (the next boot option), like pxelinux's ``LOCALBOOT``.
Upstream GRUB (without Debian's embedded config) asks for
``grub.cfg-01-<mac with dashes>`` first: the same document.

Every document starts with ``set root``/``set prefix`` naming the server the request reached
(:func:`_root_lines`): Debian's GRUB starts on the DHCP ACK's ``siaddr``, which in proxyDHCP mode
is the site's server, not sidusd (docs/quirks.md "shim and GRUB in proxyDHCP mode").  With
``boot.loader.grub_http`` the kernel and initrd come from ``(http,<server>:<http.port>)`` when
``insmod http`` works, else over TFTP (:func:`_boot_lines`).

Quoting (GRUB 2.06 ``grub-core/script/yylex.l``): every word of the kernel
line is written in single quotes, inside which GRUB takes every character
literally; an append holding a quote is refused
(:func:`sidusd.boot.cmdline.grub_append_problem`), so no value can close
the quote and start a GRUB command.
"""

from __future__ import annotations

import re
from typing import Any

from sidusd.boot.cmdline import grub_append_problem, linux_words
from sidusd.boot.inventory import BootTarget
from sidusd.boot.render import (
    _FILE,
    _MAC,
    _WORD,
    IscsiLogin,
    RenderContext,
    RenderError,
    _check,
    _who,
    kernel_cmdline,
)

PREFIX = "grub"                       # grubnetx64.efi.signed's built-in prefix, /grub
_HTTP_SERVER = re.compile(r"^[0-9]{1,3}(?:\.[0-9]{1,3}){3}:[0-9]{1,5}$")


def quote(word: str) -> str:
    """``word`` as one single-quoted GRUB word; RenderError for a word holding ``'`` or a control."""
    if "'" in word or any(ord(c) < 0x20 or ord(c) == 0x7f for c in word):
        raise RenderError(f"refusing to quote {word!r} for GRUB")
    return f"'{word}'"


def http_server(config: Any, server_ip: str) -> str | None:
    """``IP:PORT`` of sidusd's HTTP server for GRUB's ``(http,IP:PORT)`` device when
    ``boot.loader.grub_http`` is on (config.py refuses it without ``http.enabled``), else None."""
    if not (config.boot.loader.grub_http and config.http.enabled):
        return None
    return f"{server_ip}:{config.http.port}"


def _root_lines(ctx: RenderContext) -> list[str]:
    # Quirk (Debian GRUB 2.06, docs/quirks.md "shim and GRUB in proxyDHCP mode"): GRUB's boot device
    # is (tftp,<siaddr of the site's DHCP ACK>), not the proxy's address.  Whoever GRUB started on,
    # everything after this file (the per-MAC document, modules, kernel, initrd) comes from the
    # server this request reached: a site stub `configfile (tftp,<sidusd>)/grub/grub.cfg` suffices.
    server = _check("server_ip", ctx.server_ip, _WORD)
    return [f"set root={quote('tftp,' + server)}", f"set prefix={quote('(tftp,' + server + ')/' + PREFIX)}"]


def _boot_lines(target: BootTarget, ctx: RenderContext, iscsi: IscsiLogin | None,
                bootif: str, http: str | None = None) -> list[str]:
    kernel = _check("kernel", target.kernel, _FILE)
    initrd = _check("initrd", target.initrd, _FILE)
    problem = grub_append_problem(target.append.strip())
    if problem is not None:
        raise RenderError(f"refusing to render append={target.append!r} for GRUB: {problem}")
    words = linux_words(kernel_cmdline(target, ctx, iscsi))
    args = " ".join(quote(w) for w in words)

    def load(device: str) -> list[str]:
        # an empty device: the root device, (tftp,<server>) as set by _root_lines
        return [f"linux {quote(device + '/' + kernel)} {args} {bootif}", f"initrd {quote(device + '/' + initrd)}"]

    lines = [f"echo {quote('sidus: booting image ' + _check('image', target.image, _WORD))}"]
    if http is None:
        lines += load("")
    else:
        if not _HTTP_SERVER.match(http):
            raise RenderError(f"refusing {http!r} as GRUB's HTTP server (IPv4:port)")
        # boot.loader.grub_http: GRUB's TFTP moves one block per round trip (no windowsize; the
        # blksize is the MTU's); over HTTP the kernel streams on TCP.  Debian's signed network GRUB
        # has no http built in and, with Secure Boot on, refuses `insmod` ("prohibited by secure
        # boot policy", kern/efi/sb.c) -- and insmod returns 0 all the same (GRUB 2.06
        # grub_cmd_insmod), so the test is `linux` itself: "disk `http,...' not found" -> TFTP.
        kernel_http, initrd_http = load(f"(http,{http})")
        lines += ["insmod http",
                  f"if {kernel_http}; then",
                  f"  echo {quote('sidus: kernel and initrd over http from ' + http)}",
                  f"  {initrd_http}",
                  "else",
                  "  echo 'sidus: no http module in this GRUB (Secure Boot refuses insmod): over tftp'",
                  *("  " + line for line in load("")),
                  "fi"]
    return lines + ["boot"]


def grub_config(target: BootTarget, ctx: RenderContext, iscsi: IscsiLogin | None = None,
                http: str | None = None) -> bytes:
    """``grub/grub.cfg-01-<mac>`` for ``target`` (its MAC is known: BOOTIF written out)."""
    if target.mac is None:
        raise RenderError("a per-MAC GRUB config needs the target's MAC")
    mac = _check("mac", target.mac, _MAC)
    lines = [
        f"# sidus GRUB configuration for {_who(target)}, image {_check('image', target.image, _WORD)}",
        "# generated by sidusd: do not edit (edit the inventory, then `sidusctl reload`)",
        *_root_lines(ctx),
        # BOOTIF as pxelinux's IPAPPEND 2 gives it: the initramfs configures the boot NIC
        *_boot_lines(target, ctx, iscsi, quote("BOOTIF=01-" + mac.replace(":", "-")), http),
    ]
    return ("\n".join(lines) + "\n").encode("ascii")


def grub_default(ctx: RenderContext, target: BootTarget | None = None, http: str | None = None) -> bytes:
    """``grub/grub.cfg``: the per-MAC document, then the default profile's ``target`` or ``exit``."""
    lines = [
        "# sidus GRUB configuration: per-MAC first, then machines not in the inventory",
        "# generated by sidusd: do not edit",
        "set timeout=0",
        *_root_lines(ctx),
        # a per-MAC document boots and does not return; "file not found" goes on below
        'source "${prefix}/grub.cfg-01-${net_default_mac}"',
    ]
    if target is not None:
        # GRUB's MAC has colons; initramfs-tools turns BOOTIF's dashes into colons, and keeps colons
        lines += _boot_lines(target, ctx, None, '"BOOTIF=01-${net_default_mac}"', http)
    else:
        lines += [
            "echo 'sidus: this machine is not in the inventory; back to the firmware (next boot option).'",
            "sleep 5",
            "exit",
        ]
    return ("\n".join(lines) + "\n").encode("ascii")
