"""What both process layouts share: the services built from their :class:`ServiceIO`, the signals.

:func:`build_services` is called by :func:`sidusd.daemon.serve` with
:func:`sidusd.net.io.local_io` (one process) and by the privilege-separated
worker with its RPC-backed ServiceIO (:mod:`sidusd.privsep.rpc`).
:func:`serve_signals` and :func:`sd_notify` run the daemon's life in the
single process and in the supervisor alike.  Nothing here imports
:mod:`sidusd.daemon` or :mod:`sidusd.privsep`, so neither imports the other.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from typing import Any

from .net.io import ServiceIO
from .observability import get_logger

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


def build_services(runtime: Any, io: ServiceIO) -> dict[str, Any]:
    """The network services the config asks for, built on ``io``, not yet started."""
    services: dict[str, Any] = {}
    cfg = runtime.config
    if cfg.dhcp.mode != "off":
        from .net.dhcp_server import DhcpService
        services["dhcp"] = DhcpService(runtime, io=io)
        if cfg.dhcp.ipv6_no_router:
            from .net.ra import RaService
            services["ra"] = RaService(runtime, io=io)
    if cfg.tftp.enabled:
        from .net.tftp_server import TftpService
        services["tftp"] = TftpService(runtime, io=io)
    if cfg.http.enabled:
        from .net.http_server import HttpService
        services["http"] = HttpService(runtime, io=io)
    return services


async def stop_service(svc: Any, grace_s: float = STOP_GRACE_S) -> None:
    """Stop one service (transfers in flight get ``grace_s``); a failure is logged, never raised."""
    try:
        if hasattr(svc, "active_transfers"):
            await svc.stop(grace_s=grace_s)
        else:
            await svc.stop()
    except Exception as exc:  # stopping must reach every service
        get_logger("daemon").error("stop.failed", service=type(svc).__name__, error=str(exc))


async def serve_signals(runtime: Any, stop: asyncio.Event, log: Any, services: dict[str, Any] | None = None,
                        **ready: Any) -> None:
    """Serve until SIGTERM/SIGINT: SIGHUP reloads (sd_notify around it), ``daemon.ready``
    (with ``ready``) and READY=1 first, STOPPING=1 last; the handlers are removed on return.
    The monitoring (boot history, metrics endpoint: :mod:`sidusd.monitoring`) runs meanwhile,
    reading ``services`` for the transfers in flight."""
    from .monitoring import Monitoring
    loop = asyncio.get_running_loop()
    monitoring = Monitoring(runtime, services or {})
    await monitoring.start()
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
    await monitoring.stop()
