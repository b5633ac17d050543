"""`sidusd --config FILE` runs the daemon in the foreground; `--check` validates and exits.

``--check`` also verifies what a boot needs (:mod:`sidusd.preflight`): the TFTP
root, the boot files and their companions, each image's root, kernel and
initrd, the NFS backend; a missing ``dhcp.interfaces`` entry is a warning.

Exit codes: 0 ok, 1 runtime failure (a port could not be bound...), 2 bad config.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import ConfigError, StartupError

DEFAULT_CONFIG = "/etc/sidus/sidus.yaml"      # = sidusd.cliconfig.DEFAULT_CONFIG (sidusctl and sidus-image read it too)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sidusd", description="sidus network-boot daemon")
    p.add_argument("--config", "-c", default=None, help=f"config file (default $SIDUS_CONFIG, else {DEFAULT_CONFIG})")
    p.add_argument("--check", action="store_true", help="validate config + inventory, then exit")
    p.add_argument("--version", action="version", version=f"sidusd {__version__}")
    args = p.parse_args(argv)
    from .cliconfig import config_source
    path = config_source(args.config).path
    if args.check:
        from .daemon import open_state
        from .runtime import load_snapshot
        try:
            state = open_state(path)        # state.backend: postgresql: the shared state (or its local copy)
            snap = load_snapshot(path, source=state.inventory_source if state is not None else None)
        except (ConfigError, StartupError) as exc:
            print(f"sidusd: {path}: {exc}", file=sys.stderr)
            return 2
        cfg = snap.config
        if cfg.security.privsep:
            from .privsep.creds import lookup_user
            try:
                lookup_user(cfg.security.worker_user)
            except StartupError as exc:
                print(f"sidusd: {path}: {exc}", file=sys.stderr)
                return 2
        if cfg.control.tcp is not None:          # the TLS files, as the start would (control/tls.py)
            from .control.tls import server_context
            try:
                server_context(cfg.control.tcp)
            except ConfigError as exc:
                print(f"sidusd: {path}: {exc}", file=sys.stderr)
                return 2
        from .preflight import at_check, inspect
        errors, warnings = at_check(inspect(cfg, nfs=True))
        for w in warnings:
            print(f"sidusd: {path}: warning: {w}", file=sys.stderr)
        for e in errors:
            print(f"sidusd: {path}: {e}", file=sys.stderr)
        if errors:
            print(f"sidusd: {path}: {len(errors)} problem(s) would leave machines unbootable", file=sys.stderr)
            return 2
        print(f"{path}: OK (dhcp {cfg.dhcp.mode}, tftp {'on' if cfg.tftp.enabled else 'off'}, "
              f"{len(cfg.images)} image(s), {len(snap.inventory.profiles)} profile(s), "
              f"{len(snap.inventory.hosts)} host(s))")
        return 0
    from .daemon import run
    try:
        return run(path)
    except (ConfigError, StartupError) as exc:
        print(f"sidusd: {path}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
