"""`sidusctl tftp-root populate [DIR]`: the boot files of tftp.root, from their Debian packages.

Which files: those ``sidusd --check`` needs (:func:`sidusd.preflight.populate_plan`: the
boot file of each enabled architecture and its companion, the iPXE binaries with
``boot.ipxe_chain``), under the names the config gives them.  From where:
:data:`sidusd.preflight.SOURCES` (pxelinux, syslinux-common, syslinux-efi, ipxe, shim-signed,
grub-efi-amd64-signed, grub-efi-arm64-signed:arm64).
Local: it reads the daemon's config (``$SIDUS_CONFIG``, else ``/etc/sidus/sidus.yaml``)
for tftp.root and the boot file names, and needs no running daemon (a daemon
that refuses to start for want of these files can then be started).  A file
already there with the same bytes is kept; each copy is atomic (mode 0644).

Exit: 0 every file is in place; 1 one could not be placed (the line says which
package to install); 2 no directory given and no config to read it from.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .cliconfig import CONFIG_ENV, DEFAULT_CONFIG, config_source
from .errors import ConfigError
from .fsutil import atomic_write


def add_parser(sub, common) -> None:
    """``tftp-root populate [DIR]`` on sidusctl's subcommands."""
    t = sub.add_parser("tftp-root", parents=[common], help="the boot files in tftp.root (local, no daemon)")
    ts = t.add_subparsers(dest="tftp_cmd", required=True, metavar="populate")
    tp = ts.add_parser("populate", parents=[common],
                       help="copy the boot files (pxelinux, syslinux.efi, iPXE) from their Debian packages")
    tp.add_argument("dir", nargs="?", help=f"the TFTP root (default: tftp.root of ${CONFIG_ENV} or {DEFAULT_CONFIG})")


def _config(directory: str | None, config_flag: str | None = None):
    from . import config as config_mod
    path = str(config_source(config_flag).path)      # --config > $SIDUS_CONFIG > the default
    try:
        cfg = config_mod.read(path)
    except ConfigError as exc:
        if directory is None:
            raise
        print(f"sidusctl: {path} not read ({exc}): the default boot file names", file=sys.stderr)
        cfg = config_mod.parse("dhcp: {mode: 'off'}\ntftp: {root: /}\n", "<defaults>", None)
    if directory is not None:
        import dataclasses
        cfg = dataclasses.replace(cfg, tftp=dataclasses.replace(cfg.tftp, root=Path(directory).absolute()))
    return cfg


def main(directory: str | None, config_flag: str | None = None) -> int:
    """Place the boot files in the TFTP root; the exit code (see the module docstring)."""
    from .preflight import populate_plan
    try:
        cfg = _config(directory, config_flag)
    except ConfigError as exc:
        print(f"sidusctl: {exc}; give the TFTP root: sidusctl tftp-root populate DIR", file=sys.stderr)
        return 2
    rc = 0
    for dest, src, key in populate_plan(cfg):
        if src is None:
            there = dest.is_file()
            print(f"{'kept' if there else 'MISSING'}  {dest}  ({key}: no Debian source known, copy it yourself)")
            rc = rc if there else 1
            continue
        try:
            data = Path(src.path).read_bytes()
        except OSError as exc:
            print(f"MISSING  {dest}  ({src.path}: {exc.strerror}; apt-get install {src.package})")
            rc = 1
            continue
        try:
            if dest.is_file() and not dest.is_symlink() and dest.read_bytes() == data:
                print(f"kept     {dest}  (same as {src.path})")
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(dest, data, 0o644)
        except OSError as exc:
            print(f"FAILED   {dest}  ({exc})")
            rc = 1
            continue
        print(f"copied   {dest}  (from {src.path}, package {src.package})")
    return rc
