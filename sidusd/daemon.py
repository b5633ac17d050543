"""Composition root: build the runtime and the services, run until SIGTERM.

* SIGTERM / SIGINT: stop accepting, let TFTP transfers in flight finish (bounded
  grace), close the control socket, exit 0.
* SIGHUP: reload (the same as `sidusctl reload`); a bad config is refused and
  the old one keeps serving.
* systemd: ``Type=notify`` is supported (READY=1 once every listener is bound,
  RELOADING=1 / READY=1 around a reload, STOPPING=1).

The services are built by :func:`sidusd.services.build_services` on
:func:`sidusd.net.io.local_io`; with ``security.privsep`` the supervisor
(:mod:`sidusd.privsep.supervisor`) runs instead and the worker builds them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from .errors import SidusError
from .net.io import local_io
from .observability import get_logger, setup_logging
from .runtime import Runtime
from .services import STOP_GRACE_S, build_services, sd_notify, serve_signals, stop_service

__all__ = ["STOP_GRACE_S", "build_services", "nfs_factory", "run", "sd_notify", "serve", "serve_signals"]


def nfs_factory(config: Any) -> Any:
    from .storage.nfs import NfsManager
    from .storage.runner import Runner
    return NfsManager(config, Runner())


async def serve(runtime: Runtime, pushers: Any = None) -> int:
    """Run the daemon until a stop signal.  Returns the exit code.  ``pushers``: the TFTP
    pushers forked before the loop (``net.tftp_pushers.start``), or None."""
    log = get_logger("daemon")
    stop = asyncio.Event()
    services = build_services(runtime, local_io(tftp_pushers=pushers))
    from .control.server import ControlServer
    control = ControlServer(runtime, services)
    started: list[Any] = []
    try:
        for svc in services.values():
            await svc.start()
            started.append(svc)
        await control.start()
        started.append(control)
    except (SidusError, OSError) as exc:
        log.error("startup.failed", error=str(exc))
        for svc in reversed(started):
            await stop_service(svc)
        return 1

    await runtime.apply_backends()

    listeners = [l for svc in services.values() for l in svc.listeners()]
    await serve_signals(runtime, stop, log, services=services, listeners=listeners)
    for svc in reversed(started):
        await stop_service(svc)
    await runtime.stop_watchers()
    log.info("daemon.stopped")
    return 0


def open_state(config_path: Path) -> Any:
    """``state.backend: postgresql``: the shared state, opened (sidusd/state; psycopg is imported only
    then); ``yaml``: None, no database."""
    from .config import read
    cfg = read(config_path)
    if cfg.state.backend != "postgresql":
        return None
    setup_logging(cfg.log.format, cfg.log.level)
    from .state.service import StateService
    state = StateService(cfg)
    state.open()
    return state


async def _with_state(state: Any, runtime: Runtime, main: Any) -> int:
    await state.start(runtime)
    try:
        return await main
    finally:
        await state.stop()


def run(config_path: Path) -> int:
    """Load the config (fatal if bad), set up logging, serve."""
    state = open_state(config_path)
    runtime = Runtime.load(config_path, nfs_factory=nfs_factory,
                           inventory_source=state.inventory_source if state is not None else None,
                           inventory_writer=state.edit_inventory if state is not None else None)
    setup_logging(runtime.config.log.format, runtime.config.log.level)
    runtime.check_start()           # what a boot needs (sidusd/preflight.py); ConfigError if fatal
    if runtime.config.nfs.backend == "none":
        runtime._nfs_factory = None
    if runtime.config.security.privsep:
        # root supervisor + unprivileged network worker (sidusd/privsep, docs/security.md)
        from .privsep.supervisor import serve as serve_split
        main = serve_split(runtime)
    else:
        # one process: the TFTP pushers are forked here, before the event loop (as the worker does)
        from .net import tftp_pusher, tftp_pushers
        main = serve(runtime, tftp_pushers.start(runtime.config, get_logger("daemon"), tftp_pusher.main))
    return asyncio.run(main if state is None else _with_state(state, runtime, main))
