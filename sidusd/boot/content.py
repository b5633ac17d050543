"""What a requested boot file name means (pure: no file system access here).

:func:`resolve` turns the name a client asked for (TFTP RRQ, later HTTP path)
into one of:

* :class:`Generated` — a document rendered per machine:
  ``pxelinux.cfg/01-<mac with dashes>`` -> kind ``pxelinux`` (pxelinux's
  per-MAC config; ``01`` is the ARP hardware type, Ethernet),
  ``pxelinux.cfg/default`` -> kind ``pxelinux-default``,
  ``<mac>.ipxe`` and ``boot/<mac>.ipxe`` -> kind ``ipxe`` (``<mac>`` written
  with colons, dashes or 12 bare hex digits, as iPXE's ``${mac}``,
  ``${mac:hexhyp}`` and ``${mac:hexraw}`` give it),
  ``grub/grub.cfg-01-<mac>`` -> kind ``grub`` (``<mac>`` with dashes, as
  upstream GRUB's ``grub_net_search_config_file`` asks, or colons, as
  GRUB's ``${net_default_mac}`` gives it in our ``grub/grub.cfg``),
  ``grub/grub.cfg`` -> kind ``grub-default`` (what Debian's signed
  ``grubnetx64.efi`` reads: see ``sidusd.boot.grub``);
* :class:`StaticPath` — components of a path below the TFTP root, opened
  later by :func:`sidusd.net.files.open_confined` (which refuses symlinks);
  other ``pxelinux.cfg/<hex ip>`` probes land here and are normally "file not
  found", which is what pxelinux expects before it tries ``default``;
* :class:`Refused` — a name that is never served, with the reason.

Name rules, applied in this order:

1. more than 255 bytes (UTF-8) -> refused;
2. NUL or another control character (< 0x20, 0x7f) -> refused;
3. backslashes are *normalized* to ``/`` (Windows-style clients such as WDS
   loaders send ``boot\\x64\\file``); the result is checked like any name, so
   ``..\\x`` is refused like ``../x``;
4. leading slashes are stripped (many clients send ``/pxelinux.0``);
5. empty components (``a//b``, trailing ``/``), ``.`` and ``..`` -> refused.
   No percent-decoding is done: ``%2e%2e`` is an ordinary (odd) file name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_NAME = 255

_HEX2 = "[0-9a-fA-F]{2}"
_PXE_MAC = re.compile(rf"^01-({_HEX2}(?:-{_HEX2}){{5}})$")
_IPXE_MAC = re.compile(
    rf"^({_HEX2}(?::{_HEX2}){{5}}|{_HEX2}(?:-{_HEX2}){{5}}|[0-9a-fA-F]{{12}})\.ipxe$")
_GRUB_MAC = re.compile(rf"^grub\.cfg-01-({_HEX2}(?:-{_HEX2}){{5}}|{_HEX2}(?::{_HEX2}){{5}})$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Generated:
    """A rendered document: ``kind`` is ``pxelinux``, ``pxelinux-default``, ``ipxe``, ``grub`` or
    ``grub-default``; ``mac`` is lower-case and colon-separated (None for the ``-default`` kinds)."""

    kind: str
    mac: str | None


@dataclass(frozen=True)
class StaticPath:
    """A file below the served root, as validated path components."""

    parts: tuple[str, ...]


@dataclass(frozen=True)
class Refused:
    """A name that is never served; ``reason`` is for logs and the ERROR message."""

    reason: str


Resolution = Generated | StaticPath | Refused


def mac_from_hex(text: str) -> str:
    """``AA-bb-cc-DD-ee-ff`` / ``aabbccddeeff`` / colons -> ``aa:bb:cc:dd:ee:ff``."""
    digits = re.sub(r"[-:]", "", text).lower()
    return ":".join(digits[i:i + 2] for i in range(0, 12, 2))


def resolve(name: str) -> Resolution:
    """What the requested ``name`` is (rules in the module docstring).

    pxelinux's search order is ``pxelinux.cfg/01-<mac>``, the client IP in hex
    (shortened one digit at a time), then ``pxelinux.cfg/default``.
    """
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME:
        return Refused(f"name longer than {MAX_NAME} bytes")
    if _CONTROL.search(name):
        return Refused("control character in name")
    path = name.replace("\\", "/").lstrip("/")
    if not path:
        return Refused("empty name")
    parts = tuple(path.split("/"))
    for part in parts:
        if part == "":
            return Refused("empty path component")
        if part in (".", ".."):
            return Refused(f"'{part}' path component")
    if len(parts) == 2 and parts[0] == "pxelinux.cfg":
        leaf = parts[1]
        if leaf == "default":
            return Generated("pxelinux-default", None)
        if leaf.startswith("01-"):
            m = _PXE_MAC.match(leaf)
            if not m:
                return Refused("malformed MAC in pxelinux.cfg/01-<mac>")
            return Generated("pxelinux", mac_from_hex(m.group(1)))
        return StaticPath(parts)
    if len(parts) == 2 and parts[0] == "grub":
        leaf = parts[1]
        if leaf == "grub.cfg":
            return Generated("grub-default", None)
        if leaf.startswith("grub.cfg-01-"):
            m = _GRUB_MAC.match(leaf)
            if not m:
                return Refused("malformed MAC in grub/grub.cfg-01-<mac>")
            return Generated("grub", mac_from_hex(m.group(1)))
        return StaticPath(parts)
    if len(parts) == 1 or (len(parts) == 2 and parts[0] == "boot"):
        m = _IPXE_MAC.match(parts[-1])
        if m:
            return Generated("ipxe", mac_from_hex(m.group(1)))
    return StaticPath(parts)
