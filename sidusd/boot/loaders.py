"""Which loader a PXE or UEFI HTTP Boot client is given, and its first file (pure).

Three loaders (docs/boot-chain.md):

* ``pxelinux``: ``boot.boot_files.<family>`` (``pxelinux.0`` for BIOS, ``syslinux.efi`` for UEFI),
  reading ``pxelinux.cfg/01-<mac>``;
* ``grub``: ``boot.loader.grub.<family>`` (x64: ``shimx64.efi``, which loads ``grubx64.efi``,
  which reads ``grub/grub.cfg`` then ``grub/grub.cfg-01-<mac>``): the Secure Boot path;
* ``ipxe``: the iPXE binary (``boot.boot_files.ipxe_bios`` / ``ipxe_efi``), then, when that
  iPXE asks again (option 175), its script ``/boot/<mac>.ipxe`` over HTTP.

:func:`choose` picks the loader: the profile's (``boot.loader.profiles.<name>``), else the
architecture's (``boot.loader.<family>``), else ``ipxe`` with ``boot.ipxe_chain`` for BIOS and
x64 UEFI, else ``pxelinux`` (``boot.boot_files`` as given: the behaviour before loaders existed).

A UEFI HTTP Boot client (option 60 ``HTTPClient``, option 93 = 15/16/19) is different: the
firmware downloads one file over HTTP and runs it with no PXE base code under it, so a loader that
fetches its next files over TFTP through the PXE base code (``syslinux.efi``: "PXE loader")
cannot work; it gets ``boot.loader.http`` (``ipxe``: iPXE's ``snponly.efi`` drives the NIC through
the firmware's SNP and does its own DHCP), whatever its profile or architecture says, unless that
says ``ipxe`` too.  ``boot.loader.http: null``: HTTP Boot clients are not answered.

:func:`first_file` is the file a loader starts with for a family, with the config key that names
it (for refusals and :mod:`sidusd.preflight`), or why there is none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PXELINUX, GRUB, IPXE = "pxelinux", "grub", "ipxe"
LOADERS = (PXELINUX, GRUB, IPXE)
FAMILIES = ("bios", "uefi_x64", "uefi_ia32", "arm64")
#: loaders that work after a UEFI HTTP Boot download (no PXE base code underneath)
HTTP_CAPABLE = (IPXE,)
#: the iPXE binary of each family (boot.boot_files keys); Debian's ipxe has none for ia32/arm64
_IPXE_KEY = {"bios": "ipxe_bios", "uefi_x64": "ipxe_efi"}


@dataclass(frozen=True)
class Choice:
    """The loader for one client and the config key that chose it (``source``)."""

    loader: str | None              # None: no loader (HTTP Boot with boot.loader.http null)
    source: str                     # e.g. "boot.loader.profiles.secure", "boot.loader.http"


def choose(family: str, config: Any, *, profile: str | None = None, http: bool = False) -> Choice:
    """The loader for a client of ``family`` booting ``profile`` (None: unknown), ``http``: a UEFI
    HTTP Boot client (see the module docstring for the order)."""
    boot = config.boot
    sel = boot.loader
    chosen: Choice
    if profile is not None and profile in sel.profiles:
        chosen = Choice(sel.profiles[profile], f"boot.loader.profiles.{profile}")
    elif getattr(sel, family, None) is not None:
        chosen = Choice(getattr(sel, family), f"boot.loader.{family}")
    elif boot.ipxe_chain and family in _IPXE_KEY:
        chosen = Choice(IPXE, "boot.ipxe_chain")
    else:
        chosen = Choice(PXELINUX, f"boot.boot_files.{family}")
    if http and chosen.loader not in HTTP_CAPABLE:
        # Quirk (UEFI 2.x §24.7 HTTP Boot): the downloaded image runs without PXE base code;
        # syslinux.efi and shim/GRUB's TFTP path would look for their next files over TFTP.
        return Choice(sel.http, "boot.loader.http")
    return chosen


def first_file(loader: str, family: str, config: Any) -> tuple[str | None, str, str]:
    """(file relative to tftp.root or None, config key, why there is none) for ``loader`` on
    ``family``."""
    files = config.boot.boot_files
    if loader == PXELINUX:
        key = f"boot.boot_files.{family}"
        name = getattr(files, family, None)
    elif loader == GRUB:
        key = f"boot.loader.grub.{family}"
        name = getattr(config.boot.loader.grub, family, None)
    elif loader == IPXE:
        attr = _IPXE_KEY.get(family)
        if attr is None:
            return None, f"boot.loader.{family}", f"no iPXE binary for {family} (only bios and uefi_x64)"
        key = f"boot.boot_files.{attr}"
        name = getattr(files, attr)
    else:
        return None, "boot.loader", f"unknown loader {loader!r} (one of {', '.join(LOADERS)})"
    if not name:
        return None, key, f"no {key} configured for the {loader} loader"
    return name, key, ""


def in_use(config: Any) -> list[tuple[str, str, str, str]]:
    """(key, family, loader, first file) of every loader the config can hand out, each once: the
    architectures' choices, each profile's on each architecture, and HTTP Boot's on x64 (for
    :mod:`sidusd.preflight`).  A loader without a file for a family is left out (the client is
    refused at DHCP time with the reason)."""
    out: list[tuple[str, str, str, str]] = []
    seen: set[tuple[str, str]] = set()

    def add(family: str, c: Choice) -> None:
        if c.loader is None:
            return
        name, key, _ = first_file(c.loader, family, config)
        if name is None or (family, name) in seen:
            return
        seen.add((family, name))
        plain = c.source == key or c.source == "boot.ipxe_chain" or c.source.startswith("boot.boot_files.")
        out.append((key if plain else f"{c.source} ({key})", family, c.loader, name))

    boot_files = config.boot.boot_files
    for family in FAMILIES:
        c = choose(family, config)
        if c.loader == PXELINUX and getattr(boot_files, family, None) is None:
            continue                 # the architecture is not served at all (boot_files.<family>: null)
        add(family, c)
    for profile in config.boot.loader.profiles:
        for family in FAMILIES:
            add(family, choose(family, config, profile=profile))
    if config.http.enabled:
        add("uefi_x64", choose("uefi_x64", config, http=True))
    return out
