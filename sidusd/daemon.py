"""Composition root: build the runtime and the services, run until SIGTERM.

* SIGTERM / SIGINT: stop accepting, let TFTP transfers in flight finish (bounded
  grace), close the control socket, exit 0.
* SIGHUP: reload (the same as `sidusctl reload`); a bad config is refused and
  the old one keeps serving.
* systemd: ``Type=notify`` is supported (READY=1 once every listener is bound,
  RELOADING=1 / READY=1 around a reload, STOPPING=1).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path
from typing import Any

from .errors import SidusError, StartupError
from .observability import get_logger, setup_logging
from .runtime import Runtime

STOP_GRACE_S = 10.0


def sd_notify(state: str) -> None:
    """Tell systemd about our state if it is listening (sd_notify(3) protocol)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError:
        pass


def build_services(runtime: Runtime) -> dict[str, Any]:
    """The network services the config asks for, not yet started."""
    services: dict[str, Any] = {}
    cfg = runtime.config
    if cfg.dhcp.mode != "off":
        from .net.dhcp_server import DhcpService
        services["dhcp"] = DhcpService(runtime)
    if cfg.tftp.enabled:
        from .net.tftp_server import TftpService
        services["tftp"] = TftpService(runtime)
    if cfg.http.enabled:
        from .net.http_server import HttpService
        services["http"] = HttpService(runtime)
    return services


def nfs_factory(config: Any) -> Any:
    from .storage.nfs import NfsManager
    from .storage.runner import Runner
    return NfsManager(config, Runner())


async def serve_signals(runtime: Runtime, stop: asyncio.Event, log: Any, **ready: Any) -> None:
    """Serve until SIGTERM/SIGINT: SIGHUP reloads (sd_notify around it), ``daemon.ready``
    (with ``ready``) and READY=1 first, STOPPING=1 last; the handlers are removed on return."""
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task] = set()

    async def do_reload() -> None:
        sd_notify("RELOADING=1")
        await runtime.reload()
        sd_notify("READY=1")

    def on_hup() -> None:
        t = loop.create_task(do_reload())
        reloads.add(t)
        t.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    log.info("daemon.ready", pid=os.getpid(), config=str(runtime.config_path), **ready)
    sd_notify("READY=1")
    await stop.wait()
    sd_notify("STOPPING=1")
    log.info("daemon.stopping")
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)


async def serve(runtime: Runtime) -> int:
    """Run the daemon until a stop signal.  Returns the exit code."""
    log = get_logger("daemon")
    stop = asyncio.Event()
    services = build_services(runtime)
    from .control.server import ControlServer
    control = ControlServer(runtime, services)
    started: list[Any] = []
    try:
        for name, svc in services.items():
            await svc.start()
            started.append(svc)
        await control.start()
        started.append(control)
    except (SidusError, OSError) as exc:
        log.error("startup.failed", error=str(exc))
        for svc in reversed(started):
            await _stop(svc)
        return 1

    await runtime.apply_backends()

    listeners = [l for svc in services.values() for l in svc.listeners()]
    await serve_signals(runtime, stop, log, listeners=listeners)
    for svc in reversed(started):
        await _stop(svc)
    await runtime.stop_watchers()
    log.info("daemon.stopped")
    return 0


async def _stop(svc: Any) -> None:
    try:
        if hasattr(svc, "active_transfers"):
            await svc.stop(grace_s=STOP_GRACE_S)
        else:
            await svc.stop()
    except Exception as exc:  # stopping must reach every service
        get_logger("daemon").error("stop.failed", service=type(svc).__name__, error=str(exc))


def run(config_path: Path) -> int:
    """Load the config (fatal if bad), set up logging, serve."""
    runtime = Runtime.load(config_path, nfs_factory=nfs_factory)
    setup_logging(runtime.config.log.format, runtime.config.log.level)
    if runtime.config.nfs.backend == "none":
        runtime._nfs_factory = None
    if runtime.config.security.privsep:
        # root supervisor + unprivileged network worker (sidusd/privsep, docs/security.md)
        from .privsep.supervisor import serve as serve_split
        return asyncio.run(serve_split(runtime))
    return asyncio.run(serve(runtime))
